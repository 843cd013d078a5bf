"""Registers the training-free baselines with the sparsifier registry (import this module once):

    fastv    FastV(K, R)                 overrides: k, r                (default K=3, R=0.75)
    pdrop    PyramidDrop(layers, ratios) overrides: layers, ratios      (default 50/25/12.5% at L·¼,½,¾)
    random   RandomKeep                  overrides: sparse_layer, keep_ratio, seed
    uniform  UniformKeep                 overrides: sparse_layer, keep_ratio
Random and uniform default to Dynamic-LLaVA's budget: `model.sparse.sparse_layer` and ⌊N·r_I⌋ with
r_I = `model.sparse.image_keep_ratio`.
"""
from dynllava_jax.sparsity import registry
from dynllava_jax.sparsity.fastv import FastV
from dynllava_jax.sparsity.pyramid_drop import PyramidDrop
from dynllava_jax.sparsity.random_keep import RandomKeep
from dynllava_jax.sparsity.uniform import UniformKeep


def _budget(mc, overrides):
  """Dynamic-LLaVA's budget (`model.sparse.sparse_layer`, image_keep_ratio) under the overrides."""
  return dict({'sparse_layer': mc.sparse.sparse_layer, 'keep_ratio': mc.sparse.image_keep_ratio}, **overrides)


registry.register('fastv', lambda mc, **kw: FastV(**kw))
registry.register('pdrop', lambda mc, **kw: PyramidDrop(**kw))
registry.register('random', lambda mc, **kw: RandomKeep(**_budget(mc, kw)))
registry.register('uniform', lambda mc, **kw: UniformKeep(**_budget(mc, kw)))
