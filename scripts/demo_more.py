"""`make demo-more`: the sibling methods' stages and rows (MQT-LLaVA, VideoLLM-MoD, visual region), added to
the same workdir as `make demo`.

    python scripts/demo_more.py --workdir runs/demo [--test_limit 300] [--methods mqt,mod,region]
        [--no_matched] [--eval_batch 100] [--set [stageK:|<stage name>:]SECTION.FIELD=VALUE ...]

Stages: `make demo`'s 0-3 (configs/demo.py; cached, so after `make demo` they are skipped), then per method
family the stages of configs/demo_more.py, each cached in <workdir>/stage<i>_<name>/ like the others:
  mqt     mqt_align (projector only, m = M, from the lm stage), mqt_instruct (+ LLM, m ~ U{2, ..., M})
  mod     mod_instruct (MoD on the images), video_instruct (dense) and mod_video (MoD) on digits_video (both
          from stage 2, the image LLaVA)
  region  region_full, region_lora (layer 0 of 4 trained, fully / by LoRA)
all from stage 1 with stage 2's recipe unless said. Then the rows (dynllava_jax/demo/more.py): mqt@<m>, the
image-token methods at the MQT counts (`<method>@<m/64>`, unless --no_matched), mod@0.2, mod_random@0.2,
mod_uniform@0.2, drop_equal_flops@0.2, dense_mod@1.0, region_full, region_lora. They are merged into
<workdir>/summary.json, results.json, results.md and tradeoff.png beside `make demo`'s rows (kept when
they answered as many test samples with the same stages 0-3; else dense@1.0 and dynamic@0.2 are evaluated
here and the old rows are left out).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
  from dynllava_jax.demo import fingerprint as fp_lib  # pylint: disable=g-import-not-at-top  (numpy only at import)
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--test_limit', type=int, default=300, help='test samples answered per row (each split)')
  ap.add_argument('--methods', default='mqt,mod,region', help='method families: mqt, mod, region')
  ap.add_argument('--no_matched', action='store_true',
                  help='skip the image-token methods at the MQT token counts')
  ap.add_argument('--eval_batch', type=int, default=100)
  ap.add_argument('--smoke', action='store_true', help='smoke=True configs: 2 steps, tiny data')
  ap.add_argument('--cpus', type=int, default=2, help=fp_lib.CPUS_HELP)
  ap.add_argument('--set', action='append', default=[], metavar='[STAGE:]SECTION.FIELD=VALUE',
                  help='override a stage config field; STAGE = stageK (configs/demo.py) or a demo_more '
                       'stage name (e.g. mqt_instruct:train.steps=60); without STAGE every stage')
  ap.add_argument('--train_only', action='store_true', help='run the stages, no evaluation')
  args = ap.parse_args()
  t0 = time.time()
  from demo import check_counts, fail, resolve_sets  # pylint: disable=g-import-not-at-top  (scripts/demo.py)
  check_counts(args)
  fp = fp_lib.begin(args.cpus)             # before jax's first computation

  from configs import demo as demo_cfg  # pylint: disable=g-import-not-at-top
  from configs import demo_more as more_cfg  # pylint: disable=g-import-not-at-top
  from dynllava_jax.demo import more  # pylint: disable=g-import-not-at-top
  from dynllava_jax.demo import stages as stg  # pylint: disable=g-import-not-at-top

  families = [m.strip() for m in args.methods.split(',') if m.strip()]
  if not families or any(f not in more.FAMILIES for f in families):
    fail(f'--methods {args.methods!r}: use a comma-separated subset of {tuple(more.FAMILIES)}')
  # Every stage's config is resolved, and every --set applied to them, before the first stage runs.
  configs = {demo_cfg.stage_key(k): demo_cfg.get_config(f'stage={k},smoke={args.smoke}') for k in demo_cfg.STAGES}
  more_stages = {name: more_cfg.get_config(f'stage={name},smoke={args.smoke}') for name in more_cfg.STAGES}
  configs.update(more_stages)
  resolve_sets({key: (c, {key, c.stage.name} | ({f'stage{c.stage.index}'} if key in more_stages else set()))
                for key, c in configs.items()}, args.set)
  from dynllava_jax import errors  # pylint: disable=g-import-not-at-top
  # a workdir in use, a checkpoint of another run, a full disk: one line, exit 2
  guard = lambda fn: errors.guard('demo_more.py', fn)
  infos = {}
  try:
    up = None
    for k in demo_cfg.STAGES:
      c = configs[demo_cfg.stage_key(k)]
      up = infos[demo_cfg.stage_key(k)] = guard(lambda: stg.run_stage(c, stg.stage_dir(args.workdir, c), up,
                                                                      fingerprint=fp['hash']))
    for name in [s for f in families for s in more.FAMILIES[f]]:
      c = configs[name]
      infos[name] = guard(lambda: stg.run_stage(c, stg.stage_dir(args.workdir, c), infos[c.upstream],
                                                fingerprint=fp['hash']))
  except stg.StageInterrupted as e:
    print(str(e), file=sys.stderr)
    sys.exit(130)
  t_train = time.time() - t0
  print(f'stages done in {t_train:.0f} s: ' + ', '.join(
      f'{k} ' + ('cached' if i['skipped'] else '%.0f s' % i['wall_s']) for k, i in infos.items()), flush=True)
  if args.train_only:
    return

  import numpy as np  # pylint: disable=g-import-not-at-top
  from dynllava_jax.demo import results as res  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval import report  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval.run import _load_samples, load_model  # pylint: disable=g-import-not-at-top
  from dynllava_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.projector import num_visual_tokens  # pylint: disable=g-import-not-at-top

  def load(name, **mod):
    # train.init_from as in training (a cached stage was not run): a region run's checkpoint leaves its
    # frozen params out and the load rebuilds them from there
    c = configs[name].copy_and_resolve_references()
    up = c.get('upstream') or f'stage{c.stage.index - 1}'
    c.train.init_from = os.path.abspath(os.path.join(infos[up]['dir'], 'params'))
    c.model.mod.update(mod)
    return load_model(c, infos[name]['dir'], report_fn=lambda m: None)[0], c

  models = {2: load('stage2'), 3: load('stage3')}
  c2 = configs['stage2']
  samples, tok = _load_samples(c2, 'test', args.test_limit)
  ordered = sorted(samples, key=lambda s: (s['question_type'] == 'describe', len(s['prompt_ids'])))
  n_img = num_visual_tokens(c2.model)
  text_tokens = max(1, int(round(np.mean([len(s['prompt_ids']) for s in samples]))) - n_img)
  bs = args.eval_batch

  # the workdir's earlier rows (make demo's), kept when they answered the same test samples
  old_rows, old_summary, old_json = {}, None, {}
  try:
    with open(os.path.join(args.workdir, 'summary.json')) as f:
      old_summary = json.load(f)
    with open(os.path.join(args.workdir, 'results.json')) as f:
      old_json = json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    pass
  base_stages = {str(k): infos[demo_cfg.stage_key(k)] for k in demo_cfg.STAGES}
  same_models = ({k: v.get('hash') for k, v in (old_json.get('stages') or {}).items()} ==
                 {k: v['hash'] for k, v in base_stages.items()})
  if old_summary and old_summary.get('test_samples') == len(samples) and old_json.get('rows') and same_models:
    old_rows = old_json['rows']
  elif old_summary:
    print(f'{args.workdir}/summary.json answered {old_summary.get("test_samples")} test samples (this run '
          f'{len(samples)}) with stages 0-3 ' + ('as now' if same_models else 'not recorded as the current ones') +
          ': its rows are left out', flush=True)
  rows = {}
  base = [m for m in ('dense', 'dynamic') if res.key(m, 1.0 if m == 'dense' else 0.2) not in old_rows]
  if base:
    print(f'evaluating {base} (not in the workdir summary)', flush=True)
    rows.update(res.evaluate_all(models, ordered, tok, budgets=(0.2,), methods=base, batch_size=bs))

  print(f'evaluating {len(samples)} test samples: {families}', flush=True)
  if 'mqt' in families:
    model, c = load('mqt_instruct')
    rows.update(more.mqt_rows(model, c, ordered, tok, text_tokens=text_tokens, batch_size=bs))
    if not args.no_matched:
      budgets = [r for r in more.matched_budgets(n_img)
                 if any(res.key(m, r) not in old_rows for m in more.MATCHED_METHODS)]
      rows.update(res.evaluate_all(models, ordered, tok, budgets=budgets, methods=list(more.MATCHED_METHODS),
                                   batch_size=bs))
  majority = dict(old_summary['majority']) if old_rows else res.majority(
      pipeline.make_eval_samples(c2, 'train', limit=2000), samples)
  if 'mod' in families:
    vc = configs['video_instruct']
    video, vtok = _load_samples(vc, 'test', args.test_limit)
    video = sorted(video, key=lambda s: (s['question_type'] == 'narrate', len(s['prompt_ids'])))
    vmaj = res.majority(pipeline.make_eval_samples(vc, 'train', limit=2000), video)
    majority.update({t: v for t, v in vmaj.items() if t != 'all'})
    dense_video = load('video_instruct')
    part = lambda mc, sp, ss, tk, **kw: more.evaluate_part(*mc, sp, ss, tk, batch_size=bs,
                                                             text_tokens=text_tokens, **kw)
    mod = configs['mod_instruct'].model.mod      # drop at the MoD stage's first MoD layer, to its capacity
    drop = {'r': mod.r, 'layers': mod.layers}
    for name, routing in more.MOD_ROUTINGS.items():
      parts = {'image': part(load('mod_instruct', routing=routing), 'dense', ordered, tok),
               'video': part(load('mod_video', routing=routing), 'dense', video, vtok)}
      rows[res.key(name, more.MOD_R)] = more.merged_row(name, more.MOD_R, parts)
    # images only: the engine refuses a per-image drop budget on multi-frame prompts (decode/prefill.py)
    parts = {'image': part(models[2], 'drop_equal_flops', ordered, tok, overrides=drop)}
    rows[res.key('drop_equal_flops', more.MOD_R)] = more.merged_row('drop_equal_flops', more.MOD_R, parts)
    parts = {'image': part(models[2], 'dense', ordered, tok),
             'video': part(dense_video, 'dense', video, vtok)}
    rows['dense_mod@1.0'] = more.merged_row('dense_mod', 1.0, parts)
    for k in [k for k in rows if k.split('@')[0] in (*more.MOD_ROUTINGS, 'drop_equal_flops', 'dense_mod')]:
      a = rows[k]['accuracy_by_type']
      print(f'  {k:20s} all {a["all"]:.3f}  ' + '  '.join(f'{t} {v:.3f}' for t, v in a.items() if t != 'all'),
            flush=True)
  if 'region' in families:
    for key in more.REGION_KEYS:
      model, c = load(key)
      r = more.evaluate_part(model, c, 'dense', ordered, tok, batch_size=bs, text_tokens=text_tokens)
      r.update(method=key, key=key, stage=key)
      rows[key] = r
      print(f'  {key:20s} all {r["accuracy_by_type"]["all"]:.3f}', flush=True)

  wall = time.time() - t0
  all_rows = {**old_rows, **rows}
  new = res.make_summary(rows, majority, len(samples), 0.0)['methods']
  methods = {**(old_summary['methods'] if old_rows else {}), **new}
  summary = res.check_summary({'methods': methods, 'majority': majority, 'test_samples': len(samples),
                               'wall_s': float((old_summary or {}).get('wall_s', 0.0) if old_rows else 0.0)
                               + wall})
  report.plot_tradeoff(more.plot_entries(summary['methods'], all_rows), os.path.join(args.workdir,
                                                                                      'tradeoff.png'))
  with open(os.path.join(args.workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  from demo import _json_default  # pylint: disable=g-import-not-at-top
  out = {**(old_json if old_rows else {}), 'rows': all_rows, 'majority': majority, 'stages': base_stages}
  out['more'] = {'stages': {k: infos[k] for k in infos if k in more_cfg.STAGES}, 'wall_s': wall,
                 'eval_wall_s': wall - t_train, 'families': families, 'fingerprint': fp}
  with open(os.path.join(args.workdir, 'results.json'), 'w') as f:
    json.dump(out, f, indent=1, default=_json_default)
  types = sorted({t for r in all_rows.values() for t in r['accuracy_by_type'] if t != 'all'})
  table = res.markdown_table(all_rows, majority, types)
  head = (f'test split: {len(samples)} image samples' + (f' + {len(video)} video samples (digits_video, '
          f'{configs["video_instruct"].data.max_frames} frames)' if 'mod' in families else '') +
          f', greedy generation; exact match per question type (describe tok = token accuracy of the '
          f'descriptions); demo-more: stages {t_train:.0f} s, total {wall:.0f} s' + fp_lib.head_note(fp, infos))
  with open(os.path.join(args.workdir, 'results.md'), 'w') as f:
    f.write(f'{head}\n\n{table}\n')
  print(f'\n{head}\n{table}\n\nwrote {args.workdir}/summary.json, results.md, results.json, tradeoff.png',
        flush=True)


if __name__ == '__main__':
  main()
