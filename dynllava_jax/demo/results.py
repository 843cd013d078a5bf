"""The demo's result: every method at several image-token budgets on the test split, by generation.

    rows = evaluate_all(configs, dirs, samples, tok)      # one row per '<method>@<budget>' key
    summary = make_summary(rows, majority, test_samples, wall_s)

Keys are `<method>@<budget>`: for the image-token methods the budget is the kept fraction of image
tokens asked for, written as Python prints the float (`dense@1.0`, `dynamic@0.2`, `fastv@0.35`, ...); for
the layer-pruned models it is the number of decoder layers removed (`prune_bi@1`). Methods and models:
  dense@1.0           stage 2 (the dense LLaVA), every token kept
  dynamic@r           stage 3 (Dynamic-LLaVA), top-k ⌊N·r⌋ image tokens at `sparse_layer`, output-text
                      pruning in decoding (trained at r_I = 0.2, r_OT = 0.5; r only changes k at inference)
  dynamic_cal@0.2     the same with the output-text rule `text_margin=θ` (an option, not the released
                      rule): θ = the (1 − r_OT) quantile of the predictor's keep margins on the validation
                      descriptions (`text_margin_quantile`), so it keeps ~r_OT of the generated tokens
  dynamic_image@0.2   the same model and image rule without output-text pruning (every generated token kept)
  random@r, uniform@r stage 2, ⌊N·r⌋ image tokens at `sparse_layer` (the same budget as dynamic@r)
  fastv@r             stage 2, FastV with K = max(sparse_layer, 1) and R = 1 − r (round(N·r) kept from layer
                      K on; its score is layer K−1's attention)
  pdrop@r             stage 2, PyramidDrop dropping entering every layer from max(sparse_layer, 1) on, the kept
                      fractions halving per layer (x, x/2, x/4, ...) with x chosen so their mean equals r:
                      the same image-token·layers in the prefill as the others at r
  visionzip@r,        stage 2, ⌊N·r⌋ visual tokens handed to the LLM by the pre-LLM reducers (VisionZip:
  divprune@r          dominant + contextual tokens from the tower's CLS attention; DivPrune: the max-min
                      diverse subset of the projected tokens); prompts carry that many image slots
  prune_bi@k,         stage 2 with k decoder layers removed (`tools/prune.prune_model`): the k lowest Block
  prune_random@k      Influence layers outside the visual region (BI over 64 validation prompts), or k of
                      the same candidates drawn at random by (seed, k); the region is `prune_region` (the
                      demo's `configs/demo.py:VISUAL_REGION`, the layer demo-more's region stages tune)
All use `dynllava_jax.eval.run.evaluate_method` (the engine's greedy KV-cache generation).
"""
import collections

import numpy as np

BUDGETS = (0.1, 0.2, 0.35, 0.5)
PRUNE_LAYERS = (1,)     # decoder layers removed by prune_bi / prune_random (of the 4; the region's layer stays)
# VisionZip and DivPrune in `make demo`: at 20 % only (issue 12's comparison point, beside Dynamic-LLaVA);
# their sweep over token counts is `make demo-more`'s matched rows (m / 64). Keeps `make demo` in 15 min.
REDUCER_BUDGETS = (0.2,)
REDUCERS = ('visionzip', 'divprune')     # pre-LLM reducers: ⌊N·r⌋ projected tokens handed to the LLM
TRAINING_FREE = ('fastv', 'pdrop', 'random', 'uniform') + REDUCERS
PRUNE = ('prune_bi', 'prune_random')
CAL_BUDGET = 0.2        # dynamic_cal and dynamic_image run at the trained r_I only
METHOD_ORDER = ('dense', 'dynamic', 'dynamic_cal', 'dynamic_image') + TRAINING_FREE + PRUNE


def key(method, budget):
  return f'{method}@{budget}' if method in PRUNE else f'{method}@{float(budget)}'


def pdrop_ratios(budget, layers, sparse_layer):
  """Halving ratios over the layers [sparse_layer, layers) whose mean is `budget` (first capped at 1)."""
  m = layers - sparse_layer
  x = min(1.0, budget * m / sum(0.5 ** i for i in range(m)))
  return tuple(range(sparse_layer, layers)), tuple(x * 0.5 ** i for i in range(m))


