"""Moving weights between layer plans: regroup, LoRA merge, pruning, and LoRA adapters on their own.

    model2 = rebuild(model, mc2, layer_map)      # a model of config mc2 holding model's weights
    merged, mc2 = merge(model, mc)               # LoRA folded in: W + (alpha / r) A B, plan LoRA -> full
    params = adapter_params(model)               # the adapters only ({path: array});
                                                 # saved / loaded with a base reference: tools/adapters.py

`rebuild` is the one copy routine: decoder layer j of the new model takes old layer layer_map[j] (a
global index; the plans' groups may split the layers differently), every other parameter is copied by
path. Adapters are copied where both layers have them, folded into the kernel where only the old one
has them, and keep their fresh init (B = 0: the layer unchanged) where only the new one has them.
Host memory: the weights are copied once (the old model is not changed).
"""
import copy
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynllava_jax.errors import UserError
from dynllava_jax.model import plan as P


def _layer_trees(lm_params, groups):
  """Per global layer: (pure dict of its params, Group) (None for a skipped layer)."""
  out = []
  for g in groups:
    for j in range(g.size):
      if g.kind == P.SKIP:
        out.append((None, g))
      else:
        out.append((jax.tree.map(lambda a, j=j: np.asarray(a)[j], lm_params[g.attr]), g))
  return out


def _fresh_adapter(abstract, rng):
  """nnx.LoRA's init distribution, drawn on the host: A he-uniform (U(±sqrt(6 / din))), B zeros (the
  layer unchanged)."""
  a, b = abstract['lora_a'], abstract['lora_b']
  lim = np.sqrt(6.0 / a.shape[0])
  return {'lora_a': rng.uniform(-lim, lim, a.shape).astype(a.dtype), 'lora_b': np.zeros(b.shape, b.dtype)}


def _fill_layer(new, old, old_scale, rng):
  """One layer: new's structure (pure dict of abstract leaves), values from old (pure dict) where they
  exist; adapters only the new layer has start fresh (`_fresh_adapter`)."""
  out = {}
  for k, v in sorted(new.items()):
    if isinstance(v, dict):
      if k == 'lora':
        out[k] = old[k] if (old is not None and k in old) else _fresh_adapter(v, rng)
        continue
      sub = old.get(k) if old is not None else None
      if sub is not None and 'lora' in sub and 'lora' not in v and 'kernel' in v:
        # Fold the old adapter in: W + (alpha / r) A B (fp32, cast back).
        a, b = sub['lora']['lora_a'], sub['lora']['lora_b']
        w = sub['kernel']
        merged = np.asarray(w, np.float32) + old_scale * (np.asarray(a, np.float32) @ np.asarray(b, np.float32))
        sub = dict(sub, kernel=merged.astype(w.dtype))
      out[k] = _fill_layer(v, sub, old_scale, rng)
    else:
      if old is None or k not in old:
        raise UserError(f'rebuild: parameter {k} has no source in the old model')
      if tuple(old[k].shape) != tuple(v.shape):
        raise UserError(f'rebuild: parameter {k} has shape {tuple(old[k].shape)}, the new model {tuple(v.shape)}')
      out[k] = np.asarray(old[k]).astype(v.dtype)
  return out


def _copy_by_path(new, old, where):
  if not isinstance(new, dict):
    if old is None:
      raise UserError(f'rebuild: the old model has no {where}')
    if tuple(old.shape) != tuple(new.shape):
      raise UserError(f'rebuild: {where} has shape {tuple(old.shape)}, the new model {tuple(new.shape)}')
    return np.asarray(old).astype(new.dtype)
  return {k: _copy_by_path(v, old.get(k) if isinstance(old, dict) else None, f'{where}/{k}')
          for k, v in new.items()}


