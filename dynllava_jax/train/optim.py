"""AdamW with parameter groups, warm-up + cosine schedules and global-norm clipping.

Parameter split (`split_params`): the model's nnx.Param variables are split into
  frozen:    by rule (`frozen_rules`): the CLIP tower (train.freeze_vision), the projector
             (train.freeze_projector), the whole LLM (train.freeze_llm, optional: the demo's alignment
             stage), path patterns (train.frozen) and the layer plan's frozen groups.
             No gradients are computed for them and the optimizer holds no state for them.
  trainable: everything else, in two optimizer groups (`param_group`):
             'predictor' = the keep-predictors (train.predictor_lr, train.predictor_weight_decay),
             'main'      = LLM + projector (train.lr, train.weight_decay).
Weight decay applies to matrices (ndim >= 2) only, never to biases or norm scales.
Gradient accumulation is done inside the jitted step (`step.py`), not by the optimizer.
"""
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

PREDICTORS = ('image_score_predictor', 'output_text_score_predictor', 'instruct_score_predictor')


def frozen_rules(train_cfg, model=None):
  """Regular expressions over '/'-joined parameter paths; a param matching any is frozen. From the config:
  train.freeze_vision (`^vision_tower/`), train.freeze_projector (`^projector/`), train.frozen (extra
  comma-separated patterns) and the layer plan's `:frozen` groups (`^language_model/<group attr>/`)."""
  rules = ['^vision_tower/'] * bool(train_cfg.freeze_vision) + ['^projector/'] * bool(train_cfg.freeze_projector)
  rules += ['^language_model/'] * bool(train_cfg.get('freeze_llm', False))   # projector-only alignment
  rules += [r for r in str(train_cfg.get('frozen', '') or '').split(',') if r]
  if model is not None:
    rules += [f'^language_model/{g.attr}/' for g in model.language_model.plan if g.train == 'frozen']
  return rules


def frozen_filter(train_cfg, model=None):
  """nnx filter of the frozen params (`frozen_rules`; model: the Llava, for its layer plan)."""
  rules = [re.compile(r) for r in frozen_rules(train_cfg, model)]
  if not rules:
    return nnx.Nothing
  match = lambda path, _: any(r.search('/'.join(str(k) for k in path)) for r in rules)
  return nnx.All(nnx.Param, match)


def split_params(model, train_cfg):
  """-> (graphdef, frozen, trainable) with frozen / trainable as pure nested dicts of arrays."""
  graphdef, frozen, trainable = nnx.split(model, frozen_filter(train_cfg, model), ...)
  return graphdef, nnx.to_pure_dict(frozen), nnx.to_pure_dict(trainable)


def param_group(path):
  """'predictor' for keep-predictor params, else 'main'. path: tuple of keys."""
  return 'predictor' if path and str(path[0]) in PREDICTORS else 'main'


def _labels(params):
  def one(path, _):
    return param_group(tuple(getattr(k, 'key', getattr(k, 'name', k)) for k in path))
  return jax.tree_util.tree_map_with_path(one, params)


def _decay_mask(params):
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def schedule(peak, steps, warmup_ratio, min_ratio=0.0):
  """Linear warm-up for round(warmup_ratio·steps) steps, then cosine to min_ratio·peak at `steps`."""
  warm = int(round(warmup_ratio * steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warm, decay_steps=max(steps, warm + 1),
      end_value=peak * min_ratio)


def restart_step(config):
  """Step at which the schedules restart: the end of the dense stage of a sparse run when
  train.restart_schedule (the released Dynamic-LLaVA training is its own fine-tuning run, with its own
  warm-up and cosine, from a trained LLaVA), else 0 (one schedule over the whole run)."""
  t = config.train
  if (config.model.sparse.enabled and t.get('restart_schedule', False)
      and 0 < t.dense_warmup_steps < t.steps):
    return int(t.dense_warmup_steps)
  return 0


def _staged(peak, t, restart):
  if not restart:
    return schedule(peak, t.steps, t.warmup_ratio, t.min_lr_ratio)
  sparse_peak = peak * float(t.get('sparse_lr_scale', 1.0))
  return optax.join_schedules(
      [schedule(peak, restart, t.warmup_ratio, t.min_lr_ratio),
       schedule(sparse_peak, t.steps - restart, t.warmup_ratio, t.min_lr_ratio)], [restart])


def schedules(train_cfg, restart=0):
  """{'main', 'predictor'}: step -> lr. restart > 0: warm-up + cosine over [0, restart), then again over
  [restart, steps) with the peaks times train.sparse_lr_scale (see `restart_step`)."""
  t = train_cfg
  return {'main': _staged(t.lr, t, restart), 'predictor': _staged(t.predictor_lr, t, restart)}


def make_optimizer(train_cfg, restart=0):
  """optax GradientTransformation over the trainable pure dict."""
  t = train_cfg
  sch = schedules(t, restart)

  def adamw(lr, wd):
    return optax.adamw(lr, b1=t.b1, b2=t.b2, eps=t.adam_eps, weight_decay=wd, mask=_decay_mask)

  groups = optax.multi_transform(
      {'main': adamw(sch['main'], t.weight_decay),
       'predictor': adamw(sch['predictor'], t.predictor_weight_decay)}, _labels)
  parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
  return optax.chain(*parts, groups)


def global_norm(tree):
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
