"""Dense greedy generation (keep ratio 1, predictors off) equals HF transformers' `generate`."""
import jax.numpy as jnp
import numpy as np

from dynllava_jax import hf
from dynllava_jax.decode.generate import generate
from hf_utils import load_hf, make_tiny_hf_llava, sample_batch

M = 8


def test_greedy_tokens_match_hf_generate(tmp_path):
  import torch
  path = make_tiny_hf_llava(tmp_path, kv_heads=2)
  model, mc = hf.load_llava(path, dtype=jnp.float32)
  ids, pix, mask = sample_batch({'kv_heads': 2}, batch=3, left_pad=(0, 3, 5), seed=2)
  ref_model = load_hf(path)
  with torch.no_grad():
    ref = ref_model.generate(
        input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask, dtype=torch.long),
        pixel_values=torch.as_tensor(pix).permute(0, 3, 1, 2).contiguous(), max_new_tokens=M, do_sample=False,
        pad_token_id=mc.pad_token_id, eos_token_id=mc.eos_token_id)
  ref = ref[:, ids.shape[1]:].numpy()
  for method in ('dense', 'dense_nocache'):
    out = generate(model, None, 'dense', ids, pix, mask, max_new_tokens=M, sampling='greedy',
                   use_cache=method == 'dense')
    for b in range(ids.shape[0]):
      n = int(out.lengths[b])
      np.testing.assert_array_equal(out.tokens[b, :n], ref[b, :n], err_msg=f'{method} sample {b}')
      assert n == M or out.tokens[b, n - 1] == mc.eos_token_id
    assert len(set(map(tuple, out.tokens.tolist()))) > 1, 'degenerate test: all samples generated the same'
