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
