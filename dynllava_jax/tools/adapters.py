"""LoRA adapters on their own: the small file a region-LoRA run needs beside its base checkpoint.

    save_adapters(out_dir, model, mc, base)      # adapters.npz + adapter_config.json (base dir, config)
    model, mc = load_adapters(out_dir)           # base loaded (HF / released or convert.py dir), adapters
                                                 # applied (unmerged)

Here, not in model/lora.py, because loading the base needs `hf` / `convert`, which import model/lora.py.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynllava_jax.errors import UserError
from dynllava_jax.model.lora import adapter_params, rebuild

ADAPTERS = 'adapters'
ADAPTER_META = 'adapter_config.json'


def save_adapters(out_dir, model, mc, base):
  """Writes the adapters (adapters.npz: path -> array) and adapter_config.json {base, model config} to
  out_dir. base: the base weights' directory (a `dynllava_jax.convert` orbax dir or an HF checkpoint)."""
  ad = adapter_params(model)
  if not ad:
    raise UserError('save_adapters: the model has no LoRA layers (model.region_train / layer_plan lora<r>)')
  os.makedirs(out_dir, exist_ok=True)
  np.savez(os.path.join(out_dir, ADAPTERS + '.npz'), **ad)
  with open(os.path.join(out_dir, ADAPTER_META), 'w') as f:
    json.dump({'base': os.path.abspath(base), 'model_config': json.loads(mc.to_json_best_effort())}, f,
              indent=2)
  return out_dir


def load_adapters(adapter_dir):
  """-> (model with the base weights and the adapters, unmerged; its model config)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  meta_path = os.path.join(adapter_dir, ADAPTER_META)
  if not os.path.exists(meta_path):
    raise UserError(f'{meta_path} not found: {adapter_dir} was not written by save_adapters')
  with open(meta_path) as f:
    meta = json.load(f)
  mc = ml_collections.ConfigDict(meta['model_config'])
  base = meta['base']
  if os.path.exists(os.path.join(base, 'config.json')):
    from dynllava_jax import hf  # pylint: disable=g-import-not-at-top
    base_model, _ = hf.load_llava(base, dtype=mc.param_dtype)
  else:
    from dynllava_jax import convert  # pylint: disable=g-import-not-at-top
    base_model, _ = convert.load_params(base)
  model = rebuild(base_model, mc)
  with np.load(os.path.join(adapter_dir, ADAPTERS + '.npz')) as f:
    ad = {k: f[k] for k in f.files}
  state = nnx.state(model, nnx.LoRAParam)
  flat = dict(nnx.to_flat_state(state))
  keys = {'/'.join(str(k) for k in p): p for p in flat}
  if set(keys) != set(ad):
    raise UserError(f'{adapter_dir}: adapters {sorted(set(ad) ^ set(keys))[:3]} do not match the model config')
  for name, p in keys.items():
    flat[p].set_value(jnp.asarray(ad[name], flat[p].get_value().dtype))
  nnx.update(model, nnx.from_flat_state(flat))
  return model, mc
