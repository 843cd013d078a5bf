"""Dynamic-LLaVA training entry point.

    python train.py --config configs/dynllava.py:size=tiny --workdir runs/tiny [--config.train.steps=100]

Resumes from the newest valid checkpoint in <workdir>/checkpoints. SIGTERM saves and exits cleanly (0).
A bad config fails at start-up with one line on stderr and exit status 2. See docs/training.md.
"""
import logging
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/dynllava.py', 'Training config.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard logs, metrics.jsonl.')
flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.getLogger('absl').setLevel(logging.WARNING)
  from dynllava_jax.train import loop  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import metrics  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:
    loop.setup(config)
  except ValueError as e:
    print(f'train.py: bad config: {e}', file=sys.stderr)
    sys.exit(2)
  try:
    out = loop.train(config, _WORKDIR.value)
  except metrics.NonFiniteLoss as e:
    print(f'train.py: {e}', file=sys.stderr)
    sys.exit(3)
  print(f'done: step {out["step"]}' + (' (preempted, checkpoint saved)' if out['preempted'] else ''),
        flush=True)


if __name__ == '__main__':
  app.run(main)
