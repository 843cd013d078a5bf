"""A demo stage-2 run that prints the teacher-forced per-question-type accuracy every K steps (the
learning curves of docs/demo.md, "Why echo").

    python scripts/demo_curve.py OUT --init W/stage1_align/params [--stage 2] [--steps 400]
        [--eval_every 100] [--samples 200] [--set data.digits.describe_style='echo' ...]

OUT is a fresh training workdir (checkpoints); --set SECTION.FIELD=VALUE (Python literal, else a string)
overrides `configs/demo.py:stage=K`. EXPORT=DIR in the environment also writes the final params there
(the `convert` layout, usable as another run's --init).
"""
import argparse
import ast
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('out')
  ap.add_argument('--init', required=True, help='params to start from (e.g. <workdir>/stage1_align/params)')
  ap.add_argument('--stage', type=int, default=2)
  ap.add_argument('--steps', type=int, default=800)
  ap.add_argument('--eval_every', type=int, default=200)
  ap.add_argument('--samples', type=int, default=200, help='validation samples in each table')
  ap.add_argument('--set', action='append', default=[])
  a = ap.parse_args()
  from configs.demo import get_config  # pylint: disable=g-import-not-at-top
  from dynllava_jax.data import builders, pipeline  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import evaluate, loop  # pylint: disable=g-import-not-at-top
  c = get_config(f'stage={a.stage}')
  with c.unlocked():
    c.train.steps, c.train.eval_every, c.train.init_from = a.steps, a.eval_every, os.path.abspath(a.init)
    for item in a.set:
      key, value = item.split('=', 1)
      try:
        value = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        pass
      node = c
      parts = key.split('.')
      for p in parts[:-1]:
        node = node[p]
      node[parts[-1]] = value
  builders.build(c)
  samples = pipeline.make_eval_samples(c, 'validation', limit=a.samples)
  t0 = time.time()

  def table(trainer, state, step, split='validation', max_batches=None):
    del split, max_batches
    tab = evaluate.answer_table(trainer, state, step, samples, batch_size=50)
    print(f'[{time.time() - t0:.0f}s] step {step} ' +
          ' '.join(f'{k}={v["answer_accuracy"]:.3f}' for k, v in sorted(tab.items())), flush=True)
    return {'answer_accuracy': tab['all']['answer_accuracy']}

  evaluate.validation_metrics = table     # the loop's periodic evaluation prints the per-type table
  out = loop.train(c, a.out)
  if os.environ.get('EXPORT'):
    from dynllava_jax.demo.stages import save_model_params  # pylint: disable=g-import-not-at-top
    from dynllava_jax.train import state as st  # pylint: disable=g-import-not-at-top
    save_model_params(st.merge_model(out['trainer'].graphdef, out['state']), os.environ['EXPORT'])


if __name__ == '__main__':
  main()
