"""The dataset build entry point: builds config.data once and prints its skip report.

    python -m dynllava_jax.data.build --config configs/dynllava.py:size=tiny \
        [--config.data.name=llava_instruct --config.data.manual_dir=/data/llava]

Bad input (a JSON that is not UTF-8 / JSON / a list, a missing folder, every record skipped, a missing or
corrupt tokenizer.json, an `<image>` id that disagrees with the model config) is one line on stderr and
exit status 2 (docs/reliability.md).
"""
import logging

from absl import app

from dynllava_jax import errors

PROG = 'python -m dynllava_jax.data.build'
_CONFIG = errors.define_config_flag(PROG, 'configs/dynllava.py', 'Config (its data section).')


def build(config):
  """Builds, checks the tokenizer and that the train split has records; returns the summary line."""
  from dynllava_jax.data import builders  # pylint: disable=g-import-not-at-top
  from dynllava_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from dynllava_jax.data import policy  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train.config import check_data_config  # pylint: disable=g-import-not-at-top
  check_data_config(config)
  pipeline._source(config, 'train')  # pylint: disable=protected-access  (build + tokenizer + empty checks)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds_dir = builders.build(config)
  sizes = {k: v.num_examples for k, v in tfds.builder_from_directory(ds_dir).info.splits.items()}
  report = builders.read_report(ds_dir)
  line = f'{ds_dir}: ' + ', '.join(f'{k} {n}' for k, n in sorted(sizes.items()))
  if report['total']:
    c = policy.SkipCounter('records')
    c.load_state(report)
    line += f'; {c.summary()}'
  return line


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.getLogger('absl').setLevel(logging.WARNING)
  print(errors.guard(PROG, lambda: build(_CONFIG.value)), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=errors.flags_parser(PROG))
