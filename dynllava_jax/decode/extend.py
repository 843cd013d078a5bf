"""Extend: append new prompt tokens to existing segment KV caches (multi-turn chat with the cache carried
over), instead of re-running the prefill on the whole conversation.

    ext = extend(model, cfg, method, caches, input_ids, attention_mask, max_new_tokens=32)
    ext.caches (the same segments, grown and appended), ext.logits_last (B, vocab) fp32

`caches`: the SegmentCaches a `generate(..., return_caches=True)` (or an earlier `extend` + decode) left.
The chunk (B, T): the next turn's tokens (a chat: the previous answer's unfed last token, then
`</s>USER: … ASSISTANT:`), real tokens marked by `attention_mask` (left or right padding alike).

Semantics (docs/serving.md, "What a carried-over cache means"; tests/test_chat_extend.py): earlier turns'
pruning stands; every chunk text token is prompt text, kept by every segment; a chunk image is pruned as
a prefill would, scored over the chunk alone (`ScoreContext`), keeping its k best image tokens, its text
and its last token; a chunk token's position continues each segment's `next_pos` (or, for a renumbering
method, its rank among the chunk tokens the segment kept).

Static shapes: the chunk is padded to `eval.prefill_bucket`; the caches are grown (`cache.grow`) to hold
the chunk (segment 0: + max_new_tokens) in `eval.cache_bucket` steps: one compile per (chunk bucket,
capacities).
"""
import dataclasses
import types
from functools import partial
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dynllava_jax.decode import cache as C
from dynllava_jax.decode import request as R
from dynllava_jax.decode.prefill import eval_section
from dynllava_jax.model import mod as M
from dynllava_jax.model.attention import NEG_INF
from dynllava_jax.model.projector import visual_token_count
from dynllava_jax.model.walk import walk
from dynllava_jax.sparsity.base import ScoreContext, top_k_mask


@dataclasses.dataclass
class ExtendOutput:
  """caches: tuple of SegmentCache (device arrays) with the chunk appended; logits_last (B, V) fp32 at
  each sample's last chunk token; logits (B, T, V) fp32 at every chunk slot (return_logits) or None;
  n_new (B,) chunk tokens per sample; kept (n_seg, B, T) bool: which chunk tokens (by their slot in the
  packed chunk) each segment holds; kept_image_ratio (B,): image tokens of the chunk in the last segment /
  the chunk's image tokens (NaN for a chunk without an image)."""
  caches: Tuple[Any, ...]
  logits_last: Any
  logits: Optional[Any]
  n_new: np.ndarray
  kept: np.ndarray
  kept_image_ratio: np.ndarray


def chunk_attention(k_buf, v_buf, length, n_new):
  """An `attend` for `DecoderLayer.__call__` on a chunk of T new tokens over a segment cache.

  k_buf / v_buf (B, Hkv, C, D): the layer's cache buffers, slots [0, length) in use; n_new (B,) real chunk
  tokens (slots [0, n_new) of the chunk). The chunk's K/V are written at slots length + j (j < n_new;
  padding rows are not written), then query j attends over the old slots and chunk tokens 0..j (fp32
  softmax, GQA). attend(q (B, T, Hq, D), k, v (B, T, Hkv, D)) -> (o (B, T, Hq, D), (k_buf', v_buf')).
  """
  b, _, cap, _ = k_buf.shape

  def attend(q, k, v):
    t = q.shape[1]
    j = jnp.arange(t)[None, :]
    slot = jnp.where(j < n_new[:, None], length[:, None] + j, cap)             # (B, T); cap: not written
    rows = jnp.arange(b)[:, None]
    kc = k_buf.at[rows, :, slot].set(k.astype(k_buf.dtype), mode='drop')       # value (B, T, Hkv, D)
    vc = v_buf.at[rows, :, slot].set(v.astype(v_buf.dtype), mode='drop')
    hq, d = q.shape[2], q.shape[3]
    hkv = kc.shape[1]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    s = jnp.einsum('bthgd,bhkd->bhgtk', qg, kc, preferred_element_type=jnp.float32) * d ** -0.5
    c = jnp.arange(cap)[None, None, :]
    old = c < length[:, None, None]
    new = (c >= length[:, None, None]) & (c - length[:, None, None] <= jnp.arange(t)[None, :, None])
    allowed = (old | new)[:, None, None]                                        # (B, 1, 1, T, C)
    s = jnp.where(allowed, s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1) * allowed
    o = jnp.einsum('bhgtk,bhkd->bthgd', p.astype(vc.dtype), vc, preferred_element_type=jnp.float32)
    return o.reshape(b, t, hq, d).astype(q.dtype), (kc, vc)
  return attend


