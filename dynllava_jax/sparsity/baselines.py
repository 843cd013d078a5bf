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

NAMES = ('fastv', 'pdrop', 'random', 'uniform')


def _model_cfg(cfg):
  return cfg.model if 'model' in cfg else cfg


def _budget(cfg, overrides):
  sc = _model_cfg(cfg).sparse
  out = {'sparse_layer': sc.sparse_layer, 'keep_ratio': sc.image_keep_ratio}
  out.update(overrides)
  return out


def make_fastv(cfg, **overrides):
  return FastV(**overrides)


def make_pdrop(cfg, **overrides):
  return PyramidDrop(**overrides)


def make_random(cfg, **overrides):
  return RandomKeep(**_budget(cfg, overrides))


def make_uniform(cfg, **overrides):
  return UniformKeep(**_budget(cfg, overrides))


for _name, _factory in zip(NAMES, (make_fastv, make_pdrop, make_random, make_uniform)):
  registry.register(_name, _factory)
