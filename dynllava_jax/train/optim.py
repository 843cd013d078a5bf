"""AdamW with parameter groups, warm-up + cosine schedules and global-norm clipping.

Parameter split (`split_params`): frozen by rule (`frozen_rules`: train.freeze_vision / freeze_projector /
freeze_llm, train.frozen patterns, the layer plan's frozen groups, LoRA groups' base weights, with a
visual region the LLM's embeddings, final norm and LM head; no gradients, no optimizer state); the rest
in optimizer groups by rule (`group_rules`, first match wins: train.param_groups, then each method's
TrainHook.param_rules, then '^projector/' -> 'projector' when train.projector_lr > 0; else 'main'), each
with its peak lr and weight decay (`group_settings`; docs/training.md). A config rule that matches no
trainable param, or names an unknown group: one UserError line. Weight decay applies to matrices
(ndim >= 2) only; gradient accumulation is inside the jitted step (`step.py`).
"""
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dynllava_jax.errors import UserError
from dynllava_jax.sparsity.registry import train_param_rules


def frozen_rules(train_cfg, model=None):
  """Regular expressions over '/'-joined parameter paths; a param matching any is frozen. From the config:
  train.freeze_vision (`^vision_tower/`), train.freeze_projector (`^projector/`), train.frozen (extra
  comma-separated patterns) and the layer plan's `:frozen` groups (`^language_model/<group attr>/`)."""
  rules = ['^vision_tower/'] * bool(train_cfg.freeze_vision) + ['^projector/'] * bool(train_cfg.freeze_projector)
  rules += ['^language_model/'] * bool(train_cfg.get('freeze_llm', False))   # projector-only alignment
  rules += [r for r in str(train_cfg.get('frozen', '') or '').split(',') if r]
  if model is not None:
    plan = model.language_model.plan
    rules += [f'^language_model/{g.attr}/' for g in plan if g.train == 'frozen' and g.kind != 'skip']
    rules += [f'^language_model/{g.attr}/(?!(.*/)?lora/)' for g in plan if g.lora_rank]
    if str(model.mc.get('region', '') or ''):
      rules += ['^language_model/(embed_tokens|norm|lm_head)/']
  return rules


def grad_floor(model, trainable):
  """The lowest decoder layer whose input needs a gradient: the lowest trainable layer when nothing
  upstream of it trains (no trainable param in the vision tower, projector, token embedding or a lower
  layer), else 0. The train step stops the gradient of the hidden state entering that layer, so the
  backward pass ends there. trainable: the trainable pure dict (after `split_params`)."""
  lm = model.language_model
  layers = [i for g in lm.plan if g.trains and g.attr in trainable.get('language_model', {})
            for i in range(g.start, g.stop)]
  upstream = ('vision_tower', 'projector')
  if not layers or any(k in trainable for k in upstream) or 'embed_tokens' in trainable.get('language_model', {}):
    return 0
  return min(layers)


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


def group_settings(train_cfg):
  """{group: (peak lr, weight decay)}: 'main' and 'predictor' always, 'projector' when train.projector_lr > 0."""
  t = train_cfg
  groups = {'main': (t.lr, t.weight_decay), 'predictor': (t.predictor_lr, t.predictor_weight_decay)}
  if float(t.get('projector_lr', 0.0)) > 0:
    groups['projector'] = (t.projector_lr, t.weight_decay)
  return groups


def config_rules(train_cfg):
  """train.param_groups ('regex=group,...') -> ((regex, group), ...); UserError for an unknown group or a
  bad regex."""
  rules = []
  for item in (r.strip() for r in str(train_cfg.get('param_groups', '') or '').split(',')):
    if not item:
      continue
    pattern, _, group = item.rpartition('=')
    if group not in group_settings(train_cfg) or not pattern:
      raise UserError(f'train.param_groups: {item!r} must be regex=group with group one of '
                      f'{sorted(group_settings(train_cfg))} (projector needs train.projector_lr > 0)')
    try:
      re.compile(pattern)
    except re.error as e:
      raise UserError(f'train.param_groups: {pattern!r} is not a regular expression ({e})') from None
    rules.append((pattern, group))
  return tuple(rules)


def group_rules(train_cfg):
  """The rules table, first match wins: the config's, the methods', then the projector's own rate."""
  proj = (('^projector/', 'projector'),) if 'projector' in group_settings(train_cfg) else ()
  return config_rules(train_cfg) + train_param_rules() + proj


def param_group(path, rules=None):
  """The optimizer group of the param at `path` (a tuple of keys or a '/'-joined string); rules: from
  `group_rules` (default: the methods' rules only)."""
  path = path if isinstance(path, str) else '/'.join(str(k) for k in path)
  return next((g for r, g in (train_param_rules() if rules is None else rules) if re.search(r, path)), 'main')


def _labels(train_cfg):
  rules = group_rules(train_cfg)
  checked = config_rules(train_cfg)

  def labels(params):
    paths = ['/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in p)
             for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for r, g in checked:
      if not any(re.search(r, p) for p in paths):
        raise UserError(f'train.param_groups: {r}={g} matches no trainable parameter (frozen ones take no '
                        'group); check the pattern against the model\'s parameter paths')
    return jax.tree.unflatten(jax.tree.structure(params), [param_group(p, rules) for p in paths])
  return labels


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
  """{group: step -> lr} for `group_settings`. restart > 0: warm-up + cosine over [0, restart), then
  again over [restart, steps) with the peaks times train.sparse_lr_scale (see `restart_step`)."""
  return {g: _staged(lr, train_cfg, restart) for g, (lr, _) in group_settings(train_cfg).items()}


def make_optimizer(train_cfg, restart=0):
  """optax GradientTransformation over the trainable pure dict: global-norm clipping, then AdamW per group."""
  t = train_cfg
  sch = schedules(t, restart)
  txs = {g: optax.adamw(sch[g], b1=t.b1, b2=t.b2, eps=t.adam_eps, weight_decay=wd, mask=_decay_mask)
         for g, (_, wd) in group_settings(t).items()}
  parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
  return optax.chain(*parts, optax.multi_transform(txs, _labels(t)))


def global_norm(tree):
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
