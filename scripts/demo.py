"""The CPU demo (`make demo`): LLaVA's recipe at toy scale, then every method's accuracy–cost trade-off.

    python scripts/demo.py --workdir runs/demo [--test_limit 300] [--set stage2:train.steps=800 ...]

Stages (configs/demo.py:stage=K; each cached in <workdir>/stage<K>_<name>/, skipped on a re-run while its
config and every upstream config are unchanged — dynllava_jax/demo/stages.py):
  0 tower     pretrain the tiny ViT (each patch token: its cell's digit and which cell), then freeze it
  lm          pretrain the LLM on the conversations' text, the grid in words where the image goes (dir stage0_lm)
  1 align     projector only, on captions
  2 instruct  LLM + projector on the digits questions: the dense LLaVA
  3 dynamic   Dynamic-LLaVA fine-tune from stage 2
Then the test split is answered by generation for dense, Dynamic-LLaVA (stage 3) and the training-free
methods (stage 2) at image-token budgets 0.1, 0.2, 0.35, 0.5 (dynllava_jax/demo/results.py). Outputs:
  <workdir>/summary.json     {"methods": {"<method>@<budget>": {...}}, "majority", "test_samples", "wall_s"}
  <workdir>/results.md|json  the printed table / every measured field per method and budget
  <workdir>/tradeoff.png     accuracy vs prefill FLOPs and vs KV bytes, a line per method
  <workdir>/kept_patches.png the kept image patches of a few test images at a 20 % budget
"""
import argparse
import ast
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KEPT_PATCH_METHODS = ('dense', 'dynamic', 'fastv', 'pdrop', 'random', 'uniform')   # N image slots in the LLM


def fail(msg):
  """Bad input: one line on stderr, exit 2 (the flags are checked before any stage runs)."""
  print(msg, file=sys.stderr, flush=True)
  sys.exit(2)


def split_set(item):
  """'stage2:train.steps=800' -> ('stage2', 'train.steps', '800'); no stage: ('', ...); one line, exit 2, on
  an item that is not [STAGE:]SECTION.FIELD=VALUE."""
  target, _, rest = item.partition(':') if item.split('=', 1)[0].count(':') else ('', '', item)
  key, sep, value = rest.partition('=')
  if not sep or not key or '.' not in key:
    fail(f'--set {item}: use [stageK:]SECTION.FIELD=VALUE')
  return target, key, value


def apply_sets(config, names, items):
  """--set [STAGE:]SECTION.FIELD=VALUE (Python literal, else a string) on one stage's config; `names`: the
  STAGE prefixes that address this stage (stage2, instruct); an item without one goes to every stage that
  has the field. One line, exit 2, on a field the named stage lacks or a value of the wrong type. Returns
  the items it set."""
  applied = []
  for item in items:
    target, key, value = split_set(item)
    if target and target not in names:
      continue
    *path, field = key.split('.')
    node = config
    for p in path:
      node = node.get(p) if node is not None and p in node else None
    if node is None or field not in node:
      if target:
        fail(f'--set {item}: stage {config.stage.name} has no field {key}')
      continue
    try:
      v = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      v = value
    if isinstance(node[field], str) and not isinstance(v, str):
      v = value                     # a string field keeps the text as written ('model.region=1')
    try:
      with config.unlocked():
        node[field] = v
    except TypeError as e:
      fail(f'--set {item}: {e}')
    applied.append(item)
  return applied


def resolve_sets(stages, items):
  """Applies every --set item before any stage runs. stages: {key: (config, names addressing it)}. One line,
  exit 2, on an item naming no stage of `stages`, a field the named stage lacks, or (no stage named) a
  field no stage has."""
  known = set().union(*(names for _, names in stages.values()))
  for item in items:
    target = split_set(item)[0]
    if target and target not in known:
      fail(f'--set {item}: stage {target!r} unknown; use one of {", ".join(sorted(known))}')
  applied = {item for config, names in stages.values() for item in apply_sets(config, names, items)}
  for item in items:
    if item not in applied:
      fail(f'--set {item}: no stage config has the field {split_set(item)[1]}')


