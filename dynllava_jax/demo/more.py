"""`make demo-more`'s rows: the sibling methods (MQT-LLaVA, VideoLLM-MoD, visual region) on the demo's test
split, by generation, merged into the workdir's summary.json beside `make demo`'s rows.

    rows = mqt_rows(model, config, samples, tok, (2, 4, 8, 16, 32, 64), text_tokens=...)
    row = merged_row('mod', 0.2, {'image': image_row, 'video': video_row})

Keys (docs/demo.md's key table):
  mqt@<m>                 the MQT model (stage mqt_instruct) answering with m visual tokens per image, m in
                          MQT_COUNTS (M = 64 = the dense model's N): the first m of the M query outputs
  <method>@<m/N>          the image-token methods at the MQT counts (`matched_budgets`: r = m/N, so ⌊N·r⌋ = m)
  mod@0.2, mod_random@0.2, mod_uniform@0.2
                          the MoD models (mod_instruct on the images, mod_video on the video) with the learned
                          router, a fixed random pattern, the uniform stride centres (`model.mod.routing` at
                          eval; equal capacity: k = ⌈0.2·64⌉ = 13 routed per frame in layers 0 and 2)
  drop_equal_flops@0.2    the dense models (stage 2 on the images, video_instruct on the video) dropping image
                          tokens once at the MoD stage's first MoD layer (0) to the same vision-token work
                          (`sparsity/mod_baselines.py`: 38 of 64 kept)
  dense_mod@1.0           the dense comparator of the four rows above, on the same tasks (stage 2 on the
                          images, video_instruct on the video)
  region_full, region_lora  the visual-region models (layer 0 of 4 trained, fully or by LoRA) on the images,
                          from stage 1; their comparator is dense@1.0 (stage 2: full tuning from stage 1)
The MoD rows and their comparator are the sample-weighted merge of an image part and a video part
(`merged_row`): accuracy per question type (image and video types side by side), 'all' over both test sets,
and every cost field the sample-weighted mean; results.json keeps each part.
"""
import numpy as np

MQT_COUNTS = (2, 4, 8, 16, 32, 64)
MATCHED_METHODS = ('dynamic', 'fastv', 'pdrop', 'random', 'uniform', 'visionzip', 'divprune')
MOD_R = 0.2
MOD_ROUTINGS = {'mod': 'learned', 'mod_random': 'random', 'mod_uniform': 'uniform'}
REGION_KEYS = ('region_full', 'region_lora')
FAMILIES = {   # --methods name -> the demo_more stages it needs
    'mqt': ('mqt_align', 'mqt_instruct'),
    'mod': ('mod_instruct', 'video_instruct', 'mod_video'),
    'region': ('region_full', 'region_lora'),
}


def matched_budgets(n, counts=MQT_COUNTS):
  """The image-token budgets r = m/N of the MQT counts below N (m = N is the dense row): ⌊N·r⌋ = m."""
  from dynllava_jax.sparsity.base import keep_budget  # pylint: disable=g-import-not-at-top
  out = tuple(m / n for m in counts if m < n)
  assert all(keep_budget(n, r) == m for r, m in zip(out, counts)), (n, out)
  return out


def _row_from(scores, tok_acc, kv, types, img, txt, flops, **extra):
  from dynllava_jax.eval.run import by_type  # pylint: disable=g-import-not-at-top
  n = len(scores)
  return {'accuracy': float(np.mean(scores)), 'accuracy_by_type': by_type(scores, types),
          'token_accuracy_by_type': by_type(tok_acc, types), 'kv_cache_bytes_by_type': by_type(kv, types),
          'kv_cache_bytes': float(np.mean(kv)), 'kept_image_ratio': img, 'kept_text_ratio': txt,
          'prefill_flops_analytic': float(flops), 'num_samples': n,
          'samples_by_type': {t: types.count(t) for t in sorted(set(types))}, **extra}


def mqt_rows(model, config, samples, tok, counts=MQT_COUNTS, *, text_tokens, batch_size=100, report=print):
  """One row per m (the fields `evaluate_method` gives the demo's other rows): greedy KV-cache generation
  with m placeholders per image (`generate(..., visual_tokens=m)`), exact match and token accuracy per
  question type, K/V bytes at the end of each answer, prefill FLOPs analytic at `text_tokens` + m."""
  from dynllava_jax.data.pipeline import left_pad_batch  # pylint: disable=g-import-not-at-top
  from dynllava_jax.decode.generate import generate  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval import metrics as M  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval.run import (_batches, engine_prefill_flops, per_sample_kv_bytes,  # pylint: disable=g-import-not-at-top
                                     token_accuracy)
  from dynllava_jax.eval.visual_prompts import with_visual_tokens  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.projector import num_visual_tokens  # pylint: disable=g-import-not-at-top
  from dynllava_jax.sparsity.dense import Dense  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  mc = model.mc
  big_m = num_visual_tokens(mc)
  rng = jax.random.key(config.seed)
  types = [s['question_type'] for s in samples]
  rows = {}
  for m in counts:
    scores, tok_acc, kv = [], [], []
    for batch in _batches(samples, batch_size):
      ids, mask = left_pad_batch([with_visual_tokens(s['prompt_ids'], mc.image_token_id, m) for s in batch],
                                 mc.pad_token_id)
      pix = np.stack([s['pixel_values'] for s in batch]).astype(np.float32)
      out = generate(model, config, Dense(), ids, pix, mask, max_new_tokens=int(config.eval.max_new_tokens),
                     sampling='greedy', rng=rng, visual_tokens=m, return_caches=True)
      kv_b = per_sample_kv_bytes(out.caches)
      for b, s in enumerate(batch):
        gen = [int(t) for t in out.tokens[b, :out.lengths[b]]]
        scores.append(M.digits_match(tok.decode(gen), s['answer']))
        f = s['full']
        tok_acc.append(token_accuracy(gen, f['input_ids'][int(f['answer_start']):int(f['answer_end'])]))
        kv.append(float(kv_b[b]))
    _, flops = engine_prefill_flops(mc, Dense(), text_tokens, 1, 1, xla=False, visual_tokens=m)
    k = f'mqt@{m}'
    rows[k] = _row_from(scores, tok_acc, kv, types, m / big_m, 1.0, flops, method='mqt', key=k,
                        budget=float(m), stage='mqt_instruct', visual_tokens=m)
    report(f'  {k:14s} all {rows[k]["accuracy_by_type"]["all"]:.3f}  ' + '  '.join(
        f'{t} {v:.3f}' for t, v in rows[k]['accuracy_by_type'].items() if t != 'all'))
  return rows


