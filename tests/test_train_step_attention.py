"""MaskedSoftmax's custom VJP (`attention._masked_softmax_eps`, there for the training step's speed) has
the gradients of differentiating its formula, also where that is delicate: tied maxima (the gradient
through the max splits evenly, as jnp.max's), rows with no allowed key (padding queries), a self mask that
is not the identity, and 4-D heads-major scores."""
import jax
import jax.numpy as jnp
import numpy as np

from dynllava_jax.model.attention import NEG_INF, masked_softmax


def plain(scores, allowed, g, i, eps=1e-6):
  """The formula, left to autodiff."""
  s = jnp.where(allowed, scores, NEG_INF)
  gp = g + (1.0 - g) * i
  ag = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)) * gp
  return (ag + eps / s.shape[-1]) / (jnp.sum(ag, axis=-1, keepdims=True) + eps)


def test_custom_vjp_equals_autodiff_of_the_formula():
  rng = np.random.default_rng(0)
  b, h, tq, tk = 2, 3, 5, 7
  s = rng.normal(size=(b, h, tq, tk)).astype(np.float32)
  s[0, 1, 2, [0, 2]] = 4.0                                   # a tied maximum (both keys allowed)
  allowed = np.tril(np.ones((tq, tk), bool), k=2)[None, None].repeat(b, 0)
  allowed[1, :, 3] = False                                   # a padding query row
  g = (rng.random((b, tk)) > 0.5).astype(np.float32)
  self_mask = np.eye(tq, tk, k=2, dtype=bool)                # queries are the last tq of the tk tokens
  w = rng.normal(size=s.shape).astype(np.float32)

  def loss(fn):
    return lambda s, g: jnp.sum(fn(s, g) * w)
  ours = lambda s, g: masked_softmax(s, allowed, g, self_mask=self_mask)
  ref = lambda s, g: plain(s, allowed, g[:, None, None, :], self_mask.astype(np.float32))
  np.testing.assert_allclose(ours(s, g), ref(s, g), rtol=1e-6, atol=1e-12)
  got = jax.grad(loss(ours), argnums=(0, 1))(jnp.asarray(s), jnp.asarray(g))
  want = jax.grad(loss(ref), argnums=(0, 1))(jnp.asarray(s), jnp.asarray(g))
  for a, r in zip(got, want):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-7)
  assert np.abs(np.asarray(want[1])).max() > 1e-2            # G's gradient is not trivially zero
  assert np.all(np.asarray(got[0])[1, :, 3] == 0)            # nothing flows into a padding row's scores


def _autodiff_attention(qh, kh, vh, allowed, g, i, eps=1e-6):
  """o = softmax or MaskedSoftmax of the scaled scores, times v: every step left to autodiff."""
  s = jnp.einsum('bhgqd,bhkd->bhgqk', qh, kh) * qh.shape[-1] ** -0.5
  p = jax.nn.softmax(jnp.where(allowed, s, NEG_INF), -1) if g is None else plain(s, allowed, g, i, eps)
  return jnp.einsum('bhgqk,bhkd->bhgqd', p, vh)


def test_attention_level_vjps_equal_autodiff():
  """`dot_attention` without probabilities (the training step's path) differentiates through
  `_softmax_attend` / `_masked_attend`, whose backward takes Σ p·dp as do·o: q, k, v (GQA, 2 query heads
  per KV head) and G gradients equal autodiff's, with a padding query row and a tied maximum."""
  from dynllava_jax.model.attention import dot_attention  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  b, t, hq, hkv, d = 2, 6, 4, 2, 8
  q = rng.normal(size=(b, t, hq, d)).astype(np.float32)
  k = rng.normal(size=(b, t, hkv, d)).astype(np.float32)
  k[0, 1] = k[0, 0]                                          # equal keys: tied maxima in sample 0
  v = rng.normal(size=(b, t, hkv, d)).astype(np.float32)
  allowed = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
  allowed[1, 4] = False                                      # a padding query row
  keep = (rng.random((b, t)) > 0.4).astype(np.float32)
  w = rng.normal(size=(b, t, hq, d)).astype(np.float32)

  def heads(q, k, v):
    return (q.reshape(b, t, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3),
            v.transpose(0, 2, 1, 3))

  for key_keep in (None, keep):
    def ours(q, k, v, g, key_keep=key_keep):
      o = dot_attention(q, k, v, allowed, None if key_keep is None else g)
      return jnp.sum(o * w)

    def ref(q, k, v, g, key_keep=key_keep):
      qh, kh, vh = heads(q, k, v)
      gg = None if key_keep is None else g[:, None, None, None, :]
      o = _autodiff_attention(qh, kh, vh, allowed[:, None, None], gg, np.eye(t, dtype=np.float32))
      return jnp.sum(o.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d) * w)

    args = tuple(jnp.asarray(x) for x in (q, k, v, keep))
    np.testing.assert_allclose(ours(*args), ref(*args), rtol=1e-5)
    got = jax.grad(ours, argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(ref, argnums=(0, 1, 2, 3))(*args)
    for a, r in zip(got, want):
      np.testing.assert_allclose(a, r, rtol=2e-4, atol=2e-5)
    assert np.abs(np.asarray(got[0])).max() > 1e-2
    if key_keep is not None:
      assert np.abs(np.asarray(want[3])).max() > 1e-3
