"""The demo's result: every method at several image-token budgets on the test split, by generation.

    rows = evaluate_all(configs, dirs, samples, tok)      # one row per '<method>@<budget>' key
    summary = make_summary(rows, majority, test_samples, wall_s)

Keys are `<method>@<budget>`, the budget being the kept fraction of image tokens asked for, written as
Python prints the float (`dense@1.0`, `dynamic@0.2`, `fastv@0.35`, ...). Methods and models:
  dense@1.0           stage 2 (the dense LLaVA), every token kept
  dynamic@r           stage 3 (Dynamic-LLaVA), top-k ⌊N·r⌋ image tokens at `sparse_layer`, output-text
                      pruning in decoding (trained at r_I = 0.2, r_OT = 0.5; r only changes k at inference)
  random@r, uniform@r stage 2, ⌊N·r⌋ image tokens at `sparse_layer` (the same budget as dynamic@r)
  fastv@r             stage 2, FastV with K = sparse_layer and R = 1 − r (round(N·r) kept from layer K on)
  pdrop@r             stage 2, PyramidDrop dropping entering every layer from sparse_layer on, the kept
                      fractions halving per layer (x, x/2, x/4, ...) with x chosen so their mean equals r:
                      the same image-token·layers in the prefill as the others at r
All use `dynllava_jax.eval.run.evaluate_method` (the engine's greedy KV-cache generation).
"""
import collections

import numpy as np

BUDGETS = (0.1, 0.2, 0.35, 0.5)
TRAINING_FREE = ('fastv', 'pdrop', 'random', 'uniform')
METHOD_ORDER = ('dense', 'dynamic') + TRAINING_FREE


def key(method, budget):
  return f'{method}@{float(budget)}'


def pdrop_ratios(budget, layers, sparse_layer):
  """Halving ratios over the layers [sparse_layer, layers) whose mean is `budget` (first capped at 1)."""
  m = layers - sparse_layer
  x = min(1.0, budget * m / sum(0.5 ** i for i in range(m)))
  return tuple(range(sparse_layer, layers)), tuple(x * 0.5 ** i for i in range(m))


def method_specs(model_cfg, budgets=BUDGETS, methods=METHOD_ORDER):
  """[(key, method name, stage (2 | 3), image_keep_ratio for the config, sparsifier overrides)]."""
  sl, n_layers = int(model_cfg.sparse.sparse_layer), int(model_cfg.llm.layers)
  out = []
  if 'dense' in methods:
    out.append((key('dense', 1.0), 'dense', 2, None, {}))
  for m in methods:
    if m == 'dense':
      continue
    for r in budgets:
      if m == 'dynamic':
        out.append((key(m, r), m, 3, r, {}))
      elif m in ('random', 'uniform'):
        out.append((key(m, r), m, 2, r, {}))
      elif m == 'fastv':
        out.append((key(m, r), m, 2, None, {'k': sl, 'r': 1.0 - r}))
      elif m == 'pdrop':
        layers, ratios = pdrop_ratios(r, n_layers, sl)
        out.append((key(m, r), m, 2, None, {'layers': layers, 'ratios': ratios}))
      else:
        raise ValueError(f'demo: method {m!r} unknown; use {METHOD_ORDER}')
  return out


def majority(train_samples, test_samples):
  """Exact match of always answering the most frequent training answer of the question type."""
  counts = collections.defaultdict(collections.Counter)
  for s in train_samples:
    counts[s['question_type']][s['answer']] += 1
  hits = collections.defaultdict(list)
  for s in test_samples:
    c = counts[s['question_type']]
    guess = c.most_common(1)[0][0] if c else None
    hits[s['question_type']].append(float(guess == s['answer']))
    hits['all'].append(float(guess == s['answer']))
  return {k: float(np.mean(v)) for k, v in sorted(hits.items())}


