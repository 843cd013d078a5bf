"""Sparsified prefill ≡ masked-attention forward with the same keep set; bad requests; the registry."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.dynllava import get_config
from dynllava_jax.decode.prefill import prefill
from dynllava_jax.model.llava import Llava, dense_allowed, positions_from_mask
from dynllava_jax.sparsity import registry
from dynllava_jax.sparsity.base import Sparsifier
from dynllava_jax.sparsity.dynamic import DynamicSparsifier


def small_config(dense=False, **eval_overrides):
  """tiny, shrunk: 32×32 images (16 image tokens), 3 decoder layers, sparse_layer 1, keep 4 of 16."""
  cfg = get_config(f'size=tiny,dense={dense}')
  mc = cfg.model
  mc.vision.image_size, mc.vision.depth = 32, 2
  mc.llm.layers, mc.llm.hidden, mc.llm.heads, mc.llm.kv_heads, mc.llm.mlp_dim = 3, 64, 4, 2, 128
  mc.llm.head_dim = 16
  s = mc.sparse
  s.d_model, s.nhead, s.dim_feedforward, s.num_layers, s.sparse_layer = 32, 4, 64, 1, 1
  s.image_keep_ratio = 0.25
  cfg.eval.prefill_bucket, cfg.eval.cache_bucket = 8, 8
  cfg.eval.update(eval_overrides)
  return cfg


def make_model(cfg, seed=0, scale=3.0, pred_scale=30.0):
  """Random model; weights scaled so greedy outputs vary and predictor decisions are far from ties."""
  model = Llava(cfg.model, rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)

  def f(path, x):
    name = '/'.join(str(p) for p in path)
    if 'norm' in name or '_ln' in name or name.endswith('ln/weight') or 'bias' in name:
      return x
    if 'head_3' in name or 'fc_4' in name:
      return x * pred_scale
    return x * scale

  nnx.update(model, jax.tree_util.tree_map_with_path(f, state))
  return model


def make_batch(cfg, specs, seed=0):
  """specs: (length, n_text_before_image or None for text-only, 'left'|'right'). -> ids, pix, mask."""
  mc = cfg.model
  n = (mc.vision.image_size // mc.vision.patch_size) ** 2
  rng = np.random.default_rng(seed)
  t = max(s[0] for s in specs) + 3
  ids = np.full((len(specs), t), mc.pad_token_id, np.int32)
  mask = np.zeros((len(specs), t), np.int32)
  for b, (length, before, side) in enumerate(specs):
    text = list(rng.integers(5, mc.llm.vocab_size, length))
    row = [mc.bos_token_id] + (text[:length - 1] if before is None else
                               text[:before] + [mc.image_token_id] * n + text[before:length - 1 - n])
    sl = slice(t - len(row), t) if side == 'left' else slice(0, len(row))
    ids[b, sl], mask[b, sl] = row, 1
  pix = rng.standard_normal((len(specs), mc.vision.image_size, mc.vision.image_size, 3)).astype(np.float32)
  return ids, pix, mask


class TwoDrops(Sparsifier):
  """Test method: drops at layers 1 and 2 (keep 8 then 3 of 16), score = first hidden channel."""
  name = 'two_drops'

  def drop_points(self, model_cfg):
    return (1, 2)

  def keep_counts(self, n):
    return (8, 3)

  def score(self, i, ctx):
    return ctx.h[..., 0].astype(jnp.float32)


@pytest.fixture(scope='module')
def setup():
  cfg = small_config()
  model = make_model(cfg)
  specs = [(30, 3, 'left'), (26, 1, 'right'), (21, None, 'left'), (33, 6, 'left')]
  return cfg, model, make_batch(cfg, specs)


@partial(jax.jit, static_argnames='points')
def masked_reference(model, ids, pix, mask, points, keeps):
  """Full-length forward; layers >= points[i] use key_keep = keeps[i] (B, T) with exact-zero attention."""
  lm = model.language_model
  h, _ = model.embed(ids, pix)
  pos, allowed = positions_from_mask(mask), dense_allowed(mask)
  bounds = (0,) + tuple(points) + (model.mc.llm.layers,)
  for j in range(len(bounds) - 1):
    g = None if j == 0 else jnp.asarray(keeps[j - 1], jnp.float32)
    h = lm.run_layers(h, pos, allowed, start=bounds[j], stop=bounds[j + 1], key_keep=g, mode='exact_zero')
  return lm.head(h)


def to_original(kept_packed, mask):
  """(B, T0) packed-slot flags -> (B, T) flags in the caller's (padded) layout."""
  out = np.zeros(mask.shape, bool)
  for b in range(mask.shape[0]):
    real = np.flatnonzero(mask[b])
    out[b, real] = kept_packed[b, :len(real)]
  return out


