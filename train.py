"""Dynamic-LLaVA training entry point.

    python train.py --config configs/dynllava.py:size=tiny --workdir runs/tiny [--config.train.steps=100]

Resumes from the newest valid checkpoint in <workdir>/checkpoints; one train.py per workdir (a lock).
Writes the resolved config to <workdir>/config.json (eval.py, generate.py, serve.py and convert.py
--export read it: no --config needed for the workdir; a different earlier one is kept as config.<time>.json).
SIGTERM saves and exits cleanly (0). Bad input (a flag, the config, the data, a checkpoint of another
config, a read-only or full disk) fails with one line on stderr and exit status 2; a NaN loss with exit
status 3. `--config.train.restart=True` moves checkpoints that do not fit to checkpoints/old/ and starts
over. See docs/training.md and docs/reliability.md.
"""
import logging
import signal
import sys

from absl import app
from absl import flags

from dynllava_jax import errors

_CONFIG = errors.define_config_flag('train.py', 'configs/dynllava.py', 'Training config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard logs, metrics.jsonl.')
flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.getLogger('absl').setLevel(logging.WARNING)
  from dynllava_jax.train import loop  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import metrics  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  from dynllava_jax import source  # pylint: disable=g-import-not-at-top
  errors.guard('train.py', lambda: source.save_train_config(config, _WORKDIR.value))
  try:
    out = errors.guard('train.py', lambda: loop.train(config, _WORKDIR.value))
  except metrics.NonFiniteLoss as e:
    print(f'train.py: {e}', file=sys.stderr)
    sys.exit(3)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)   # saved and done: a late SIGTERM must not turn 0 into -15
  print(f'done: step {out["step"]}' + (' (preempted, checkpoint saved)' if out['preempted'] else ''),
        flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=errors.flags_parser('train.py'))
