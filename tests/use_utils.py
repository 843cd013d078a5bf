"""A tiny 'trained' workdir for the use-the-model tests (generate, serve, export, question files): the tiny
2-layer config (tests/train_utils.py), a train state of its exact structure with N(0, 0.3²) weights (norm
scales 1 + N(0, 0.3²): large enough that different questions get different greedy answers; filled on the host: the jitted init costs ~15 s on CPU), saved as checkpoint step 1
by the training Checkpointer, and config.json written as train.py writes it."""
import os

import numpy as np
from PIL import Image

import train_utils


def make_workdir(path, seed=0, std=0.3):
  """Writes the workdir into `path`; returns (path, config)."""
  import jax
  import jax.numpy as jnp
  from dynllava_jax import sharding as shd
  from dynllava_jax import source
  from dynllava_jax.train import checkpoint as ckpt_lib
  from dynllava_jax.train import optim
  from dynllava_jax.train import state as st
  cfg = train_utils.config({'data.data_dir': os.path.join(str(path), 'no_data')})
  cfg.seed = seed
  cfg.mesh.fsdp = -1              # all devices (8 fake CPU devices in-process, 1 in a subprocess)
  mesh = shd.make_mesh(cfg.mesh)
  tx = optim.make_optimizer(cfg.train, optim.restart_step(cfg))
  _, abstract, _ = st.state_shardings(mesh, cfg, tx)
  rng = np.random.default_rng(seed)

  def fill(path, x):
    keys = jax.tree_util.keystr(path)
    if keys.startswith(("['params']", "['frozen']")):
      v = rng.standard_normal(x.shape) * std + (1.0 if "norm" in keys else 0.0)
    elif keys.startswith("['rng']"):
      v = np.asarray(jax.random.PRNGKey(seed))
    else:
      v = np.zeros(x.shape)
    return jnp.asarray(v.astype(x.dtype))
  state = jax.tree_util.tree_map_with_path(fill, abstract)
  ck = ckpt_lib.Checkpointer(str(path), async_save=False)
  ck.save(1, state, {})
  ck.wait()
  ck.close()
  source.save_run_config(cfg, str(path))
  return str(path), cfg


def write_images(folder, n=3, size=40, seed=0):
  """n small RGB PNGs (non-square, so the pad-to-square path runs) -> their paths."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    p = os.path.join(str(folder), f'img{i}.png')
    Image.fromarray(rng.integers(0, 255, (size, size + 8 * i, 3), np.uint8)).save(p)
    out.append(p)
  return out


_SHARED = {}


def shared_workdir(tmp_path_factory):
  """One workdir per test process, shared by the test modules that use it (read-only for them)."""
  if 'wd' not in _SHARED:
    _SHARED['wd'] = make_workdir(tmp_path_factory.mktemp('use_workdir'))
  return _SHARED['wd']


def shared_export(tmp_path_factory):
  """The shared workdir exported in the HF layout (`convert --export --workdir`), once per process."""
  if 'export' not in _SHARED:
    from dynllava_jax import convert
    path, _ = shared_workdir(tmp_path_factory)
    out = str(tmp_path_factory.mktemp('use_export') / 'hf')
    assert convert.main(['--export', '--workdir', path, '--out', out, '--layout', 'hf']) == 0
    _SHARED['export'] = out
  return _SHARED['export']
