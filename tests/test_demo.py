"""The staged demo (scripts/demo.py, configs/demo.py, dynllava_jax/demo/*): every stage's config trains 2
steps, summary.json has the documented schema, and the stage cache skips / invalidates as documented."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs.demo import STAGES, VISUAL_REGION, get_config
from dynllava_jax.data import digits_vqa
from dynllava_jax.demo import results as res
from dynllava_jax.demo import stages as stg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_geometry_cells_align_with_patches_and_descriptions_qualify():
  c = get_config('stage=2')
  d, v = c.data.digits, c.model.vision
  cell = d.canvas_size // d.grid
  assert d.canvas_size == v.image_size and cell % v.patch_size == 0       # a cell = a block of patches
  assert (cell // v.patch_size) ** 2 >= 16
  grid = [[None, 7], [3, None]]
  n_tok = len(digits_vqa.describe(grid, d.describe_style).split()) + 1    # + </s>
  assert n_tok >= c.model.sparse.len_ot == 24   # descriptions qualify for output-text sparsification
  from sklearn.datasets import load_digits
  dg = load_digits()
  rng = np.random.default_rng(0)
  empty, src, g = digits_vqa.draw_grid(rng, dg.target, 'train', 2)
  canvas = digits_vqa.render_canvas(digits_vqa.tiles_of(dg.images, empty, src), 64, rng)
  for r in range(2):
    for col in range(2):
      ink = canvas[32 * r:32 * r + 32, 32 * col:32 * col + 32].mean()
      assert (ink > 20) == (g[r][col] is not None)     # every digit stays inside its own 4x4 patch block
  from dynllava_jax.demo.tower import patch_cells
  cells = patch_cells(d.canvas_size, d.grid, v.image_size, v.patch_size).reshape(8, 8)   # stage 0's 'where'
  np.testing.assert_array_equal(cells, np.repeat(np.repeat(np.arange(4).reshape(2, 2), 4, 0), 4, 1))


def test_builder_options_name_the_dataset():
  a = digits_vqa.make_config(grid=2, describe_style='cells')
  b = digits_vqa.make_config(grid=3, describe_style='cells')
  cap = digits_vqa.make_config(grid=2, describe_style='cells', type_probs=(0, 0, 0, 1, 0), max_rounds=1)
  assert len({a.name, b.name, cap.name}) == 3
  assert digits_vqa.make_config().name == 'c64_n4000-300-300_s0'       # default sets keep their dir
  named = digits_vqa.make_config(grid=2, describe_style='named', describe_alone=True)
  assert named.name.endswith('_da') and 'named' in named.name
  assert digits_vqa.make_config(tile_fraction=0.5).name.endswith('_tf0.5')
  assert digits_vqa.make_config(one_round_test=True).name.endswith('_t1')
  with pytest.raises(ValueError, match='tile_fraction'):
    digits_vqa.make_config(tile_fraction=1.5)


def test_one_round_test_split_and_its_hash():
  from sklearn.datasets import load_digits
  dg = load_digits()
  d = get_config('stage=2').data.digits
  assert d.one_round_test
  rounds = {split: [len(digits_vqa.make_sample(split, i, dg.images, dg.target, 64, 0, d.describe_style,
                                               d.max_rounds, d.extra_round_prob, d.grid, d.type_probs,
                                               d.describe_alone, d.tile_fraction, True)
                        ['conversations']['value']) // 2 for i in range(40)]
            for split in ('train', 'test')}
  assert set(rounds['test']) == {1} and max(rounds['train']) > 1    # only the test split changes
  c = get_config('stage=2')
  c.data.digits.one_round_test = False        # the test split is read by no stage: same hash
  assert stg.stage_hash(c) == stg.stage_hash(get_config('stage=2'))
  c.model.sparse.hard_from_step = 5           # a dense stage has no predictors: its sparse knobs are unread
  c.model.mqt.local_init = 3.0                # nor MQT's, with the MLP projector
  c.data.digits.video_style = 'echo'          # nor digits_vqa digits_video's answer style
  assert stg.stage_hash(c) == stg.stage_hash(get_config('stage=2'))
  c.data.name = 'digits_video'                # digits_video reads it
  v = get_config('stage=2')
  v.data.name = 'digits_video'
  assert stg.stage_hash(c) != stg.stage_hash(v)
  s3 = get_config('stage=3')
  s3.model.sparse.hard_from_step = 5
  assert stg.stage_hash(s3) != stg.stage_hash(get_config('stage=3'))


def test_ink_targets_and_cell_scores():
  from sklearn.datasets import load_digits
  import jax.numpy as jnp
  from dynllava_jax.demo import tower
  dg = load_digits()
  rng = np.random.default_rng(1)
  empty, src, g = digits_vqa.draw_grid(rng, dg.target, 'train', 2)
  canvas, ink = digits_vqa.render_canvas(digits_vqa.tiles_of(dg.images, empty, src), 64, rng, with_ink=True)
  share = tower.patch_ink(ink, 64, 8).reshape(8, 8)
  for r in range(2):
    for col in range(2):
      block = share[4 * r:4 * r + 4, 4 * col:4 * col + 4]
      assert (block.max() > 0.4) == (g[r][col] is not None)     # ink only in the digits' own cells
      if g[r][col] is not None:
        assert 2 <= (block >= 0.4).sum() < 16                   # a digit shows in some of its 16 tokens
  # cell scores: a cell is digit d if any of its patches says d; empty only if all of them say empty
  cells = jnp.asarray([0, 0, 1, 1])
  logits = np.full((1, 4, 11), -9.0, np.float32)
  logits[0, :, 10] = 9.0               # every patch says empty ...
  logits[0, 1, 7] = 12.0               # ... but one patch of cell 0 shows a 7
  pred = np.asarray(tower.cell_logits((None, jnp.asarray(logits), None), cells, 2, 'ink')).argmax(-1)
  np.testing.assert_array_equal(pred, [[7, 10]])


def test_ink_hits_script_counts_named_tokens_and_hits():
  """scripts/demo_ink_hits.py: a higher ink_min names fewer tokens per digit, so a uniform stride hits
  fewer digits; every share is a fraction."""
  cmd = [sys.executable, os.path.join(ROOT, 'scripts', 'demo_ink_hits.py'), '--canvases', '20', '--keep', '12',
         '--ink_min', '0.4,0.6']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [[c.strip() for c in line.strip('|').split('|')] for line in out.stdout.splitlines()
          if line.startswith('| 0.8')]
  assert [r[1] for r in rows] == ['0.4', '0.6']
  (_, _, n4, _, _, u4, r4), (_, _, n6, _, _, u6, r6) = [[float(c) for c in r] for r in rows]
  assert n6 < n4 and u6 <= u4 and all(0 <= x <= 1 for x in (u4, r4, u6, r6))


def test_kept_cells_script_reads_answers_and_cells():
  """scripts/demo_kept_cells.py: the cells an answer names and what it says of them (counts and
  descriptions alike), kept tokens summed over each cell's patch block, and the tally by seen / truth."""
  sys.path.insert(0, os.path.join(ROOT, 'scripts'))
  import demo_kept_cells as kc  # pylint: disable=g-import-not-at-top
  assert kc.cell_presence('a1 digit a2 empty b1 digit b2 digit count 3') == {
      'a1': True, 'a2': False, 'b1': True, 'b2': True}
  assert kc.cell_presence('row a : a1 9 , a2 empty . row b : b1 4 , b2 7 . the grid has 2 rows') == {
      'a1': True, 'a2': False, 'b1': True, 'b2': True}
  keep = np.zeros((8, 8), bool)
  keep[0, 0] = keep[3, 3] = keep[5, 6] = True          # two tokens in a1, one in b2
  assert kc.kept_per_cell(keep.ravel(), 2) == {'a1': 2, 'a2': 0, 'b1': 0, 'b2': 1}
  t = kc.tally([(0, False, False), (0, True, False), (2, True, True), (1, False, True)])
  assert t == {('no kept token', 'empty', 'empty'): 1, ('no kept token', 'digit', 'empty'): 1,
               ('>= 1 kept token', 'digit', 'digit'): 1, ('>= 1 kept token', 'empty', 'digit'): 1}
  preds = [{'question_type': 'row_sum', 'correct': False, 'prediction': 'a1 3 a2 7 sum 10'},      # misread
           {'question_type': 'row_sum', 'correct': False, 'prediction': 'a1 empty a2 7 sum 8'},    # wrong sum
           {'question_type': 'row_sum', 'correct': True, 'prediction': 'a1 2 a2 7 sum 9'},
           {'question_type': 'digit_at', 'correct': False, 'prediction': 'a1 5'}]
  assert kc.sum_misses(preds) == (1, 1)


