"""Evaluation entry point: accuracy, perplexity, kept ratios, FLOPs, KV bytes and latency per method.

    python eval.py --config configs/dynllava.py:size=tiny --workdir runs/tiny \
        [--methods dense,dynamic,fastv,pdrop,random,uniform] [--json OUT.json] [--limit 64] \
        [--allow_random_init] [--config.eval.max_new_tokens=32]
    python eval.py --config configs/mqt.py:size=tiny --workdir runs/mqt --mqt_tokens 2,4,8,16   # MQT sweep

Restores the newest checkpoint in <workdir>/checkpoints (random init only with --allow_random_init) and
writes <workdir>/eval/results.md, results.json and plots; prints the table. Bad input: one line on stderr,
exit status 2. See docs/eval.md.
"""
import logging
import sys

from absl import app
from absl import flags

from dynllava_jax import errors

_CONFIG = errors.define_config_flag('eval.py', 'configs/dynllava.py', 'Model / data / eval config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (checkpoints/); results go to <workdir>/eval.')
_METHODS = flags.DEFINE_string('methods', 'dense,dynamic,fastv,pdrop,random,uniform',
                               'Comma-separated sparsification methods.')
_JSON = flags.DEFINE_string('json', None, 'Also write the results JSON here.')
_SPLIT = flags.DEFINE_string('split', 'validation', 'Dataset split to evaluate.')
_LIMIT = flags.DEFINE_integer('limit', None, 'Evaluate only the first N samples.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Generation batch size.')
_RUNS = flags.DEFINE_integer('timing_runs', 3, 'Warm timing repetitions (median).')
_RANDOM = flags.DEFINE_bool('allow_random_init', False, 'Evaluate a random-init model when no checkpoint.')
_PLOTS = flags.DEFINE_bool('plots', True, 'Write accuracy-vs-FLOPs and kept-patch plots.')
_MQT = flags.DEFINE_string('mqt_tokens', None, 'MQT-LLaVA sweep: comma-separated visual-token counts m '
                           '(e.g. 2,4,8,16); evaluates the model at each m (instead of --methods).')
flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.getLogger('absl').setLevel(logging.WARNING)
  if _MQT.value:
    from dynllava_jax.eval.token_sweep import run_mqt_sweep  # pylint: disable=g-import-not-at-top
    errors.guard('eval.py', lambda: run_mqt_sweep(
        _CONFIG.value, _WORKDIR.value, _MQT.value, allow_random_init=_RANDOM.value, split=_SPLIT.value,
        limit=_LIMIT.value, batch_size=_BATCH.value, json_path=_JSON.value), extra=(ValueError,))
    return
  from dynllava_jax.eval.run import run_eval  # pylint: disable=g-import-not-at-top
  # ValueError too: the eval-side checks (methods, budgets, samples) raise it with one line.
  errors.guard('eval.py', lambda: run_eval(
      _CONFIG.value, _WORKDIR.value, _METHODS.value.split(','), allow_random_init=_RANDOM.value,
      split=_SPLIT.value, limit=_LIMIT.value, batch_size=_BATCH.value, timing_runs=_RUNS.value,
      json_path=_JSON.value, plots=_PLOTS.value), extra=(ValueError,))


if __name__ == '__main__':
  app.run(main, flags_parser=errors.flags_parser('eval.py'))
