"""Uniform-stride keeping (a sanity floor): at Dynamic-LLaVA's `sparse_layer`, keep k = ⌊N·r_I⌋ image
tokens spread evenly over each sample's image: the j-th image token (in image order, j < N) is kept iff
j = ⌊(i + ½)·N/k⌋ for some i < k (the centres of k equal strides).
"""
import numpy as np
import jax.numpy as jnp

from dynllava_jax.sparsity.base import ScoreContext, image_count
from dynllava_jax.sparsity.random_keep import RandomKeep


def stride_table(n, k):
  """(n,) bool numpy: True at the k stride centres ⌊(i + ½)·n/k⌋, i < k (k distinct ordinals for k ≤ n)."""
  table = np.zeros((n,), bool)
  table[np.floor((np.arange(k) + 0.5) * (n / k)).astype(np.int64)] = True
  return table


class UniformKeep(RandomKeep):
  name = 'uniform'

  def score(self, i, ctx: ScoreContext):
    """1 on the stride centres, 0 elsewhere, minus a tiny ordinal term (deterministic order). (B, T)."""
    n = image_count(ctx)
    table = jnp.asarray(stride_table(n, self.keep_counts(n)[0]))
    mask = ctx.image_mask.astype(bool)
    ordinal = jnp.clip(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0, n - 1)   # (B, T)
    return jnp.where(table[ordinal], 1.0, 0.0) - ordinal.astype(jnp.float32) * (0.5 / n)

  def describe(self):
    return {'method': self.name, 'sparse_layer': self.sparse_layer, 'keep_ratio': self.keep_ratio}
