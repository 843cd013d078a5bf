"""MQT-LLaVA's accuracy-vs-tokens sweep (`eval.py --mqt_tokens 2,4,8,16`): one model, one row per m.

    rows = run_mqt_sweep(config, '2,4,8,16', model=model, out_dir='runs/mqt/eval', split='validation')

Each eval prompt's placeholders past the first m are removed (`eval/visual_prompts.py`) and the engine
runs with `visual_tokens=m` (greedy, KV cache, no token pruning). Rows (`report.markdown_table`): method
`mqt@<m>`, accuracy (+ by question type), kept_image_ratio m / M, prefill_flops_analytic / _xla (batch 1,
the mean prompt length), num_samples -> <out_dir>/mqt_sweep.{md,json} (docs/eval.md).
"""
import jax
import numpy as np

from dynllava_jax.errors import UserError
from dynllava_jax.eval.visual_prompts import with_visual_tokens
from dynllava_jax.model.projector import elastic, num_visual_tokens


def parse_counts(text, model_cfg):
  """'2,4,8' -> [2, 4, 8]; one-line UserError for a model without the MQT projector or a bad m."""
  if not elastic(model_cfg):
    raise UserError(f'--mqt_tokens needs a model with the MQT projector (model.projector=mqt); this one has '
                    f"model.projector={model_cfg.get('projector', 'mlp2x_gelu')}")
  out = []
  for item in str(text).split(','):
    item = item.strip()
    if not item:
      continue
    try:
      m = int(item)
    except ValueError:
      raise UserError(f'--mqt_tokens: {item!r} is not an integer (e.g. --mqt_tokens 2,4,8,16)') from None
    out.append(num_visual_tokens(model_cfg, m))
  if not out:
    raise UserError('--mqt_tokens is empty: give counts, e.g. --mqt_tokens 2,4,8,16')
  return out


def mqt_rows(model, config, samples, tok, counts, *, batch_size=8, xla_flops=True, rng=None):
  """One row per m (see the module docstring)."""
  from dynllava_jax.decode.generate import generate  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval import metrics as M  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval import run  # pylint: disable=g-import-not-at-top
  from dynllava_jax.sparsity.dense import Dense  # pylint: disable=g-import-not-at-top
  mc = model.mc
  big_m = num_visual_tokens(mc)
  match = M.digits_match if config.data.name == 'digits_vqa' else M.vqa_match
  rng = jax.random.key(config.seed) if rng is None else rng
  types = [s['question_type'] for s in samples]
  rows = []
  for m in counts:
    scores = []
    for batch in run._batches(samples, batch_size):   # pylint: disable=protected-access
      prompts = [with_visual_tokens(s['prompt_ids'], mc.image_token_id, m) for s in batch]
      from dynllava_jax.data.pipeline import left_pad_batch  # pylint: disable=g-import-not-at-top
      ids, mask = left_pad_batch(prompts, mc.pad_token_id)
      pix = np.stack([s['pixel_values'] for s in batch]).astype(np.float32)
      out = generate(model, config, Dense(), ids, pix, mask, max_new_tokens=int(config.eval.max_new_tokens),
                     sampling='greedy', rng=rng, visual_tokens=m)
      for b, s in enumerate(batch):
        scores.append(match(tok.decode([int(t) for t in out.tokens[b, :out.lengths[b]]]), s['answer']))
    text_tokens = max(1, int(round(np.mean([len(s['prompt_ids']) for s in samples]))) - big_m)
    xla, analytic = run.engine_prefill_flops(mc, Dense(), text_tokens, 1, int(config.eval.prefill_bucket),
                                             xla=xla_flops, visual_tokens=m)
    rows.append({'method': f'mqt@{m}', 'visual_tokens': m, 'accuracy': M.accuracy(scores),
                 'accuracy_by_type': run.by_type(scores, types), 'kept_image_ratio': m / big_m,
                 'prefill_flops_analytic': analytic, 'prefill_flops_xla': xla, 'num_samples': len(samples)})
  return rows


COLUMNS = ('method', 'accuracy', 'kept_image_ratio', 'prefill_flops_analytic', 'prefill_flops_xla')


def run_mqt_sweep(config, counts_text, *, model, step=None, out_dir, split='validation', limit=None,
                  batch_size=8, json_path=None, report_fn=print):
  """`eval.py --mqt_tokens`: evaluates `model` (loaded by the caller: workdir step, export or random init)
  at each m, writes <out_dir>/mqt_sweep.{md,json} (+ json_path), prints the table; returns the rows."""
  from dynllava_jax.eval import report  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval import run  # pylint: disable=g-import-not-at-top
  counts = parse_counts(counts_text, config.model)
  samples, tok = run._load_samples(config, split, limit)   # pylint: disable=protected-access
  report_fn(f'MQT sweep m={counts} on {config.data.name}/{split}: {len(samples)} samples')
  rows = mqt_rows(model, config, samples, tok, counts, batch_size=batch_size)
  for r in rows:
    r['checkpoint_step'] = step
  table = report.write_results(out_dir, 'mqt_sweep', f'MQT sweep: {config.data.name}/{split}, {len(samples)} '
                               f'samples, {"random init" if step is None else f"step {step}"}', rows, COLUMNS,
                               json_path)
  report_fn(table)
  return rows
