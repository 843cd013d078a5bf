"""`make demo-more` (configs/demo_more.py, scripts/demo_more.py, dynllava_jax/demo/more.py): each stage is
configs/demo.py's stage plus its method's settings only (so the lead's recipe changes reach it, hash
included), the riskiest stage (MoD on digits_video through train.py) trains 2 steps, the merged rows and
the new summary keys follow the documented schema.

The whole pipeline (every stage 2 steps, every row on 6 samples) is `scripts/demo_more.py --smoke`
(~8 min of CPU on the 2-core VM: too slow for `make test`); set DEMO_MORE_SMOKE=1 to run it here."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import demo
from configs import demo_more
from dynllava_jax.demo import more
from dynllava_jax.demo import results as res
from dynllava_jax.demo import stages as stg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what each stage may change of the configs/demo.py stage it derives from (besides stage / upstream)
ALLOWED = {
    'mqt': {'model.projector', 'model.mqt.queries', 'model.mqt.sample_m', 'model.mqt.local_init',
            'model.mqt.local_order', 'model.mqt.sample_from_step', 'train.frozen', 'train.freeze_projector'},
    'mod': {'model.mod.layers', 'model.mod.r', 'model.mod.routing', 'model.mod.alpha'},
    'video': {'data.name', 'data.max_frames', 'data.max_len', 'eval.prefill_bucket', 'data.digits.video_style',
              'eval.max_new_tokens'},
    'region': {'model.region', 'model.region_train', 'model.lora.alpha'},
}


def _flat(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


@pytest.mark.parametrize('name', list(demo_more.STAGES))
def test_stage_is_the_demo_stage_plus_its_method(name):
  from dynllava_jax.train.config import check_config
  index, base, upstream = demo_more.STAGES[name]
  c = demo_more.get_config(f'stage={name}')
  b = _flat(demo.get_config(f'stage={base}').to_dict())
  f = _flat(c.to_dict())
  changed = {k for k in set(b) | set(f) if b.get(k, '<absent>') != f.get(k, '<absent>')}
  allowed = {'stage.index', 'stage.name', 'upstream'}
  for fam in ALLOWED:
    if fam in name or (fam == 'video' and name == 'mod_video'):
      allowed |= ALLOWED[fam]
  if name == 'region_full':                      # the fully tuned region layer: half the base stage's rate
    allowed |= {'train.lr'}
  assert changed <= allowed, sorted(changed - allowed)
  assert c.train.steps == b['train.steps']                                     # the base stage's recipe
  assert c.train.lr == b['train.lr'] * (0.5 if name == 'region_full' else 1.0)
  check_config(c, 1)                                                           # train.py would accept it
  assert c.stage.index == index and stg.stage_dir('/w', c) == f'/w/stage{index}_{name}'
  assert c.upstream == (upstream if upstream in demo_more.STAGES else demo.stage_key(upstream))
  if name.startswith('mqt'):
    from dynllava_jax.model.projector import num_visual_tokens
    assert num_visual_tokens(c.model) == 64 == c.model.mqt.queries            # M = the dense model's N
  if name.startswith('region'):
    from dynllava_jax.tools.prune import region_of
    assert tuple(region_of(c.model)) == (0,)                         # a quarter of the 4 layers: the reading one
  if name.startswith('region'):                                              # dense@1.0's start
    assert c.upstream == 'stage1'
  if name in ('video_instruct', 'mod_video'):    # from the image LLaVA (the video's tokenizer extends its)
    assert c.upstream == 'stage2' and c.model.mod.layers in ('', '0,2')
  if name == 'mod_instruct':                      # the images: from stage 1, interleaved (layer 0 dense)
    assert c.upstream == 'stage1' and c.model.mod.layers == '1,3'
  if name == 'mqt_align':
    assert c.upstream == 'lm'


def test_text_only_corpus_is_the_same_conversations_without_images():
  """The demo's lm stage's data: the conversations of the image dataset minus every image (its word tokenizer
  depends on describe_style only, so the pretrained LLM's embedding rows mean the same words later), and
  the option leaves every other stage's hash alone."""
  from sklearn.datasets import load_digits
  from dynllava_jax.data import digits_vqa
  d = load_digits()
  images, labels = d.images.astype(np.float32), d.target
  kw = dict(describe_style='echo', max_rounds=6, extra_round_prob=0.8, grid_size=2,
            type_probs=(0.4, 0.1, 0.25, 0.15, 0.1), describe_alone=True, add_echo=True)
  for i in range(20):
    a = digits_vqa.make_sample('train', i, images, labels, 64, 0, **kw)
    b = digits_vqa.make_sample('train', i, images, labels, 64, 0, text_only=True, **kw)
    assert not b['has_image'] and b['image'] == b'' and b['answer'] == a['answer']
    va, vb = a['conversations']['value'], b['conversations']['value']
    assert [v.replace('<image>\n', '') for v in va] == vb and not any('<image>' in v for v in vb)
    # text_grid: the grid in words where the image was (the description's text), so the answers follow
    g = digits_vqa.make_sample('train', i, images, labels, 64, 0, text_only=True, text_grid=True, **kw)
    vg = g['conversations']['value']
    if a['has_image']:
      words = vg[0].split('\n')[0]
      assert vg[0] == words + '\n' + vb[0] and vg[1:] == vb[1:] and not g['has_image']
      if a['question_type'] == 'describe':
        assert words == a['answer']                  # the description is the grid in words
    else:
      assert vg == vb                                # a text-only addition has no grid to write
  assert digits_vqa.make_config(text_only=True).name.endswith('_to')
  assert digits_vqa.make_config(text_only=True, text_grid=True).name.endswith('_to_tg')
  with pytest.raises(ValueError, match='text_only'):
    digits_vqa.make_config(text_grid=True)
  c2 = demo.get_config('stage=2')
  lm = demo.get_config('stage=lm')
  assert lm.data.digits.text_only and lm.data.digits.text_grid and not c2.data.digits.text_only
  assert not {'text_only', 'text_grid'} & set(stg.stage_inputs(c2)['data']['digits'])   # hashes kept
  assert stg.stage_inputs(lm)['data']['digits']['text_only'] is True
  # the lm stage is stage 2's recipe on that corpus, for demo.LM_STEPS steps
  f2, fl = _flat(c2.to_dict()), _flat(lm.to_dict())
  changed = {k for k in set(f2) | set(fl) if f2.get(k, '<absent>') != fl.get(k, '<absent>')}
  assert {'data.digits.text_only', 'data.digits.text_grid', 'stage.name'} <= changed <= {
      'data.digits.text_only', 'data.digits.text_grid', 'train.steps', 'stage.index', 'stage.name'}
  assert lm.train.steps == demo.LM_STEPS and stg.stage_dir('/w', lm) == '/w/stage0_lm'


def test_demo_recipe_changes_reach_the_stages(monkeypatch):
  """A change to configs/demo.py's stage 2 changes every derived stage's config and cache hash."""
  before = {n: stg.stage_hash(demo_more.get_config(f'stage={n}'), 'up') for n in demo_more.STAGES}
  real = demo.get_config

  def changed(arg=None):
    c = real(arg)
    if c.stage.index == 2:
      c.train.lr = 5e-4
    return c
  monkeypatch.setattr(demo, 'get_config', changed)
  for n, (_, base, _) in demo_more.STAGES.items():
    c = demo_more.get_config(f'stage={n}')
    assert (c.train.lr == 5e-4 * (0.5 if n == 'region_full' else 1.0)) == (base == 2)
    assert (stg.stage_hash(c, 'up') != before[n]) == (base == 2), n


def _part(types, acc, n, flops, kv):
  by = {t: a for t, a in zip(types, acc)}
  by['all'] = float(np.mean(acc))
  return {'accuracy_by_type': by, 'token_accuracy_by_type': dict(by), 'kv_cache_bytes_by_type': dict(by),
          'num_samples': n, 'kept_image_ratio': 1.0, 'kept_text_ratio': 1.0, 'prefill_flops_analytic': flops,
          'kv_cache_bytes': kv}


def test_merged_rows_and_the_new_summary_keys():
  assert more.matched_budgets(64) == (2 / 64, 4 / 64, 8 / 64, 16 / 64, 32 / 64)
  img = _part(['count', 'digit_at'], [1.0, 0.5], 30, 100.0, 10.0)
  vid = _part(['changed', 'narrate'], [0.0, 0.5], 10, 300.0, 50.0)
  row = more.merged_row('mod', 0.2, {'image': img, 'video': vid})
  assert row['key'] == 'mod@0.2' and row['num_samples'] == 40
  assert set(row['accuracy_by_type']) == {'count', 'digit_at', 'changed', 'narrate', 'all'}
  assert np.isclose(row['accuracy_by_type']['all'], 0.75 * 0.75 + 0.25 * 0.25)   # sample-weighted
  assert np.isclose(row['prefill_flops_analytic'], 150.0) and np.isclose(row['kv_cache_bytes'], 20.0)
  with pytest.raises(ValueError, match='two parts'):
    more.merged_row('mod', 0.2, {'image': img, 'video': img})
  rows = {'dense@1.0': {**img, 'method': 'dense'}, 'dynamic@0.2': {**img, 'method': 'dynamic'},
          'mqt@16': {**img, 'method': 'mqt'}, 'visionzip@0.03125': {**img, 'method': 'visionzip'},
          'mod@0.2': row, 'dense_mod@1.0': more.merged_row('dense_mod', 1.0, {'image': img, 'video': vid}),
          'drop_equal_flops@0.2': more.merged_row('drop_equal_flops', 0.2, {'image': img}),
          'region_full': {**img, 'method': 'region_full'}, 'region_lora': {**img, 'method': 'region_lora'}}
  summary = res.check_summary(res.make_summary(rows, {'count': 0.3, 'changed': 0.1}, 40, 1.0))
  assert summary['methods']['mod@0.2']['accuracy']['changed'] == 0.0
  plot = more.plot_entries(summary['methods'], rows)
  assert 'region_full@1.0' in plot and 'region_full' not in plot
  assert plot['mod@0.2']['accuracy'] == img['accuracy_by_type'] and plot['mod@0.2']['prefill_flops'] == 100.0


def test_mod_video_stage_trains_two_steps(tmp_path):
  """The MoD stage on digits_video (4 frames) through the demo's stage runner body (`loop.train`), 2 steps
  from a fresh init: the frames reach training, the params are exported for evaluation."""
  c = demo_more.get_config('stage=mod_video,smoke=True')
  c.data.data_dir = str(tmp_path / 'tfds')
  c.data.digits.num_train, c.data.digits.num_val, c.data.digits.num_test = 16, 4, 4
  c.train.eval_every = 0
  c.model.llm.layers, c.model.vision.depth = 2, 1          # a cheaper compile: one MoD layer (0)
  c.model.mod.layers = '0'
  path = str(tmp_path / 'mod_video')
  out = stg._train_llava_stage(c, path, report=lambda m: None)   # pylint: disable=protected-access
  assert out['step'] == 2 and np.isfinite(out['last']['loss'])
  assert os.path.isdir(os.path.join(path, 'params'))


@pytest.mark.skipif(not os.environ.get('DEMO_MORE_SMOKE'), reason='~8 min CPU; set DEMO_MORE_SMOKE=1')
def test_demo_more_smoke_end_to_end(tmp_path):
  w = tmp_path / 'demo'
  cmd = [sys.executable, os.path.join(ROOT, 'scripts', 'demo_more.py'), '--workdir', str(w), '--smoke',
         '--test_limit', '6', '--eval_batch', '6', '--set', f'data.data_dir={tmp_path / "tfds"}']
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600,
                       env=dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu'))
  assert out.returncode == 0, out.stderr[-3000:]
  for name in demo_more.STAGES:
    info = stg.read_state(stg.stage_dir(str(w), demo_more.get_config(f'stage={name},smoke=True')))
    assert info['done'] and info['result']['step'] == 2
  m = res.check_summary(json.loads((w / 'summary.json').read_text()))['methods']
  want = {f'mqt@{k}' for k in more.MQT_COUNTS} | {'mod@0.2', 'mod_random@0.2', 'mod_uniform@0.2',
                                                   'drop_equal_flops@0.2', 'dense_mod@1.0', *more.REGION_KEYS}
  want |= {res.key(x, r) for x in more.MATCHED_METHODS for r in more.matched_budgets(64)}
  assert want <= set(m)
  types = set(m['mod@0.2']['accuracy'])           # the image part's and the video part's types side by side
  assert types & {'count', 'describe', 'digit_at', 'row_sum'} and types & {'changed', 'count_frames', 'narrate'}
  assert m['mqt@2']['prefill_flops'] < m['mqt@64']['prefill_flops']


def test_set_keeps_a_string_field_a_string(capsys):
  """`--set region_full:model.region=1`: a string field takes the text as written; a wrong type is one
  line and exit 2, not a traceback."""
  sys.path.insert(0, os.path.join(ROOT, 'scripts'))
  from demo import apply_sets  # pylint: disable=g-import-not-at-top  (scripts/demo.py)
  c = demo_more.get_config('stage=region_full')
  k = c.stage.index
  assert apply_sets(c, {f'stage{k}'}, [f'stage{k}:model.region=1', f'stage{k}:train.steps=7',
                                       'stage2:train.steps=9']) == [
      f'stage{k}:model.region=1', f'stage{k}:train.steps=7']
  assert c.model.region == '1' and c.train.steps == 7
  with pytest.raises(SystemExit) as e:
    apply_sets(c, {f'stage{k}'}, [f'stage{k}:train.steps=[1]'])
  assert e.value.code == 2 and 'train.steps' in capsys.readouterr().err


@pytest.mark.parametrize('item,says', [('stage99:train.steps=1', 'unknown'),
                                       ('mqt_instruct:train.nosuch=1', 'has no field'),
                                       ('train.nosuch=1', 'no stage config has')])
def test_bad_set_is_one_line_before_any_stage(tmp_path, item, says):
  """scripts/demo_more.py: a --set naming no stage of the run, or a field no stage has, is one line and
  exit 2 before the first stage runs (nothing written to the workdir)."""
  w = tmp_path / 'w'
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'demo_more.py'), '--workdir', str(w),
                        '--smoke', '--set', item], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 2, out.stderr[-2000:]
  assert says in out.stderr and len(out.stderr.strip().splitlines()) == 1 and not w.exists()
