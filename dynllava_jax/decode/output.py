"""What `generate` returns (KV-cache and cache-free decoding alike)."""
import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass
class GenerateOutput:
  """Host (numpy) results of one `generate` call.

  tokens (B, M) int32, pad_token_id after each sample's end; lengths (B,) generated tokens incl. EOS;
  kept_image_ratio (B,) image tokens present in the last non-MoD segment / the sample's image tokens (1.0 for
  text-only samples); kept_text_ratio (B,) fraction of the fed generated tokens the method kept at its text
  layer (1.0 when none was fed); text_keep (B, M) bool decision for generated token j (True where no
  decision was made); kv_cache_bytes_prefill / _final: K/V bytes holding tokens after prefill / at the end
  (all segments and samples; 0 without a cache); kv_cache_bytes_allocated: final buffer bytes;
  capacities: the segment-cache capacity tuples used, in order; logits (B, M, V) when asked, else None;
  caches: the final SegmentCache tuple (device arrays) when return_caches=True, else None; decode_s: wall
  seconds from the prefill's outputs being ready to the tokens on the host (KV-cache path; else None);
  intermediates: with generate(..., intermediates=True) {'prefill', 'positions' (B, M), 'text_logits'
  (B, M, C)} (decode/generate.py), else None.
  """
  tokens: np.ndarray
  lengths: np.ndarray
  kept_image_ratio: np.ndarray
  kept_text_ratio: np.ndarray
  kv_cache_bytes_prefill: int
  kv_cache_bytes_final: int
  kv_cache_bytes_allocated: int
  text_keep: np.ndarray
  capacities: list
  logits: Optional[np.ndarray] = None
  caches: Optional[tuple] = None
  method: str = ''
  use_cache: bool = True
  decode_s: Optional[float] = None
  intermediates: Optional[dict] = None
