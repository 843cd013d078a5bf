"""Our Llava loaded by `hf.load_llava` gives HF transformers' LlavaForConditionalGeneration logits.

Tiny random checkpoints written by transformers itself; batch 2 with left padding (real tokens compared);
HF gets position_ids = cumsum(mask) - 1 clipped at 0, the positions our model uses.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from dynllava_jax import hf
from hf_utils import hf_logits, make_tiny_hf_llava, sample_batch

TOL = 1e-4

CASES = {
    'mha_theta1e4_fl-2_hf5': dict(),
    'gqa_theta5e5_fl-3_llava15hf': dict(kv_heads=2, rope_theta=500000.0, feature_layer=-3, layout='llava15hf'),
    'mqa_full_bf16_hf5': dict(kv_heads=1, layers=3, select_strategy='full', dtype='bfloat16', seed=1),
}


def rel_err(ours, ref, mask):
  m = np.asarray(mask).astype(bool)
  return float(np.abs(ours[m] - ref[m]).max() / np.abs(ref[m]).max())


@pytest.mark.parametrize('name', sorted(CASES))
def test_logits_match_hf(tmp_path, name):
  ov = CASES[name]
  path = make_tiny_hf_llava(tmp_path, **ov)
  model, config = hf.load_llava(path, dtype=jnp.float32)
  assert config.llm.kv_heads == ov.get('kv_heads', 4)
  assert config.llm.rope_theta == ov.get('rope_theta', 10000.0)
  assert config.vision.feature_layer == ov.get('feature_layer', -2)
  ids, pix, mask = sample_batch(ov, left_pad=(0, 3))
  assert mask[1, 0] == 0 and mask[0, 0] == 1    # sample 1 is left-padded
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask)))
  ref = hf_logits(path, ids, pix, mask)
  assert ours.shape == ref.shape == (2, ids.shape[1], 256)
  err = rel_err(ours, ref, mask)
  assert err <= TOL, f'{name}: max|Δ|/max|ref| = {err:.2e}'
  # The comparison is sensitive: a perturbed image changes the HF logits far beyond the tolerance.
  ref2 = hf_logits(path, ids, pix + 1.0, mask)
  assert rel_err(ours, ref2, mask) > 100 * TOL
