"""Teacher-forced look at a trained demo stage (the figures of docs/demo.md's second table).

    python scripts/demo_probe.py <workdir>/stage2_instruct 2 [--samples 300]
    python scripts/demo_probe.py <workdir>/stage3_dynamic 3

Prints, per question type of the validation split, the teacher-forced answer accuracy (every token of the
last answer right, `train.evaluate.answer_table`: sparse models with inference-style decisions, top-k image
tokens and output-text keep iff logit0 > logit1) and the kept ratios; for stage 3 also the percentiles of
the output-text predictor's keep margin logit0 − logit1 on the answer tokens of 16 validation descriptions
(the training forward without Gumbel noise) — what decides the keep rate at inference — and the train /
inference mask gap: the image predictor's keep probabilities by rank (median over validation images), and
the teacher-forced exact match of every labelled answer token per question type with the image and text
decisions drawn as in training (Gumbel samples, two draws) against those of inference (top-k, argmax).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('stage_dir')
  ap.add_argument('stage', type=int, choices=(1, 2, 3))
  ap.add_argument('--samples', type=int, default=300)
  ap.add_argument('--lookups', action='store_true', help='classify the wrong cell look-ups (generation)')
  args = ap.parse_args()
  if args.lookups:
    return lookup_errors(args.stage_dir, args.stage, args.samples)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs.demo import get_config  # pylint: disable=g-import-not-at-top
  from dynllava_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import checkpoint, evaluate, loop  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import state as st  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train.forward import train_forward  # pylint: disable=g-import-not-at-top

  c = get_config(f'stage={args.stage}')
  tr = loop.Trainer(c, args.stage_dir)
  step, state, _ = checkpoint.Checkpointer(args.stage_dir, keep=1).restore_latest(
      st.abstract_with_shardings(tr.abstract, tr.shardings))
  samples = pipeline.make_eval_samples(c, 'validation', limit=args.samples)
  for t, v in sorted(evaluate.answer_table(tr, state, step, samples, batch_size=32).items()):
    print(f'{t:10s} acc {v["answer_accuracy"]:.3f} loss {v["loss"]:.3f} n {v["samples"]} ' +
          ' '.join(f'{q}={v[q]:.3f}' for q in ('kept_image', 'kept_answer') if q in v), flush=True)
  if args.stage == 3:
    desc = [s['full'] for s in samples if s['question_type'] == 'describe'][:16]
    batch = pipeline.pad_batch(desc, pipeline.buckets(c), c.model.pad_token_id)
    out = train_forward(st.merge_model(tr.graphdef, state), {k: jnp.asarray(v) for k, v in batch.items()},
                        tau=0.1, rng=None)
    lg = np.asarray(out['ot_logits'])
    m = (lg[..., 0] - lg[..., 1])[np.asarray(out['ot_span'])]
    print('describe answer tokens: keep margin logit0-logit1 percentiles 5/25/50/75/95',
          np.percentile(m, [5, 25, 50, 75, 95]).round(3), 'kept (margin > 0)', (m > 0).mean().round(3))
    mask_gap(st.merge_model(tr.graphdef, state), c, samples)


def mask_gap(model, c, samples, batch_size=64):
  """Prints the keep probabilities by rank and the teacher-forced exact match under training-style
  (Gumbel-sampled) and inference-style (top-k / argmax) decisions."""
  import collections  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dynllava_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train.forward import train_forward  # pylint: disable=g-import-not-at-top
  hits = collections.defaultdict(lambda: collections.defaultdict(list))
  probs = []
  modes = {'sampled (draw 1)': 1, 'sampled (draw 2)': 2, 'top-k (inference)': None}
  for i in range(0, len(samples), batch_size):
    chunk = samples[i:i + batch_size]
    batch = pipeline.pad_batch([s['full'] for s in chunk], pipeline.buckets(c), c.model.pad_token_id)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    tgt = np.asarray(batch['labels'])[:, 1:]
    for name, seed in modes.items():
      out = train_forward(model, jb, tau=0.1, rng=None if seed is None else jax.random.key(1000 * seed + i),
                          image_topk=seed is None)
      pred = np.asarray(jnp.argmax(out['logits'][:, :-1], -1))
      for b, s in enumerate(chunk):
        v = tgt[b] != -100
        hits[name][s['question_type']].append(float(np.all(pred[b][v] == tgt[b][v])))
      if seed is None:
        p = np.asarray(jax.nn.softmax(out['image_logits'], -1)[..., 0])[np.asarray(batch['has_image'], bool)]
        probs.append(-np.sort(-p, axis=1))
  ranks = [0, 3, 7, 11, 15, 23, 31, 47, 63]
  ranked = np.median(np.concatenate(probs), axis=0)
  print('image keep probability by rank (median over images):',
        ' '.join(f'#{r + 1} {ranked[r]:.3f}' for r in ranks if r < ranked.size))
  print('teacher-forced exact match (every labelled answer token) by decision style:')
  for name, per in hits.items():
    print(f'  {name:18s} ' + ' '.join(f'{t} {np.mean(v):.3f}' for t, v in sorted(per.items())))


def lookup_errors(stage_dir, stage, limit):
  import collections  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from configs.demo import get_config  # pylint: disable=g-import-not-at-top
  from dynllava_jax.data import digits_vqa  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval.run import _load_samples, evaluate_method, load_model  # pylint: disable=g-import-not-at-top
  c = get_config(f'stage={stage}')
  model = load_model(c, stage_dir, report_fn=lambda m: None)[0]
  samples, tok = _load_samples(c, 'validation', limit)
  samples = [s for s in samples if s['question_type'] == 'digit_at']
  row = evaluate_method(model, c, 'dynamic' if stage == 3 else 'dense', samples, tok, batch_size=len(samples),
                        timing_runs=0, ppl=False, xla_flops=False)
  labels = load_digits().target
  split = list(digits_vqa.SOURCE_SPLITS).index('validation')
  out = collections.Counter()
  for p in row['predictions']:
    # make_sample draws the grid first from default_rng([seed, split, index]): the image's cells
    rng = np.random.default_rng([int(c.data.digits.seed), split, int(p['record_id'].split('-')[1])])
    _, _, grid = digits_vqa.draw_grid(rng, labels, 'validation', int(c.data.digits.grid))
    cells = {'empty' if v is None else str(v) for r in grid for v in r}
    out['right' if p['correct'] else ('wrong: another cell of the image' if p['prediction'].strip() in cells
                                      else 'wrong: not in the image')] += 1
  print(f'{len(samples)} validation look-ups:', dict(out))


if __name__ == '__main__':
  main()