def video_prefill_flops(mc, method, samples):
  """Analytic prefill FLOPs (batch 1) of the mean video prompt: its text tokens + F frames of N tokens
  (ViT and projector per frame; MoD layers on text + k per frame; a drop method's kept tokens)."""
  from dynllava_jax.eval import flops as F  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.projector import num_visual_tokens  # pylint: disable=g-import-not-at-top
  n = num_visual_tokens(mc)
  frames = int(round(np.mean([int(np.sum(np.asarray(s['prompt_ids']) == mc.image_token_id)) // n
                              for s in samples])))
  text = max(1, int(round(np.mean([len(s['prompt_ids']) for s in samples]))) - frames * n)
  return F.prefill_flops(mc, method, text, 1, frames=frames, last_query=True,
                         causal_chunk=int(mc.get('causal_chunk', 0)))['total'], frames


def evaluate_part(model, config, sparsifier, samples, tok, *, overrides=None, batch_size=100, text_tokens=None):
  """`evaluate_method` on `samples` (images or video), prefill FLOPs recounted at the real prompt length
  (images: the engine's segment lengths at `text_tokens`; video: `video_prefill_flops`)."""
  from dynllava_jax.eval.run import engine_prefill_flops, evaluate_method  # pylint: disable=g-import-not-at-top
  from dynllava_jax.sparsity.registry import make_sparsifier  # pylint: disable=g-import-not-at-top
  row = evaluate_method(model, config, sparsifier, samples, tok, batch_size=batch_size, timing_runs=0,
                        overrides=overrides or {}, ppl=False, xla_flops=False)
  row.pop('predictions', None)
  method = make_sparsifier(sparsifier, config, **(overrides or {}))
  if int(config.data.get('max_frames', 1)) > 1:
    row['prefill_flops_analytic'], row['frames'] = video_prefill_flops(model.mc, method, samples)
  else:
    _, row['prefill_flops_analytic'] = engine_prefill_flops(config.model, method, text_tokens, 1, 1, xla=False)
  return row


def merged_row(method, budget, parts):
  """One row from parts {name: row} evaluated on disjoint sample sets: per-type fields side by side
  (the parts' question types are disjoint), 'all' and every scalar cost the sample-weighted mean."""
  n = {p: float(r['num_samples']) for p, r in parts.items()}
  total = sum(n.values())
  w = {p: n[p] / total for p in parts}
  out = {'method': method, 'key': f'{method}@{float(budget)}', 'budget': float(budget), 'stage': 'merged',
         'num_samples': int(total), 'parts': parts}
  for field in ('accuracy_by_type', 'token_accuracy_by_type', 'kv_cache_bytes_by_type'):
    d = {}
    for r in parts.values():
      overlap = set(d) & (set(r[field]) - {'all'})
      if overlap:
        raise ValueError(f'merged_row({method}): question types {sorted(overlap)} in two parts')
      d.update({t: v for t, v in r[field].items() if t != 'all'})
    d['all'] = float(sum(w[p] * r[field]['all'] for p, r in parts.items()))
    out[field] = d
  for field in ('kept_image_ratio', 'kept_text_ratio', 'prefill_flops_analytic', 'kv_cache_bytes'):
    out[field] = float(sum(w[p] * float(r[field]) for p, r in parts.items()))
  out['accuracy'] = out['accuracy_by_type']['all']
  return out


def plot_entries(methods, rows):
  """summary `methods` for `report.plot_tradeoff` (accuracy on the image test split, one axis for all):
  the merged MoD rows by their image part, the region rows as budget 1.0 points."""
  out = {}
  for k, m in methods.items():
    r = rows.get(k)
    if r is not None and 'parts' in r:
      img = r['parts']['image']
      m = {**m, 'accuracy': img['accuracy_by_type'], 'prefill_flops': float(img['prefill_flops_analytic']),
           'kv_cache_bytes': float(img['kv_cache_bytes'])}
    out[k if '@' in k else f'{k}@1.0'] = m
  return out
