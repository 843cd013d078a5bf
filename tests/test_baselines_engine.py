"""Every baseline through the inference engine: exact per-sample budgets with padding and different prompt
lengths, and the engine's prefill equals the masked teacher-forcing forward (`eval.teacher`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.dynllava import get_config
from dynllava_jax.decode.prefill import prefill
from dynllava_jax.eval import teacher
from dynllava_jax.model.llava import Llava
from dynllava_jax.sparsity.registry import make_sparsifier

# (layer a drop is entered at, image tokens kept from there on); tiny: 4 layers, 64 image tokens.
CASES = [('fastv', dict(k=2, r=0.75), [(2, 16)]),
         ('pdrop', {}, [(1, 32), (2, 16), (3, 8)]),
         ('random', {}, [(1, 12)]),
         ('uniform', {}, [(1, 12)])]


@pytest.fixture(scope='module')
def setup():
  cfg = get_config('size=tiny')
  model = Llava(cfg.model, rngs=nnx.Rngs(3))
  n = model.num_image_tokens
  rng = np.random.default_rng(1)
  rows = []
  for pre, post in [(3, 12), (5, 3), (2, 25)]:
    rows.append(np.concatenate([[1], rng.integers(5, 200, pre - 1), [cfg.model.image_token_id] * n,
                                rng.integers(5, 200, post)]).astype(np.int32))
  t = max(map(len, rows))
  left = np.full((3, t), cfg.model.pad_token_id, np.int32)
  lmask = np.zeros((3, t), np.int32)
  right, rmask = left.copy(), lmask.copy()
  for b, r in enumerate(rows):
    left[b, t - len(r):], lmask[b, t - len(r):] = r, 1
    right[b, :len(r)], rmask[b, :len(r)] = r, 1
  pix = rng.normal(size=(3, 64, 64, 3)).astype(np.float32)
  last = np.array([len(r) - 1 for r in rows], np.int32)
  return cfg, model, (left, lmask), (right, rmask), pix, last


@pytest.mark.parametrize('name,kw,schedule', CASES)
def test_budget_and_masked_equivalence(setup, name, kw, schedule):
  cfg, model, (left, lmask), (right, rmask), pix, last = setup
  method = make_sparsifier(name, cfg, **kw)
  assert method.name == name
  rng = jax.random.key(0)
  out = prefill(model, cfg, method, left, pix, lmask, rng=rng).out
  # Image tokens present in the layers of every segment, per sample (all three prompts hold an image).
  got = [(seg.start, np.asarray(seg.image.sum(-1)).tolist()) for seg in out.segments[1:]]
  want = [(layer, [k] * 3) for layer, k in schedule]
  assert got == want, (name, got)
  logits, _ = jax.jit(lambda m, i, p, a, l: teacher.pruned_forward(m, method, i, p, a, l, rng))(
      model, jnp.asarray(right), jnp.asarray(pix), jnp.asarray(rmask), jnp.asarray(last))
  ours = np.asarray(logits)[np.arange(3), last]
  np.testing.assert_allclose(ours, np.asarray(out.logits_last), atol=2e-4, rtol=1e-4)
