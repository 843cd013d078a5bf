"""benchmarks/train_step.py compares like with like: on the same weights and batch, our train step and
PyTorch + HF transformers' compute the same loss, before and after one AdamW step (clipping included)."""
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