def test_named_cells_and_lone_descriptions():
  """The demo's text: one token names the cell (row) a question is about, the description names cells
  the same way at the 'cells' length, and a description is always a sample's only round."""
  assert digits_vqa.question('digit_at', 2, 1, style='named') == 'what digit is in cell b1 ?'
  assert digits_vqa.question('row_sum', 1, style='named') == 'what is the sum of row a ?'
  grid = [[None, 7], [3, 4]]
  text = digits_vqa.describe(grid, 'named')
  assert 'in cell a2 the digit is 7' in text and 'in cell a1 the cell is empty' in text
  assert len(text.split()) == len(digits_vqa.describe(grid, 'cells').split())
  from dynllava_jax.data.tokenizer import split_words
  vocab = set(w for t in digits_vqa.vocabulary_texts('named') for w in split_words(t))
  assert {'a1', 'b2', 'c3', 'cell'} <= vocab
  from sklearn.datasets import load_digits
  dg = load_digits()
  kinds, rounds = [], []
  for i in range(60):
    rec = digits_vqa.make_sample('train', i, dg.images, dg.target, 64, 0, 'named', 3, 0.9, 2,
                                 (0.3, 0.1, 0.2, 0.3, 0.1), describe_alone=True)
    qs = rec['conversations']['value'][0::2]
    kinds.append(rec['question_type'])
    rounds.append(len(qs))
    if any(q.startswith(('<image>\ndescribe', 'describe')) for q in qs):
      assert len(qs) == 1 and rec['question_type'] == 'describe'
  assert 'describe' in kinds and max(rounds) == 3
  with pytest.raises(ValueError, match='type_probs'):
    digits_vqa.make_config(type_probs=(1, 0, 0, 0))


