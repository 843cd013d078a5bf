"""The evaluation harness behind `eval.py`: every method through the same engine, one row per method.

    rows = run_eval(config, workdir, ['dense', 'dynamic', 'fastv', 'pdrop', 'random', 'uniform'])

One row per method (or per (method, budget) of a sweep: `eval/budgets.py`); the row keys
(`report.COLUMNS`), the outputs under `<out_dir>` and how each figure is measured: docs/eval.md.
"""
import math
import os
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynllava_jax.model.projector import num_visual_tokens as num_image_tokens
from dynllava_jax.decode import request as R
from dynllava_jax.decode.generate import generate
from dynllava_jax.decode.prefill import prefill, sparse_forward
from dynllava_jax.errors import UserError, one_line
from dynllava_jax.eval import flops as F
from dynllava_jax.eval import metrics as M
from dynllava_jax.eval import report
from dynllava_jax.eval import teacher
from dynllava_jax.model.llava import Llava
from dynllava_jax.sparsity.registry import make_sparsifier

DEFAULT_METHODS = ('dense', 'dynamic', 'fastv', 'pdrop', 'random', 'uniform')


# ---------------------------------------------------------------- model

def load_model(config, workdir, allow_random_init=False, report_fn=print, step=None, params_only=False):
  """The newest restorable checkpoint's model from `<workdir>/checkpoints` -> (model, step); with `step`,
  that step's (a UserError when it is missing or does not restore).

  params_only: restore just the params and frozen params (no optimizer state: a third of the memory for
  AdamW), each leaf verified against the step's stored digest; any failure falls back to the full
  restore below (and its messages). Without a checkpoint: a random-init model (step None) only when
  allow_random_init, else ValueError.
  """
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
    from dynllava_jax import sharding as shd  # pylint: disable=g-import-not-at-top
    from dynllava_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
    from dynllava_jax.train import optim  # pylint: disable=g-import-not-at-top
    from dynllava_jax.train import state as st  # pylint: disable=g-import-not-at-top
    mesh = shd.make_mesh(config.mesh)
    tx = optim.make_optimizer(config.train, optim.restart_step(config))
    graphdef, abstract, sh = st.state_shardings(mesh, config, tx)
    ck = ckpt_lib.Checkpointer(workdir, async_save=False,   # frozen params left out: rebuilt as training did
                               frozen_source=lambda: st.init_frozen(mesh, config, tx, sh))
    try:
      if step is not None and int(step) not in ck.steps():
        raise UserError(f'--step {step}: {ckpt_dir} has steps {ck.steps()}')
      if params_only:
        got = _restore_params_verified(ck, ck.steps()[-1] if step is None else int(step),
                                       st.abstract_with_shardings(abstract, sh))
        if got is not None:
          return st.merge_model(graphdef, got[1]), got[0]
      if step is None:
        restored = ck.restore_latest(st.abstract_with_shardings(abstract, sh), report=report_fn,
                                      strict=False)
      else:
        try:
          state, _ = ck.restore(int(step), st.abstract_with_shardings(abstract, sh))
          restored = (int(step), state, None)
        except Exception as e:  # pylint: disable=broad-except  (another optimizer: params only below)
          report_fn(f'checkpoint {ckpt_dir}/{step} does not restore whole ({one_line(e, 160)})')
          restored = None
      if restored is None:
        restored = _restore_params_only(ck, graphdef, abstract, report_fn, step)
    finally:
      ck.close()
    if restored is not None:
      got, state, _ = restored
      return st.merge_model(graphdef, state), int(got)
    if not allow_random_init:
      raise ValueError(f'no checkpoint in {ckpt_dir} restores; pass --allow_random_init to evaluate a '
                       'random-init model')
  elif not allow_random_init:
    raise ValueError(f'no checkpoint in {ckpt_dir}; train first (train.py --workdir {workdir}) or pass '
                     '--allow_random_init to evaluate a random-init model')
  return nnx.jit(lambda: Llava(config.model, rngs=nnx.Rngs(config.seed)))(), None


