"""Host-side request handling: validation (one clear error line), packing, and static size planning.

Everything here runs in numpy before jit: prompts are *packed* (each sample's real tokens moved to the front,
in order, padding after), so left and right padding (or any mask) look the same to the engine, and RoPE
positions are simply the slot index (= cumsum(mask) − 1 of the original layout). Static sequence lengths are
rounded up to a bucket so only a few shapes are ever compiled.
"""
import dataclasses
from typing import Optional, Tuple

import numpy as np

from dynllava_jax.model.projector import num_visual_tokens as num_image_tokens


def round_up(n, step):
  """Smallest multiple of `step` that is >= max(n, 1)."""
  step = max(int(step), 1)
  return max(1, -(-int(n) // step)) * step


@dataclasses.dataclass
class Request:
  """A validated, packed batch.

  ids (B, T0) int32 packed prompt ids (pad after the n_real[b] real tokens); n_real (B,); n_img (B,) image
  placeholders per sample (0 or the model's count); pixel_values (B, H, W, 3) float32 or None if no sample
  has an image.
  """
  ids: np.ndarray
  n_real: np.ndarray
  n_img: np.ndarray
  pixel_values: Optional[np.ndarray]


PIXEL_LIMIT = 10.0   # CLIP-normalised pixels lie in about [-1.8, 2.2]; raw 0..255 values go far past this


def check_and_pack(model_cfg, input_ids, pixel_values, attention_mask, *, max_new_tokens=0, bucket=16,
                   extra_len=0, n_visual=None):
  """Validates a generation / prefill request and packs it. Raises ValueError with one actionable line.

  input_ids (B, T) int; attention_mask (B, T) {0,1} or None (all real); pixel_values (B, H, W, 3), frames
  (B, F, H, W, 3) (N placeholders per frame, up to F per sample) or None.
  The packed length is round_up(max real length + extra_len, bucket). n_visual: this call's image
  placeholders per image (`projector.visual_token_count`; default the model's count).
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2 or ids.shape[0] == 0:
    raise ValueError(f'input_ids must be (batch, length) with batch >= 1; got shape {ids.shape}')
  b, t = ids.shape
  mask = np.ones_like(ids, dtype=np.int32) if attention_mask is None else np.asarray(attention_mask)
  if mask.shape != ids.shape:
    raise ValueError(f'attention_mask shape {mask.shape} must equal input_ids shape {ids.shape}')
  mask = mask.astype(bool)
  n_real = mask.sum(-1).astype(np.int32)
  if (n_real == 0).any():
    raise ValueError(f'empty prompt: sample(s) {np.flatnonzero(n_real == 0).tolist()} have no real token '
                     '(attention_mask all 0); give every sample at least one token')
  lc = model_cfg.llm
  if ids.min() < 0 or ids[mask].max() >= lc.vocab_size:
    raise ValueError(f'input_ids must lie in [0, vocab_size={lc.vocab_size})')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1')
  longest = int(n_real.max())
  if longest + max_new_tokens > lc.max_position:
    raise ValueError(f'prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model\'s '
                     f'max_position={lc.max_position}; shorten the prompt or lower max_new_tokens')
  n = num_image_tokens(model_cfg) if n_visual is None else int(n_visual)
  n_img = ((ids == model_cfg.image_token_id) & mask).sum(-1).astype(np.int32)
  frames = np.shape(pixel_values)[1] if pixel_values is not None and np.ndim(pixel_values) == 5 else 1
  if frames > 1:    # frames (B, F, H, W, 3): N placeholders per frame, up to F frames per sample
    bad = np.flatnonzero((n_img % n != 0) | (n_img > frames * n))
    if bad.size:
      raise ValueError(f'sample {int(bad[0])} has {int(n_img[bad[0]])} image placeholders; with {frames} '
                       f'frames this model needs {n} per frame, at most {frames * n}')
  bad = np.flatnonzero((n_img != 0) & (n_img != n)) if frames == 1 else bad
  if bad.size:
    raise ValueError(f'sample {int(bad[0])} has {int(n_img[bad[0]])} image placeholders; this model needs '
                     f'exactly {n} (or 0 for a text-only sample)')
  if (n_img > 0).any():
    if pixel_values is None:
      raise ValueError('the prompts contain image placeholders but pixel_values is None')
    raw = np.asarray(pixel_values)
    pix = raw.astype(np.float32)
    if raw.dtype == np.uint8 or (pix.size and float(np.abs(pix).max()) > PIXEL_LIMIT):
      raise ValueError(f'pixel_values look like raw 0..255 pixels ({raw.dtype}, max {float(pix.max()):g}); '
                       'give CLIP-normalised floats (dynllava_jax.data.images.preprocess)')
    s = model_cfg.vision.image_size
    if pix.shape != (b, s, s, 3) and pix.shape != (b, frames, s, s, 3):
      raise ValueError(f'pixel_values has shape {pix.shape}; this model expects ({b}, {s}, {s}, 3) '
                       '(batch, height, width, RGB), CLIP-normalised')
  else:
    pix = None
  t0 = round_up(longest + extra_len, bucket)
  packed = np.full((b, t0), model_cfg.pad_token_id, np.int32)
  for i in range(b):
    packed[i, :n_real[i]] = ids[i][mask[i]]
  return Request(packed, n_real, n_img, pix)


def boundaries(method, model_cfg):
  """Sorted layer indices where a segment starts after a boundary: drop points ∪ {text_layer} (0 = before
  any layer: the prefill then has no segment before it)."""
  pts = set(int(p) for p in method.drop_points(model_cfg))
  tl = method.text_layer(model_cfg)
  if tl is not None:
    pts.add(int(tl))
  return tuple(sorted(pts))


def segment_sizes(method, model_cfg, n_real, n_img, t0, bucket, extra=0, n_visual=None) -> Tuple[int, ...]:
  """Static sequence length of every segment (len(boundaries) + 1 entries), each <= the previous one.

  Per sample after drop i: real tokens − image tokens + min(k_i, image tokens) + 1 (the last token is
  always kept) + `extra` (generated tokens in no-cache decoding); threshold mode (k_i None) keeps the bound
  of all image tokens. n_visual: this call's image tokens per image (default the model's count).
  """
  n = num_image_tokens(model_cfg) if n_visual is None else int(n_visual)
  pts = tuple(int(p) for p in method.drop_points(model_cfg))
  counts = tuple(method.keep_counts(n))
  if len(counts) != len(pts):
    raise ValueError(f'{method.name}: keep_counts gives {len(counts)} entries for {len(pts)} drop points')
  sizes = [int(t0)]
  cur_img = np.asarray(n_img, np.int64)
  for p in boundaries(method, model_cfg):
    if p in pts:
      k = counts[pts.index(p)]
      if k is not None:
        cur_img = np.minimum(cur_img, int(k))
    need = np.asarray(n_real) - np.asarray(n_img) + cur_img + (np.asarray(n_img) > 0) + extra
    sizes.append(min(sizes[-1], round_up(int(need.max()), bucket)))
  return tuple(sizes)
