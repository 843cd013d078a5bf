"""Generation: KV-cache ≡ no-cache, batch ≡ single, compact caches hold only kept tokens, growth is
invisible, EOS stops per sample, sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynllava_jax.decode import cache as C
from dynllava_jax.decode.generate import generate
from dynllava_jax.decode.sampling import Sampling
from test_decode_prefill import make_batch, make_model, small_config

M = 10
SPECS = [(30, 3, 'left'), (26, 1, 'right'), (21, None, 'left'), (33, 6, 'right')]


@pytest.fixture(scope='module')
def setup():
  cfg = small_config(cache_bucket=4)      # small buckets: the compact cache must grow during decoding
  model = make_model(cfg, seed=1)
  batch = make_batch(cfg, SPECS, seed=1)
  ref = generate(model, cfg, 'dynamic', *batch, max_new_tokens=M, sampling='greedy', return_logits=True,
                 return_caches=True)
  return cfg, model, batch, ref


def test_kv_cache_equals_no_cache(setup):
  cfg, model, batch, ref = setup
  nc = generate(model, cfg, 'dynamic', *batch, max_new_tokens=M, sampling='greedy', use_cache=False,
                return_logits=True)
  np.testing.assert_array_equal(ref.tokens, nc.tokens)
  np.testing.assert_array_equal(ref.lengths, nc.lengths)
  np.testing.assert_allclose(ref.logits, nc.logits, atol=2e-4, rtol=1e-4)
  # same text decisions for every fed token but the newest (which no-cache decoding always keeps)
  for b in range(len(SPECS)):
    n = ref.lengths[b] - 2
    np.testing.assert_array_equal(ref.text_keep[b, :n], nc.text_keep[b, :n])
  np.testing.assert_allclose(ref.kept_image_ratio, nc.kept_image_ratio)
  fed = ref.lengths - 1
  assert not ref.text_keep[np.arange(M)[None] < fed[:, None]].all(), 'no generated token was dropped'
  assert ref.text_keep[np.arange(M)[None] < fed[:, None]].any(), 'every generated token was dropped'


def test_compact_cache_holds_only_kept_tokens_and_growth_is_invisible(setup):
  cfg, model, batch, ref = setup
  ids, pix, mask = batch
  caches = ref.caches
  assert len(caches) == 2 and caches[0].stop == cfg.model.sparse.sparse_layer
  n_real = mask.sum(-1)
  n_img = (ids == cfg.model.image_token_id).sum(-1)
  fed = ref.lengths - 1
  kept_gen = np.array([ref.text_keep[b, :fed[b]].sum() for b in range(len(SPECS))])
  # full cache: every prompt token and every fed generated token
  np.testing.assert_array_equal(np.asarray(caches[0].length), n_real + fed)
  # compact cache: prompt text + 4 kept image tokens + only the kept generated tokens
  np.testing.assert_array_equal(np.asarray(caches[1].length),
                                n_real - n_img + np.where(n_img > 0, 4, 0) + kept_gen)
  for c in caches:    # slots past `length` were never written
    k = C.stacked(c.k)   # (L, B, C, Hkv, D)
    tail = np.arange(c.capacity)[None, :] >= np.asarray(c.length)[:, None]
    assert np.all(k[:, tail] == 0)
  assert len(ref.capacities) > 1 and ref.capacities[-1][1] > ref.capacities[0][1], ref.capacities
  assert ref.kv_cache_bytes_final > ref.kv_cache_bytes_prefill > 0
  big = small_config(cache_bucket=64)
  out = generate(model, big, 'dynamic', *batch, max_new_tokens=M, sampling='greedy', return_logits=True)
  assert len(out.capacities) == 1
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_allclose(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
  assert out.kv_cache_bytes_final == ref.kv_cache_bytes_final
  assert out.kv_cache_bytes_allocated > ref.kv_cache_bytes_allocated


def test_batch_equals_each_sample_alone(setup):
  cfg, model, batch, full = setup
  stable = small_config(prefill_bucket=64, cache_bucket=64)   # one shape for all single-sample calls
  ids, pix, mask = batch
  for b in range(len(SPECS)):
    one = generate(model, stable, 'dynamic', ids[b:b + 1], pix[b:b + 1], mask[b:b + 1], max_new_tokens=M,
                   sampling='greedy', return_logits=True)
    np.testing.assert_array_equal(one.tokens[0], full.tokens[b])
    n = one.lengths[0]
    np.testing.assert_allclose(one.logits[0, :n], full.logits[b, :n], atol=2e-4, rtol=1e-4)
    np.testing.assert_array_equal(one.text_keep[0, :n - 1], full.text_keep[b, :n - 1])


def test_eos_stops_each_sample(setup):
  cfg, model, batch, ref = setup
  eos = int(ref.tokens[0, 2])
  out = generate(model, cfg, 'dynamic', *batch, max_new_tokens=M, sampling='greedy', eos_token_id=eos)
  pad = cfg.model.pad_token_id
  for b in range(len(SPECS)):
    hits = np.flatnonzero(ref.tokens[b] == eos)
    n = hits[0] + 1 if hits.size else M
    assert out.lengths[b] == n
    np.testing.assert_array_equal(out.tokens[b, :n], ref.tokens[b, :n])
    assert (out.tokens[b, n:] == pad).all()
  assert out.lengths[0] <= 3


def test_sampling_rules():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  key = jax.random.PRNGKey(0)
  greedy = Sampling().sample(logits, key)
  assert (np.asarray(greedy) == 0).all()
  assert (np.asarray(Sampling(1.0, 1e-6).sample(logits, key)) == 0).all()
  tok = np.asarray(Sampling(1.0, 0.7).sample(logits, key))     # nucleus {0, 1}: mass 0.5, 0.3
  assert set(tok.tolist()) == {0, 1}
  assert abs((tok == 0).mean() - 0.5 / 0.8) < 0.03
  tok = np.asarray(Sampling(1.0).sample(logits, key))
  np.testing.assert_allclose(np.bincount(tok, minlength=4) / len(tok), [0.5, 0.3, 0.15, 0.05], atol=0.03)
  np.testing.assert_array_equal(tok, np.asarray(Sampling(1.0).sample(logits, key)))
  with pytest.raises(ValueError, match='top_p'):
    Sampling(1.0, 0.0)
  with pytest.raises(ValueError, match='temperature'):
    Sampling(-1.0)


def test_sampled_generation_is_reproducible(setup):
  cfg, model, batch, ref = setup
  s = Sampling(temperature=1.5, top_p=0.95)
  cfg = small_config(cache_bucket=64)
  a = generate(model, cfg, 'dynamic', *batch, max_new_tokens=M, sampling=s, rng=jax.random.PRNGKey(3))
  b = generate(model, cfg, 'dynamic', *batch, max_new_tokens=M, sampling=s, rng=jax.random.PRNGKey(3))
  c = generate(model, cfg, 'dynamic', *batch, max_new_tokens=M, sampling=s, rng=jax.random.PRNGKey(4))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (a.tokens != c.tokens).any()
  assert (a.tokens != ref.tokens).any(), 'temperature 1.5 sampling reproduced the greedy tokens'
  np.testing.assert_allclose(a.kept_image_ratio, [0.25, 0.25, 1.0, 0.25])
  assert a.caches is None


def test_blocked_linear_equals_linear_and_weight_block_rule():
  from flax import nnx as _nnx
  from dynllava_jax.decode.step import BlockedLinear, weight_blocks
  for bias in (False, True):
    lin = _nnx.Linear(12, 10, use_bias=bias, rngs=_nnx.Rngs(0))
    if bias:
      lin.bias[...] = jnp.arange(10, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (3, 1, 12))
    for n in (1, 3, 4, 10):     # uneven splits too
      np.testing.assert_allclose(np.asarray(BlockedLinear(lin, n)(x)), np.asarray(lin(x)), atol=1e-6, rtol=1e-6)
  lin16 = _nnx.Linear(12, 10, dtype=jnp.bfloat16, rngs=_nnx.Rngs(0))      # fp32 weights, bf16 compute
  y = BlockedLinear(lin16, 3)(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(lin16(x), np.float32), atol=1e-2, rtol=1e-2)
  assert weight_blocks(0, 1) == 1 and weight_blocks(0, 8) == 8 and weight_blocks(2, 1) == 2
  with pytest.raises(ValueError, match='decode_weight_blocks'):
    weight_blocks(-1, 8)
