"""LLaMA / Vicuna decoder: RMSNorm, RoPE (configurable theta), MHA/GQA/MQA, SwiGLU; the layer plan's
groups stacked + scanned.

Hidden states (B, T, H). One layer body (`DecoderLayer.__call__`) serves every mode: the caller hands it
an `attend` (over the layer's own tokens, or over a KV cache) and gets back whatever that attend returns
(K/V (B, T, Hkv, D) to build caches, or the updated cache); nothing is stored on the module.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from dynllava_jax.model import layers as L
from dynllava_jax.model import plan as P
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


def full_attention(allowed, key_keep=None, mode='masked_softmax_eps', causal_chunk=0, impl='reference'):
  """The attention of a layer over its own tokens (training, prefill, teacher forcing): an `attend` for
  `DecoderLayer.__call__`. allowed (B, Tq, Tk) bool; key_keep (B, Tk) or None (dense); causal_chunk, impl:
  see `attention.dot_attention`. attend(q, k, v) -> (o (B, Tq, Hq, D), (k, v))."""
  def attend(q, k, v):
    return dot_attention(q, k, v, allowed, key_keep=key_keep, mode=mode, causal_chunk=causal_chunk,
                         impl=impl), (k, v)
  return attend


class DecoderLayer(nnx.Module):
  """One pre-norm LLaMA block; the one body of every mode (training, prefill, the last-query shortcut,
  teacher forcing, the KV-cache decode step): only the `attend` it is handed differs."""

  def __init__(self, lc, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_norm = L.RMSNorm(lc.hidden, lc.rms_eps, param_dtype=param_dtype)
    self.attn = Attention(lc, **kw)
    self.post_norm = L.RMSNorm(lc.hidden, lc.rms_eps, param_dtype=param_dtype)
    self.mlp = MLP(lc, **kw)

  def __call__(self, h, positions, attend, *, select=None):
    """h (B, T, H), positions (B, T) -> (h', cache).

    attend(q, k, v) -> (o, cache): the attention of queries q (B, Tq, Hq, D) given this layer's keys and
    values k / v (B, T, Hkv, D) of the T tokens in h, RoPE applied (`full_attention`: over those tokens;
    `decode.step`: written into a KV cache, attended over it); cache is whatever attend returns.
    select (B,) int or None: queries, output projection and MLP at that one position per sample only (the
    keys and values still cover every token), h' (B, 1, H) — a prefill's last layer, where only the last
    position is read on (~85 % of that layer saved).
    """
    x = self.input_norm(h)
    rope = self.attn.rope(positions)
    k, v = self.attn.kv(x, positions, rope)
    if select is not None:
      pick = lambda a: jnp.take_along_axis(a, select.reshape((-1,) + (1,) * (a.ndim - 1)), axis=1)
      h, x, positions, rope = pick(h), pick(x), pick(positions), tuple(pick(r) for r in rope)
    o, cache = attend(self.attn.q(x, positions, rope), k, v)
    h = h + self.attn.out(o)
    h = h + self.mlp(self.post_norm(h))
    return constrain(h, ('act_batch', 'act_len', 'act_embed')), cache


class DenseAltLayer(DecoderLayer):
  """A second layer kind computing exactly what `dense` computes: holds the place of the kinds to come
  (`mod`, `skip`) in mixed-plan tests."""


LAYER_KINDS = {'dense': DecoderLayer, 'dense_alt': DenseAltLayer}


class Llama(nnx.Module):
  """Token embedding, the decoder layers (the layer plan's groups, each stacked and scanned), final norm,
  LM head. plan: `model.layer_plan` (see `plan.py`; '' = every layer dense and trained).
  attention_impl: `attention.resolve_impl`'s answer for `model.attention_impl`."""

  def __init__(self, lc, *, plan='', dtype=jnp.float32, param_dtype=jnp.float32, attention_impl='reference',
               rngs):
    self.lc = lc
    self.dtype = dtype
    self.attention_impl = attention_impl
    self.plan = P.parse_plan(plan, lc.layers, LAYER_KINDS)
    self.embed_tokens = nnx.Embed(
        lc.vocab_size, lc.hidden, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(L.INIT_STD), ('vocab', 'embed')),
        rngs=rngs)
    def stack(kind, n):
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def make(key):
        return kind(lc, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(key))
      return make(jax.random.split(rngs.params(), n))

    for g in self.plan:
      setattr(self, g.attr, stack(LAYER_KINDS[g.kind], g.size))
    self.norm = L.RMSNorm(lc.hidden, lc.rms_eps, param_dtype=param_dtype)
    self.lm_head = L.dense(lc.hidden, lc.vocab_size, ('embed', 'vocab'), dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

  def groups(self):
    """[(Group, its stacked module)] in layer order."""
    return [(g, getattr(self, g.attr)) for g in self.plan]

  def run_layers(self, h, positions, allowed, *, start=0, stop=None, key_keep=None,
                 mode='masked_softmax_eps', return_kv=False, remat=False, index_params=False,
                 causal_chunk=0, intermediates=False):
    """Runs decoder layers [start, stop) on h (B, T, H), one scan per plan group met.

    Returns h, then (when return_kv) the stacked (k, v), each (L', B, T, Hkv, D), then (when intermediates)
    the hidden state entering each layer (L', B, T, H) (the last layer's output is h).
    index_params: inference on a sub-range without copying those layers' weights (see `split_scan`).
    causal_chunk: query-chunked attention for causal `allowed` (inference; see `attention.dot_attention`).
    """
    stop = self.lc.layers if stop is None else stop
    attend = full_attention(allowed, key_keep, mode, causal_chunk, self.attention_impl)

    def step(layer, carry, _):
      out, kv = layer(carry, positions, attend)
      return out, ((kv if return_kv else None), (carry if intermediates else None))

    ys = []
    for g, lo, hi in P.spans(self.plan, start, stop):
      h, y = L.split_scan(getattr(self, g.attr), step, h, start=lo, stop=hi, remat=remat,
                          index_params=index_params)
      ys.append(y)
    if not ys:
      kv, h_in = None, None
    else:
      kv, h_in = ys[0] if len(ys) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a, 0), *ys)
    out = (h,) + ((kv,) if return_kv else ()) + ((h_in,) if intermediates else ())
    return out[0] if len(out) == 1 else out

  def layer_at(self, i):
    """Decoder layer i as its own module (a copy of its slice of its group's stacked weights)."""
    g, j = P.locate(self.plan, i)
    graphdef, state = nnx.split(getattr(self, g.attr))
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[j], state))

  def head(self, h):
    """Final norm + LM head -> fp32 logits (B, T, vocab)."""
    logits = self.lm_head(self.norm(h))
    return constrain(logits, ('act_batch', 'act_len', 'act_vocab')).astype(jnp.float32)
