"""eval.py end to end on a tiny random-init model (a few samples), the metric helpers and the report."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from dynllava_jax.eval import metrics as M
from dynllava_jax.eval import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ('method', 'accuracy', 'ppl', 'kept_image_ratio', 'kept_text_ratio', 'prefill_flops_eq13',
        'prefill_flops_xla', 'kv_cache_bytes', 'prefill_s', 'decode_ms_per_token')


def _eval(tmp_path, *extra):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  cmd = [sys.executable, os.path.join(ROOT, 'eval.py'), '--config', 'configs/dynllava.py:size=tiny',
         '--workdir', str(tmp_path / 'run'), '--limit', '3', '--batch_size', '3', '--timing_runs', '1',
         '--config.eval.max_new_tokens=4', f'--config.data.data_dir={tmp_path / "tfds"}',
         '--config.data.digits.num_train=8', '--config.data.digits.num_val=24',
         '--config.data.digits.num_test=8', *extra]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_eval_end_to_end_random_init(tmp_path):
  out_json = tmp_path / 'out.json'
  # A one-point budget sweep (each point costs its compiles; the sweep's lines: test_budget_sweep_...).
  p = _eval(tmp_path, '--allow_random_init', '--methods', 'random', '--json', str(out_json),
            '--keep_ratios', '0.5')
  assert p.returncode == 0, p.stderr[-3000:]
  rows = json.loads(out_json.read_text())
  assert [r['method'] for r in rows] == ['random keep_ratio=0.5'] and rows[0]['base_method'] == 'random'
  r = rows[0]
  assert set(KEYS) <= set(r), set(KEYS) - set(r)
  assert 0.0 <= r['accuracy'] <= 1.0 and r['prefill_s'] > 0 and r['kv_cache_bytes'] > 0
  assert r['kept_image_ratio'] == pytest.approx(32 / 64) and r['num_samples'] == 3     # the knob applied
  # A timing: only its presence is checked (3 tiny decode steps on a busy CI machine can time ≤ 0).
  assert r['prefill_flops_eq13'] > 0 and not r['decode_ms_per_token'] <= 0     # a latency or nan, never < 0
  # The analytic count of the engine's (bucketed) prefill is within 5 % of XLA's cost analysis.
  assert r['prefill_flops_analytic'] == pytest.approx(r['prefill_flops_xla'], rel=0.05)
  ev = tmp_path / 'run' / 'eval'
  for f in ('results.md', 'results.json', 'accuracy_vs_flops.png', 'accuracy_vs_kv.png', 'kept_patches.png'):
    assert (ev / f).stat().st_size > 0, f
  assert '| random keep_ratio=0.5 |' in (ev / 'results.md').read_text()
  assert '| random keep_ratio=0.5 |' in p.stdout
  preds = [json.loads(l) for l in (ev / 'predictions' / 'random_keep_ratio=0.5.jsonl').read_text().splitlines()]
  assert len(preds) == 3 and {'prediction', 'answer', 'correct', 'kv_bytes'} <= set(preds[0])
  assert np.mean([x['correct'] for x in preds]) == pytest.approx(r['accuracy'])


def test_run_eval_refuses_missing_checkpoint_and_bad_methods(tmp_path):
  from configs.dynllava import get_config
  from dynllava_jax.eval.run import run_eval
  cfg = get_config('size=tiny')
  with pytest.raises(ValueError, match='allow_random_init'):
    run_eval(cfg, str(tmp_path), ['dense'])
  with pytest.raises(ValueError, match="unknown sparsification method 'nosuch'"):
    run_eval(cfg, str(tmp_path), ['dense', 'nosuch'], allow_random_init=True)
  with pytest.raises(ValueError, match='keep-predictors'):
    run_eval(get_config('size=tiny,dense=True'), str(tmp_path), ['dynamic'], allow_random_init=True)
  with pytest.raises(ValueError, match='no methods'):
    run_eval(cfg, str(tmp_path), [' '])


def test_answer_normalisation():
  assert M.digits_match(' There are 6 digits .</s>', 'there are 6 digits .') == 1.0
  assert M.digits_match('7', '1') == 0.0
  assert M.normalize_vqa('The Two dogs!') == '2 dogs'
  assert M.normalize_vqa('1,000.5 apples.') == '1000.5 apples'
  assert M.vqa_match('Yes.', 'yes') == 1.0
  assert M.vqa_match('two', ['2', '2', 'two', 'three']) == 1.0
  assert M.vqa_match('3', ['2', '2', 'three']) == pytest.approx(1 / 3)
  assert M.perplexity([np.log(4.0) * 3], [3]) == pytest.approx(4.0)
  assert np.isnan(M.perplexity([0.0], [0]))
  assert M.decode_ms_per_token(1.5, 11, 0.5, 1) == pytest.approx(100.0)


def test_budget_sweep_points_labels_and_nan_latency(tmp_path):
  from dynllava_jax.eval import budgets
  from dynllava_jax.eval.run import latency_or_nan
  pts = budgets.sweep_points(['dense', 'dynamic', 'fastv', 'pdrop'], [0.25, 0.5])
  assert pts[0] == ('dense', {}) and ('fastv', {'r': 0.75}) in pts and ('pdrop', {'ratios': (0.5, 0.25, 0.125)}) in pts
  assert budgets.label('fastv', {'r': 0.75}) == 'fastv r=0.75'
  assert budgets.sweep_points(['mqt'], [0.5], extra={'mqt': [{'tokens': 16}]}) == [('mqt', {'tokens': 16})]
  with pytest.raises(ValueError, match='no keep-ratio knob'):
    budgets.keep_overrides('dense', 0.5)
  with pytest.warns(UserWarning, match='could not be measured'):
    assert math.isnan(latency_or_nan(-6.008, 'fastv decode ms/token'))
  assert latency_or_nan(2.5, 'x') == 2.5
  rows = [{'method': 'dense', 'base_method': 'dense', 'accuracy': 0.5, 'prefill_flops_xla': 2e9, 'kv_cache_bytes': 4096}]
  rows += [{'method': budgets.label('fastv', {'r': r}), 'base_method': 'fastv', 'accuracy': 0.5 - r / 4,
            'prefill_flops_xla': 2e9 * (1 - r), 'kv_cache_bytes': 4096 * (1 - r)} for r in (0.25, 0.75)]
  for key in ('prefill_flops_xla', 'kv_cache_bytes'):
    assert os.path.getsize(report.plot_accuracy_vs_flops(rows, str(tmp_path / f'{key}.png'), cost_key=key)) > 0


def test_report_table_and_highlight():
  rows = [{'method': 'dense', 'accuracy': 0.5, 'prefill_flops_xla': 2e9, 'kv_cache_bytes': 2 ** 20}]
  t = report.markdown_table(rows)
  assert '| dense | 0.5 |' in t and '2.000 G' in t and '1.000 MiB' in t
  img = np.zeros((8, 8, 3), np.float32)
  keep = np.array([True, False, False, True])
  out = report.highlight(img, keep, dim=0.5)
  assert out.shape == (8, 8, 3)
  assert np.all(out[:4, :4] > out[:4, 4:]) and np.allclose(out[4:, 4:], out[:4, :4])
  with pytest.raises(ValueError, match='square'):
    report.highlight(img, np.ones(3, bool))