def check_equivalence(model, cfg, method, ids, pix, mask):
  po = prefill(model, cfg, method, ids, pix, mask, return_logits=True)
  out = po.out
  kept = np.asarray(out.kept)
  points = tuple(method.drop_points(cfg.model))
  keeps = [to_original(kept[j + 1], mask) for j in range(len(points))]
  ref = np.asarray(masked_reference(model, ids, pix, mask, points, keeps))
  seg = out.segments[-1]
  got, orig, valid = np.asarray(out.logits), np.asarray(seg.orig), np.asarray(seg.valid)
  n_checked = 0
  for b in range(ids.shape[0]):
    real = np.flatnonzero(mask[b])
    for j in np.flatnonzero(valid[b]):
      np.testing.assert_allclose(got[b, j], ref[b, real[orig[b, j]]], atol=2e-4, rtol=1e-4)
      n_checked += 1
    # last-position logits are those of the last real token
    np.testing.assert_allclose(np.asarray(out.logits_last)[b], ref[b, real[-1]], atol=2e-4, rtol=1e-4)
  assert n_checked == int(np.asarray(seg.count).sum())
  return po, keeps


def test_dynamic_topk_gathered_equals_masked(setup):
  cfg, model, (ids, pix, mask) = setup
  method = registry.make_sparsifier('dynamic', cfg)
  po, keeps = check_equivalence(model, cfg, method, ids, pix, mask)
  n_img = (ids == cfg.model.image_token_id).sum(-1)
  img_kept = (keeps[0] & (ids == cfg.model.image_token_id)).sum(-1)
  # k = floor(16 * 0.25) = 4 per image sample; the text-only sample keeps everything
  np.testing.assert_array_equal(img_kept, np.where(n_img > 0, 4, 0))
  text = mask.astype(bool) & (ids != cfg.model.image_token_id)
  assert (keeps[0] | ~text).all(), 'a real text token was dropped'
  assert not (keeps[0] & ~mask.astype(bool)).any(), 'a padding slot was kept'
  seg = po.out.segments[1]
  assert np.asarray(seg.count).tolist() == (mask.sum(-1) - n_img + np.where(n_img > 0, 4, 0)).tolist()
  # the kept image tokens are the top-4 by the image predictor's keep log-prob at sparse_layer
  img_rows = np.flatnonzero(n_img)
  where = np.stack([np.flatnonzero(ids[b] == cfg.model.image_token_id) for b in img_rows])
  logp = np.asarray(_image_keep_logp(model, ids, pix, mask, img_rows, where))
  for r, b in enumerate(img_rows):
    top = where[r][np.argsort(-logp[r], kind='stable')[:4]]
    assert set(top.tolist()) == set(np.flatnonzero(keeps[0][b] & (ids[b] == cfg.model.image_token_id)).tolist())


@jax.jit
def _dense_logits(model, ids, pix, mask):
  return model(ids, pix, mask)


@jax.jit
def _image_keep_logp(model, ids, pix, mask, rows, where):
  """log p(keep) of the image predictor for the image tokens `where` (R, N) of samples `rows` (R,)."""
  lm = model.language_model
  h, _ = model.embed(ids, pix)
  h = lm.run_layers(h, positions_from_mask(mask), dense_allowed(mask), stop=model.mc.sparse.sparse_layer)
  h_img = h[rows[:, None], where]
  return jax.nn.log_softmax(model.image_score_predictor(h_img), -1)[..., 0]


