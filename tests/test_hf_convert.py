"""`python -m dynllava_jax.convert`: HF -> orbax -> HF, and the orbax dir is what train.init_from reads."""
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from dynllava_jax import convert, hf
from dynllava_jax.sharding import make_mesh
from dynllava_jax.train import checkpoint as train_ckpt
from hf_utils import flat_params, make_tiny_hf_llava

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_convert_roundtrip(tmp_path, capsys):
  src = make_tiny_hf_llava(tmp_path / 'hf', kv_heads=2, layout='llava15hf')
  ref, _ = hf.load_llava(src)
  ckpt = str(tmp_path / 'ckpt')
  assert convert.main(['--hf_dir', src, '--out', ckpt, '--dtype', 'bfloat16']) == 0
  assert 'params' in capsys.readouterr().out
  model, config = convert.load_params(ckpt, mesh=make_mesh({'data': 1, 'fsdp': 8, 'tensor': 1}))
  assert config.param_dtype == 'bfloat16' and config.llm.kv_heads == 2
  got, want = flat_params(model), flat_params(ref)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k].astype(ml_dtypes.bfloat16), err_msg=k)
  kernel = nnx.state(model, nnx.Param)['language_model']['layers']['mlp']['up_proj']['kernel'].get_value()
  assert 'fsdp' in tuple(kernel.sharding.spec)
  # train.init_from reads the same directory.
  abstract = nnx.to_pure_dict(nnx.state(hf.abstract_llava(config), nnx.Param))
  loaded = train_ckpt.load_params(ckpt, abstract)
  np.testing.assert_array_equal(np.asarray(loaded['projector']['linear_1']['bias']),
                                got['projector.linear_1.bias'])
  out = str(tmp_path / 'export')
  assert convert.main(['--export', '--ckpt', ckpt, '--out', out, '--layout', 'original']) == 0
  back, back_config = hf.load_llava(out, dtype=jnp.bfloat16)
  assert back_config.param_dtype == 'bfloat16'
  for k, v in flat_params(back).items():
    np.testing.assert_array_equal(v, got[k], err_msg=k)


def test_convert_errors_are_one_line(tmp_path):
  r = subprocess.run([sys.executable, '-m', 'dynllava_jax.convert', '--hf_dir', str(tmp_path), '--out',
                      str(tmp_path / 'o')], capture_output=True, text=True, cwd=ROOT,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert r.returncode == 2
  assert r.stderr.strip().count('\n') == 0 and 'model.safetensors' in r.stderr
  assert convert.main(['--export', '--ckpt', str(tmp_path), '--out', str(tmp_path / 'x')]) == 2