def _restore_params_verified(ck, step, target):
  """(step, {'params', 'frozen'}) restored alone (orbax partial restore) and checked leaf by leaf against
  the step's stored signature and digest; None when that is not possible (no meta, another structure,
  a damaged step): the caller then takes the full path."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  meta = ck.meta(step)
  if not meta:
    return None
  sub = {k: target[k] for k in ('params', 'frozen')}
  try:
    out = ck.mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        sub, restore_args=ocp.checkpoint_utils.construct_restore_args(sub), partial_restore=True)))['state']
  except Exception:  # pylint: disable=broad-except
    return None
  stored = {p: (list(shape), dt, list(d)) for (p, shape, dt), d in zip(meta['signature'], meta['digest'])}
  for (p, shape, dt), d in zip(ckpt_lib.signature(out), ckpt_lib.digest(out)):
    if stored.get(p) != (list(shape), dt, list(d)) or d[2]:
      return None
  return int(step), out


def _top_modules(tree):
  return {k for part in ('params', 'frozen') for k in tree.get(part, {})}


def _restore_params_only(ck, graphdef, abstract, report_fn, step=None):
  """Fallback when the full train-state restore fails (e.g. another optimizer): the newest step's params
  and frozen params only, unsharded. Returns (step, state, None) or None; a model-structure mismatch is a
  ValueError naming the modules that differ (e.g. a checkpoint trained without predictors)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  steps = ck.steps()
  if not steps:
    return None
  step = steps[-1] if step is None else int(step)
  try:
    raw = ck.mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  except Exception as e:  # pylint: disable=broad-except  (truncated / damaged: said in one line)
    raise UserError(f'no checkpoint in {ck.directory} restores (newest, step {step}: {one_line(e, 160)}); '
                    'evaluate another workdir or retrain') from None
  want, got = _top_modules(abstract), _top_modules(raw)
  if want != got:
    raise ValueError(f'checkpoint {ck.directory}/{step} holds modules {sorted(got)} but this config builds '
                     f'{sorted(want)}; evaluate with the config it was trained with (e.g. '
                     f'configs/dynllava.py:size=tiny,dense=True for a model without predictors)')
  for part in ('params', 'frozen'):    # another model size: name the first param whose shape differs
    shapes = {jax.tree_util.keystr(p): tuple(np.shape(a)) for p, a in
              jax.tree_util.tree_flatten_with_path(raw[part])[0]}
    for p, x in jax.tree_util.tree_flatten_with_path(abstract[part])[0]:
      key = jax.tree_util.keystr(p)
      if key in shapes and shapes[key] != tuple(x.shape):
        raise UserError(f'checkpoint {ck.directory}/{step} was trained with another model size: {part}{key} '
                        f'is {shapes[key]} there, {tuple(x.shape)} in this config; evaluate with the config '
                        'it was trained with')
  try:
    state = {'params': jax.tree.map(lambda a, x: jnp.asarray(a, x.dtype), raw['params'], abstract['params']),
             'frozen': jax.tree.map(lambda a, x: jnp.asarray(a, x.dtype), raw['frozen'], abstract['frozen'])}
  except ValueError as e:
    raise ValueError(f'checkpoint {ck.directory}/{step}: parameters do not match this config ({e})') from None
  report_fn(f'restored params only from {ck.directory}/{step}')
  return step, state, None


# ---------------------------------------------------------------- FLOPs of the engine's prefill

def layer_lengths(method, model_cfg, sizes):
  """Per-LLM-layer sequence length from the engine's static segment sizes."""
  bounds = R.boundaries(method, model_cfg) + (model_cfg.llm.layers,)
  out, start = [], 0
  for size, stop in zip(sizes, bounds):
    out += [size] * (stop - start)
    start = stop
  return out


