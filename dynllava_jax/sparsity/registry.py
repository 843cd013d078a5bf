"""Sparsifiers by name: `make_sparsifier(name, cfg, **overrides)`; other modules add theirs with `register`.

    method = make_sparsifier('dynamic', cfg)                   # cfg: the root config or its `model` section
    method = make_sparsifier('dynamic_image', cfg, topk=False)
    register('fastv', lambda cfg, **kw: FastV(**kw))            # in dynllava_jax/sparsity/fastv.py

Names not registered yet trigger one import of every module in `dynllava_jax.sparsity` (so methods that
register themselves at import time are found without a central list).
"""
import importlib
import pkgutil

from dynllava_jax.sparsity.dense import Dense
from dynllava_jax.sparsity.dynamic import DynamicSparsifier

_FACTORIES = {}
_SCANNED = [False]


def register(name, factory):
  """factory(model_cfg, **overrides) -> Sparsifier. Re-registering a name replaces it."""
  _FACTORIES[str(name)] = factory


def _model_cfg(cfg):
  return cfg.model if 'model' in cfg else cfg


def _dynamic(image, text):
  def make(mc, **kw):
    s = mc.sparse
    args = dict(image=image, text=text, topk=s.topk, keep_ratio=s.image_keep_ratio)
    args.update(kw)
    return DynamicSparsifier(**args)
  return make


register('dense', lambda mc, **kw: Dense(**kw))
register('dynamic', _dynamic(True, True))
register('dynamic_image', _dynamic(True, False))
register('dynamic_text', _dynamic(False, True))


def _scan_package():
  if _SCANNED[0]:
    return
  _SCANNED[0] = True
  import dynllava_jax.sparsity as pkg
  for m in pkgutil.iter_modules(pkg.__path__):
    importlib.import_module(f'{pkg.__name__}.{m.name}')


def names():
  _scan_package()
  return sorted(_FACTORIES)


def make_sparsifier(name, cfg, **overrides):
  """The method `name` configured from cfg (root config or model config) and keyword overrides."""
  if name not in _FACTORIES:
    _scan_package()
  if name not in _FACTORIES:
    raise ValueError(f'unknown sparsification method {name!r}; known: {sorted(_FACTORIES)}')
  return _FACTORIES[name](_model_cfg(cfg), **overrides)