def method_specs(model_cfg, budgets=BUDGETS, methods=METHOD_ORDER, prune_layers=PRUNE_LAYERS,
                 reducer_budgets=None):
  """One dict per key: {key, method (the key's name), sparsifier (the registry name run), stage (2 | 3),
  ratio (model.sparse.image_keep_ratio for the config, or None), overrides (sparsifier keywords),
  prune (k decoder layers to remove, 0 = none)}. reducer_budgets: VisionZip's and DivPrune's budgets
  (None = `budgets`)."""
  from dynllava_jax.model.projector import num_visual_tokens  # pylint: disable=g-import-not-at-top
  from dynllava_jax.sparsity.base import keep_budget  # pylint: disable=g-import-not-at-top
  sl, n_layers = int(model_cfg.sparse.sparse_layer), int(model_cfg.llm.layers)
  k_attn = max(sl, 1)   # FastV / PyramidDrop score with the attention of the layer before: from layer 1
  n = num_visual_tokens(model_cfg)
  spec = lambda m, b, **kw: {'key': key(m, b), 'method': m, 'sparsifier': m, 'stage': 2, 'ratio': None,
                             'overrides': {}, 'prune': 0, **kw}
  out = []
  if 'dense' in methods:
    out.append(spec('dense', 1.0))
  for m in methods:
    if m == 'dense':
      continue
    if m in PRUNE:
      out += [spec(m, k, sparsifier='dense', prune=k) for k in prune_layers]
      continue
    for r in (reducer_budgets if m in REDUCERS and reducer_budgets is not None else budgets):
      if m == 'dynamic':
        out.append(spec(m, r, stage=3, ratio=r))
      elif m == 'dynamic_cal':   # the calibrated output-text threshold (evaluate_all sets text_margin)
        if r == CAL_BUDGET:      # at the trained r_I only
          out.append(spec(m, r, sparsifier='dynamic', stage=3, ratio=r))
      elif m == 'dynamic_image':   # the image rule alone: what the output-text rule costs
        if r == CAL_BUDGET:
          out.append(spec(m, r, stage=3, ratio=r))
      elif m in ('random', 'uniform'):
        out.append(spec(m, r, ratio=r))
      elif m == 'fastv':
        out.append(spec(m, r, overrides={'k': k_attn, 'r': 1.0 - r}))
      elif m == 'pdrop':
        layers, ratios = pdrop_ratios(r, n_layers, k_attn)
        out.append(spec(m, r, overrides={'layers': layers, 'ratios': ratios}))
      elif m in REDUCERS:
        out.append(spec(m, r, overrides={'tokens': keep_budget(n, r)}))
      else:
        raise ValueError(f'demo: method {m!r} unknown; use {METHOD_ORDER}')
  return out


def prune_choice(method, k, bi, model_cfg, seed=0, region=None):
  """The k decoder layers prune_bi (lowest Block Influence outside the visual region, `tools/prune.choose`)
  or prune_random (k of the same candidate layers drawn by (seed, k)) removes, sorted. region: the layers
  to keep, in `model.region`'s syntax ('0', '1,5'); None = model_cfg's own (else the released spread)."""
  from dynllava_jax.tools import prune  # pylint: disable=g-import-not-at-top
  if region is not None:
    model_cfg = model_cfg.copy_and_resolve_references()
    with model_cfg.unlocked():
      model_cfg.region = str(region)
  if method == 'prune_bi':
    return prune.choose(bi, k, model_cfg)
  free = [i for i in range(int(model_cfg.llm.layers)) if i not in set(prune.region_of(model_cfg))]
  rng = np.random.default_rng([int(seed), int(k)])
  return tuple(sorted(int(i) for i in rng.choice(free, int(k), replace=False)))


