"""What `generate` returns (KV-cache and cache-free decoding alike)."""
import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass
class GenerateOutput:
  """Host (numpy) results of one `generate` call; the fields: docs/inference.md, "API".

  kv_cache_bytes_*: 0 without a cache; logits (B, M, V) only with return_logits; caches (the final
  SegmentCache tuple, device arrays) only with return_caches; decode_s only on the KV-cache path;
  intermediates only with generate(..., intermediates=True) (decode/generate.py); else None.
  """
  tokens: np.ndarray                # (B, M) int32, pad_token_id after each sample's end
  lengths: np.ndarray               # (B,) generated tokens incl. EOS
  kept_image_ratio: np.ndarray      # (B,) of the last non-MoD segment (1.0: text-only)
  kept_text_ratio: np.ndarray       # (B,) of the fed generated tokens (1.0: none fed)
  kv_cache_bytes_prefill: int
  kv_cache_bytes_final: int
  kv_cache_bytes_allocated: int
  text_keep: np.ndarray             # (B, M) bool (True where no decision was made)
  capacities: list                  # the segment-cache capacity tuples used, in order
  logits: Optional[np.ndarray] = None
  caches: Optional[tuple] = None
  method: str = ''
  use_cache: bool = True
  decode_s: Optional[float] = None
  intermediates: Optional[dict] = None
