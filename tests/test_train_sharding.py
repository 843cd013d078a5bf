"""Sharded ≡ single device: 3 train steps on a (data 2, fsdp 2, tensor 2) mesh of 8 CPU devices give the same
params as on 1 device; every parameter above 1 MB is sharded on the fsdp axis."""
import jax
import numpy as np

from dynllava_jax.train import loop
from test_train_forward import small_config, synthetic_batch

# Tolerance: fp32, 3 AdamW steps at lr 1e-3; the only difference is the order of sharded reductions.
# Adam divides each update by sqrt(v), so a param whose gradient is at rounding-noise level can move by a
# different fraction of lr: all params within ATOL = lr / 10 (= 1e-4), and all but 1e-4 of them within 1e-6.
ATOL, TIGHT, TIGHT_FRACTION = 1e-4, 1e-6, 1e-4


def config():
  c = small_config(image_keep_ratio=0.5)
  c.model.llm.vocab_size = 4096       # embed_tokens and lm_head: 4096 x 128 x 4 B = 2 MiB each
  c.data.batch_size = 8
  t = c.train
  t.steps, t.dense_warmup_steps, t.lr, t.predictor_lr, t.warmup_ratio = 3, 0, 1e-3, 1e-3, 0.0
  t.grad_accum = 2
  return c


def batches(c):
  out = []
  for i in range(3):
    parts = [synthetic_batch(c, seed=10 * i + j) for j in range(4)]
    out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
  return out


def run(devices, mesh, tmp_path, init=None):
  """3 steps; `init` (a state from another mesh) is moved into this mesh's shardings instead of a new init."""
  c = config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  tr = loop.Trainer(c, str(tmp_path), devices)
  state = tr.init_state() if init is None else jax.device_put(jax.device_get(init), tr.shardings)
  first = jax.device_get(state) if init is None else None
  losses = []
  with jax.set_mesh(tr.mesh):
    for i, b in enumerate(batches(c)):
      state, m = tr.step_fn(i)(state, loop.to_device(b, tr.batch_sharding))
      losses.append(float(m['loss']))
  return state, losses, first


def test_sharded_equals_single_device(tmp_path):
  devs = jax.devices()
  assert len(devs) == 8
  s8, l8, init = run(devs, (2, 2, 2), tmp_path / 'a')
  s1, l1, _ = run(devs[:1], (1, 1, 1), tmp_path / 'b', init=init)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  p8, p1 = jax.device_get(s8['params']), jax.device_get(s1['params'])
  diffs = np.concatenate([np.abs(a - b).ravel() for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1))])
  assert diffs.max() < ATOL, diffs.max()
  assert np.mean(diffs > TIGHT) < TIGHT_FRACTION, np.mean(diffs > TIGHT)
  big = 0
  for tree in (s8['params'], s8['frozen'], s8['opt_state']):
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if x.nbytes > 2 ** 20:
        big += 1
        axes = [a for s in x.sharding.spec if s for a in ((s,) if isinstance(s, str) else s)]
        assert 'fsdp' in axes, (jax.tree_util.keystr(path), x.sharding.spec)
        assert len(x.addressable_shards[0].data.ravel()) < x.size, jax.tree_util.keystr(path)
  assert big >= 6       # embed_tokens + lm_head, and their two Adam moments