def test_dynamic_argmax_and_two_drop_points(setup):
  cfg, model, (ids, pix, mask) = setup
  method = DynamicSparsifier(image=True, text=False, topk=False)
  _, keeps = check_equivalence(model, cfg, method, ids, pix, mask)
  img = ids == cfg.model.image_token_id
  kept = (keeps[0] & img).sum(-1)
  assert 0 < kept.max() < 16, f'argmax kept {kept}: the test should exercise a partial keep'
  _, keeps = check_equivalence(model, cfg, TwoDrops(), ids, pix, mask)
  np.testing.assert_array_equal((keeps[0] & img).sum(-1), np.where(img.any(-1), 8, 0))
  np.testing.assert_array_equal((keeps[1] & img).sum(-1), np.where(img.any(-1), 3, 0))
  assert not (keeps[1] & ~keeps[0]).any(), 'a token dropped at layer 1 came back at layer 2'


def test_dense_prefill_matches_model_call(setup):
  cfg, model, (ids, pix, mask) = setup
  po = prefill(model, cfg, registry.make_sparsifier('dense', cfg), ids, pix, mask)
  ref = np.asarray(_dense_logits(model, ids, pix, mask))
  last = np.array([np.flatnonzero(m)[-1] for m in mask])
  np.testing.assert_allclose(np.asarray(po.logits_last), ref[np.arange(len(last)), last], atol=2e-4, rtol=1e-4)
  assert len(po.out.segments) == 1
  # keep ratio 1: the image drop keeps every token, so the logits are the dense ones
  full = prefill(model, cfg, DynamicSparsifier(image=True, text=False, keep_ratio=1.0), ids, pix, mask)
  np.testing.assert_allclose(np.asarray(full.logits_last), ref[np.arange(len(last)), last], atol=2e-4, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(full.out.segments[1].count), mask.sum(-1))


def test_bad_requests_raise_clear_errors(setup):
  cfg, model, (ids, pix, mask) = setup
  method = registry.make_sparsifier('dynamic', cfg)
  empty = mask.copy()
  empty[1] = 0
  with pytest.raises(ValueError, match='empty prompt'):
    prefill(model, cfg, method, ids, pix, empty)
  with pytest.raises(ValueError, match='pixel_values has shape'):
    prefill(model, cfg, method, ids, pix[:, :16, :16], mask)
  with pytest.raises(ValueError, match='max_position'):
    prefill(model, cfg, method, ids, pix, mask, max_new_tokens=cfg.model.llm.max_position)
  bad = ids.copy()
  bad[0, np.flatnonzero(bad[0] == cfg.model.image_token_id)[0]] = 7
  with pytest.raises(ValueError, match='image placeholders'):
    prefill(model, cfg, method, bad, pix, mask)
  with pytest.raises(ValueError, match='pixel_values is None'):
    prefill(model, cfg, method, ids, None, mask)
  with pytest.raises(ValueError, match='unknown sparsification method'):
    registry.make_sparsifier('no_such_method', cfg)
  dense_cfg = small_config(dense=True)
  dense_model = Llava(dense_cfg.model, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='sparse.enabled'):
    prefill(dense_model, dense_cfg, method, ids, pix, mask)


def test_registry_names_and_static_hashing():
  cfg = small_config()
  names = registry.names()
  for n in ('dense', 'dynamic', 'dynamic_image', 'dynamic_text'):
    assert n in names
  a = registry.make_sparsifier('dynamic', cfg)
  b = registry.make_sparsifier('dynamic', cfg.model)
  assert a == b and hash(a) == hash(b)
  c = registry.make_sparsifier('dynamic', cfg, topk=False)
  assert a != c and c.keep_counts(576) == (None,)
  assert a.keep_counts(576) == (144,)
  assert DynamicSparsifier(keep_ratio=0.2).keep_counts(576) == (115,)
  img = registry.make_sparsifier('dynamic_image', cfg)
  txt = registry.make_sparsifier('dynamic_text', cfg)
  assert img.text_layer(cfg.model) is None and img.drop_points(cfg.model) == (1,)
  assert txt.drop_points(cfg.model) == () and txt.text_layer(cfg.model) == 1