def evaluate_all(stage_models, samples, tok, *, budgets=BUDGETS, methods=METHOD_ORDER, batch_size=64,
                 report=print):
  """stage_models: {2: (model, config), 3: (model, config)}. Returns {key: row} (`evaluate_method` rows
  plus 'key', 'budget', 'stage')."""
  from dynllava_jax.model.projector import num_visual_tokens as num_image_tokens  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval.run import engine_prefill_flops, evaluate_method  # pylint: disable=g-import-not-at-top
  from dynllava_jax.sparsity.registry import make_sparsifier  # pylint: disable=g-import-not-at-top
  rows = {}
  mc = stage_models[2][1].model  # prefill FLOPs: analytic, batch 1, the mean test prompt, real length
  mean_prompt = int(round(np.mean([len(s['prompt_ids']) for s in samples])))
  text_tokens = max(1, mean_prompt - num_image_tokens(mc))
  for k, name, stage, ratio, overrides in method_specs(mc, budgets, methods):
    model, config = stage_models[stage]
    cfg = config
    if ratio is not None:
      cfg = config.copy_and_resolve_references()
      cfg.model.sparse.image_keep_ratio = float(ratio)
    row = evaluate_method(model, cfg, name, samples, tok, batch_size=batch_size, timing_runs=0,
                          overrides=overrides, ppl=False, xla_flops=False)
    # The engine packs prompts to eval.prefill_bucket (one compile); count FLOPs at the real length.
    method = make_sparsifier(name, cfg, **overrides)
    _, row['prefill_flops_analytic'] = engine_prefill_flops(mc, method, text_tokens, 1, 1, xla=False)
    row.update(key=k, budget=float(k.split('@')[1]), stage=stage)
    rows[k] = row
    acc = row['accuracy_by_type']
    report(f'  {k:14s} all {acc["all"]:.3f}  ' + '  '.join(
        f'{t} {v:.3f}' for t, v in acc.items() if t != 'all') +
        f'  image {row["kept_image_ratio"]:.3f} text {row["kept_text_ratio"]:.3f}')
  return rows


def make_summary(rows, majority_acc, test_samples, wall_s):
  """The `<workdir>/summary.json` dict (schema in docs/demo.md)."""
  methods = {}
  for k, r in rows.items():
    methods[k] = {'method': r['method'], 'image_keep': float(r['kept_image_ratio']),
                  'text_keep': float(r['kept_text_ratio']),
                  'accuracy': {t: float(v) for t, v in r['accuracy_by_type'].items()},
                  'prefill_flops': float(r['prefill_flops_analytic']),
                  'kv_cache_bytes': float(r['kv_cache_bytes'])}
  return {'methods': methods, 'majority': {t: float(v) for t, v in majority_acc.items()},
          'test_samples': int(test_samples), 'wall_s': float(wall_s)}


def check_summary(summary):
  """Raises ValueError naming the first field that breaks the documented schema."""
  if set(summary) != {'methods', 'majority', 'test_samples', 'wall_s'}:
    raise ValueError(f'summary keys {sorted(summary)}')
  for k in ('dense@1.0', 'dynamic@0.2'):
    if k not in summary['methods']:
      raise ValueError(f'summary.methods lacks {k}')
  fields = {'method': str, 'image_keep': float, 'text_keep': float, 'accuracy': dict,
            'prefill_flops': float, 'kv_cache_bytes': float}
  for k, m in summary['methods'].items():
    if set(m) != set(fields) or any(not isinstance(m[f], t) for f, t in fields.items()):
      raise ValueError(f'summary.methods[{k!r}] = {m}')
    if k.split('@')[0] != m['method'] or 'all' not in m['accuracy']:
      raise ValueError(f'summary.methods[{k!r}]: method name or accuracy["all"] wrong')
    if not all(isinstance(v, float) for v in m['accuracy'].values()):
      raise ValueError(f'summary.methods[{k!r}].accuracy has a non-float')
  if not isinstance(summary['test_samples'], int) or not isinstance(summary['wall_s'], float):
    raise ValueError('summary.test_samples must be int and wall_s float')
  return summary


def markdown_table(rows, majority_acc, types):
  """One line per key: exact match per question type, overall, description token accuracy, kept
  image / text ratios, prefill GFLOPs (analytic, batch 1, mean prompt), KV KiB at the end of the answer
  (all samples; describe samples)."""
  cols = ['key'] + types + ['all', 'describe tok', 'image kept', 'text kept', 'prefill GFLOPs',
                            'KV KiB (all)', 'KV KiB (describe)']
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for k, r in rows.items():
    acc, ta, kv = r['accuracy_by_type'], r['token_accuracy_by_type'], r['kv_cache_bytes_by_type']
    cells = [k] + [f'{acc.get(t, float("nan")):.3f}' for t in types] + [
        f'{acc["all"]:.3f}', f'{ta.get("describe", float("nan")):.3f}', f'{r["kept_image_ratio"]:.3f}',
        f'{r["kept_text_ratio"]:.3f}', f'{r["prefill_flops_analytic"] / 1e9:.4f}',
        f'{r["kv_cache_bytes"] / 1024:.1f}', f'{kv.get("describe", float("nan")) / 1024:.1f}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines.append('| majority | ' + ' | '.join(f'{majority_acc.get(t, float("nan")):.3f}' for t in types) +
               f' | {majority_acc.get("all", float("nan")):.3f} |' + ' |' * 7)
  return '\n'.join(lines)