def test_echo_answers_name_the_cell_before_its_value():
  """The demo's 'echo' answers: the value token directly follows its cell's name (look-ups, row sums,
  descriptions); questions are the 'named' ones; every word is in the vocabulary."""
  grid = [[None, 7], [3, 4]]
  assert digits_vqa.question('digit_at', 2, 1, style='echo') == 'what digit is in cell b1 ?'
  assert digits_vqa.answer('digit_at', grid, 2, 1, style='echo') == 'b1 3'
  assert digits_vqa.answer('digit_at', grid, 1, 1, style='echo') == 'a1 empty'
  assert digits_vqa.answer('row_sum', grid, 1, style='echo') == 'a1 empty a2 7 sum 7'
  text = digits_vqa.describe(grid, 'echo')
  assert text.endswith('row a : a1 empty , a2 7 . row b : b1 3 , b2 4 .') and len(text.split()) == 30
  from dynllava_jax.data.tokenizer import split_words
  vocab = set(w for t in digits_vqa.vocabulary_texts('echo') for w in split_words(t))
  assert set(split_words(text)) | set(split_words(digits_vqa.answer('row_sum', grid, 2, style='echo'))) <= vocab


def test_tally_answers_count_after_the_cells():
  """The demo's 'tally' answers: 'echo' with the counts after the cells they count."""
  grid = [[None, 7], [3, 4]]
  assert digits_vqa.answer('digit_at', grid, 2, 1, style='tally') == 'b1 3'
  assert digits_vqa.answer('row_sum', grid, 1, style='tally') == 'a1 empty a2 7 sum 7'
  assert digits_vqa.answer('count', grid, style='tally') == 'a1 empty a2 digit b1 digit b2 digit count 3'
  text = digits_vqa.describe(grid, 'tally')
  assert text == ('row a : a1 empty , a2 7 . row b : b1 3 , b2 4 . the grid has 2 rows and 2 columns and 3 '
                  'digits .')
  assert sorted(text.split()) == sorted(digits_vqa.describe(grid, 'echo').split())
  from dynllava_jax.data.tokenizer import split_words
  vocab = set(w for t in digits_vqa.vocabulary_texts('tally') for w in split_words(t))
  assert set(split_words(text)) | set(split_words(digits_vqa.answer('count', grid, style='tally'))) <= vocab


