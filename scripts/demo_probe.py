"""Teacher-forced look at a trained demo stage (the figures of docs/demo.md's second table).

    python scripts/demo_probe.py <workdir>/stage2_instruct 2 [--samples 300]
    python scripts/demo_probe.py <workdir>/stage3_dynamic 3

Prints, per question type of the validation split, the teacher-forced answer accuracy (every token of the
last answer right, `train.evaluate.answer_table`: sparse models with inference-style decisions, top-k image
tokens and output-text keep iff logit0 > logit1) and the kept ratios; for stage 3 also the percentiles of
the output-text predictor's keep margin logit0 − logit1 on the answer tokens of 16 validation descriptions
(the training forward without Gumbel noise) — what decides the keep rate at inference.
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
  args = ap.parse_args()
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


if __name__ == '__main__':
  main()
