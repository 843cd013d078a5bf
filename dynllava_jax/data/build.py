"""The dataset build entry point: builds config.data once and prints its skip report.

    python -m dynllava_jax.data.build --config configs/dynllava.py:size=tiny \
        [--config.data.name=llava_instruct --config.data.manual_dir=/data/llava]

Bad input (a JSON that is not UTF-8 / JSON / a list, a missing folder, every record skipped, a missing or
corrupt tokenizer.json, an `<image>` id that disagrees with the model config) is one line on stderr and
exit status 2 (docs/reliability.md).
"""
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
  ds_dir = builders.build(config)
  c = policy.SkipCounter('records')
  c.load_state(builders.read_report(ds_dir))
  return f'{ds_dir}: {c.summary()}'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  print(errors.guard(PROG, lambda: build(_CONFIG.value)), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=errors.flags_parser(PROG))
