"""train.ce_weighting: 'token' (released) vs 'sample' (each sample's token-mean CE, averaged over samples)."""
import jax.numpy as jnp
import numpy as np
import pytest

from dynllava_jax.train import forward as F


def _out_and_batch(v=8):
  # Sample 0: one labelled target, uniform logits (nll = log v). Sample 1: three targets, predicted with
  # near-certainty (nll ~ 0).
  labels = np.full((2, 5), F.IGNORE, np.int32)
  labels[0, 4] = 3
  labels[1, 2:5] = [1, 2, 3]
  logits = np.zeros((2, 5, v), np.float32)
  for t in range(1, 5):
    if labels[1, t] != F.IGNORE:
      logits[1, t - 1, labels[1, t]] = 60.0
  return {'logits': jnp.asarray(logits)}, {'labels': jnp.asarray(labels)}, v


def test_token_and_sample_weighting_hand_computed():
  out, batch, v = _out_and_batch()
  sums = F.loss_sums(out, batch)
  n_tok = jnp.asarray(4.0)
  token, _ = F.combine(sums, n_tok, 2.0, (), 'token')
  sample, _ = F.combine(sums, n_tok, 2.0, (), 'sample')
  np.testing.assert_allclose(float(token), np.log(v) / 4, rtol=1e-5)
  np.testing.assert_allclose(float(sample), np.log(v) / 2, rtol=1e-5)


def test_unknown_weighting_is_one_clear_error():
  out, batch, _ = _out_and_batch()
  sums = F.loss_sums(out, batch)
  with pytest.raises(ValueError, match='ce_weighting'):
    F.combine(sums, jnp.asarray(4.0), 2.0, (), 'tokens')
