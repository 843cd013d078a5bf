"""Baseline scoring functions (FastV, PyramidDrop, random, uniform) against direct computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.dynllava import get_config
from dynllava_jax.model.attention import dot_attention
from dynllava_jax.model.llava import Llava, dense_allowed, positions_from_mask
from dynllava_jax.sparsity.base import ScoreContext
from dynllava_jax.sparsity.fastv import FastV, decoder_layer
from dynllava_jax.sparsity.pyramid_drop import PyramidDrop
from dynllava_jax.sparsity.random_keep import RandomKeep
from dynllava_jax.sparsity.uniform import UniformKeep, stride_table


@pytest.fixture(scope='module')
def setup():
  cfg = get_config('size=tiny')
  model = Llava(cfg.model, rngs=nnx.Rngs(0))
  n = model.num_image_tokens
  rng = np.random.default_rng(0)
  lens = [n + 9, n + 4]                       # two prompt lengths, right padded (packed)
  t = max(lens)
  ids = np.full((2, t), cfg.model.pad_token_id, np.int32)
  mask = np.zeros((2, t), np.int32)
  for b, ln in enumerate(lens):
    pre = 2 + b
    row = np.concatenate([[1] + list(rng.integers(5, 200, pre - 1)), [cfg.model.image_token_id] * n,
                          rng.integers(5, 200, ln - n - pre)])
    ids[b, :ln] = row
    mask[b, :ln] = 1
  pix = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
  return cfg, model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pix), np.asarray(lens) - 1


def _ctx(model, ids, mask, pix, last, layer, with_prev):
  h, image_mask = model.embed(ids, pix)
  pos = positions_from_mask(mask)
  allowed = dense_allowed(mask)
  lm = model.language_model
  h_prev = lm.run_layers(h, pos, allowed, stop=layer - 1) if layer >= 1 else None
  h_cur = lm.run_layers(h, pos, allowed, stop=layer)
  return ScoreContext(h=h_cur, h_prev=h_prev if with_prev else None, positions=pos, valid=mask.astype(bool),
                      image_mask=image_mask, last_index=jnp.asarray(last), layer=layer, model=model,
                      rng=jax.random.key(1))


def _direct_last_row(model, h, pos, mask, last, layer_index):
  """Plain forward's attention probabilities of layer `layer_index`, row of the last token, head mean."""
  layer = decoder_layer(model, layer_index)
  q, k, v = layer.attn.qkv(layer.input_norm(h), pos)
  _, p = dot_attention(q, k, v, dense_allowed(mask), return_probs=True)      # (B, Hq, T, T)
  rows = p[jnp.arange(p.shape[0]), :, jnp.asarray(last)]                       # (B, Hq, T)
  return rows.mean(axis=1)


def _topk_sets(scores, image_mask, k):
  s = np.where(np.asarray(image_mask), np.asarray(scores), -np.inf)
  return [set(np.argsort(-row, kind='stable')[:k].tolist()) for row in s]


def test_fastv_ranking_equals_plain_forward_attention(setup):
  cfg, model, ids, mask, pix, last = setup
  m = FastV(k=2, r=0.75)
  assert m.drop_points(cfg.model) == (2,)
  (k,) = m.keep_counts(model.num_image_tokens)
  assert k == 16
  ctx = _ctx(model, ids, mask, pix, last, 2, True)
  scores = m.score(0, ctx)
  direct = _direct_last_row(model, ctx.h_prev, ctx.positions, mask, last, 1)
  np.testing.assert_allclose(np.asarray(scores), np.asarray(direct), atol=1e-6)
  assert _topk_sets(scores, ctx.image_mask, k) == _topk_sets(direct, ctx.image_mask, k)
  with pytest.raises(ValueError, match='h_prev'):
    m.score(0, _ctx(model, ids, mask, pix, last, 2, False))


def test_pdrop_scores_use_next_layer_and_schedule(setup):
  cfg, model, ids, mask, pix, last = setup
  m = PyramidDrop()
  assert m.drop_points(cfg.model) == (1, 2, 3)                    # 4 layers · {1/4, 1/2, 3/4}
  assert m.keep_counts(576) == (288, 144, 72)
  from configs.common import model_config
  assert m.drop_points(model_config('7b')) == (8, 16, 24)
  ctx = _ctx(model, ids, mask, pix, last, 2, False)
  scores = m.score(1, ctx)
  direct = _direct_last_row(model, ctx.h, ctx.positions, mask, last, 2)
  np.testing.assert_allclose(np.asarray(scores), np.asarray(direct), atol=1e-6)
  with pytest.raises(ValueError, match='strictly increasing'):
    PyramidDrop(layers=(2, 2, 3)).drop_points(cfg.model)


def test_random_and_uniform_budget_and_sets(setup):
  cfg, model, ids, mask, pix, last = setup
  n = model.num_image_tokens
  r = RandomKeep(sparse_layer=1, keep_ratio=0.2)
  u = UniformKeep(sparse_layer=1, keep_ratio=0.2)
  assert r.keep_counts(n) == u.keep_counts(n) == (12,)            # ⌊64·0.2⌋
  assert r.keep_counts(576) == (115,)
  ctx = _ctx(model, ids, mask, pix, last, 1, False)
  (k,) = u.keep_counts(n)
  im = np.asarray(ctx.image_mask)
  table = stride_table(n, k)
  for b, chosen in enumerate(_topk_sets(u.score(0, ctx), im, k)):
    img_idx = np.nonzero(im[b])[0]
    assert chosen == set(img_idx[table].tolist())
  a = _topk_sets(r.score(0, ctx), im, k)
  ctx2 = ScoreContext(**{**ctx.__dict__, 'rng': jax.random.key(7)})
  assert _topk_sets(r.score(0, ctx2), im, k) != a
  assert all(len(s) == k and s <= set(np.nonzero(im[b])[0].tolist()) for b, s in enumerate(a))
