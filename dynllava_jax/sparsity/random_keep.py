"""Random keeping (a sanity floor): at Dynamic-LLaVA's `sparse_layer`, keep k = ⌊N·r_I⌋ image tokens
chosen uniformly at random per sample (the same budget as Dynamic-LLaVA's top-k prefill).

The draw uses `ctx.rng` when the engine passes one (it folds in the drop index), else a fixed key from
`seed` (deterministic).
"""
import jax
import jax.numpy as jnp

from dynllava_jax.sparsity.base import ScoreContext, Sparsifier, image_count, keep_budget


class RandomKeep(Sparsifier):
  name = 'random'

  def __init__(self, sparse_layer=2, keep_ratio=0.2, seed=0):
    if not 0.0 < float(keep_ratio) <= 1.0:
      raise ValueError(f'random: keep_ratio={keep_ratio} must be in (0, 1]')
    self.sparse_layer, self.keep_ratio, self.seed = int(sparse_layer), float(keep_ratio), int(seed)

  def drop_points(self, model_cfg):
    if not 0 <= self.sparse_layer < model_cfg.llm.layers:
      raise ValueError(f'{self.name}: sparse_layer={self.sparse_layer} must be in [0, '
                       f'{model_cfg.llm.layers})')
    return (self.sparse_layer,)

  def keep_counts(self, n_image_tokens):
    return (keep_budget(n_image_tokens, self.keep_ratio),)

  def score(self, i, ctx: ScoreContext):
    """Uniform draws indexed by (sample, image-token ordinal), so the choice does not depend on the
    sequence length, padding or packing. (B, T) float32."""
    key = ctx.rng if ctx.rng is not None else jax.random.fold_in(jax.random.key(self.seed), i)
    n = image_count(ctx)
    mask = ctx.image_mask.astype(bool)
    draws = jax.random.uniform(key, (mask.shape[0], n))
    ordinal = jnp.clip(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0, n - 1)
    return jnp.take_along_axis(draws, ordinal, axis=1)

  def describe(self):
    return {'method': self.name, 'sparse_layer': self.sparse_layer, 'keep_ratio': self.keep_ratio,
            'seed': self.seed}
