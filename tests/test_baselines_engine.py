"""The training-free baselines (FastV, PyramidDrop, random, uniform): their scores against direct
computations from a plain forward, exact per-sample budgets through the inference engine (padding and
different prompt lengths), and engine prefill ≡ the masked teacher-forcing forward (`eval.teacher`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.common import model_config
from configs.dynllava import get_config
from dynllava_jax.decode.prefill import prefill
from dynllava_jax.eval import teacher
from dynllava_jax.model.attention import dot_attention
from dynllava_jax.model.llava import Llava, dense_allowed, positions_from_mask
from dynllava_jax.sparsity.base import ScoreContext
from dynllava_jax.sparsity.fastv import FastV
from dynllava_jax.sparsity.pyramid_drop import PyramidDrop
from dynllava_jax.sparsity.random_keep import RandomKeep
from dynllava_jax.sparsity.registry import make_sparsifier
from dynllava_jax.sparsity.uniform import UniformKeep, stride_table

# (layer a drop is entered at, image tokens kept from there on); tiny: 4 layers, 64 image tokens.
CASES = [('fastv', dict(k=2, r=0.75), [(2, 16)], True),
         ('pdrop', {}, [(1, 32), (2, 16), (3, 8)], True),
         ('random', {}, [(1, 12)], False),
         ('uniform', {}, [(1, 12)], False)]


@pytest.fixture(scope='module')
def setup():
  cfg = get_config('size=tiny')
  model = nnx.jit(lambda: Llava(cfg.model, rngs=nnx.Rngs(3)))()
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

  @nnx.jit
  def hidden(model, ids, pix, mask):
    """Hidden states entering every layer 0..L of the plain dense forward (right-padded batch)."""
    h, image_mask = model.embed(ids, pix)
    pos, allowed = positions_from_mask(mask), dense_allowed(mask)
    hs = [h]
    for i in range(model.mc.llm.layers):
      hs.append(model.language_model.run_layers(hs[-1], pos, allowed, start=i, stop=i + 1))
    return hs, image_mask, pos

  hs, image_mask, pos = hidden(model, jnp.asarray(right), jnp.asarray(pix), jnp.asarray(rmask))
  return dict(cfg=cfg, model=model, left=(left, lmask), right=(right, rmask), pix=pix, last=last, hs=hs,
              image_mask=image_mask, pos=pos)


def _ctx(s, layer, with_prev=True, rng=None):
  return ScoreContext(h=s['hs'][layer], h_prev=s['hs'][layer - 1] if (with_prev and layer) else None,
                      positions=s['pos'], valid=jnp.asarray(s['right'][1]).astype(bool),
                      image_mask=s['image_mask'], last_index=jnp.asarray(s['last']), layer=layer,
                      model=s['model'], rng=rng)


def _direct_last_row(s, layer_index):
  """The plain forward's attention probabilities in layer `layer_index`, last token's row, head mean."""
  layer = s['model'].language_model.layer_at(layer_index)
  mask = jnp.asarray(s['right'][1])
  x = layer.input_norm(s['hs'][layer_index])
  q, (k, v) = layer.attn.q(x, s['pos']), layer.attn.kv(x, s['pos'])
  _, p = dot_attention(q, k, v, dense_allowed(mask), return_probs=True)      # (B, Hq, T, T)
  return p[jnp.arange(p.shape[0]), :, jnp.asarray(s['last'])].mean(axis=1)


def _topk_sets(scores, image_mask, k):
  sc = np.where(np.asarray(image_mask), np.asarray(scores), -np.inf)
  return [set(np.argsort(-row, kind='stable')[:k].tolist()) for row in sc]


def test_fastv_ranking_equals_plain_forward_attention(setup):
  m = FastV(k=2, r=0.75)
  assert m.drop_points(setup['cfg'].model) == (2,)
  (k,) = m.keep_counts(64)
  assert k == 16 and FastV(3, 0.75).keep_counts(576) == (144,)
  ctx = _ctx(setup, 2)
  scores = m.score(0, ctx)
  direct = _direct_last_row(setup, 1)
  np.testing.assert_allclose(np.asarray(scores), np.asarray(direct), atol=1e-6)
  assert _topk_sets(scores, ctx.image_mask, k) == _topk_sets(direct, ctx.image_mask, k)
  with pytest.raises(ValueError, match='h_prev'):
    m.score(0, _ctx(setup, 2, with_prev=False))
  with pytest.raises(ValueError, match='K=0'):
    FastV(0, 0.5)


def test_pdrop_scores_use_the_next_layer_and_schedule(setup):
  m = PyramidDrop()
  assert m.drop_points(setup['cfg'].model) == (1, 2, 3)                # 4 layers · {1/4, 1/2, 3/4}
  assert m.drop_points(model_config('7b')) == (8, 16, 24)
  assert m.keep_counts(576) == (288, 144, 72)
  np.testing.assert_allclose(np.asarray(m.score(1, _ctx(setup, 2))), np.asarray(_direct_last_row(setup, 2)),
                             atol=1e-6)
  with pytest.raises(ValueError, match='strictly increasing'):
    PyramidDrop(layers=(2, 2, 3)).drop_points(setup['cfg'].model)


def test_random_and_uniform_sets(setup):
  r, u = RandomKeep(sparse_layer=1, keep_ratio=0.2), UniformKeep(sparse_layer=1, keep_ratio=0.2)
  assert r.keep_counts(64) == u.keep_counts(64) == (12,) and r.keep_counts(576) == (115,)
  ctx = _ctx(setup, 1)
  im = np.asarray(ctx.image_mask)
  table = stride_table(64, 12)
  for b, chosen in enumerate(_topk_sets(u.score(0, ctx), im, 12)):
    assert chosen == set(np.nonzero(im[b])[0][table].tolist())
  a = _topk_sets(r.score(0, _ctx(setup, 1, rng=jax.random.key(3))), im, 12)
  assert _topk_sets(r.score(0, _ctx(setup, 1, rng=jax.random.key(7))), im, 12) != a
  assert all(len(s) == 12 and s <= set(np.nonzero(im[b])[0].tolist()) for b, s in enumerate(a))


@pytest.mark.parametrize('name,kw,schedule,check_teacher', CASES)
def test_engine_budget_and_masked_equivalence(setup, name, kw, schedule, check_teacher):
  cfg, model, pix, last = setup['cfg'], setup['model'], setup['pix'], setup['last']
  (left, lmask), (right, rmask) = setup['left'], setup['right']
  method = make_sparsifier(name, cfg, **kw)
  assert method.name == name
  rng = jax.random.key(0)
  out = prefill(model, cfg, method, left, pix, lmask, rng=rng).out
  # Image tokens present in every segment after a drop, per sample (all three prompts hold an image).
  got = [(seg.start, np.asarray(seg.image.sum(-1)).tolist()) for seg in out.segments[1:]]
  assert got == [(layer, [k] * 3) for layer, k in schedule], (name, got)
  if check_teacher:
    logits, _ = jax.jit(lambda m, i, p, a, l: teacher.pruned_forward(m, method, i, p, a, l, rng))(
        model, jnp.asarray(right), jnp.asarray(pix), jnp.asarray(rmask), jnp.asarray(last))
    ours = np.asarray(logits)[np.arange(3), last]
    np.testing.assert_allclose(ours, np.asarray(out.logits_last), atol=2e-4, rtol=1e-4)
