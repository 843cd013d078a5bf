"""Evaluation entry point: accuracy, perplexity, kept ratios, FLOPs, KV bytes and latency per method.

    python eval.py --workdir runs/tiny [--step N] \\
        [--methods dense,dynamic,fastv,pdrop,random,uniform] [--json OUT.json] [--limit 64] \\
        [--allow_random_init] [--config.eval.max_new_tokens=32]
    python eval.py --model export/tiny_hf [--out_dir DIR] ...          # an export / convert.py / HF dir
    python eval.py --workdir runs/tiny --keep_ratios 0.1,0.2,0.35,0.5     # budget sweep: a line per method
    python eval.py --workdir runs/tiny --questions q.jsonl --image_folder imgs --answers answers.jsonl \
        [--methods dynamic] [--keep_ratios 0.2,0.5]                      # LLaVA question / answer files
    python eval.py --workdir runs/mqt --mqt_tokens 2,4,8,16               # MQT-LLaVA: a row per m

The model comes from a training workdir (its newest checkpoint, or --step; its own config.json, so no
--config is needed; --config replaces it, --config.x=v overrides one field) or from --model DIR. Writes
<workdir>/eval (or <model>/eval, or --out_dir): results.md, results.json, plots; prints the table. Bad
input: one line on stderr, exit status 2. Per-sample predictions go to <out>/predictions/<label>.jsonl.
With --questions, no dataset is read: each method (and budget) answers the question file and writes an
answer file (--answers; with several methods or budgets, one file per point: answers.<label>.jsonl).
See docs/eval.md.
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
_PLOTS = flags.DEFINE_bool('plots', True, 'Write accuracy-vs-FLOPs / -KV and kept-patch plots.')
_KEEP_RATIOS = flags.DEFINE_string('keep_ratios', '', 'Budget sweep: fractions of image tokens kept, e.g. '
                                   '0.1,0.2,0.35,0.5 (each method\'s knob: eval/budgets.py).')
_QUESTIONS = flags.DEFINE_string('questions', None, 'LLaVA question file (JSONL: question_id, image, text).')
_IMAGE_FOLDER = flags.DEFINE_string('image_folder', '', 'Folder the question file\'s image paths are in.')
_ANSWERS = flags.DEFINE_string('answers', None, 'Answer file to write (with --questions).')
_MQT = flags.DEFINE_string('mqt_tokens', None, 'MQT-LLaVA sweep: comma-separated visual-token counts m '
                           '(e.g. 2,4,8,16); evaluates the model at each m (instead of --methods).')
_MODEL_ID = flags.DEFINE_string('model_id', None, 'model_id in the answer file (default: the model\'s name).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.getLogger('absl').setLevel(logging.WARNING)
  # ValueError too: the eval-side checks (methods, budgets, samples) raise it with one line.
  errors.guard('eval.py', _run, extra=(ValueError,))


def _run():
  import os  # pylint: disable=g-import-not-at-top
  from dynllava_jax import source  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval import budgets  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval.run import check_methods, run_eval  # pylint: disable=g-import-not-at-top
  workdir, model_dir = _WORKDIR.value, _MODEL.value
  if bool(workdir) == bool(model_dir):
    raise errors.UserError('give --workdir W [--step N] or --model DIR (one of them)')
  config = source.resolve_config(flags.FLAGS, workdir, model_dir)
  methods = _METHODS.value.split(',')
  if config is not None and not _MQT.value and (not _QUESTIONS.value or flags.FLAGS['methods'].present):
    check_methods(config, methods)           # before the (slow) restore
  src = source.load_source(workdir=workdir, step=_STEP.value, model_dir=model_dir, config=config,
                           tokenizer=_TOKENIZER.value, allow_random_init=_RANDOM.value)
  if config is None:
    source.apply_config_flags(src.config, flags.FLAGS)
    if 'data' not in src.config and not _QUESTIONS.value:
      raise errors.UserError(f'{model_dir} carries no data config (no run_config.json): pass --config '
                             'with the data to evaluate on')
  out_dir = _OUT_DIR.value or os.path.join(workdir or model_dir, 'eval')
  if _MQT.value:
    from dynllava_jax.eval.token_sweep import run_mqt_sweep  # pylint: disable=g-import-not-at-top
    return run_mqt_sweep(src.config, _MQT.value, model=src.model, step=src.step, out_dir=out_dir,
                         split=_SPLIT.value, limit=_LIMIT.value, batch_size=_BATCH.value, json_path=_JSON.value)
  keep_ratios = budgets.parse_list(_KEEP_RATIOS.value)
  if _QUESTIONS.value:
    return _answer_file(src, methods if flags.FLAGS['methods'].present else [str(src.config.eval.method)],
                        keep_ratios, workdir or model_dir)
  return run_eval(src.config, workdir or model_dir, methods, allow_random_init=_RANDOM.value,
                  split=_SPLIT.value, limit=_LIMIT.value, batch_size=_BATCH.value,
                  timing_runs=_RUNS.value, json_path=_JSON.value, plots=_PLOTS.value,
                  model=src.model, step=src.step, out_dir=out_dir, keep_ratios=keep_ratios)


def _answer_file(src, methods, keep_ratios, where):
  """--questions: one answer file per (method, budget) point."""
  import os  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval import questions as Q  # pylint: disable=g-import-not-at-top
  if not _ANSWERS.value:
    raise errors.UserError('--questions needs --answers FILE (the answer file to write)')
  Q.run_question_file(src, _QUESTIONS.value, _ANSWERS.value, image_folder=_IMAGE_FOLDER.value,
                      methods=methods, keep_ratios=keep_ratios, batch_size=_BATCH.value, limit=_LIMIT.value,
                      model_id=_MODEL_ID.value or os.path.basename(os.path.normpath(where)))
  return 0


if __name__ == '__main__':
  app.run(main, flags_parser=errors.flags_parser('eval.py'))
