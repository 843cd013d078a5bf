"""Teacher-forced evaluation used during training and by the demo.

`validation_metrics`: CE loss, kept ratios and answer accuracy over batches of the validation iterator.
`answer_table`: per question type, over `pipeline.make_eval_samples` samples: teacher-forced answer
accuracy (the argmax prediction of every token of the last answer span, "</s>" included, equals the gold
token), CE on the answers, kept ratios. Sparse models use deterministic decisions (image tokens: per-sample
top-k with k = ⌊N·r_I⌋ as at prefill; answer tokens: keep iff logit0 > logit1; no Gumbel noise) with the
training-time key-column masks (no token removed).
"""
import collections

import jax
import numpy as np

from dynllava_jax.train.batch import to_device


def _to_device(batch, trainer):
  return to_device(batch, trainer.batch_sharding, trainer.config.model.pad_token_id)


def validation_metrics(trainer, state, step, split='validation', max_batches=None):
  """-> dict: loss, answer_accuracy, samples, kept_image, kept_answer (when sparse)."""
  from dynllava_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  it = pipeline.make_iterator(trainer.config, split, shuffle=False, num_epochs=1, drop_remainder=False)
  fn = trainer.eval_fn(step)
  dp = trainer.mesh.shape['data'] * trainer.mesh.shape['fsdp']
  tot, correct, n = collections.defaultdict(float), 0, 0
  with jax.set_mesh(trainer.mesh):
    for i, batch in enumerate(it):
      if (max_batches is not None and i >= max_batches) or batch['input_ids'].shape[0] % dp:
        break
      out = jax.device_get(fn(state, _to_device(batch, trainer)))
      correct += int(np.sum(out.pop('answer_correct')))
      n += batch['input_ids'].shape[0]
      for k, v in out.items():
        tot[k] += float(np.sum(v))
  it.close()
  return _summary(tot, correct, n)


def _summary(tot, correct, n):
  if not n:
    return {}
  res = {'loss': tot['ce_sum'] / max(tot['n_tokens'], 1.0), 'answer_accuracy': correct / n, 'samples': n}
  for name in ('image', 'answer'):
    if tot.get(f'n_{name}', 0) > 0:
      res[f'kept_{name}'] = tot[f'kept_{name}'] / tot[f'n_{name}']
  return res


def answer_table(trainer, state, step, samples, batch_size=16, sparse=None):
  """Per question type (and 'all') teacher-forced metrics over eval samples -> {type: dict}."""
  from dynllava_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  cfg = trainer.config
  fn = trainer.eval_fn(step, sparse)
  dp = trainer.mesh.shape['data'] * trainer.mesh.shape['fsdp']
  bs = max(dp, batch_size // dp * dp)
  buckets = pipeline.buckets(cfg)
  by_type = collections.defaultdict(lambda: [collections.defaultdict(float), 0, 0])
  with jax.set_mesh(trainer.mesh):
    for i in range(0, len(samples), bs):
      chunk = samples[i:i + bs]
      full = [s['full'] for s in chunk]
      full += [full[-1]] * (bs - len(full))           # pad the last batch; padded rows are dropped below
      batch = pipeline.pad_batch(full, buckets, cfg.model.pad_token_id)
      per = jax.device_get(fn(state, _to_device(batch, trainer)))
      ok = np.asarray(per.pop('answer_correct'))
      for j, s in enumerate(chunk):
        for key in (s['question_type'], 'all'):
          acc = by_type[key]
          acc[1] += 1
          acc[2] += int(ok[j])
          for k, v in per.items():
            acc[0][k] += float(v[j])
  table = {}
  for key, (tot, n, correct) in by_type.items():
    table[key] = _summary(tot, correct, n)
  return table
