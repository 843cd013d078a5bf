"""benchmarks/train_step.py compares like with like: on the same weights and batch, our train step and
PyTorch + HF transformers' compute the same loss, before and after one AdamW step (clipping included)."""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import train_step as TS  # pylint: disable=wrong-import-position
from dynllava_jax import hf  # pylint: disable=wrong-import-position


def test_same_loss_before_and_after_a_step(tmp_path):
  cfg = TS.step_config('tiny', 'dense')
  cfg.model.llm.layers = 2
  batch = TS.make_batch(cfg.model, 2, 24)
  assert (batch['labels'] != -100).sum() == 2 * 7          # the answer half of the text is labelled
  ours = TS.Ours(cfg, batch, 'dense')
  hf.save_llava(ours.model(), cfg.model, str(tmp_path))
  ref = TS.Torch(str(tmp_path), batch)
  losses = np.array([[ours.step(), ref.step()] for _ in range(2)])
  assert losses[0, 0] > 1.0
  np.testing.assert_allclose(losses[:, 0], losses[:, 1], rtol=1e-4)
  assert abs(losses[1, 0] - losses[0, 0]) > 1e-6                # the step changed the weights
  np.testing.assert_allclose(ours.step(), ref.loss(), rtol=1e-4)  # after two steps: the same weights


def test_rows_from_children():
  """The parent's aggregation: medians over every child's timed steps, FLOPs rates, the speed-up against
  torch, XLA's peak for ours and the max RSS for torch, a child that failed in `skipped`."""
  args = argparse.Namespace(peak_tflops=None)
  child = lambda ts, loss, **kw: {'tokens': 640, 'step_s': ts, 'losses': [loss, loss - 1], **kw}
  results = {('ours', 'dense'): [child([2.0, 4.0], 10.0, compile_s=5.0, xla_peak_bytes=7, max_rss_bytes=9,
                                       rss_polled_bytes=8),
                                 child([3.0], 10.0, compile_s=7.0, xla_peak_bytes=7, max_rss_bytes=9)],
             ('torch', 'dense'): [child([6.0, 5.0], 10.0005, max_rss_bytes=20, rss_polled_bytes=30),
                                  child([9.0], 10.0005, max_rss_bytes=25)],
             ('ours', 'dynamic'): [{'error': 'does not fit', 'max_rss_bytes': 3, 'rss_polled_bytes': 4,
                                    'xla_peak_bytes': 99}]}
  rows, skipped = TS._rows(args, 1, results, {'dense': 12e9, 'dense:full': 18e9}, gemm=8.0)
  ours, torch = rows
  assert (ours['step_s'], ours['children'], ours['compile_s']) == (3.0, 2, 6.0)
  assert ours['gflops'] == 4.0 and ours['gemm_fraction'] == 0.5
  assert torch['gflops'] == 3.0 and torch['step_flops'] == 18e9     # torch's head runs at every position
  assert (ours['peak_bytes'], ours['max_rss_bytes'], torch['peak_bytes']) == (7, 9, 30)
  assert torch['step_s'] == 6.0 and ours['speedup_vs_torch'] == 2.0 and torch['vs_ours_dense'] == 2.0
  assert skipped == [{'impl': 'ours', 'method': 'dynamic', 'batch': 1, 'error': 'does not fit',
                      'max_rss_bytes': 4, 'xla_peak_bytes': 99}]
  assert abs(TS.first_loss_diff(rows) - 0.0005 / 10.0005) < 1e-12 and TS.first_loss_diff(rows[:1]) is None