def engine_prefill_flops(model_cfg, method, text_tokens, batch=1, bucket=16, xla=True, visual_tokens=None):
  """(XLA FLOPs, analytic FLOPs) of the engine's prefill (`sparse_forward` with KV outputs) for `batch`
  prompts of `text_tokens` text + N image tokens, on abstract shapes (no weights are allocated).
  xla=False skips XLA's count (a compile): (nan, analytic). visual_tokens: MQT m (N = m); a pre-LLM
  reducer method sets its own N = k."""
  from dynllava_jax.model.projector import visual_token_count  # pylint: disable=g-import-not-at-top
  n = visual_token_count(model_cfg, method, visual_tokens)
  n_real = np.full((batch,), text_tokens + n, np.int32)
  n_img = np.full((batch,), n, np.int32)
  t0 = R.round_up(text_tokens + n, bucket)
  sizes = R.segment_sizes(method, model_cfg, n_real, n_img, t0, bucket, n_visual=n)
  analytic = F.prefill_flops(model_cfg, method, text_tokens, batch,
                             seq_lens=layer_lengths(method, model_cfg, sizes),
                             causal_chunk=int(model_cfg.get('causal_chunk', 0)), last_query=True,
                             visual_tokens=visual_tokens)['total']
  if not xla:
    return float('nan'), analytic
  graphdef, state = F.abstract_model(model_cfg)

  def fn(state, ids, count, pix):
    model = nnx.merge(graphdef, state)
    h, image_mask = model.embed(ids, pix, visual_tokens, method)
    valid = jnp.arange(ids.shape[1])[None, :] < count[:, None]
    out = sparse_forward(model, method, h, valid, image_mask, None, jax.random.key(0), sizes=sizes, n_image=n)
    return out.logits_last, [s.kv for s in out.segments]

  s = model_cfg.vision.image_size
  xla = F.xla_flops(fn, state, jax.ShapeDtypeStruct((batch, t0), jnp.int32),
                    jax.ShapeDtypeStruct((batch,), jnp.int32),
                    jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32))
  return xla, analytic


# ---------------------------------------------------------------- data

def _load_samples(config, split, limit):
  from dynllava_jax.data import builders  # pylint: disable=g-import-not-at-top
  from dynllava_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from dynllava_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  builders.build(config)
  tok = tok_lib.load_tokenizer(builders.tokenizer_path(config))
  samples = pipeline.make_eval_samples(config, split, limit)
  if not samples:
    raise ValueError(f'{config.data.name}/{split} gave no eval samples')
  return samples, tok


def _batches(samples, batch_size):
  return [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]


def _prompt_batch(config, batch):
  from dynllava_jax.data.pipeline import left_pad_batch  # pylint: disable=g-import-not-at-top
  ids, mask = left_pad_batch([s['prompt_ids'] for s in batch], config.model.pad_token_id)
  pix = np.stack([s['pixel_values'] for s in batch]).astype(np.float32)
  return ids, mask, pix


