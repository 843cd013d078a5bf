"""Dynamic-LLaVA: the one "fork me" config.

    python train.py --config configs/dynllava.py:size=tiny --workdir runs/x --config.train.steps=100
    python train.py --config configs/dynllava.py:size=7b,dense=True ...

Arguments: size (tiny | bench | 7b | 13b), dense (no predictors: plain LLaVA-1.5).
Each section's defaults live beside the code that reads them (model sizes: `dynllava_jax/presets.py`); this
file picks sizes and overrides.
"""
import ml_collections

from dynllava_jax.data.config import data_defaults
from dynllava_jax.decode.config import eval_defaults
from dynllava_jax.presets import model_config, parse_arg
from dynllava_jax.train.config import train_defaults


def get_config(arg=None):
  arg = parse_arg(arg, size='tiny', dense=False)
  if arg.size not in ('tiny', 'bench', '7b', '13b'):
    raise ValueError(f'config argument size={arg.size!r} is unknown: use tiny | bench | 7b | 13b')
  c = ml_collections.ConfigDict()
  c.size = arg.size
  c.model = model_config(arg.size)
  c.model.sparse.enabled = not arg.dense
  if arg.size == 'tiny':
    s = c.model.sparse
    s.d_model, s.nhead, s.dim_feedforward, s.num_layers = 64, 4, 128, 1
    s.sparse_layer = 1
    s.len_ot = 16
  c.data = data_defaults(arg.size)
  c.train = train_defaults(arg.size)
  c.eval = eval_defaults(arg.size)
  # Mesh (data, fsdp, tensor); -1 = all remaining devices.
  c.mesh = ml_collections.ConfigDict({'data': 1, 'fsdp': -1, 'tensor': 1})
  c.seed = 0
  return c