def check_counts(args, flags=('cpus', 'test_limit', 'eval_batch')):
  """One line, exit 2, on a negative --cpus (0 = all) or a count flag below 1."""
  for flag in flags:
    low = 0 if flag == 'cpus' else 1
    if getattr(args, flag) < low:
      fail(f'--{flag} {getattr(args, flag)}: must be >= {low}')


def _json_default(x):
  if hasattr(x, 'item'):
    return x.item()
  if isinstance(x, float) and math.isnan(x):
    return None
  return str(x)


def _fractions(flag, text):
  """'0.1,0.2' -> (0.1, 0.2) sorted, each in (0, 1]; one line, exit 2, otherwise."""
  try:
    out = tuple(sorted({float(b) for b in text.split(',') if b.strip()}))
  except ValueError:
    fail(f'{flag} {text!r}: give comma-separated fractions, e.g. 0.1,0.2')
  if any(not 0.0 < b <= 1.0 for b in out):
    fail(f'{flag} must be in (0, 1]')
  return out


def main():
  from dynllava_jax.demo import results as res  # pylint: disable=g-import-not-at-top  (numpy only at import)
  from dynllava_jax.demo import fingerprint as fp_lib  # pylint: disable=g-import-not-at-top  (numpy only at import)
  joined = lambda xs: ','.join(f'{x:g}' for x in xs)
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--test_limit', type=int, default=300, help='test samples answered per method')
  ap.add_argument('--budgets', default=joined(res.BUDGETS), help='image-token budgets (0.2 always added)')
  ap.add_argument('--methods', default=','.join(res.METHOD_ORDER))
  ap.add_argument('--eval_batch', type=int, default=100,
                  help='generation batch (300 test samples = 3 x 100: one compiled shape per run)')
  ap.add_argument('--prune_layers', default=joined(res.PRUNE_LAYERS), help='prune_bi / prune_random: decoder layers removed')
  ap.add_argument('--reducer_budgets', default=joined(res.REDUCER_BUDGETS),
                  help="VisionZip's and DivPrune's budgets ('' = --budgets; their sweep: make demo-more)")
  ap.add_argument('--smoke', action='store_true', help='configs/demo.py smoke=True: 2 steps, tiny data')
  ap.add_argument('--cpus', type=int, default=2, help=fp_lib.CPUS_HELP)
  ap.add_argument('--set', action='append', default=[], metavar='[stageK:]SECTION.FIELD=VALUE',
                  help='override a stage config field, e.g. --set stage2:train.steps=800; repeatable')
  ap.add_argument('--stop_after', type=int, default=3, choices=(0, 1, 2, 3),
                  help='last stage to run (0: the tower and lm; no evaluation if < 3)')
  args = ap.parse_args()
  t0 = time.time()
  check_counts(args)
  methods = [m.strip() for m in args.methods.split(',') if m.strip()]
  for m in ('dense', 'dynamic'):
    if m not in methods:
      methods.insert(0, m)
  if any(m not in res.METHOD_ORDER for m in methods):
    fail(f'--methods must be among {res.METHOD_ORDER}')
  budgets = sorted(set(_fractions('--budgets', args.budgets)) | {0.2})
  try:
    prune_layers = tuple(int(k) for k in args.prune_layers.split(',') if k.strip())
  except ValueError:
    prune_layers = None
  if prune_layers is None or any(k < 1 for k in prune_layers):
    fail(f'--prune_layers {args.prune_layers!r}: give comma-separated layer counts >= 1, e.g. 1,2')
  reducer_budgets = _fractions('--reducer_budgets', args.reducer_budgets) or None
  fp = fp_lib.begin(args.cpus)             # before jax's first computation

  from configs.demo import STAGES, VISUAL_REGION, get_config, stage_key  # pylint: disable=g-import-not-at-top
  from dynllava_jax.demo import stages as stg  # pylint: disable=g-import-not-at-top
  from dynllava_jax import errors  # pylint: disable=g-import-not-at-top

  # Every stage's config is resolved, and every --set applied to them, before the first stage runs.
  configs = {k: get_config(f'stage={k},smoke={args.smoke}') for k in STAGES}
  resolve_sets({k: (c, {stage_key(k), c.stage.name}) for k, c in configs.items()}, args.set)
  infos, up = {}, None
  for k in STAGES:
    if k != 'lm' and k > args.stop_after:
      break
    c = configs[k]
    try:
      # a workdir in use, a checkpoint of another run, a full disk: one line, exit 2
      up = infos[k] = errors.guard('demo.py', lambda: stg.run_stage(c, stg.stage_dir(args.workdir, c), up,
                                                                   fingerprint=fp['hash']))
    except stg.StageInterrupted as e:
      print(str(e), file=sys.stderr)
      sys.exit(130)
  t_train = time.time() - t0
  done = ', '.join(f'{k} ' + ('cached' if i['skipped'] else '%.0f s' % i['wall_s']) for k, i in infos.items())
  print(f'stages done in {t_train:.0f} s: {done}', flush=True)
  if args.stop_after < 3:
    return

  from dynllava_jax.eval import report  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval.run import _load_samples, _prompt_batch, load_model  # pylint: disable=g-import-not-at-top
  from dynllava_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  models = {k: (load_model(configs[k], infos[k]['dir'], report_fn=lambda m: None)[0], configs[k])
            for k in (2, 3)}
  samples, tok = _load_samples(configs[2], 'test', args.test_limit)
  # Batches of like answers: short answers stop decoding after a few steps, descriptions run together.
  ordered = sorted(samples, key=lambda s: (s['question_type'] == 'describe', len(s['prompt_ids'])))
  print(f'evaluating {len(samples)} test samples: {methods} at budgets {budgets}', flush=True)
  calib = pipeline.make_eval_samples(configs[2], 'validation', limit=64)   # prune_bi's Block Influence
  rows = res.evaluate_all(models, ordered, tok, budgets=budgets, methods=methods, batch_size=args.eval_batch,
                          calib_samples=calib, prune_layers=prune_layers, prune_region=VISUAL_REGION,
                          reducer_budgets=reducer_budgets)
  train_samples = pipeline.make_eval_samples(configs[2], 'train', limit=2000)
  majority = res.majority(train_samples, samples)
  types = sorted({s['question_type'] for s in samples})
  table = res.markdown_table(rows, majority, types)

  os.makedirs(args.workdir, exist_ok=True)
  report.plot_tradeoff(res.make_summary(rows, majority, len(samples), 0.0)['methods'],
                       os.path.join(args.workdir, 'tradeoff.png'))
  imgs = [s for s in samples if s['has_image']][:4]
  if imgs:
    ids, mask, pix = _prompt_batch(configs[2], imgs)
    keeps, titles = {}, []
    for sp in res.method_specs(configs[2].model, (0.2,), [m for m in methods if m in KEPT_PATCH_METHODS]):
      keeps[sp['key']] = list(res.spec_keep_grids(*models[sp['stage']], sp, ids, mask, pix))
      titles.append(sp['key'])
    report.plot_kept_patches(list(pix), keeps, titles, os.path.join(args.workdir, 'kept_patches.png'))
  wall = time.time() - t0
  summary = res.check_summary(res.make_summary(rows, majority, len(samples), wall))
  with open(os.path.join(args.workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(args.workdir, 'results.json'), 'w') as f:
    json.dump({'rows': rows, 'majority': majority, 'stages': infos, 'wall_s': wall,
               'cpu_s': time.process_time(), 'eval_wall_s': wall - t_train, 'fingerprint': fp}, f, indent=1,
              default=_json_default)
  head = (f'test split: {len(samples)} samples, greedy generation; exact match per question type '
          f'(describe tok = token accuracy of the descriptions); stages {t_train:.0f} s, total {wall:.0f} s, '
          f'process CPU {time.process_time():.0f} s' + fp_lib.head_note(fp, infos))
  with open(os.path.join(args.workdir, 'results.md'), 'w') as f:
    f.write(f'{head}\n\n{table}\n')
  print(f'\n{head}\n{table}\n\nwrote {args.workdir}/summary.json, results.md, tradeoff.png, '
        f'kept_patches.png', flush=True)


if __name__ == '__main__':
  main()
