"""Evaluation entry point: accuracy, perplexity, kept ratios, FLOPs, KV bytes and latency per method.

    python eval.py --workdir runs/tiny [--step N] \\
        [--methods dense,dynamic,fastv,pdrop,random,uniform] [--json OUT.json] [--limit 64] \\
        [--allow_random_init] [--config.eval.max_new_tokens=32]
    python eval.py --model export/tiny_hf [--out_dir DIR] ...          # an export / convert.py / HF dir

The model comes from a training workdir (its newest checkpoint, or --step; its own config.json, so no
--config is needed; --config replaces it, --config.x=v overrides one field) or from --model DIR. Writes
<workdir>/eval (or <model>/eval, or --out_dir): results.md, results.json, plots; prints the table. Bad
input: one line on stderr, exit status 2. See docs/eval.md.
"""
import logging

from absl import app
from absl import flags

from dynllava_jax import errors

_CONFIG = errors.define_config_flag('eval.py', 'configs/dynllava.py', 'Model / data / eval config (default: '
                                    'the workdir\'s config.json, else this file).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (checkpoints/, config.json).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step of --workdir (default: the newest).')
_MODEL = flags.DEFINE_string('model', None, 'Instead of --workdir: an exported, convert.py or HF / released '
                             'checkpoint directory.')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'tokenizer.json (default: the model\'s / the run\'s).')
_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Results directory (default: <workdir or model>/eval).')
_METHODS = flags.DEFINE_string('methods', 'dense,dynamic,fastv,pdrop,random,uniform',
                               'Comma-separated sparsification methods.')
_JSON = flags.DEFINE_string('json', None, 'Also write the results JSON here.')
_SPLIT = flags.DEFINE_string('split', 'validation', 'Dataset split to evaluate.')
_LIMIT = flags.DEFINE_integer('limit', None, 'Evaluate only the first N samples.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Generation batch size.')
_RUNS = flags.DEFINE_integer('timing_runs', 3, 'Warm timing repetitions (median).')
_RANDOM = flags.DEFINE_bool('allow_random_init', False, 'Evaluate a random-init model when no checkpoint.')
_PLOTS = flags.DEFINE_bool('plots', True, 'Write accuracy-vs-FLOPs and kept-patch plots.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.getLogger('absl').setLevel(logging.WARNING)
  # ValueError too: the eval-side checks (methods, budgets, samples) raise it with one line.
  errors.guard('eval.py', _run, extra=(ValueError,))


def _run():
  import os  # pylint: disable=g-import-not-at-top
  from dynllava_jax import source  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval.run import check_methods, run_eval  # pylint: disable=g-import-not-at-top
  workdir, model_dir = _WORKDIR.value, _MODEL.value
  if bool(workdir) == bool(model_dir):
    raise errors.UserError('give --workdir W [--step N] or --model DIR (one of them)')
  config = source.resolve_config(flags.FLAGS, workdir, model_dir)
  methods = _METHODS.value.split(',')
  if config is not None:
    check_methods(config, methods)           # before the (slow) restore
  src = source.load_source(workdir=workdir, step=_STEP.value, model_dir=model_dir, config=config,
                           tokenizer=_TOKENIZER.value, allow_random_init=_RANDOM.value)
  if config is None:
    source.apply_config_flags(src.config, flags.FLAGS)
    if 'data' not in src.config:
      raise errors.UserError(f'{model_dir} carries no data config (no run_config.json): pass --config '
                             'with the data to evaluate on')
  out_dir = _OUT_DIR.value or os.path.join(workdir or model_dir, 'eval')
  return run_eval(src.config, workdir or model_dir, methods, allow_random_init=_RANDOM.value,
                  split=_SPLIT.value, limit=_LIMIT.value, batch_size=_BATCH.value,
                  timing_runs=_RUNS.value, json_path=_JSON.value, plots=_PLOTS.value,
                  model=src.model, step=src.step, out_dir=out_dir)


if __name__ == '__main__':
  app.run(main, flags_parser=errors.flags_parser('eval.py'))