def long_answer_batches(config, samples, batch_size):
  """Right-padded teacher-forcing batches of the long-answer samples, one static shape:
  (ids (B, L), mask, pix, last_index (B,), weight (B,) 1 = real row, 0 = filler)."""
  min_len = int(config.model.sparse.len_ot)
  long = [s for s in samples
          if int(s['full']['answer_end']) - int(s['full']['answer_start']) >= min_len]
  if not long:
    return []
  length = R.round_up(max(int(s['full']['answer_end']) for s in long), config.eval.prefill_bucket)
  out = []
  for group in _batches(long, batch_size):
    rows = group + [group[0]] * (batch_size - len(group))
    ids = np.full((batch_size, length), config.model.pad_token_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for b, s in enumerate(rows):
      e = int(s['full']['answer_end'])
      ids[b, :e], mask[b, :e] = s['full']['input_ids'][:e], 1
    last = np.array([int(s['full']['answer_start']) - 1 for s in rows], np.int32)
    pix = np.stack([s['pixel_values'] for s in rows]).astype(np.float32)
    weight = (np.arange(batch_size) < len(group)).astype(np.float32)
    out.append((ids, mask, pix, last, weight))
  return out


# ---------------------------------------------------------------- one method

def _is_digits(config):
  return config.data.name == 'digits_vqa'


def image_keep_grids(model, config, method, ids, mask, pix, rng):
  """(B, N) bool: which image patches the method's prefill keeps to the last layer (from the engine; the
  prefill key is derived from `rng` as `generate` derives it)."""
  pre = prefill(model, config, method, ids, pix, mask, rng=jax.random.split(rng)[0],
                max_new_tokens=int(config.eval.max_new_tokens))   # the same compiled program as generate's
  kept = np.asarray(pre.out.kept[-1])
  packed = pre.request.ids
  n = num_image_tokens(model.mc)
  out = np.ones((packed.shape[0], n), bool)
  for b in range(packed.shape[0]):
    slots = np.flatnonzero(packed[b, :pre.request.n_real[b]] == model.mc.image_token_id)
    if slots.size == n:
      out[b] = kept[b, slots]
  return out


def _decode_ms_per_token(model, config, method, ids, pix, mask, max_new, rng, runs):
  """Warm decode ms/token: generations of max_new and of 1 token, EOS ignored so both run their full length,
  timed in `runs` interleaved pairs; the median of (t_long − t_short) / (max_new − 1). nan if max_new < 2."""
  if max_new < 2:
    return float('nan')

  def gen(m):
    return generate(model, config, method, ids, pix, mask, max_new_tokens=m, sampling='greedy', rng=rng,
                    eos_token_id=-1).tokens

  for m in (1, max_new):                    # compile both shapes
    jax.block_until_ready(gen(m))
  per_pair = []
  for _ in range(max(int(runs), 1)):
    t = {}
    for m in (1, max_new):
      t0 = time.perf_counter()
      jax.block_until_ready(gen(m))
      t[m] = time.perf_counter() - t0
    per_pair.append(M.decode_ms_per_token(t[max_new], max_new, t[1], 1))
  return latency_or_nan(statistics.median(per_pair), f'{method.name} decode ms/token', len(per_pair))


def latency_or_nan(value, what, runs=1):
  """`value` when it is a positive number; else nan with a warning (timing noise beat the signal: a tiny
  model on a busy machine), never a negative latency."""
  if value > 0 and math.isfinite(value):
    return float(value)
  warnings.warn(f'{what} could not be measured (median {value:.4g} over {runs} runs); reported as nan. '
                'Use more --timing_runs or a quieter machine.')
  return float('nan')


def token_accuracy(generated, gold):
  """Fraction of the gold ids matched position by position by the generated ids (both 1-D)."""
  gold = np.asarray(gold)
  if gold.size == 0:
    return 1.0
  gen = np.asarray(generated)[:gold.size]
  return float(np.sum(gen == gold[:gen.size]) / gold.size)


def per_sample_kv_bytes(caches):
  """(B,) K/V bytes holding tokens per sample (the per-sample split of `cache.used_bytes`)."""
  from dynllava_jax.decode import cache as C  # pylint: disable=g-import-not-at-top
  return sum(C.bytes_per_token(c) * np.asarray(c.length).astype(np.float64) for c in caches)


def by_type(values, types):
  """{question type: mean, ..., 'all': mean} of per-sample values."""
  out = {t: float(np.mean([v for v, u in zip(values, types) if u == t])) for t in sorted(set(types))}
  out['all'] = float(np.mean(values)) if values else float('nan')
  return out


def evaluate_method(model, config, name, samples, tok, *, batch_size=8, timing_runs=3, rng=None,
                    overrides=None, ppl=True, xla_flops=True):
  """One row of results for method `name` (see the module docstring); row['predictions'] holds the
  per-sample records (run_eval writes them to predictions/<label>.jsonl and drops them from the row).

  overrides: keyword settings of the method (`make_sparsifier(name, config, **overrides)`, e.g. FastV's
  k, r); ppl=False skips the teacher-forced perplexity (nan), timing_runs=0 the timings (nan),
  xla_flops=False XLA's FLOP count (nan; the analytic count stays)."""
  mc = model.mc
  method = make_sparsifier(name, config, **(overrides or {}))
  from dynllava_jax.model.projector import visual_token_count  # pylint: disable=g-import-not-at-top
  n_vis = visual_token_count(mc, method)
  if n_vis != num_image_tokens(mc):     # a pre-LLM reducer (VisionZip, DivPrune): prompts with its k slots
    from dynllava_jax.eval.visual_prompts import resize_sample  # pylint: disable=g-import-not-at-top
    samples = [resize_sample(s, mc.image_token_id, n_vis) for s in samples]
  rng = jax.random.key(config.seed) if rng is None else rng
  max_new = int(config.eval.max_new_tokens)
  _ = method.drop_points(mc)          # a budget this model cannot run: one line before any compile
  match = M.digits_match if _is_digits(config) else M.vqa_match
  scores, tok_acc, kv_sample, img_ratios, txt_ratios, kv_final, kv_pre = [], [], [], [], [], 0, 0
  predictions = []
  first = None
  for batch in _batches(samples, batch_size):
    ids, mask, pix = _prompt_batch(config, batch)
    out = generate(model, config, method, ids, pix, mask, max_new_tokens=max_new, sampling='greedy',
                   rng=rng, return_caches=True)
    first = first or (ids, mask, pix)
    kv_b = per_sample_kv_bytes(out.caches)
    for b, s in enumerate(batch):
      gen = [int(t) for t in out.tokens[b, :out.lengths[b]]]
      text = tok.decode(gen)
      scores.append(match(text, s['answer']))
      f = s['full']
      tok_acc.append(token_accuracy(gen, f['input_ids'][int(f['answer_start']):int(f['answer_end'])]))
      kv_sample.append(float(kv_b[b]))
      predictions.append({'id': s['id'], 'record_id': s['record_id'], 'question_type': s['question_type'],
                          'prediction': text, 'answer': s['answer'], 'correct': scores[-1],
                          'token_accuracy': tok_acc[-1], 'kept_image_ratio': float(out.kept_image_ratio[b]),
                          'kept_text_ratio': float(out.kept_text_ratio[b]), 'kv_bytes': kv_sample[-1]})
      if s['has_image']:
        img_ratios.append(float(out.kept_image_ratio[b]))
      txt_ratios.append(float(out.kept_text_ratio[b]))
    kv_final += out.kv_cache_bytes_final
    kv_pre += out.kv_cache_bytes_prefill
  types = [s['question_type'] for s in samples]

  nll_fn = teacher.make_answer_nll(method, nnx.graphdef(model))
  state = nnx.state(model)
  nll, cnt = 0.0, 0.0
  for ids, mask, pix, last, w in (long_answer_batches(config, samples, batch_size) if ppl else []):
    s, c = nll_fn(state, jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask), jnp.asarray(last), rng)
    nll += float(np.sum(np.asarray(s) * w))
    cnt += float(np.sum(np.asarray(c) * w))

  ids, mask, pix = first
  prefill_s = decode_ms = float('nan')
  if timing_runs > 0:
    prefill_s, _ = M.time_call(lambda: prefill(model, config, method, ids, pix, mask, rng=rng,
                                               max_new_tokens=max_new).out.logits_last,
                               runs=timing_runs)
    decode_ms = _decode_ms_per_token(model, config, method, ids, pix, mask, max_new, rng, timing_runs)

  text_tokens = int(round(np.mean([len(s['prompt_ids']) for s in samples]))) - n_vis
  xla, analytic = engine_prefill_flops(mc, method, max(text_tokens, 1), 1, int(config.eval.prefill_bucket),
                                       xla=xla_flops)
  n = len(samples)
  return {
      'method': name,
      'accuracy': M.accuracy(scores),
      'ppl': M.perplexity(nll, cnt),
      # of the model's N image tokens (a pre-LLM reducer already kept n_vis of them before the LLM)
      'kept_image_ratio': float(np.mean(img_ratios)) * n_vis / num_image_tokens(mc) if img_ratios else 1.0,
      'kept_text_ratio': float(np.mean(txt_ratios)) if txt_ratios else 1.0,
      'prefill_flops_eq13': F.eq13_flops(mc, method),
      'prefill_flops_xla': xla,
      'prefill_flops_analytic': analytic,
      'kv_cache_bytes': kv_final / n,
      'kv_cache_bytes_prefill': kv_pre / n,
      'prefill_s': prefill_s,
      'decode_ms_per_token': decode_ms,
      'num_samples': n,
      'accuracy_by_type': by_type(scores, types),
      'token_accuracy_by_type': by_type(tok_acc, types),
      'kv_cache_bytes_by_type': by_type(kv_sample, types),
      'kept_text_ratio_by_type': by_type(txt_ratios, types),
      'samples_by_type': {t: types.count(t) for t in sorted(set(types))},
      'ppl_tokens': cnt,
      'settings': method.describe(),
      'predictions': predictions,
  }


