"""Defaults of the `eval` config section (owned by inference / evaluation).

Inference engine fields (see docs/inference.md):
  method          sparsification method name for `dynllava_jax.sparsity.registry.make_sparsifier`
  max_new_tokens  generation budget per sample
  temperature     0 = greedy; > 0 samples from softmax(logits / temperature)
  top_p           nucleus sampling mass (1.0 = off; only with temperature > 0)
  use_cache       KV-cache decoding (True) or re-running the forward every step (False)
  prefill_bucket  packed prompt lengths and per-segment sequence lengths are rounded up to a multiple
  cache_bucket    compact KV caches are allocated / grown in multiples of this many tokens
  decode_weight_blocks  the KV-cache decode loop holds each matmul kernel as this many column blocks
                  (`decode.step.BlockedLinear`: XLA CPU runs the blocks' few-row dots concurrently);
                  0 = auto (8 from batch 4 on, else 1)
"""
import ml_collections


def eval_defaults(size='tiny'):
  c = ml_collections.ConfigDict()
  c.method = 'dynamic'
  c.max_new_tokens = 64 if size == 'tiny' else 512
  c.temperature = 0.0
  c.top_p = 1.0
  c.use_cache = True
  c.prefill_bucket = 16 if size == 'tiny' else 64
  c.cache_bucket = 16 if size == 'tiny' else 128
  c.decode_weight_blocks = 0
  return c