def _fake_body(calls):
  def body(config, path, report):
    calls.append(config.stage.name)
    os.makedirs(os.path.join(path, 'params'), exist_ok=True)
    os.makedirs(os.path.join(path, 'checkpoints'), exist_ok=True)
    return {'steps': 2}
  return body


def test_stage_cache_skips_and_invalidates(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(stg, '_train_llava_stage', _fake_body(calls))
  import dynllava_jax.demo.tower as tower
  monkeypatch.setattr(tower, 'pretrain_tower', lambda c, p, report: _fake_body(calls)(c, p, report))

  def run_all(sets=None):
    up, infos = None, {}
    for k in STAGES:
      c = get_config(f'stage={k},smoke=True')
      for (stage, section, field), value in (sets or {}).items():
        if stage == k:
          c[section][field] = value
      up = infos[c.stage.name] = stg.run_stage(c, stg.stage_dir(str(tmp_path), c), up, report=lambda m: None)
    return infos

  first = run_all()
  assert calls == ['tower', 'lm', 'align', 'instruct', 'dynamic'] and not any(i['skipped'] for i in first.values())
  assert os.path.basename(first['lm']['dir']) == 'stage0_lm'
  calls.clear()
  assert all(i['skipped'] for i in run_all().values()) and calls == []       # a re-run skips every stage
  marker = os.path.join(first['dynamic']['dir'], 'stale.txt')
  open(marker, 'w').close()
  calls.clear()
  third = run_all({(3, 'train', 'lr'): 5e-5})                                 # stage 3's config changed
  assert calls == ['dynamic'] and [i['skipped'] for i in third.values()] == [True, True, True, True, False]
  assert not os.path.exists(marker)                                           # not in the rerun stage's dir
  kept = os.path.join(str(tmp_path), stg.STALE, f'stage3_dynamic-{first["dynamic"]["hash"]}')
  assert os.path.exists(os.path.join(kept, 'stale.txt'))                      # the finished stage moved aside
  assert third['dynamic']['hash'] != first['dynamic']['hash']
  calls.clear()
  fourth = run_all({('lm', 'train', 'steps'): 3})                             # upstream change
  assert calls == ['lm', 'align', 'instruct', 'dynamic'] and fourth['tower']['skipped']
  # an interrupted stage (stage.json without done) with the same hash reruns
  st = stg.read_state(fourth['instruct']['dir'])
  st['done'] = False
  with open(os.path.join(fourth['instruct']['dir'], stg.STATE), 'w') as f:
    json.dump(st, f)
  calls.clear()
  run_all({('lm', 'train', 'steps'): 3})
  assert calls == ['instruct']   # same hash: stage 3 (deterministic training gives the same stage 2) is kept
  import shutil
  shutil.rmtree(os.path.join(fourth['dynamic']['dir'], 'checkpoints'))       # outputs gone: rerun
  calls.clear()
  run_all({('lm', 'train', 'steps'): 3})
  assert calls == ['dynamic']


def test_stale_linked_stage_is_unlinked_not_deleted(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(stg, '_train_llava_stage', _fake_body(calls))
  c = get_config('stage=1,smoke=True')
  other = tmp_path / 'other_run' / 'stage1_align'      # another workdir's stage of a different config
  os.makedirs(other / 'params')
  with open(other / stg.STATE, 'w') as f:
    json.dump({'hash': 'not-this-one', 'done': True}, f)
  path = stg.stage_dir(str(tmp_path / 'run'), c)
  os.makedirs(os.path.dirname(path))
  os.symlink(other, path)
  info = stg.run_stage(c, path, {'hash': 'x', 'dir': str(tmp_path / 'up')}, report=lambda m: None)
  assert calls == ['align'] and not info['skipped'] and not os.path.islink(path)
  assert (other / 'params').is_dir() and stg.read_state(str(other))['hash'] == 'not-this-one'


def test_tower_hash_covers_what_the_tower_reads():
  base = stg.stage_hash(get_config('stage=0'))
  c = get_config('stage=0')
  c.data.digits.type_probs, c.data.digits.max_rounds = (0.2, 0.2, 0.2, 0.2, 0.2), 2   # the question mix
  assert stg.stage_hash(c) == base
  changes = {'tower.steps': lambda c: setattr(c.tower, 'steps', 5),
             'data.digits.grid': lambda c: setattr(c.data.digits, 'grid', 3),
             'data.digits.tile_fraction': lambda c: setattr(c.data.digits, 'tile_fraction', 0.5),
             'tower.ink_min': lambda c: setattr(c.tower, 'ink_min', 0.2),
             'model.vision.patch_size': lambda c: setattr(c.model.vision, 'patch_size', 16)}
  for name, change in changes.items():                                             # what it reads
    c = get_config('stage=0')
    change(c)
    assert stg.stage_hash(c) != base, name


def test_summary_schema_check():
  acc = {'count': 1.0, 'all': 1.0}
  entry = {'method': 'dense', 'image_keep': 1.0, 'text_keep': 1.0, 'accuracy': acc, 'prefill_flops': 1.0,
           'kv_cache_bytes': 1.0}
  ok = {'methods': {'dense@1.0': entry, 'dynamic@0.2': {**entry, 'method': 'dynamic'}},
        'majority': {'count': 0.3}, 'test_samples': 3, 'wall_s': 1.0}
  res.check_summary(ok)
  for bad in ({**ok, 'extra': 1}, {**ok, 'methods': {'dense@1.0': entry}},
              {**ok, 'methods': {**ok['methods'], 'fastv@0.2': entry}},
              {**ok, 'methods': {**ok['methods'], 'x@0.1': {**entry, 'method': 'x', 'more': 1}}}):
    with pytest.raises(ValueError):
      res.check_summary(bad)


def test_budgets_match():
  mc = get_config('stage=2').model
  specs = {sp['key']: sp for sp in res.method_specs(mc, prune_layers=(1, 2))}
  n_budgeted = len(res.METHOD_ORDER) - 3 - len(res.PRUNE)     # dense, dynamic_cal, dynamic_image: one each
  assert len(specs) == 3 + n_budgeted * len(res.BUDGETS) + len(res.PRUNE) * 2
  demo = {sp['key'] for sp in res.method_specs(mc, reducer_budgets=res.REDUCER_BUDGETS)}   # `make demo`
  assert len(demo) == len(specs) - 2 * (len(res.BUDGETS) - 1) - 2
  assert {'visionzip@0.2', 'divprune@0.2', 'prune_bi@1', 'fastv@0.1'} <= demo and 'visionzip@0.1' not in demo
  assert specs['dynamic_cal@0.2']['sparsifier'] == 'dynamic' and specs['dynamic_cal@0.2']['stage'] == 3
  assert specs['dynamic_image@0.2']['sparsifier'] == 'dynamic_image' and specs['dynamic_image@0.2']['stage'] == 3
  assert specs['dense@1.0']['stage'] == 2 and specs['dynamic@0.2']['stage'] == 3
  for r in res.BUDGETS:
    pd = specs[res.key('pdrop', r)]['overrides']
    assert pd['layers'][0] == max(mc.sparse.sparse_layer, 1) and np.isclose(np.mean(pd['ratios']), r)
    assert specs[res.key('fastv', r)]['overrides']['k'] == max(mc.sparse.sparse_layer, 1)   # attention of k-1
    assert np.isclose(specs[res.key('fastv', r)]['overrides']['r'], 1 - r)
    k = int(np.floor(64 * r + 1e-6))                  # the random / dynamic budget, before the LLM
    for m in ('visionzip', 'divprune'):
      assert specs[res.key(m, r)]['overrides'] == {'tokens': k}
  assert specs['prune_bi@1']['prune'] == 1 and specs['prune_bi@1']['sparsifier'] == 'dense'
  bi = [0.5, 0.1, 0.3, 0.05]                           # layer 3 is the visual region's: never removed
  assert res.prune_choice('prune_bi', 1, bi, mc) == (1,) and res.prune_choice('prune_bi', 2, bi, mc) == (1, 2)
  rand = res.prune_choice('prune_random', 2, bi, mc)
  assert len(rand) == 2 and 3 not in rand and rand == res.prune_choice('prune_random', 2, bi, mc)
  # make demo's rows keep the demo's region (layer 0, configs/demo.py:VISUAL_REGION) instead of the config's
  assert res.prune_choice('prune_bi', 1, bi, mc, region=VISUAL_REGION) == (3,)
  assert res.prune_choice('prune_random', 3, bi, mc, region=VISUAL_REGION) == (1, 2, 3)
  assert mc.region == ''                              # the stage's config is left as it was


def test_demo_smoke_runs_every_stage_and_writes_summary(tmp_path):
  """scripts/demo.py --smoke: every stage's config trains 2 steps; summary.json follows the schema."""
  w = tmp_path / 'demo'
  cmd = [sys.executable, os.path.join(ROOT, 'scripts', 'demo.py'), '--workdir', str(w), '--smoke',
         '--test_limit', '6', '--methods', 'dense,dynamic,dynamic_cal,divprune,prune_bi', '--budgets', '0.2',
         '--prune_layers', '1',
         '--set', f'data.data_dir={tmp_path / "tfds"}']
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=2400)
  assert out.returncode == 0, out.stderr[-3000:]
  for k in STAGES:
    c = get_config(f'stage={k},smoke=True')
    info = stg.read_state(stg.stage_dir(str(w), c))
    assert info['done']
    assert info['result']['steps' if k == 0 else 'step'] == 2
  summary = json.loads((w / 'summary.json').read_text())
  res.check_summary(summary)
  m = summary['methods']
  assert summary['test_samples'] == 6
  assert set(m) == {'dense@1.0', 'dynamic@0.2', 'dynamic_cal@0.2', 'divprune@0.2', 'prune_bi@1'}
  assert m['dense@1.0']['image_keep'] == 1.0 and np.isclose(m['divprune@0.2']['image_keep'], 12 / 64)
  for k in ('dynamic@0.2', 'divprune@0.2', 'prune_bi@1'):
    assert m[k]['prefill_flops'] < m['dense@1.0']['prefill_flops']
  assert m['prune_bi@1']['kv_cache_bytes'] < m['dense@1.0']['kv_cache_bytes']      # 3 of the 4 layers' caches
  for f in ('tradeoff.png', 'kept_patches.png', 'results.md'):
    assert (w / f).stat().st_size > 0
  fp = json.loads((w / 'results.json').read_text())['fingerprint']       # the floating-point path, recorded
  assert len(fp['hash']) == 16 and f"floating-point path {fp['hash']}" in (w / 'results.md').read_text()
  for k in STAGES:                                                         # ... and in every stage it trained
    assert stg.read_state(stg.stage_dir(str(w), get_config(f'stage={k},smoke=True')))['fingerprint'] == fp['hash']


def test_fingerprint_is_the_same_in_two_processes_and_names_its_threads():
  """The same machine and thread count give the same floating-point fingerprint in two processes (what the
  demo prints beside its table), and the same per-operation hashes; pin_cpus(1) runs on one CPU and says
  so; pin_cpus(0) keeps every CPU; the command line prints the same line and hashes."""
  code = ('import json; from dynllava_jax.demo import fingerprint as F; cpus = F.pin_cpus(1); '
          'print(json.dumps([cpus, F.fingerprint(), F.op_hashes()]))')
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  run = lambda args: subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                                    timeout=300, check=True).stdout.splitlines()
  runs = [json.loads(run(['-c', code])[-1]) for _ in range(2)]
  assert runs[0] == runs[1]
  cpus, fp, ops = runs[0]
  assert len(cpus) == 1 and fp['threads'] == 1 and len(fp['hash']) == 16 and fp['backend'] == 'cpu'
  from dynllava_jax.demo import fingerprint as F
  assert list(ops) == list(F._ops()) and len(set(ops.values())) == len(ops)   # distinct results, 16 hex each
  lines = run(['-m', 'dynllava_jax.demo.fingerprint', '--cpus', '1', '--ops'])
  assert lines[0] == F.fingerprint_line(fp)
  assert dict(line.split() for line in lines[1:]) == ops
  assert F.pin_cpus(0) == sorted(os.sched_getaffinity(0))
  infos = {'tower': {'fingerprint': fp['hash']}, 'lm': {}, 'instruct': {'fingerprint': 'feedfacefeedface'}}
  assert F.foreign_stages(infos, fp) == ['instruct']                     # trained elsewhere; unknown: left out
  assert 'instruct' in F.foreign_line(infos, fp) and F.foreign_line({'lm': {}}, fp) == ''


