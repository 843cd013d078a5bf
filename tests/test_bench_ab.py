"""benchmarks/ab_compare.py's arithmetic (no workers, no clocks): per-repetition prefill / decode figures
from the calls' times, the after ÷ before ratios and the Dynamic / dense speed-up change, the bootstrap
interval around the median."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import ab_compare as AB  # pylint: disable=wrong-import-position


def _call(prefill, ms, m):
  return {'total_s': prefill + (0.5 + ms * m / 1000.0), 'decode_s': 0.5 + ms * m / 1000.0}


def test_per_rep_prefill_and_decode():
  reps = [{4: _call(2.0, 40.0, 4), 36: _call(2.2, 40.0, 36)}]
  pre, dec = AB.per_rep(reps, [4, 36])
  np.testing.assert_allclose(pre, [2.1])
  np.testing.assert_allclose(dec, [40.0])       # the 0.5 s set-up cancels


def test_summary_ratios_and_intervals():
  lens = [4, 36]
  rng = np.random.default_rng(0)

  def reps(prefill, ms, n=9):
    out = []
    for _ in range(n):
      j = 1 + 0.01 * rng.standard_normal()
      out.append({m: _call(prefill * j, ms * j, m) for m in lens})
    return out

  raw = {'before': {(8, 'dense'): reps(10.0, 120.0), (8, 'dynamic'): reps(5.0, 100.0)},
         'after': {(8, 'dense'): reps(10.0, 120.0), (8, 'dynamic'): reps(5.0, 110.0)}}
  rows, speedups = AB.summarize(raw, [8], ['dense', 'dynamic'], lens)
  by = {r['method']: r for r in rows}
  assert abs(by['dense']['decode_time_ratio'] - 1.0) < 0.03
  assert abs(by['dynamic']['decode_time_ratio'] - 1.1) < 0.03
  lo, hi = by['dynamic']['decode_time_ratio_ci95']
  assert lo <= by['dynamic']['decode_time_ratio'] <= hi and hi - lo < 0.05
  dec = next(s for s in speedups if s['what'] == 'decode')
  assert abs(dec['speedup_before'] - 1.2) < 0.04 and abs(dec['change'] - 1 / 1.1) < 0.04
  med, lo, hi = AB.bootstrap_median([1.0] * 5)
  assert med == lo == hi == 1.0
