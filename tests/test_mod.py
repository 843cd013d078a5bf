"""VideoLLM-MoD layers (model/mod.py): routing per frame, skipped tokens untouched and invisible, the router's
gradient, r = 1 ≡ dense, the engine (routed tokens gathered) ≡ the masked forward, caches ≡ recompute, an
MoD layer's KV cache = its routed tokens, bad settings in one line."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.dynllava import get_config
from dynllava_jax.decode import cache as C
from dynllava_jax.decode.generate import generate
from dynllava_jax.decode.prefill import prefill
from dynllava_jax.errors import UserError
from dynllava_jax.eval.teacher import pruned_forward
from dynllava_jax.model import mod as M
from dynllava_jax.model.llama import full_attention
from dynllava_jax.model.llava import Llava, dense_allowed, positions_from_mask
from dynllava_jax.sparsity.base import Sparsifier
from dynllava_jax.train import forward as F

N = 16          # tokens per frame (32×32 images, 8×8 patches)
K = 4           # routed per frame: ceil(0.25 · 16)


def small_config(r=0.25, layers='interleave'):
  """4 decoder layers (MoD at 1 and 3), hidden 64, 16 tokens per frame, k = 4."""
  cfg = get_config('size=tiny,dense=1')
  mc = cfg.model
  mc.vision.image_size, mc.vision.depth, mc.vision.feature_layer = 32, 1, -1
  mc.llm.layers, mc.llm.hidden, mc.llm.heads, mc.llm.kv_heads, mc.llm.mlp_dim = 4, 64, 4, 2, 128
  mc.llm.head_dim = 16
  mc.mod.layers, mc.mod.r = layers, r
  cfg.eval.prefill_bucket, cfg.eval.cache_bucket = 8, 8
  return cfg


def make_model(cfg, seed=0):
  """Random weights without running the initializers (seconds saved per test session): matrices
  N(0, 0.06²), norm weights 1, biases 0, routers N(0, 1) (the router's own init is zero)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Llava(cfg.model, rngs=nnx.Rngs(seed))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    keys = [str(getattr(k, 'key', k)) for k in path]
    if keys[-1] == 'bias' and 'router' not in keys:
      return jnp.zeros(x.shape, x.dtype)
    if any('norm' in k or k.startswith('ln') for k in keys):
      return jnp.ones(x.shape, x.dtype)
    return jnp.asarray(rng.normal(0, 1.0 if 'router' in keys else 0.06, x.shape).astype(x.dtype))

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def frames_batch(cfg, specs, frames=2, seed=0):
  """specs: per sample (text before, n frames, text after, 'left'|'right'): BOS, text, n frames of N
  placeholders each separated by one text token, text. -> ids (B, T), pix (B, F, 32, 32, 3), mask."""
  mc = cfg.model
  rng = np.random.default_rng(seed)
  rows = []
  for before, nf, after, _ in specs:
    row = [mc.bos_token_id] + list(rng.integers(5, mc.llm.vocab_size, before))
    for f in range(nf):
      row += [mc.image_token_id] * N + ([int(rng.integers(5, 200))] if f < nf - 1 else [])
    rows.append(row + list(rng.integers(5, mc.llm.vocab_size, after)))
  t = max(len(r) for r in rows) + 2
  ids = np.full((len(rows), t), mc.pad_token_id, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for b, (row, spec) in enumerate(zip(rows, specs)):
    sl = slice(t - len(row), t) if spec[3] == 'left' else slice(0, len(row))
    ids[b, sl], mask[b, sl] = row, 1
  s = mc.vision.image_size
  pix = rng.standard_normal((len(rows), frames, s, s, 3)).astype(np.float32)
  return ids, pix, mask


SPECS = [(3, 2, 5, 'right'), (6, 1, 3, 'left'), (4, 0, 6, 'right')]


@pytest.fixture(scope='module')
def setup():
  cfg = small_config()
  model = make_model(cfg)
  ids, pix, mask = frames_batch(cfg, SPECS)
  return cfg, model, ids, pix, mask


@pytest.fixture(scope='module')
def embedded(setup):
  """(h (B, T, H), image (B, T)) of the setup batch: the jitted embedding, shared."""
  _, model, ids, pix, _ = setup
  return _embed(model, jnp.asarray(ids), jnp.asarray(pix))


@nnx.jit
def _embed(model, ids, pix):
  return model.embed(ids, pix)


def _routed_reference(model, layer_index, h, image, slots, valid):
  """numpy: text tokens, and per present frame the K tokens with the highest router score (ties: earlier)."""
  s = np.asarray(model.language_model.layer_at(layer_index).router(h))
  routed = ~np.asarray(image)
  for b in range(h.shape[0]):
    for f in range(slots.shape[1]):
      if valid[b, f]:
        sl = np.asarray(slots[b, f])
        order = sorted(range(N), key=lambda j: (-s[b, sl[j]], j))[:K]
        routed[b, sl[order]] = True
  return routed


def test_one_mod_layer_routes_per_frame_and_skipped_tokens_are_untouched(setup, embedded):
  """The routed set is the router's top k per frame; skipped tokens pass unchanged and are not keys (a
  change to a skipped token's state changes no other token's output); routed vision tokens get
  h + (1 + α·tanh s)·(f(h) − h)."""
  cfg, model, ids, pix, mask = setup
  h, image = embedded
  route = M.make_route(cfg.model, image, N, 2)
  pos = positions_from_mask(jnp.asarray(mask))
  attend = full_attention(dense_allowed(jnp.asarray(mask)))
  layer = model.language_model.layer_at(1)
  run = jax.jit(lambda h: layer(h, pos, attend, route=route, layer=1)[0])
  out = np.asarray(run(h))
  routed = _routed_reference(model, 1, h, image, np.asarray(route.slots), np.asarray(route.valid))
  assert routed[np.asarray(image)].sum() == 3 * K           # 2 + 1 frames present
  skipped = ~routed
  np.testing.assert_array_equal(out[skipped], np.asarray(h)[skipped])
  moved = np.abs(out - np.asarray(h)).max(-1) > 0
  assert moved[routed & (mask > 0)].all()
  # a skipped token is no key: perturbing it (lowering its router score, so it stays skipped) changes nothing
  kern = layer.router.kernel[...][:, 0]
  bump = jnp.where(jnp.asarray(skipped)[..., None], -3.0 * kern / jnp.linalg.norm(kern), 0.0)
  out2 = np.asarray(run(h + bump))
  real_routed = routed & (mask > 0)          # (a padding row has no allowed key: it averages every value)
  np.testing.assert_allclose(out2[real_routed], out[real_routed], rtol=0, atol=1e-6)
  # the update of a routed vision token is weighted by 1 + α·tanh(s); text tokens get the dense body's
  s = np.asarray(layer.router(h))
  dense = np.asarray(jax.jit(lambda h: layer(h, pos, full_attention(
      dense_allowed(jnp.asarray(mask)) & jnp.asarray(routed)[:, None, :]))[0])(h))
  w = 1 + 0.2 * np.tanh(s)
  rv = routed & np.asarray(image)
  want = np.asarray(h) + w[..., None] * (dense - np.asarray(h))
  np.testing.assert_allclose(out[rv], want[rv], rtol=1e-5, atol=1e-5)
  rt = routed & ~np.asarray(image) & (mask > 0)
  np.testing.assert_allclose(out[rt], dense[rt], rtol=1e-6, atol=1e-6)
  # training's gathered form (the routed real tokens in T − F·(N − k) slots) equals the masked one; with
  # too few slots for a sample it falls back to the masked form
  # (values and the router's gradient)
  real = mask > 0
  graphdef, router, rest = nnx.split(layer, lambda p, _: 'router' in p, ...)

  def value_and_router_grad(rt):
    def f(router):
      o = nnx.merge(graphdef, router, rest)(h, pos, attend, route=rt, layer=1)[0]
      return jnp.sum(jnp.where(jnp.asarray(real)[..., None], o, 0.0) ** 2), o
    (_, o), g = jax.jit(jax.value_and_grad(f, has_aux=True))(router)
    return np.asarray(o), np.asarray(nnx.to_pure_dict(g)['router']['kernel'])

  _, g_masked = value_and_router_grad(route)
  for size in (ids.shape[1] - 2 * (N - K), 8):
    got, g = value_and_router_grad(dataclasses.replace(route, gather=size, real=jnp.asarray(real)))
    np.testing.assert_allclose(got[real], out[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g, g_masked, rtol=1e-4, atol=1e-4 * np.abs(g_masked).max())


def test_r1_with_the_init_router_equals_dense(setup, embedded):
  """r = 1 routes every token and the zero-init router weighs every update 1: the MoD layer is the dense
  layer."""
  cfg, model, ids, pix, mask = setup
  h, image = embedded
  route = dataclasses.replace(M.make_route(cfg.model, image, N, 2), k=N)
  graphdef, state = nnx.split(model.language_model.layer_at(1))
  state = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if 'router' in str(p) else x, state)
  layer = nnx.merge(graphdef, state)
  m = jnp.asarray(mask)
  args = (positions_from_mask(m), full_attention(dense_allowed(m)))
  got = jax.jit(lambda h: layer(h, *args, route=route, layer=1)[0])(h)
  want = jax.jit(lambda h: layer(h, *args)[0])(h)
  real = mask > 0
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-6, atol=1e-6)


def test_router_gets_gradient_through_the_update_weight(setup):
  """The training forward (train/forward.py) routes; the CE's gradient reaches both routers."""
  cfg, model, ids, pix, mask = setup
  labels = np.where(mask > 0, ids, F.IGNORE)
  labels[ids == cfg.model.image_token_id] = F.IGNORE
  batch = {'input_ids': jnp.asarray(ids), 'attention_mask': jnp.asarray(mask), 'labels': jnp.asarray(labels),
           'pixel_values': jnp.asarray(pix), 'has_image': jnp.asarray((ids == 4).any(-1))}
  graphdef, routers, rest = nnx.split(model, lambda p, _: 'router' in p, ...)

  @jax.jit
  def grads(routers):
    def loss(routers):
      out = F.train_forward(nnx.merge(graphdef, routers, rest), batch, sparse=False)
      return F.ce_sums(out['logits'], batch['labels'])[0]
    return jax.grad(loss)(routers)

  g = nnx.to_pure_dict(grads(routers))['language_model']
  assert sorted(g) == ['layers_1', 'layers_3']
  for attr in ('layers_1', 'layers_3'):
    gk = np.asarray(g[attr]['router']['kernel'])
    assert np.isfinite(gk).all() and np.abs(gk).max() > 0


class _Drop(Sparsifier):
  name = 'drop_test'

  def drop_points(self, model_cfg):
    return (1,)

  def keep_counts(self, n):
    return (2,)


def test_engine_equals_masked_forward_and_mod_caches_hold_routed_tokens(setup):
  """KV-cache generation (prefill: each MoD layer on its gathered routed tokens; decode steps over the MoD
  layers' compact caches) ≡ the masked forward recomputed over prompt + generated tokens (teacher forcing,
  eval/teacher.py, which routes like training), at the prefill's last position and at every step; each
  MoD layer's cache holds text + k per frame of the prompt plus the generated tokens; a token-dropping
  method is refused."""
  cfg, model, ids, pix, mask = setup
  dense, m = Sparsifier(), 4
  out = generate(model, cfg, dense, ids, pix, mask, max_new_tokens=m, sampling='greedy', return_logits=True,
                 return_caches=True, use_cache=True)
  n_real = mask.sum(-1)
  full = np.full((len(ids), ids.shape[1] + m), cfg.model.pad_token_id, np.int32)
  full_mask = np.zeros(full.shape, np.int32)
  for b in range(len(ids)):
    row = np.r_[ids[b][mask[b] > 0], out.tokens[b, :m]]
    full[b, :len(row)], full_mask[b, :len(row)] = row, 1
  teacher = nnx.jit(lambda md, i, p, k, l: pruned_forward(md, dense, i, p, k, l)[0])
  tf = np.asarray(teacher(model, jnp.asarray(full), jnp.asarray(pix), jnp.asarray(full_mask),
                          jnp.asarray(n_real - 1)))
  for b in range(len(ids)):
    steps = int(out.lengths[b])
    np.testing.assert_allclose(out.logits[b, :steps], tf[b, n_real[b] - 1:n_real[b] - 1 + steps],
                               rtol=1e-4, atol=1e-4)
  caches = out.caches
  assert [(c.start, c.stop) for c in caches] == [(0, 1), (1, 2), (2, 3), (3, 4)]
  n_img = (ids == cfg.model.image_token_id).sum(-1)
  routed = n_real - n_img + (n_img // N) * K
  fed = out.lengths - 1                    # tokens fed back through the decode steps (all text: routed)
  for c in caches:
    np.testing.assert_array_equal(np.asarray(c.length), (routed if c.start in (1, 3) else n_real) + fed)
  assert C.used_bytes(caches[1:2]) == C.bytes_per_token(caches[1]) * int((routed + fed).sum())
  np.testing.assert_array_equal(out.kept_image_ratio, 1.0)      # routed past, never dropped
  with pytest.raises(UserError, match='MoD'):
    prefill(model, cfg, _Drop(), ids[1:2], pix[1:2, 0], mask[1:2])     # one image: reaches the engine


def test_bad_settings_one_line(setup):
  cfg, model, ids, pix, mask = setup
  for field, value, match in (('r', 0.0, r'r=0.0 must be in \(0, 1\]'), ('r', 1.5, 'must be in'),
                              ('layers', '1,9', 'layer 9 is outside the layer plan'),
                              ('router', 'softmax', 'unknown')):
    c = small_config()
    c.model.mod[field] = value
    with pytest.raises(UserError, match=match):
      Llava(c.model, rngs=nnx.Rngs(0))
  bad = ids.copy()
  bad[0, np.flatnonzero(bad[0] == cfg.model.image_token_id)[0]] = 7        # a frame one short
  with pytest.raises(UserError, match='16 per frame'):
    model.embed(jnp.asarray(bad), jnp.asarray(pix))
  with pytest.raises(UserError, match='at most 16'):
    model.embed(jnp.asarray(ids), jnp.asarray(pix[:, :1]))                 # 2 frames' spans, 1 frame given


def test_two_frame_sample_equals_one_sample_per_frame(setup, embedded):
  """Frames: with the model cut to its embedding (frame-independent), a two-frame sample's placeholder
  spans hold what each frame gives as a sample of its own; the engine checks frames per sample."""
  cfg, model, ids, pix, mask = setup
  two = np.asarray(embedded[0][:1])                                              # sample 0: 2 frames
  one = [np.asarray(_embed(model, jnp.asarray(ids[1:2]), jnp.asarray(pix[0:1, f:f + 1]))[0])  # 1 frame each
         for f in range(2)]
  spans = np.flatnonzero(ids[0] == cfg.model.image_token_id).reshape(2, N)
  span1 = np.flatnonzero(ids[1] == cfg.model.image_token_id)
  for f in range(2):
    np.testing.assert_allclose(two[0, spans[f]], one[f][0, span1], rtol=1e-6, atol=1e-6)
  text = (ids[0] != cfg.model.image_token_id)
  np.testing.assert_array_equal(two[0, text], np.asarray(model.language_model.embed_tokens(ids[:1]))[0, text])
  with pytest.raises(ValueError, match='at most 32'):
    prefill(model, cfg, Sparsifier(), np.concatenate([ids, ids[:, -N:] * 0 + 4], 1), pix, None)


def test_mod_prefill_flops_analytic_equals_xla():
  """The engine's prefill with MoD layers (routed tokens only, router on every token; the last one with
  the last-query shortcut): the analytic count (eval/flops.py) within 1 % of XLA's cost analysis, at bench
  proportions (576 tokens per frame, 2 frames; abstract shapes, 2 layers, both MoD); per kind, an MoD
  layer costs a dense layer on text + k per frame plus the router; KV bytes: routed tokens only."""
  from dynllava_jax.eval import flops as FL
  cfg = get_config('size=bench,dense=1')
  mc = cfg.model
  mc.llm.layers, mc.vision.depth, mc.llm.vocab_size = 2, 1, 1024
  mc.vision.feature_layer = -1
  mc.image_token_id, mc.pad_token_id = 1000, 1001
  mc.mod.layers, mc.attention_impl = '0,1', 'reference'
  xla, analytic = FL.mod_engine_prefill_flops(mc, text_tokens=40, frames=2)
  assert analytic == pytest.approx(xla, rel=0.01)
  parts = FL.prefill_flops(mc, None, 40, frames=2, last_query=True)
  t, tr = 40 + 2 * 576, 40 + 2 * M.routed_count(576, 0.2)
  router = 2 * mc.llm.hidden * t
  assert parts['per_kind'] == {'mod': FL.llm_layer_flops(mc.llm, tr) + FL.last_query_layer_flops(mc.llm, tr)
                               + 2 * router}
  kv = FL.mod_kv_bytes(mc, 40, 2)['per_kind']
  mc.mod.layers = ''
  dense = FL.mod_kv_bytes(mc, 40, 2)['per_kind']
  assert kv['mod'] * t == dense['dense'] * tr


def test_equal_capacity_baselines():
  """uniform routing = the k stride centres of each frame, random = a fixed draw per (layer, frame); the
  "drop for good" baseline keeps k' so that the vision-token work equals MoD's (7B: 339 of 576)."""
  from dynllava_jax.eval import flops as FL
  from dynllava_jax.sparsity.registry import make_sparsifier
  from dynllava_jax.sparsity.uniform import stride_table
  image = jnp.asarray(np.r_[[False] * 3, [True] * (2 * N), [False] * 2][None])
  slots, valid = M.frame_slots(image, N, 2)
  scores = jnp.asarray(np.random.default_rng(0).normal(size=image.shape), jnp.float32)
  uni = M.route_tokens(scores, M.Route(image, slots, valid, K, 'uniform'), layer=1)
  for f in range(2):
    np.testing.assert_array_equal(np.asarray(uni)[0, 3 + f * N:3 + (f + 1) * N], stride_table(N, K))
  r1, r3 = (np.asarray(M.route_tokens(scores, M.Route(image, slots, valid, K, 'random'), layer=i)) for i in (1, 3))
  assert r1[0, 3:3 + N].sum() == K and not (r1 == r3).all()
  assert (np.asarray(M.route_tokens(scores * 5, M.Route(image, slots, valid, K, 'random'), layer=1)) == r1).all()
  cfg = get_config('size=7b,dense=1')
  drop = make_sparsifier('drop_equal_flops', cfg)
  assert drop.drop_points(cfg.model) == (1,) and drop.keep_counts(576) == (339,)
  sched = FL.image_token_schedule(cfg.model, drop)
  assert abs(sum(sched) - (16 * 576 + 16 * M.routed_count(576, 0.2))) < 32
