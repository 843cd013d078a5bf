"""KV caches for decoding: one per segment (layers [start, stop)), static shapes, explicit pytrees.

Layout of a segment cache (docs/inference.md, "KV-cache decoding"):
  k, v     tuples of L_s arrays, one per layer, each (B, Hkv, C, D): RoPE already applied to k;
           C = capacity (a multiple of eval.cache_bucket); one buffer per layer, heads before slots, is
           what a one-token decode step reads as is and writes in place (docs/benchmarks.md §4).
  length   (B,) int32           slots [0, length) hold tokens, in causal order; the next write goes to
                                slot `length` (per sample)
  next_pos (B,) int32           RoPE position of the next token fed to this segment
Segment 0 is the *full* cache; every later segment is *compact* (the prompt tokens its prefill kept + the
generated tokens the method keeps; an MoD segment: the prompt tokens routed through it + every generated
token). A dropped token is never written (its scatter index is pushed out of bounds); nothing is evicted.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dynllava_jax.model.attention import NEG_INF


@struct.dataclass
class SegmentCache:
  k: jax.Array
  v: jax.Array
  length: jax.Array
  next_pos: jax.Array
  start: int = struct.field(pytree_node=False)
  stop: int = struct.field(pytree_node=False)

  @property
  def capacity(self):
    return self.k[0].shape[2]

  @property
  def num_layers(self):
    return len(self.k)


def stacked(arrays):
  """Host view of one cache side as one array (L_s, B, C, Hkv, D) (tests, inspection)."""
  return np.stack([np.asarray(a) for a in arrays]).transpose(0, 1, 3, 2, 4)


def from_segment(seg, capacity):
  """Cache from a prefill `Segment` (its kv (L, B, T_s, Hkv, D), count, positions), padded to capacity.

  Slots >= count (padding, or dropped tokens the gather parked there) are zeroed: nothing but kept tokens
  is ever in the buffer.
  """
  k, v = seg.kv
  t = k.shape[2]
  held = (jnp.arange(t)[None, :] < seg.count[:, None])[None, :, :, None, None]
  k, v = jnp.where(held, k, 0), jnp.where(held, v, 0)
  if capacity < t:
    k, v = k[:, :, :capacity], v[:, :, :capacity]
  elif capacity > t:
    pad = [(0, 0), (0, 0), (0, capacity - t), (0, 0), (0, 0)]
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
  k, v = k.transpose(0, 1, 3, 2, 4), v.transpose(0, 1, 3, 2, 4)   # (L, B, Hkv, C, D)
  if seg.next_pos is not None:      # an MoD layer's cache: its last slot may be a skipped token's successor
    nxt = seg.next_pos
  else:
    nxt = jnp.take_along_axis(seg.positions, (seg.count - 1)[:, None], axis=1)[:, 0] + 1
  return SegmentCache(tuple(k), tuple(v), seg.count, nxt, seg.start, seg.stop)


def grow(cache, capacity):
  """The same cache with capacity slots (>= the current one); contents unchanged."""
  extra = capacity - cache.capacity
  if extra < 0:
    raise ValueError(f'cannot shrink a cache from {cache.capacity} to {capacity} slots')
  if extra == 0:
    return cache
  pad = [(0, 0), (0, 0), (0, extra), (0, 0)]
  return cache.replace(k=tuple(jnp.pad(a, pad) for a in cache.k), v=tuple(jnp.pad(a, pad) for a in cache.v))


def attend(q, k_cache, v_cache, length, k_new, v_new):
  """One query token over cache slots [0, length) ∪ itself. fp32 softmax, GQA.

  q (B, 1, Hq, D); k_cache / v_cache (B, Hkv, C, D); length (B,); k_new / v_new (B, 1, Hkv, D)
  -> (B, 1, Hq, D) in q.dtype.
  """
  b, _, hq, d = q.shape
  hkv = k_cache.shape[1]
  g = hq // hkv
  qg = q.reshape(b, hkv, g, d)
  scale = d ** -0.5
  s_c = jnp.einsum('bhgd,bhkd->bhgk', qg, k_cache, preferred_element_type=jnp.float32) * scale
  s_s = jnp.einsum('bhgd,bhd->bhg', qg, k_new[:, 0], preferred_element_type=jnp.float32)[..., None] * scale
  mask = (jnp.arange(k_cache.shape[2])[None, :] < length[:, None])[:, None, None, :]
  s_c = jnp.where(mask, s_c, NEG_INF)
  m = jnp.maximum(jnp.max(s_c, axis=-1, keepdims=True), s_s)
  a_c = jnp.exp(s_c - m) * mask
  a_s = jnp.exp(s_s - m)
  den = jnp.sum(a_c, axis=-1, keepdims=True) + a_s
  o = jnp.einsum('bhgk,bhkd->bhgd', a_c.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
  o = o + a_s * v_new[:, 0, :, None, :].astype(jnp.float32)
  o = o / den
  return o.reshape(b, 1, hq, d).astype(q.dtype)


def write_slot(cache):
  """(B,) slot each sample's new token goes to: `length` (clamped to the last slot; the decode loop grows
  a cache before any sample can overflow it)."""
  return jnp.minimum(cache.length, cache.capacity - 1)


def write_layer(buf, new, slot, write_mask):
  """buf (B, Hkv, C, D) with new (B, Hkv, D) written at [b, :, slot[b]] where write_mask[b]; elsewhere the
  slot's own content is written back, so every index is in bounds and XLA updates the buffer in place (why
  this form and the (batch, head) scatter: docs/inference.md, "How a decode step runs")."""
  b, h = buf.shape[:2]
  rows, heads, slots = jnp.arange(b)[:, None], jnp.arange(h)[None, :], slot[:, None]
  old = buf[rows, heads, slots]
  val = jnp.where(write_mask[:, None, None], new.astype(buf.dtype), old)
  return buf.at[rows, heads, slots].set(val, mode='promise_in_bounds')


def advance(cache, k, v, write_mask, active):
  """The cache with per-layer buffers k / v (already written), length += write_mask, next_pos += active."""
  return cache.replace(k=tuple(k), v=tuple(v), length=cache.length + write_mask.astype(jnp.int32),
                       next_pos=cache.next_pos + active.astype(jnp.int32))


def bytes_per_token(cache):
  """K + V bytes one token occupies in this segment (all its layers)."""
  _, hkv, _, d = cache.k[0].shape
  return 2 * cache.num_layers * hkv * d * cache.k[0].dtype.itemsize


def used_bytes(caches):
  """Bytes of K/V actually holding tokens, summed over segments and samples (host int)."""
  return int(sum(bytes_per_token(c) * int(np.asarray(c.length).sum()) for c in caches))


def allocated_bytes(caches):
  """Bytes of the allocated buffers (host int)."""
  return int(sum(a.nbytes for c in caches for a in c.k + c.v))