def spec_keep_grids(model, config, spec, ids, mask, pix):
  """(B, N) bool: which image tokens the method of `spec` (a `method_specs` entry) keeps for these prompts,
  at its budget, with the evaluation's prefill and key (`eval.run.image_keep_grids`)."""
  import jax  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval.run import image_keep_grids  # pylint: disable=g-import-not-at-top
  from dynllava_jax.sparsity.registry import make_sparsifier  # pylint: disable=g-import-not-at-top
  if spec['ratio'] is not None:
    config = config.copy_and_resolve_references()
    config.model.sparse.image_keep_ratio = float(spec['ratio'])
  method = make_sparsifier(spec['sparsifier'], config, **spec['overrides'])
  return image_keep_grids(model, config, method, ids, mask, pix, jax.random.key(config.seed))


def text_margin_quantile(model, config, samples, batch_size=16):
  """(θ, margins): the output-text predictor's keep margins logit0 − logit1 on the answer tokens of the
  long answers (≥ len_ot) among `samples`, teacher-forced with inference's image decisions (the per-sample
  top k; `train_forward(image_topk=True)`), and θ = their (1 − r_OT) quantile: `text_margin=θ` keeps the
  trained fraction r_OT of these tokens (less where margins tie at θ). The predictor reads the hidden
  state entering `text_layer`, which below it depends on the kept image tokens only, not on earlier text
  decisions, so a generated answer equal to the reference meets these margins. The rule then acts on every
  generated token, short answers too (`text kept` over all answers differs from the descriptions')."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dynllava_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train.forward import train_forward  # pylint: disable=g-import-not-at-top
  len_ot = int(config.model.sparse.len_ot)
  long = [s['full'] for s in samples
          if int(s['full']['answer_end']) - int(s['full']['answer_start']) >= len_ot]
  if not long:
    return 0.0, np.zeros((0,))
  margins = []
  for i in range(0, len(long), batch_size):
    batch = pipeline.pad_batch(long[i:i + batch_size], pipeline.buckets(config), config.model.pad_token_id)
    out = train_forward(model, {k: jnp.asarray(v) for k, v in batch.items()}, tau=0.1, rng=None,
                        image_topk=True)
    lg = np.asarray(out['ot_logits'])
    margins.append((lg[..., 0] - lg[..., 1])[np.asarray(out['ot_span'])])
  m = np.concatenate(margins)
  return float(np.quantile(m, 1.0 - float(config.model.sparse.text_keep_ratio))), m


def block_influence(model, config, samples, batch_size=32):
  """Mean Block Influence per decoder layer of `model` over the prompts of `samples` (numpy (L,))."""
  from dynllava_jax.data.pipeline import left_pad_batch  # pylint: disable=g-import-not-at-top
  from dynllava_jax.tools import block_influence as bi_lib  # pylint: disable=g-import-not-at-top

  def batches():
    for i in range(0, len(samples), batch_size):
      chunk = samples[i:i + batch_size]
      ids, mask = left_pad_batch([s['prompt_ids'] for s in chunk], config.model.pad_token_id)
      yield ids, np.stack([s['pixel_values'] for s in chunk]).astype(np.float32), mask

  return bi_lib.block_influence(model, batches(), 'all')[0]


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


def evaluate_all(stage_models, samples, tok, *, budgets=BUDGETS, methods=METHOD_ORDER, batch_size=100,
                 calib_samples=None, prune_layers=PRUNE_LAYERS, prune_region=None, reducer_budgets=None,
                 report=print):
  """stage_models: {2: (model, config), 3: (model, config)}; calib_samples: the prompts Block Influence
  is measured on (prune_bi; the validation split); prune_region: the layers the prune rows keep
  (`prune_choice`); reducer_budgets: as in `method_specs`. Returns
  {key: row} (`evaluate_method` rows plus 'key', 'budget', 'stage', 'removed_layers' for the pruned
  models)."""
  from dynllava_jax.model.projector import num_visual_tokens as num_image_tokens  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval.run import engine_prefill_flops, evaluate_method  # pylint: disable=g-import-not-at-top
  from dynllava_jax.sparsity.registry import make_sparsifier  # pylint: disable=g-import-not-at-top
  from dynllava_jax.tools import prune  # pylint: disable=g-import-not-at-top
  rows = {}
  mc = stage_models[2][1].model  # prefill FLOPs: analytic, batch 1, the mean test prompt, real length
  mean_prompt = int(round(np.mean([len(s['prompt_ids']) for s in samples])))
  text_tokens = max(1, mean_prompt - num_image_tokens(mc))
  bi = theta = None
  for sp in method_specs(mc, budgets, methods, prune_layers, reducer_budgets):
    model, config = stage_models[sp['stage']]
    cfg, removed = config, ()
    if sp['method'] == 'dynamic_cal':
      if theta is None:
        theta, m = text_margin_quantile(model, config, calib_samples or samples)
        report(f'  output-text keep margins on {m.size} held-out answer tokens: released rule (> 0) keeps '
               f'{np.mean(m > 0):.3f}; calibrated text_margin {theta:.4f} keeps {np.mean(m > theta):.3f}')
      sp = {**sp, 'overrides': {'text_margin': theta}}
    if sp['ratio'] is not None or sp['prune']:
      cfg = config.copy_and_resolve_references()
    if sp['ratio'] is not None:
      cfg.model.sparse.image_keep_ratio = float(sp['ratio'])
    if sp['prune']:
      if bi is None:
        bi = block_influence(model, config, calib_samples or samples)
        report(f'  block influence of the stage-2 layers: {np.round(bi, 4).tolist()}')
      removed = prune_choice(sp['method'], sp['prune'], bi, mc, int(config.seed), prune_region)
      model, cfg.model = prune.prune_model(model, mc, removed)
    row = evaluate_method(model, cfg, sp['sparsifier'], samples, tok, batch_size=batch_size, timing_runs=0,
                          overrides=sp['overrides'], ppl=False, xla_flops=False)
    # The engine packs prompts to eval.prefill_bucket (one compile); count FLOPs at the real length
    # (text tokens + the visual tokens this method hands the LLM).
    method = make_sparsifier(sp['sparsifier'], cfg, **sp['overrides'])
    _, row['prefill_flops_analytic'] = engine_prefill_flops(cfg.model, method, text_tokens, 1, 1, xla=False)
    k = sp['key']
    row.update(method=sp['method'], key=k, budget=float(k.split('@')[1]), stage=sp['stage'],
               removed_layers=list(removed))
    rows[k] = row
    acc = row['accuracy_by_type']
    report(f'  {k:14s} all {acc["all"]:.3f}  ' + '  '.join(
        f'{t} {v:.3f}' for t, v in acc.items() if t != 'all') +
        f'  image {row["kept_image_ratio"]:.3f} text {row["kept_text_ratio"]:.3f}' +
        (f'  removed layers {list(removed)}' if removed else ''))
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
  image / text ratios (text: over every generated token, and over the descriptions' tokens, the long
  answers r_OT is trained on), prefill GFLOPs (analytic, batch 1, mean prompt), KV KiB at the end of the
  answer (all samples; describe samples). A cell a row has no value for (a question type it was not asked)
  is left blank."""
  def cell(d, key, scale=1.0, fmt='.3f'):
    return f'{d[key] / scale:{fmt}}' if key in d else ''
  cols = ['key'] + types + ['all', 'describe tok', 'image kept', 'text kept', 'text kept (describe)',
                            'prefill GFLOPs', 'KV KiB (all)', 'KV KiB (describe)']
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for k, r in rows.items():
    acc, ta, kv = r['accuracy_by_type'], r['token_accuracy_by_type'], r['kv_cache_bytes_by_type']
    cells = [k] + [cell(acc, t) for t in types] + [
        f'{acc["all"]:.3f}', cell(ta, 'describe'), f'{r["kept_image_ratio"]:.3f}',
        f'{r["kept_text_ratio"]:.3f}', cell(r.get('kept_text_ratio_by_type', {}), 'describe'),
        f'{r["prefill_flops_analytic"] / 1e9:.4f}',
        f'{r["kv_cache_bytes"] / 1024:.1f}', cell(kv, 'describe', 1024, '.1f')]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines.append('| majority | ' + ' | '.join(cell(majority_acc, t) for t in types) +
               f' | {cell(majority_acc, "all")} |' + ' |' * (len(cols) - len(types) - 2))
  return '\n'.join(lines)
