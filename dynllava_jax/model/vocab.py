"""Vocabulary rows a model carries beyond its tokenizer, kept out of the loss and of sampling.

An original-layout checkpoint's vocabulary is padded on import (`hf.load_llava`, docs/checkpoints.md)
and `model.llm.text_vocab_size = V` (its tokenizer's size): ids >= V get NEG_INF before the cross-entropy
(`train/forward.py`, `eval/teacher.py`) and before greedy / sampled choice (`decode/sampling.py`), as the
released code's softmax covers V ids only. The model's own logits (`Llava.__call__`) stay unmasked.

    n = text_vocab_size(model.mc)              # 0: every id is a text id (nothing masked)
    logits = mask_padded(logits, n)            # (..., V_model) -> same, ids >= n at NEG_INF
"""
import jax.numpy as jnp

from dynllava_jax.model.attention import NEG_INF


def text_vocab_size(mc):
  """`model.llm.text_vocab_size` as an int; 0 (mask nothing) when unset, 0 or the whole vocabulary."""
  n = int(mc.llm.get('text_vocab_size', 0) or 0)
  return 0 if n >= int(mc.llm.vocab_size) else n


def mask_padded(logits, n):
  """logits (..., V) with entries for ids >= n set to NEG_INF (a finite −inf: no NaN in gradients);
  n = 0 returns logits unchanged."""
  if not n or n >= logits.shape[-1]:
    return logits
  return jnp.where(jnp.arange(logits.shape[-1]) < n, logits, jnp.asarray(NEG_INF, logits.dtype))
