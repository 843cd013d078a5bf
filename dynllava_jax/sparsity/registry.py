"""Sparsifiers by name: `make_sparsifier(name, cfg, **overrides)`; other modules add theirs with `register`.

    method = make_sparsifier('dynamic', cfg)                   # cfg: the root config or its `model` section
    method = make_sparsifier('dynamic_image', cfg, topk=False)
    register('fastv', lambda cfg, **kw: FastV(**kw))            # in dynllava_jax/sparsity/fastv.py
    hooks = train_hooks(mc)                                     # the training hooks this model config uses

Names not registered yet trigger one import of every module in `dynllava_jax.sparsity` (so methods that
register themselves at import time are found without a central list).
"""
import importlib
import pkgutil

from dynllava_jax.model.mqt import MQTTrain
from dynllava_jax.model.projector import elastic
from dynllava_jax.sparsity.dense import Dense
from dynllava_jax.sparsity.dynamic import DynamicSparsifier
from dynllava_jax.sparsity.dynamic_train import DynamicTrain

_FACTORIES = {}
_TRAIN = {}
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


def register_train(name, hook_cls, applies):
  """A method's training hook (sparsity/base.py::TrainHook): hook_cls(model_cfg) is used whenever
  applies(model_cfg); hooks run in registration order."""
  _TRAIN[str(name)] = (hook_cls, applies)


def train_hooks(mc):
  """The training hooks of model config mc (MQT's m draw, then Dynamic-LLaVA's decisions, ...)."""
  return tuple(cls(mc) for cls, applies in _TRAIN.values() if applies(mc))


def layer_cuts(mc):
  """The decoder layers where model config mc's training hooks act (their `layers`), sorted: the layer
  plan starts a group at each (`model/plan.py::resolve`), so the training walk's segments are whole
  groups and no step copies a sub-range of a stacked group's weights."""
  return tuple(sorted({int(p) for hk in train_hooks(mc) for p in hk.layers(mc)}))


def train_param_rules():
  """Every registered hook's optimizer rules (a rule for modules a model lacks matches nothing)."""
  return tuple(r for cls, _ in _TRAIN.values() for r in cls.param_rules)


register('dense', lambda mc, **kw: Dense(**kw))
register('dynamic', _dynamic(True, True))
register('dynamic_image', _dynamic(True, False))
register('dynamic_text', _dynamic(False, True))
register_train('mqt', MQTTrain, elastic)
register_train('dynamic', DynamicTrain, lambda mc: bool(mc.sparse.enabled))


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
