"""A params directory: the orbax StandardCheckpointer dir of `nnx.state(model, nnx.Param)` (pure dict)
with `model_config.json` (the model ConfigDict) inside it — what `python -m dynllava_jax.convert` writes
on import and `train.init_from` reads. (Re-exported by `dynllava_jax.convert`.)
"""
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from dynllava_jax import hf
from dynllava_jax.model.llava import check_model_config

CONFIG_NAME = 'model_config.json'


def save_params(model, config, ckpt_dir):
  """Writes the params (orbax) and `model_config.json` into ckpt_dir (which must not exist yet)."""
  ckpt_dir = os.path.abspath(ckpt_dir)
  if os.path.exists(ckpt_dir):
    raise FileExistsError(f'{ckpt_dir} exists: choose a new --out directory')
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(ckpt_dir, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  ckptr.wait_until_finished()
  with open(os.path.join(ckpt_dir, CONFIG_NAME), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  return ckpt_dir


def read_model_config(ckpt_dir):
  full = os.path.join(os.path.abspath(ckpt_dir), CONFIG_NAME)
  if not os.path.exists(full):
    raise FileNotFoundError(f'{full} not found: {ckpt_dir} was not written by dynllava_jax.convert')
  with open(full) as f:
    c = ml_collections.ConfigDict(json.load(f))
  check_model_config(c)
  return c


def load_params(ckpt_dir, *, shardings=None, mesh=None):
  """-> (nnx Llava, model config) from a `save_params` directory; params restored into their shardings."""
  config = read_model_config(ckpt_dir)
  graphdef, state = nnx.split(hf.abstract_llava(config), nnx.Param)
  if mesh is not None and shardings is None:
    from dynllava_jax.sharding import state_shardings
    shardings = state_shardings(mesh, state)
  abstract = nnx.to_pure_dict(state)
  if shardings is not None:
    sh = nnx.to_pure_dict(shardings) if isinstance(shardings, nnx.State) else shardings
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, sh)
  restored = ocp.StandardCheckpointer().restore(os.path.abspath(ckpt_dir), abstract)
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state), config
