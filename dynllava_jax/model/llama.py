"""LLaMA / Vicuna decoder: RMSNorm, RoPE (configurable theta), MHA/GQA/MQA, SwiGLU; stacked + scanned.

Hidden states (B, T, H). Every layer call takes its mask and keep arguments explicitly and can return its
K/V (B, T, Hkv, D) so callers build caches; nothing is stored on the module.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from dynllava_jax.model import layers as L
from dynllava_jax.model.attention import apply_rope, dot_attention, rope_cos_sin
from dynllava_jax.sharding import constrain


class Attention(nnx.Module):

  def __init__(self, lc, *, dtype, param_dtype, rngs):
    self.lc = lc
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    hd = lc.head_dim
    self.q_proj = L.dense(lc.hidden, lc.heads * hd, ('embed', 'heads'), **kw)
    self.k_proj = L.dense(lc.hidden, lc.kv_heads * hd, ('embed', 'kv_heads'), **kw)
    self.v_proj = L.dense(lc.hidden, lc.kv_heads * hd, ('embed', 'kv_heads'), **kw)
    self.o_proj = L.dense(lc.heads * hd, lc.hidden, ('heads', 'embed'), **kw)

  def qkv(self, x, positions):
    """x (B, T, H), positions (B, T) -> q (B, T, Hq, D), k, v (B, T, Hkv, D), RoPE applied to q and k."""
    rope = self.rope(positions)
    return (self.q(x, positions, rope),) + self.kv(x, positions, rope)

  def rope(self, positions):
    """positions (B, T) -> (cos, sin) each (B, T, D)."""
    return rope_cos_sin(positions, self.lc.head_dim, self.lc.rope_theta)

  def q(self, x, positions, rope=None):
    """Queries only: x (B, T, H) -> (B, T, Hq, D) with RoPE (`rope`: precomputed `self.rope(positions)`)."""
    b, t, _ = x.shape
    cos, sin = self.rope(positions) if rope is None else rope
    return apply_rope(self.q_proj(x).reshape(b, t, self.lc.heads, self.lc.head_dim), cos, sin)

  def kv(self, x, positions, rope=None):
    """Keys (RoPE applied) and values: x (B, T, H) -> k, v (B, T, Hkv, D)."""
    b, t, _ = x.shape
    hd = self.lc.head_dim
    k = self.k_proj(x).reshape(b, t, self.lc.kv_heads, hd)
    v = self.v_proj(x).reshape(b, t, self.lc.kv_heads, hd)
    cos, sin = self.rope(positions) if rope is None else rope
    return apply_rope(k, cos, sin), v

  def out(self, o):
    """o (B, T, Hq, D) -> (B, T, H)."""
    b, t = o.shape[:2]
    return self.o_proj(o.reshape(b, t, -1))


class MLP(nnx.Module):

  def __init__(self, lc, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = L.dense(lc.hidden, lc.mlp_dim, ('embed', 'mlp'), **kw)
    self.up_proj = L.dense(lc.hidden, lc.mlp_dim, ('embed', 'mlp'), **kw)
    self.down_proj = L.dense(lc.mlp_dim, lc.hidden, ('mlp', 'embed'), **kw)

  def __call__(self, x):
    h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(constrain(h, ('act_batch', 'act_len', 'act_mlp')))


class DecoderLayer(nnx.Module):

  def __init__(self, lc, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_norm = L.RMSNorm(lc.hidden, lc.rms_eps, param_dtype=param_dtype)
    self.attn = Attention(lc, **kw)
    self.post_norm = L.RMSNorm(lc.hidden, lc.rms_eps, param_dtype=param_dtype)
    self.mlp = MLP(lc, **kw)

  def __call__(self, h, positions, allowed, key_keep=None, mode='masked_softmax_eps', causal_chunk=0):
    """h (B, T, H) -> (h', (k, v)). allowed (B, T, T) bool; key_keep (B, T) or None (dense);
    causal_chunk: see `attention.dot_attention` (inference on causal masks)."""
    q, k, v = self.attn.qkv(self.input_norm(h), positions)
    o = dot_attention(q, k, v, allowed, key_keep=key_keep, mode=mode, causal_chunk=causal_chunk)
    h = h + self.attn.out(o)
    h = h + self.mlp(self.post_norm(h))
    return constrain(h, ('act_batch', 'act_len', 'act_embed')), (k, v)

  def last_query(self, h, positions, allowed_last, last_index):
    """The layer when only one position per sample is read on: K/V of every token, attention, output
    projection and MLP for position `last_index` only. h (B, T, H); allowed_last (B, T) bool the keys that
    position may see; last_index (B,) int -> (h_last (B, 1, H), (k, v) each (B, T, Hkv, D))."""
    x = self.input_norm(h)
    k, v = self.attn.kv(x, positions)
    pick = lambda a: jnp.take_along_axis(a, last_index.reshape((-1,) + (1,) * (a.ndim - 1)), axis=1)
    q = self.attn.q(pick(x), pick(positions))
    o = dot_attention(q, k, v, allowed_last[:, None, :])
    h_last = pick(h) + self.attn.out(o)
    return h_last + self.mlp(self.post_norm(h_last)), (k, v)


class Llama(nnx.Module):
  """Token embedding, stacked decoder layers, final norm, LM head."""

  def __init__(self, lc, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    self.lc = lc
    self.dtype = dtype
    self.embed_tokens = nnx.Embed(
        lc.vocab_size, lc.hidden, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(L.INIT_STD), ('vocab', 'embed')),
        rngs=rngs)

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make(key):
      return DecoderLayer(lc, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(key))

    self.layers = make(jax.random.split(rngs.params(), lc.layers))
    self.norm = L.RMSNorm(lc.hidden, lc.rms_eps, param_dtype=param_dtype)
    self.lm_head = L.dense(lc.hidden, lc.vocab_size, ('embed', 'vocab'), dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

  def run_layers(self, h, positions, allowed, *, start=0, stop=None, key_keep=None,
                 mode='masked_softmax_eps', return_kv=False, remat=False, index_params=False,
                 causal_chunk=0):
    """Runs decoder layers [start, stop) on h (B, T, H).

    Returns h, and when return_kv the stacked (k, v), each (L', B, T, Hkv, D).
    index_params: inference on a sub-range without copying those layers' weights (see `split_scan`).
    causal_chunk: query-chunked attention for causal `allowed` (inference; see `attention.dot_attention`).
    """
    stop = self.lc.layers if stop is None else stop
    if stop <= start:
      return (h, None) if return_kv else h

    def step(layer, carry, _):
      out, kv = layer(carry, positions, allowed, key_keep=key_keep, mode=mode, causal_chunk=causal_chunk)
      return out, (kv if return_kv else None)

    h, kv = L.split_scan(self.layers, step, h, start=start, stop=stop, remat=remat,
                         index_params=index_params)
    return (h, kv) if return_kv else h

  def layer_at(self, i):
    """Decoder layer i as its own module (a copy of its slice of the stacked weights)."""
    graphdef, state = nnx.split(self.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

  def head(self, h):
    """Final norm + LM head -> fp32 logits (B, T, vocab)."""
    logits = self.lm_head(self.norm(h))
    return constrain(logits, ('act_batch', 'act_len', 'act_vocab')).astype(jnp.float32)