@partial(jax.jit, static_argnames=('method', 'return_logits', 'count'))
def _extend_jit(model, method, caches, ids, n_new, pixel_values, rng, *, return_logits, count=None):
  lm = model.language_model
  h, image_mask = model.embed(ids, pixel_values, count, method)
  b, t = ids.shape
  valid = jnp.arange(t)[None, :] < n_new[:, None]
  n0 = n_new
  image_mask = image_mask & valid
  off = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))     # each token's index in the chunk
  pts = tuple(int(p) for p in method.drop_points(model.mc))
  n_image = visual_token_count(model.mc, method, count)
  counts = tuple(method.keep_counts(n_image))
  # the chunk as each segment sees it; the segment being run (index, positions, the new K/V per layer)
  st = types.SimpleNamespace(valid=valid, n_new=n_new, image_mask=image_mask, off=off, s=0, pos=None, k=[],
                             v=[])
  out, kept = [], []

  def run(h, start, stop):      # layers [start, stop) of cache segment s, each with its cache's attention
    cache = caches[st.s]
    if start == cache.start:
      kept.append(jnp.zeros((b, t), bool).at[jnp.arange(b)[:, None], st.off].max(st.valid))
      st.pos = cache.next_pos[:, None] + (jnp.arange(t, dtype=jnp.int32)[None, :] if method.renumber_positions
                                          else st.off)
    for i in range(start, stop):
      j = i - cache.start
      h, (kc, vc) = lm.layer_at(i)(h, st.pos, chunk_attention(cache.k[j], cache.v[j], cache.length, st.n_new))
      st.k.append(kc)
      st.v.append(vc)
    return h

  def at(p, h, h_prev):         # close segment s; at a drop point, the chunk keeps what a prefill would
    cache = caches[st.s]
    out.append(cache.replace(k=tuple(st.k), v=tuple(st.v), length=cache.length + st.n_new,
                             next_pos=cache.next_pos + (st.n_new if method.renumber_positions else n0)))
    st.s, st.k, st.v = st.s + 1, [], []
    if p in pts and pixel_values is not None and st.s < len(caches):   # scored on the chunk's own tokens
      i = pts.index(p)
      ctx = ScoreContext(h=h, h_prev=h_prev, positions=st.pos, valid=st.valid, image_mask=st.image_mask,
                         last_index=st.n_new - 1, layer=p, model=model, n_image=n_image,
                         rng=None if rng is None else jax.random.fold_in(rng, i))
      keep = st.valid & (~st.image_mask | top_k_mask(method.score(i, ctx), st.image_mask, counts[i]))
      keep = keep | ((jnp.arange(t)[None, :] == (st.n_new - 1)[:, None]) & st.valid)   # the last token
      idx, st.valid, st.n_new = M.compact(keep, t)
      h, st.off, st.image_mask = M.take(h, idx), M.take(st.off, idx), M.take(st.image_mask, idx) & st.valid
    return h

  h = walk(h, caches[-1].stop, tuple(c.start for c in caches[1:]), run, at,
           prev=pts if method.needs_prev_hidden else ())
  h_last = jnp.take_along_axis(h, (st.n_new - 1)[:, None, None], axis=1)
  logits = lm.head(h) if return_logits else None
  return tuple(out), lm.head(h_last)[:, 0], logits, jnp.stack(kept), jnp.sum(st.image_mask, axis=1)


def extend(model, cfg, method, caches, input_ids, attention_mask=None, pixel_values=None, *, max_new_tokens=1,
           rng=None, visual_tokens=None, return_logits=False):
  """Appends the chunk input_ids (B, T) to `caches` (module docstring) -> ExtendOutput.

  method: the Sparsifier the caches were made with (its segments must be theirs); pixel_values
  (B, S, S, 3) CLIP-normalised or None: the images of chunks that hold image placeholders (the
  method's count, as in a prefill; 0 for a text-only sample); rng: the drop points' key (random
  methods); max_new_tokens: room reserved in segment 0 and checked against the model's positions.
  ValueError (one line) for a bad chunk (`request.check_and_pack`'s checks), a batch size or
  segmentation that does not match the caches, or a conversation that would outgrow the model's
  positions (`max_position`).
  """
  mc = model.mc
  ev = eval_section(cfg, mc)
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f'input_ids must be (batch, length); got shape {ids.shape}')
  bounds = R.boundaries(method, mc)
  if bounds and bounds[0] == 0:
    raise ValueError(f'{method.name} drops tokens entering layer 0: a next turn (extend) is not supported '
                     'there; use sparse_layer >= 1')
  starts = tuple(c.start for c in caches)
  if starts != (0,) + bounds:
    raise ValueError(f'the caches have segments starting at layers {starts}; method {method.name} needs '
                     f'{(0,) + bounds}: extend with the method the caches were made with')
  b = int(np.asarray(caches[0].length).shape[0])
  if ids.shape[0] != b:
    raise ValueError(f'{ids.shape[0]} new prompts for caches of batch {b}')
  m = int(max_new_tokens)
  n_vis = visual_token_count(mc, method, visual_tokens)
  method.validate(mc, n_vis)
  req = R.check_and_pack(mc, ids, pixel_values, attention_mask, max_new_tokens=m, bucket=ev.prefill_bucket,
                         n_visual=n_vis)
  n_new = req.n_real
  used = np.asarray(caches[0].next_pos)
  over = used + n_new + m > mc.llm.max_position
  if over.any():
    i = int(np.flatnonzero(over)[0])
    raise ValueError(f'sample {i}: a conversation of {int(used[i])} tokens + {int(n_new[i])} new + '
                     f'max_new_tokens={m} exceeds the model\'s max_position={mc.llm.max_position}')
  bucket = int(ev.cache_bucket)
  grown = []
  for s, c in enumerate(caches):
    need = int((np.asarray(c.length) + n_new).max()) + (m if s == 0 else 1)
    grown.append(C.grow(c, max(c.capacity, R.round_up(need, bucket))))
  pix = None if req.pixel_values is None else jnp.asarray(req.pixel_values)
  out, logits_last, logits, kept, n_img_kept = _extend_jit(
      model, method, tuple(grown), jnp.asarray(req.ids), jnp.asarray(n_new), pix, rng,
      return_logits=bool(return_logits), count=None if visual_tokens is None else int(visual_tokens))
  ratio = np.where(req.n_img > 0, np.asarray(n_img_kept) / np.maximum(req.n_img, 1), np.nan)
  return ExtendOutput(out, logits_last, logits, n_new, np.asarray(kept), ratio.astype(np.float32))
