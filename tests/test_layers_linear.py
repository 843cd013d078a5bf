"""`layers.Linear` / `LoRADense` flatten the leading axes into one GEMM row axis: same values and gradients
as the plain (..., din) @ (din, dout) formula for any number of leading axes."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynllava_jax.model import layers as L


def _plain(m, x):
  y = x @ m.kernel[...]
  if isinstance(m, L.LoRADense):
    y = y + m.scale * (x @ m.lora.lora_a[...] @ m.lora.lora_b[...])
  return y if m.bias is None else y + m.bias[...]


def test_linear_and_lora_over_any_leading_axes_equal_the_formula():
  rngs = nnx.Rngs(0)
  lin = L.dense(6, 5, ('embed', 'mlp'), bias=True, rngs=rngs)
  lora = L.LoRADense(6, 5, rank=2, alpha=4.0, names=('embed', 'mlp'), rngs=rngs)
  lora.lora.lora_b[...] = jax.random.normal(jax.random.key(1), lora.lora.lora_b[...].shape)
  for m in (lin, lora):
    for shape in ((6,), (3, 6), (2, 3, 6), (2, 1, 3, 6)):
      x = jax.random.normal(jax.random.key(len(shape)), shape)
      y = m(x)
      assert y.shape == shape[:-1] + (5,)
      np.testing.assert_allclose(y, _plain(m, x), rtol=1e-6, atol=1e-6)
    x = jax.random.normal(jax.random.key(7), (2, 3, 6))
    g, state = nnx.split(m)
    grads = jax.grad(lambda st, x: jnp.sum(jnp.sin(nnx.merge(g, st)(x))), argnums=(0, 1))(state, x)
    ref = jax.grad(lambda st, x: jnp.sum(jnp.sin(_plain(nnx.merge(g, st), x))), argnums=(0, 1))(state, x)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