@pytest.mark.parametrize('args,says', [(['--set', 'stage9:train.steps=3'], 'unknown'),
                                       (['--set', 'stage2:train.nosuch=3'], 'has no field'),
                                       (['--set', 'train.nosuch=3'], 'no stage config has'),
                                       (['--set', 'train.steps'], 'use [stageK:]'),
                                       (['--budgets', '1.5'], 'must be in (0, 1]'),
                                       (['--cpus', '-1'], 'must be >= 0')])
def test_bad_flags_are_one_line_before_any_stage(tmp_path, args, says):
  """scripts/demo.py: a --set naming no stage, a field the named stage (or every stage) lacks, a malformed
  item, a budget outside (0, 1], a negative CPU count: one line, exit 2, before the first stage runs."""
  w = tmp_path / 'w'
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'demo.py'), '--workdir', str(w), '--smoke',
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 2, out.stderr[-2000:]
  assert says in out.stderr and len(out.stderr.strip().splitlines()) == 1 and not w.exists()


def test_interrupted_stage_is_not_done(tmp_path, monkeypatch):
  def body(config, path, report):
    raise stg.StageInterrupted('interrupted')
  monkeypatch.setattr(stg, '_train_llava_stage', body)
  c = get_config('stage=1,smoke=True')
  up = {'hash': 'x', 'dir': str(tmp_path / 'up')}
  with pytest.raises(stg.StageInterrupted):
    stg.run_stage(c, stg.stage_dir(str(tmp_path), c), up, report=lambda m: None)
  assert stg.read_state(stg.stage_dir(str(tmp_path), c))['done'] is False