# ---------------------------------------------------------------- all methods

def check_methods(config, methods):
  methods = [m.strip() for m in methods if m.strip()]
  if not methods:
    raise ValueError('no methods given; e.g. --methods dense,dynamic,fastv')
  for m in methods:
    make_sparsifier(m, config)          # unknown names raise with the known list
    if m.startswith('dynamic') and not config.model.sparse.enabled:
      raise ValueError(f'method {m!r} needs the keep-predictors: use a config with model.sparse.enabled=True '
                       '(configs/dynllava.py without dense=True) or drop it from --methods')
  return methods


def run_eval(config, workdir, methods=DEFAULT_METHODS, *, allow_random_init=False, split='validation',
             limit=None, batch_size=8, timing_runs=3, json_path=None, plots=True, report_fn=print,
             model=None, step=None, out_dir=None, keep_ratios=(), sweep_extra=None):
  """Evaluates each method (each budget of a sweep: `keep_ratios`, `sweep_extra`, see eval/budgets.py);
  writes <out_dir>/{results.md,results.json,*.png,predictions/*.jsonl} (+ json_path); out_dir defaults
  to <workdir>/eval. model / step: an already loaded model (`dynllava_jax.source.load_source`) instead of
  restoring one from the workdir. Returns the list of row dicts."""
  from dynllava_jax.eval import budgets  # pylint: disable=g-import-not-at-top
  methods = check_methods(config, methods)
  points = budgets.sweep_points(methods, keep_ratios, sweep_extra)
  for name, ov in points:
    make_sparsifier(name, config, **ov).drop_points(config.model)      # bad budgets: before the restore
  if model is None:
    model, step = load_model(config, workdir, allow_random_init, report_fn)
  samples, tok = _load_samples(config, split, limit)
  report_fn(f'evaluating {[budgets.label(*p) for p in points]} on {config.data.name}/{split}: '
            f'{len(samples)} samples, {"random init" if step is None else f"checkpoint step {step}"}')
  out_dir = out_dir or os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  for name, ov in points:
    row = evaluate_method(model, config, name, samples, tok, batch_size=batch_size, timing_runs=timing_runs,
                          overrides=ov)
    label = budgets.label(name, ov)
    row.update(method=label, base_method=name, overrides=dict(ov), checkpoint_step=step)
    report.write_jsonl(os.path.join(out_dir, 'predictions', _file_name(label) + '.jsonl'),
                       row.pop('predictions'))
    rows.append(row)
    report_fn(f'  {label}: accuracy {row["accuracy"]:.4f}  ppl {row["ppl"]:.4g}  kept image '
              f'{row["kept_image_ratio"]:.3f} text {row["kept_text_ratio"]:.3f}')
  table = report.write_results(out_dir, 'results', f'eval: {config.data.name}/{split}, {len(samples)} samples, '
                               f'{"random init" if step is None else f"step {step}"}', rows, json_path=json_path)
  if plots:
    report.plot_accuracy_vs_flops(rows, os.path.join(out_dir, 'accuracy_vs_flops.png'))
    report.plot_accuracy_vs_flops(rows, os.path.join(out_dir, 'accuracy_vs_kv.png'), cost_key='kv_cache_bytes')
    imgs = [s for s in samples if s['has_image']][:4]
    if imgs:
      ids, mask, pix = _prompt_batch(config, imgs)
      keeps = {name: list(image_keep_grids(model, config, make_sparsifier(name, config), ids, mask, pix,
                                           jax.random.key(config.seed))) for name in methods}
      report.plot_kept_patches(list(pix), keeps, methods, os.path.join(out_dir, 'kept_patches.png'))
  report_fn(table)
  return rows


def _file_name(label):
  return ''.join(c if c.isalnum() or c in '._=-' else '_' for c in label)
