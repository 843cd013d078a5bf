"""Extend: append new prompt tokens to existing segment KV caches (multi-turn chat with the cache carried
over), instead of re-running the prefill on the whole conversation.

    ext = extend(model, cfg, method, caches, input_ids, attention_mask, max_new_tokens=32)
    ext.caches (the same segments, grown and appended), ext.logits_last (B, vocab) fp32

`caches` are the SegmentCaches a `generate(..., return_caches=True)` (or an earlier `extend` + decode)
left: segment 0 holds every token of the conversation so far, the later (compact) segments what the
method kept — the image tokens its prefill kept and the generated tokens its text rule kept. The chunk
(B, T) is the next user turn's tokens (for a chat: the previous answer's last token, which the decode
loop samples but never feeds, then the template text `</s>USER: … ASSISTANT:`); each sample's real
tokens are taken in order (left- or right-padding alike), `attention_mask` marks them.

Semantics (what "the same conversation" means after pruning):
  - earlier turns' pruning stays as decided: no image token the prefill dropped and no generated token the
    text rule dropped comes back, and no kept one is re-scored;
  - every chunk token is prompt text, so every segment keeps all of them (a prefill never drops prompt
    text; the text rule judges generated tokens only);
  - a chunk token's RoPE position in a segment is that segment's `next_pos` + its index in the chunk (as
    if the decode loop had fed it: positions stay the original ones, or for a method that renumbers after
    a drop, continue its numbering).
So for the dense method extend ≡ a prefill of the whole conversation, and for a pruning method it ≡ the
masked forward over the whole conversation whose key set after each boundary is the kept set above
(tests/test_chat_extend.py). A chunk with image placeholders is refused (ValueError): an image in a later
turn would need the method's drop decisions inside the extension, which is not implemented; start a new
conversation (a fresh prefill) for a new image.

Static shapes: the chunk is padded to a multiple of `eval.prefill_bucket`; before the jitted program the
caches are grown (`cache.grow`) to hold the chunk and, for segment 0, max_new_tokens more, in multiples of
`eval.cache_bucket`: one compile per (chunk bucket, capacities).
"""
import dataclasses
from functools import partial
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dynllava_jax.decode import cache as C
from dynllava_jax.decode import request as R
from dynllava_jax.decode.prefill import eval_section
from dynllava_jax.model.attention import NEG_INF


@dataclasses.dataclass
class ExtendOutput:
  """caches: tuple of SegmentCache (device arrays) with the chunk appended; logits_last (B, V) fp32 at
  each sample's last chunk token; logits (B, T, V) fp32 at every chunk slot (return_logits) or None;
  n_new (B,) chunk tokens per sample."""
  caches: Tuple[Any, ...]
  logits_last: Any
  logits: Optional[Any]
  n_new: np.ndarray


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


@partial(jax.jit, static_argnames=('return_logits',))
def _extend_jit(model, caches, ids, n_new, *, return_logits):
  lm = model.language_model
  h, _ = model.embed(ids)
  t = ids.shape[1]
  out = []
  for cache in caches:
    pos = cache.next_pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    ks, vs = [], []
    for j, i in enumerate(range(cache.start, cache.stop)):
      h, (kc, vc) = lm.layer_at(i)(h, pos, chunk_attention(cache.k[j], cache.v[j], cache.length, n_new))
      ks.append(kc)
      vs.append(vc)
    out.append(cache.replace(k=tuple(ks), v=tuple(vs), length=cache.length + n_new,
                             next_pos=cache.next_pos + n_new))
  h_last = jnp.take_along_axis(h, (n_new - 1)[:, None, None], axis=1)
  logits_last = lm.head(h_last)[:, 0]
  logits = lm.head(h) if return_logits else None
  return tuple(out), logits_last, logits


def extend(model, cfg, method, caches, input_ids, attention_mask=None, *, max_new_tokens=1,
           return_logits=False):
  """Appends the chunk input_ids (B, T) to `caches` (module docstring) -> ExtendOutput.

  method: the Sparsifier the caches were made with (its segments must be theirs); max_new_tokens: room
  reserved in segment 0 and checked against the model's positions. ValueError (one line) for a chunk
  with image placeholders, a batch size or segmentation that does not match the caches, or a
  conversation that would outgrow the model's positions (`max_position`).
  """
  mc = model.mc
  ev = eval_section(cfg, mc)
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f'input_ids must be (batch, length); got shape {ids.shape}')
  mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  if ((ids == mc.image_token_id) & mask).any():
    raise ValueError('the new turn contains image placeholders: extend takes text only (an image in a later '
                     'turn needs a fresh prefill of the conversation)')
  bounds = R.boundaries(method, mc)
  starts = tuple(c.start for c in caches)
  if starts != (0,) + bounds:
    raise ValueError(f'the caches have segments starting at layers {starts}; method {method.name} needs '
                     f'{(0,) + bounds}: extend with the method the caches were made with')
  b = int(np.asarray(caches[0].length).shape[0])
  if ids.shape[0] != b:
    raise ValueError(f'{ids.shape[0]} new prompts for caches of batch {b}')
  m = int(max_new_tokens)
  req = R.check_and_pack(mc, ids, None, mask, max_new_tokens=m, bucket=ev.prefill_bucket)
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
  out, logits_last, logits = _extend_jit(model, tuple(grown), jnp.asarray(req.ids), jnp.asarray(n_new),
                                         return_logits=bool(return_logits))
  return ExtendOutput(out, logits_last, logits, n_new)
