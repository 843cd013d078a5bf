"""KV caches for decoding: one per segment (layers [start, stop)), static shapes, explicit pytrees.

Layout of a segment cache:
  k, v     (L_s, B, C, Hkv, D)  RoPE already applied to k; C = capacity (a multiple of eval.cache_bucket)
  length   (B,) int32           slots [0, length) hold tokens, in causal order; the next write goes to
                                slot `length` (per sample)
  next_pos (B,) int32           RoPE position of the next token fed to this segment
Segment 0 (layers before the first boundary) is the *full* cache: every real token. Every later segment is
*compact*: only the prompt tokens its prefill kept, plus the generated tokens the method keeps. A dropped
token is never written (the scatter index is pushed out of bounds and dropped); nothing is evicted.
A new token attends over the cache slots [0, length) and itself (`attend`), so it sees itself even when it
is not written. Capacity grows (outside the jitted loop, `grow`) only when a sample's next write would
overflow.
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
    return self.k.shape[2]


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
  last = jnp.take_along_axis(seg.positions, (seg.count - 1)[:, None], axis=1)[:, 0]
  return SegmentCache(k, v, seg.count, last + 1, seg.start, seg.stop)


def grow(cache, capacity):
  """The same cache with capacity slots (>= the current one); contents unchanged."""
  extra = capacity - cache.capacity
  if extra < 0:
    raise ValueError(f'cannot shrink a cache from {cache.capacity} to {capacity} slots')
  if extra == 0:
    return cache
  pad = [(0, 0), (0, 0), (0, extra), (0, 0), (0, 0)]
  return cache.replace(k=jnp.pad(cache.k, pad), v=jnp.pad(cache.v, pad))


def attend(q, k_cache, v_cache, length, k_new, v_new):
  """One query token over cache slots [0, length) ∪ itself. fp32 softmax, GQA.

  q (B, 1, Hq, D); k_cache / v_cache (B, C, Hkv, D); length (B,); k_new / v_new (B, 1, Hkv, D)
  -> (B, 1, Hq, D) in q.dtype.
  """
  b, _, hq, d = q.shape
  hkv = k_cache.shape[2]
  g = hq // hkv
  qg = q.reshape(b, hkv, g, d)
  scale = d ** -0.5
  s_c = jnp.einsum('bhgd,bkhd->bhgk', qg, k_cache, preferred_element_type=jnp.float32) * scale
  s_s = jnp.einsum('bhgd,bhd->bhg', qg, k_new[:, 0], preferred_element_type=jnp.float32)[..., None] * scale
  mask = (jnp.arange(k_cache.shape[1])[None, :] < length[:, None])[:, None, None, :]
  s_c = jnp.where(mask, s_c, NEG_INF)
  m = jnp.maximum(jnp.max(s_c, axis=-1, keepdims=True), s_s)
  a_c = jnp.exp(s_c - m) * mask
  a_s = jnp.exp(s_s - m)
  den = jnp.sum(a_c, axis=-1, keepdims=True) + a_s
  o = jnp.einsum('bhgk,bkhd->bhgd', a_c.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
  o = o + a_s * v_new[:, 0, :, None, :].astype(jnp.float32)
  o = o / den
  return o.reshape(b, 1, hq, d).astype(q.dtype)


def write(cache, k_new, v_new, write_mask, advance):
  """Appends the new token where write_mask (B,) is True; next_pos advances where `advance` (B,).

  k_new / v_new (L_s, B, Hkv, D). Rows with write_mask False are scattered out of bounds and dropped.
  """
  b = cache.length.shape[0]
  idx = jnp.where(write_mask, cache.length, cache.capacity)
  rows = jnp.arange(b)
  k = cache.k.at[:, rows, idx].set(k_new.astype(cache.k.dtype), mode='drop')
  v = cache.v.at[:, rows, idx].set(v_new.astype(cache.v.dtype), mode='drop')
  return cache.replace(k=k, v=v, length=cache.length + write_mask.astype(jnp.int32),
                       next_pos=cache.next_pos + advance.astype(jnp.int32))


def bytes_per_token(cache):
  """K + V bytes one token occupies in this segment (all its layers)."""
  l, _, _, hkv, d = cache.k.shape
  return 2 * l * hkv * d * cache.k.dtype.itemsize


def used_bytes(caches):
  """Bytes of K/V actually holding tokens, summed over segments and samples (host int)."""
  return int(sum(bytes_per_token(c) * int(np.asarray(c.length).sum()) for c in caches))


def allocated_bytes(caches):
  """Bytes of the allocated buffers (host int)."""
  return int(sum(c.k.nbytes + c.v.nbytes for c in caches))
