"""Loading straight into a (data 1, fsdp 8, tensor 1) mesh on 8 fake CPU devices."""
import jax
import numpy as np
from flax import nnx

from dynllava_jax import hf
from dynllava_jax.sharding import make_mesh, state_shardings
from hf_utils import flat_params, make_tiny_hf_llava

EXPECTED = {   # our parameter -> PartitionSpec from its logical names and LOGICAL_RULES
    ('language_model', 'layers', 'mlp', 'gate_proj', 'kernel'): (None, 'fsdp', 'tensor'),
    ('language_model', 'layers', 'attn', 'o_proj', 'kernel'): (None, 'tensor', 'fsdp'),
    ('language_model', 'embed_tokens', 'embedding'): ('tensor', 'fsdp'),
    ('language_model', 'lm_head', 'kernel'): ('fsdp', 'tensor'),
    ('vision_tower', 'layers', 'fc1', 'kernel'): (None, 'fsdp', 'tensor'),
    ('projector', 'linear_1', 'kernel'): (None, 'fsdp'),
}


def test_sharded_load_equals_single_device(tmp_path):
  assert len(jax.devices()) == 8
  path = make_tiny_hf_llava(tmp_path, kv_heads=2)
  single, _ = hf.load_llava(path)
  mesh = make_mesh({'data': 1, 'fsdp': 8, 'tensor': 1})
  shardings = state_shardings(mesh, nnx.state(hf.abstract_llava(hf.read_config(path))))
  sharded, _ = hf.load_llava(path, shardings=shardings)
  via_mesh, _ = hf.load_llava(path, mesh=mesh)
  via_dict, _ = hf.load_llava(path, shardings=nnx.to_pure_dict(shardings))
  for model in (sharded, via_mesh, via_dict):
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for name, spec in EXPECTED.items():
      arr = flat[name].get_value()
      got = tuple(arr.sharding.spec) + (None,) * (arr.ndim - len(arr.sharding.spec))
      assert got == spec, (name, got)
      ax = spec.index('fsdp')
      assert arr.addressable_shards[0].data.shape[ax] * 8 == arr.shape[ax], name
      assert len(arr.sharding.device_set) == 8
  a = flat_params(single)
  for other in (sharded, via_mesh, via_dict):
    b = flat_params(other)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
