"""The CPU demo (`make demo`): build digits_vqa, train the tiny Dynamic-LLaVA, evaluate.

    python scripts/demo.py --workdir runs/demo [--steps N] [--eval_limit 300]

Training uses the tiny config's `train` section as is (configs/dynllava.py:size=tiny; the settings are in
dynllava_jax/train/config.py): a dense stage of `dense_warmup_steps` steps, then Dynamic-LLaVA sparsification
training (Gumbel decisions, ratio losses, MaskedSoftmax). It resumes when the workdir has checkpoints.

Then it prints a teacher-forced table on the validation split (accuracy = every token of the answer, "</s>"
included, is the argmax prediction), per question type, for the trained model run sparse (deterministic
decisions) and dense (every token kept), beside a majority-answer baseline (the most frequent training answer
per question type). If `dynllava_jax.eval.run.run_eval` exists it then runs the generation evaluation.
"""
import argparse
import ast
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# More, smaller steps learn faster on 2 CPU cores than the data section's default batch of 16.
DEMO_BATCH = 8
DEMO_METHODS = ('dense', 'dynamic', 'fastv', 'pdrop', 'random')


def majority_baseline(train_samples, val_samples):
  """Accuracy of always answering the most frequent training answer of the question type."""
  counts = collections.defaultdict(collections.Counter)
  for s in train_samples:
    counts[s['question_type']][s['answer']] += 1
  out = collections.defaultdict(lambda: [0, 0])
  for s in val_samples:
    guess = counts[s['question_type']].most_common(1)[0][0] if counts[s['question_type']] else None
    for key in (s['question_type'], 'all'):
      out[key][0] += int(guess == s['answer'])
      out[key][1] += 1
  return {k: c / n for k, (c, n) in out.items()}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--steps', type=int, default=None, help='override train.steps')
  ap.add_argument('--eval_limit', type=int, default=300, help='validation samples in the tables')
  ap.add_argument('--gen_limit', type=int, default=100, help='samples for run_eval (generation); 0 skips it')
  ap.add_argument('--set', action='append', default=[], metavar='SECTION.FIELD=VALUE',
                  help='override a config field (Python literal), e.g. --set train.lr=1e-3; repeatable')
  ap.add_argument('--batch', type=int, default=DEMO_BATCH, help='global batch size')
  args = ap.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  from configs.dynllava import get_config  # pylint: disable=g-import-not-at-top
  from dynllava_jax.data import builders, pipeline  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import evaluate, loop  # pylint: disable=g-import-not-at-top

  config = get_config('size=tiny')
  config.data.batch_size = args.batch
  for item in args.set:
    key, _, value = item.partition('=')
    *path, field = key.split('.')
    node = config
    for p in path:
      node = node[p]
    if field not in node:
      raise SystemExit(f'--set {item}: the config has no field {key}')
    try:
      node[field] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[field] = value   # a bare string, e.g. --set train.ce_weighting=sample
  if args.steps is not None:
    config.train.steps = args.steps
    config.train.dense_warmup_steps = min(config.train.dense_warmup_steps, args.steps)
  t0 = time.time()
  print(f'building {config.data.name} ...', flush=True)
  builders.build(config)
  print(f'training {config.train.steps} steps ({config.train.dense_warmup_steps} dense, then sparse) '
        f'on {jax.device_count()} {jax.devices()[0].platform} device(s) into {args.workdir}', flush=True)
  out = loop.train(config, args.workdir)
  t_train = time.time() - t0
  trainer, state, step = out['trainer'], out['state'], out['step']

  val = pipeline.make_eval_samples(config, 'validation', limit=args.eval_limit)
  train_s = pipeline.make_eval_samples(config, 'train', limit=2000)
  base = majority_baseline(train_s, val)
  sparse = evaluate.answer_table(trainer, state, step, val, sparse=config.model.sparse.enabled)
  dense = evaluate.answer_table(trainer, state, step, val, sparse=False)
  lines = ['| question type | samples | majority baseline | accuracy (sparse) | accuracy (dense) | '
           'val CE (sparse) | kept image | kept answer |', '|---' * 8 + '|']
  for key in sorted(sparse, key=lambda k: (k == 'all', k)):
    s, d = sparse[key], dense[key]
    lines.append(f'| {key} | {s["samples"]} | {base.get(key, 0):.3f} | {s["answer_accuracy"]:.3f} | '
                 f'{d["answer_accuracy"]:.3f} | {s["loss"]:.4f} | {s.get("kept_image", float("nan")):.3f} | '
                 f'{s.get("kept_answer", float("nan")):.3f} |')
  table = '\n'.join(lines)
  t_total = time.time() - t0
  print(f'\nteacher-forced validation ({len(val)} samples, step {step}; train wall {t_train:.0f} s, '
        f'total {t_total:.0f} s):\n{table}', flush=True)
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, 'demo_table.md'), 'w') as f:
    f.write(f'step {step}, train wall {t_train:.0f} s\n\n{table}\n')
  with open(os.path.join(args.workdir, 'demo_table.json'), 'w') as f:
    json.dump({'step': step, 'train_wall_s': t_train, 'sparse': sparse, 'dense': dense,
               'majority': base}, f, indent=1)

  try:
    from dynllava_jax.eval.run import run_eval  # pylint: disable=g-import-not-at-top
  except ImportError:
    run_eval = None
  if run_eval is not None and args.gen_limit > 0:
    # The methods the demo compares, on the test split; one timing run keeps the demo within minutes.
    run_eval(config, args.workdir, methods=DEMO_METHODS, split='test', limit=args.gen_limit, timing_runs=1)


if __name__ == '__main__':
  main()