def rebuild(model, mc_new, layer_map=None, *, seed=0):
  """A Llava of config mc_new holding `model`'s weights; new decoder layer j <- old layer layer_map[j]
  (default: the identity). Old layers named by layer_map must not be skipped ones."""
  from dynllava_jax.model.llava import Llava  # pylint: disable=g-import-not-at-top
  old_lm = model.language_model
  n_new = mc_new.llm.layers
  layer_map = list(range(n_new)) if layer_map is None else [int(i) for i in layer_map]
  if len(layer_map) != n_new:
    raise UserError(f'rebuild: layer_map has {len(layer_map)} entries for {n_new} layers')
  old = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llava(mc_new, rngs=nnx.Rngs(seed))))
  new_plan = P.resolve(mc_new)
  new = nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, abstract), nnx.Param))
  rng = np.random.default_rng(seed)
  old_layers = _layer_trees(old['language_model'], old_lm.plan)
  lora = model.mc.get('lora')
  alpha = float(lora.get('alpha', 16.0)) if lora is not None else 16.0
  out = {k: (_copy_by_path(v, old.get(k), k) if k != 'language_model' else None) for k, v in new.items()}
  lm = {k: _copy_by_path(v, old['language_model'].get(k), f'language_model/{k}')
        for k, v in new['language_model'].items() if k not in {g.attr for g in new_plan}}
  for g in new_plan:
    if g.kind == P.SKIP:
      continue
    stacked = new['language_model'][g.attr]
    rows = []
    for j in range(g.size):
      src, src_g = old_layers[layer_map[g.start + j]]
      if src is None:
        raise UserError(f'rebuild: new layer {g.start + j} maps to old layer {layer_map[g.start + j]}, '
                        'which is skipped (has no weights)')
      scale = alpha / src_g.lora_rank if src_g.lora_rank else 0.0
      row = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stacked)
      rows.append(_fill_layer(row, src, scale, rng))
    lm[g.attr] = jax.tree.map(lambda *a: np.stack(a), *rows)
  out['language_model'] = lm
  out = jax.tree.map(jnp.asarray, out)
  params = nnx.state(nnx.merge(graphdef, abstract), nnx.Param)
  nnx.replace_by_pure_dict(params, out)
  model2 = nnx.merge(graphdef, abstract)
  nnx.update(model2, params)
  return model2


def merged_config(mc):
  """mc for the merged model: the plan's kinds only (no region, no train flags), so the layers of one
  kind are one group again (one scan at inference)."""
  mc2 = copy.deepcopy(mc)
  with mc2.unlocked():
    mc2.layer_plan = P.to_spec(P.resolve(mc), train=False)
    mc2.region = ''
  return mc2


def merge(model, mc):
  """-> (model with LoRA folded into the base kernels, its config); a model without LoRA comes back as
  is. Merged ≡ unmerged (tests/test_visual_region.py); inference, decoding and HF export use it."""
  if not any(g.lora_rank for g in model.language_model.plan):
    return model, mc
  mc2 = merged_config(mc)
  return rebuild(model, mc2), mc2


def adapter_params(model):
  """The LoRA leaves of `model` (pure dict, the paths they have in the model)."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
  return {'/'.join(str(k) for k in p): np.asarray(jax.device_get(v.get_value())) for p, v in flat}


def compacted_config(mc):
  """-> (config without the plan's `skip` layers (llm.layers smaller, region renumbered), kept layer
  indices)."""
  groups = P.resolve(mc)
  kept = [i for i in range(mc.llm.layers) if i not in set(P.skipped_layers(groups))]
  per_layer = {i: g for g in groups for i in range(g.start, g.stop)}
  entries = [per_layer[i] for i in kept]
  if not entries:
    raise UserError('every decoder layer is skipped: keep at least one')
  mc2 = copy.deepcopy(mc)
  with mc2.unlocked():
    mc2.llm.layers = len(kept)
    region = P.parse_region(mc.get('region', ''), mc.llm.layers)
    runs = itertools.groupby((g.kind, None if region else g.train) for g in entries)
    mc2.layer_plan = ','.join(f'{k}*{len(list(r))}' + (f':{t}' if t else '') for (k, t), r in runs)
    if region:
      mc2.region = ','.join(str(kept.index(i)) for i in region)
  return mc2, kept


def compact(model, mc):
  """-> (a smaller model without the plan's skipped layers, its config): layer j of the new model is the
  j-th kept layer, so its outputs equal the skip plan's (tests/test_visual_region.py)."""
  if not P.skipped_layers(model.language_model.plan):
    return model, mc
  mc2, kept = compacted_config(mc)
  return rebuild(model, mc2, kept), mc2


def for_export(model, mc):
  """The model as a plain checkpoint holds it: LoRA folded in, skipped layers removed."""
  model, mc = compact(model, mc)
  return merge(model, mc)