def test_text_only_batch_shorter_than_the_image_block(setup):
  cfg, model, _ = setup
  ids, _, mask = make_batch(cfg, [(7, None, 'left'), (5, None, 'right')], seed=3)
  po = prefill(model, cfg, registry.make_sparsifier('dynamic', cfg), ids, None, mask)
  assert po.out.segments[0].valid.shape[1] < model.num_image_tokens
  ref = np.asarray(_dense_logits(model, ids, None, mask))
  last = np.array([np.flatnonzero(m)[-1] for m in mask])
  np.testing.assert_allclose(np.asarray(po.logits_last), ref[np.arange(2), last], atol=2e-4, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(po.out.segments[1].count), mask.sum(-1))


def test_query_chunked_causal_attention_is_exact():
  """dot_attention(causal_chunk=c) ≡ one block: GQA, left padding, T not a multiple of c."""
  from dynllava_jax.model.attention import causal_allowed, dot_attention
  b, t, hq, hkv, d = 2, 23, 4, 2, 8
  q, k, v = (jax.random.normal(key, (b, t, h, d)) for key, h in zip(jax.random.split(jax.random.key(0), 3),
                                                                     (hq, hkv, hkv)))
  idx = jnp.broadcast_to(jnp.arange(t), (b, t))
  valid = jnp.arange(t)[None] >= jnp.array([[0], [5]])        # sample 1 left-padded by 5
  allowed = causal_allowed(idx, idx, valid)
  ref = np.asarray(dot_attention(q, k, v, allowed))
  rows = np.asarray(valid)          # padded queries attend to nothing: their (unused) rows may differ
  for c in (1, 5, 8, 22):
    got = np.asarray(dot_attention(q, k, v, allowed, causal_chunk=c))
    np.testing.assert_allclose(got[rows], ref[rows], atol=1e-6, rtol=1e-6)
  with pytest.raises(ValueError, match='causal_chunk needs key_keep=None'):
    dot_attention(q, k, v, allowed, key_keep=jnp.ones((b, t)), causal_chunk=5)


@pytest.mark.parametrize('method', ['dense', 'dynamic'])
def test_prefill_with_query_chunks_equals_one_block(setup, method):
  """model.causal_chunk changes nothing in the prefill: last logits and every segment's K/V."""
  _, _, (ids, pix, mask) = setup
  outs = []
  for chunk in (0, 7):
    cfg = small_config()
    cfg.model.causal_chunk = chunk
    po = prefill(make_model(cfg), cfg, registry.make_sparsifier(method, cfg), ids, pix, mask)
    outs.append(po)
  a, c = outs
  np.testing.assert_allclose(np.asarray(c.logits_last), np.asarray(a.logits_last), atol=2e-5, rtol=2e-5)
  for sa, sc in zip(a.out.segments, c.out.segments):
    np.testing.assert_array_equal(np.asarray(sc.count), np.asarray(sa.count))
    for xa, xc in zip(sa.kv, sc.kv):
      np.testing.assert_allclose(np.asarray(xc), np.asarray(xa), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('method', ['dense', 'dynamic'])
def test_last_query_shortcut_equals_full_last_layer(setup, method):
  """Without return_logits the last layer runs for the last position only (`DecoderLayer.__call__` with `select`):
  same last logits and same K/V of every segment as the full last layer (return_logits=True)."""
  cfg, model, (ids, pix, mask) = setup
  m = registry.make_sparsifier(method, cfg)
  short = prefill(model, cfg, m, ids, pix, mask)
  full = prefill(model, cfg, m, ids, pix, mask, return_logits=True)
  np.testing.assert_allclose(np.asarray(short.logits_last), np.asarray(full.logits_last), atol=2e-5, rtol=2e-5)
  for a, b in zip(short.out.segments, full.out.segments):
    for xa, xb in zip(a.kv, b.kv):
      assert xa.shape == xb.shape
      np.testing.assert_allclose(np.asarray(xa), np.asarray(xb), atol=2e-5, rtol=2e-5)