def test_markdown_table_leaves_unasked_types_blank():
  from dynllava_jax.demo import results as res
  row = {'accuracy_by_type': {'count': 1.0, 'all': 1.0}, 'token_accuracy_by_type': {},
         'kv_cache_bytes_by_type': {}, 'kept_image_ratio': 1.0, 'kept_text_ratio': 1.0,
         'prefill_flops_analytic': 1e9, 'kv_cache_bytes': 2048}
  video = dict(row, accuracy_by_type={'narrate': 0.5, 'all': 0.5})
  t = res.markdown_table({'dense@1.0': row, 'mod@0.2': video}, {'count': 0.2, 'narrate': 0.1, 'all': 0.15},
                         ['count', 'narrate'])
  assert 'nan' not in t
  assert '| dense@1.0 | 1.000 |  | 1.000 |' in t and '| mod@0.2 |  | 0.500 | 0.500 |' in t
  assert '| majority | 0.200 | 0.100 | 0.150 |' in t
  lines = t.splitlines()                               # every row has the header's cells, majority too
  assert all(line.count('|') == lines[0].count('|') for line in lines)
  t = res.markdown_table({'dynamic@0.2': dict(row, kept_text_ratio=0.6,
                                              kept_text_ratio_by_type={'describe': 0.45, 'count': 0.7})},
                         {'count': 0.2, 'all': 0.2}, ['count'])
  assert '| 0.600 | 0.450 |' in t and 'text kept (describe)' in t   # the long answers' share beside all
