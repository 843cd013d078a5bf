"""LLaMA / Vicuna decoder: RMSNorm, RoPE (configurable theta), MHA/GQA/MQA, SwiGLU; the layer plan's
groups stacked + scanned (LoRA groups: adapters on the seven linear layers; `skip` groups: no weights,
the identity).

Hidden states (B, T, H). One layer body (`DecoderLayer.__call__`) serves every mode: the caller hands it
an `attend` (over the layer's own tokens, or over a KV cache) and gets back whatever that attend returns
(K/V (B, T, Hkv, D) to build caches, or the updated cache); nothing is stored on the module.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from dynllava_jax.model import layers as L
from dynllava_jax.model import mod as M
from dynllava_jax.model import plan as P
from dynllava_jax.model.attention import apply_rope, dot_attention, rope_cos_sin
from dynllava_jax.sharding import constrain


def _proj(din, dout, names, lora, salt, **kw):
  """A projection: nnx.Linear, or `layers.LoRADense` when lora = (rank, alpha, dropout)."""
  if not lora:
    return L.dense(din, dout, names, **kw)
  rank, alpha, dropout = lora
  return L.LoRADense(din, dout, rank=rank, alpha=alpha, dropout=dropout, names=names, salt=salt, **kw)


class Attention(nnx.Module):

  def __init__(self, lc, *, dtype, param_dtype, rngs, lora=None):
    self.lc = lc
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora)
    hd = lc.head_dim
    self.q_proj = _proj(lc.hidden, lc.heads * hd, ('embed', 'heads'), salt=1, **kw)
    self.k_proj = _proj(lc.hidden, lc.kv_heads * hd, ('embed', 'kv_heads'), salt=2, **kw)
    self.v_proj = _proj(lc.hidden, lc.kv_heads * hd, ('embed', 'kv_heads'), salt=3, **kw)
    self.o_proj = _proj(lc.heads * hd, lc.hidden, ('heads', 'embed'), salt=4, **kw)

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

  def __init__(self, lc, *, dtype, param_dtype, rngs, lora=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora)
    self.gate_proj = _proj(lc.hidden, lc.mlp_dim, ('embed', 'mlp'), salt=5, **kw)
    self.up_proj = _proj(lc.hidden, lc.mlp_dim, ('embed', 'mlp'), salt=6, **kw)
    self.down_proj = _proj(lc.mlp_dim, lc.hidden, ('mlp', 'embed'), salt=7, **kw)

  def __call__(self, x):
    h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(constrain(h, ('act_batch', 'act_len', 'act_mlp')))


def full_attention(allowed, key_keep=None, mode='masked_softmax_eps', causal_chunk=0, impl='reference'):
  """The attention of a layer over its own tokens (training, prefill, teacher forcing): an `attend` for
  `DecoderLayer.__call__`. allowed (B, Tq, Tk) bool; key_keep (B, Tk) or None (dense); causal_chunk, impl:
  see `attention.dot_attention`. attend(q, k, v, key_mask=None) -> (o (B, Tq, Hq, D), (k, v)); key_mask
  (B, Tk) bool narrows `allowed` to those keys (an MoD layer's routed tokens)."""
  def attend(q, k, v, key_mask=None):
    a = allowed if key_mask is None else allowed & key_mask[:, None, :]
    return dot_attention(q, k, v, a, key_keep=key_keep, mode=mode, causal_chunk=causal_chunk,
                         impl=impl), (k, v)
  return attend


class DecoderLayer(nnx.Module):
  """One pre-norm LLaMA block; the one body of every mode (training, prefill, the last-query shortcut,
  teacher forcing, the KV-cache decode step): only the `attend` it is handed differs.
  lora: None, or (rank, alpha, dropout): a LoRA adapter on each of the seven linear layers."""

  def __init__(self, lc, *, dtype, param_dtype, rngs, lora=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora)
    self.input_norm = L.RMSNorm(lc.hidden, lc.rms_eps, param_dtype=param_dtype)
    self.attn = Attention(lc, **kw)
    self.post_norm = L.RMSNorm(lc.hidden, lc.rms_eps, param_dtype=param_dtype)
    self.mlp = MLP(lc, **kw)

  def __call__(self, h, positions, attend, *, select=None, key_mask=None):
    """h (B, T, H), positions (B, T) -> (h', cache).

    attend(q, k, v) -> (o, cache): the attention of queries q (B, Tq, Hq, D) given this layer's keys and
    values k / v (B, T, Hkv, D) of the T tokens in h, RoPE applied (`full_attention`: over those tokens;
    `decode.step`: written into a KV cache, attended over it); cache is whatever attend returns.
    select (B,) int or None: queries, output projection and MLP at that one position per sample only (the
    keys and values still cover every token), h' (B, 1, H) — a prefill's last layer, where only the last
    position is read on (~85 % of that layer saved).
    key_mask (B, T) bool or None: only these tokens are keys (handed to `attend`; an MoD layer's routed
    tokens).
    """
    x = self.input_norm(h)
    rope = self.attn.rope(positions)
    k, v = self.attn.kv(x, positions, rope)
    if select is not None:
      pick = lambda a: jnp.take_along_axis(a, select.reshape((-1,) + (1,) * (a.ndim - 1)), axis=1)
      h, x, positions, rope = pick(h), pick(x), pick(positions), tuple(pick(r) for r in rope)
    q = self.attn.q(x, positions, rope)
    o, cache = attend(q, k, v) if key_mask is None else attend(q, k, v, key_mask=key_mask)
    h = h + self.attn.out(o)
    h = h + self.mlp(self.post_norm(h))
    return constrain(h, ('act_batch', 'act_len', 'act_embed')), cache


class DenseAltLayer(DecoderLayer):
  """A second layer kind computing exactly what `dense` computes (mixed-plan tests)."""


class MoDLayer(DecoderLayer):
  """A mixture-of-depths layer (`model/mod.py`): the dense body plus a router (Linear(H→1), zero init).

  With a `route` (a forward over a sequence holding frames), per frame the top k vision tokens by the
  router go through the body (the only keys of its attention), their update scaled by the router weight;
  text tokens go through; the other vision tokens pass unchanged. Without one (the KV-cache decode step,
  text-only batches) it is the dense body. The engine runs it on the routed tokens only
  (`decode/prefill.py`), and so does training when the route says `gather` (no K/V returned then)."""

  def __init__(self, lc, *, dtype, param_dtype, rngs, lora=None):
    super().__init__(lc, dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora)
    self.router = M.Router(lc.hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, h, positions, attend, *, select=None, key_mask=None, route=None, layer=0):
    """route: `mod.Route` or None (dense body); layer: this layer's global index (the random baseline's
    pattern). -> (h', cache)."""
    if route is None:
      return super().__call__(h, positions, attend, select=select, key_mask=key_mask)
    if select is not None or key_mask is not None:
      raise ValueError('an MoD layer with a route takes neither select nor key_mask')
    s = self.router(h)
    routed = M.route_tokens(s, route, layer)
    w, weighted = M.update_weight(s, route.image, route)

    def masked(h):
      out, cache = DecoderLayer.__call__(self, h, positions, attend, key_mask=routed)
      return M.mix(h, out, w, weighted, routed), cache

    if not route.gather:
      return masked(h)
    # Training: the body on the routed real tokens only (`gather` slots, in order); when a sample has
    # more (fewer frames than the batch's F and a long text), the masked form, which is the same math.
    keep = routed & route.real
    idx, rvalid, count = M.compact(keep, route.gather)

    def gathered(h):
      hr, pr = M.take(h, idx), M.take(positions, idx)
      ar = jnp.broadcast_to(jnp.arange(route.gather, dtype=jnp.int32), rvalid.shape)
      allowed = (ar[:, None, :] <= ar[:, :, None]) & rvalid[:, None, :]
      out, _ = DecoderLayer.__call__(self, hr, pr, full_attention(allowed, mode=route.mode, impl=route.impl))
      hr = M.mix(hr, out, M.take(w, idx), M.take(weighted, idx), rvalid)
      return h.at[jnp.arange(h.shape[0])[:, None], idx].set(hr)

    # The fallback is rematerialised: a cond keeps the residuals of both branches for the backward pass,
    # so an ordinary masked branch would hold its T-token activations even when the gathered one ran.
    fits = jnp.all(count <= route.gather)
    return jax.lax.cond(fits, gathered, jax.checkpoint(lambda h: masked(h)[0]), h), None


# `skip` (plan.SKIP): a removed layer — no module, no weights; run_layers passes h through unchanged.
LAYER_KINDS = {'dense': DecoderLayer, 'dense_alt': DenseAltLayer, M.KIND: MoDLayer, P.SKIP: None}


class Llama(nnx.Module):
  """Token embedding, the decoder layers (the layer plan's groups, each stacked and scanned), final norm,
  LM head. plan: `model.layer_plan` string (see `plan.py`; '' = every layer dense and trained) or the
  groups already resolved (`plan.resolve`, region applied). lora: `model.lora` (alpha, dropout) for
  the plan's `lora<r>` groups.

  attention_impl: `attention.resolve_impl`'s answer for `model.attention_impl`.
  scan_unroll: decoder layers per scan iteration (`model.scan_unroll`; 1 = a loop over layers, compile time
  flat in depth; >= the layer count = straight-line code, no stacked loop buffers; measured on CPU in
  docs/training.md: faster for the dense step, slower for Dynamic-LLaVA's).

  grad_floor (a plain attribute, set by the train step on the module it merges): run_layers stops the
  gradient of the hidden state entering that layer (0 = none stopped)."""

  grad_floor = 0

  def __init__(self, lc, *, plan='', lora=None, dtype=jnp.float32, param_dtype=jnp.float32,
               attention_impl='reference', scan_unroll=1, rngs):
    self.lc = lc
    self.dtype = dtype
    self.attention_impl = attention_impl
    self.scan_unroll = int(scan_unroll)
    self.plan = plan if isinstance(plan, tuple) else P.parse_plan(plan, lc.layers, LAYER_KINDS)
    lora = {} if lora is None else lora         # dropout checked by `check_model_config`
    alpha, dropout = float(lora.get('alpha', 16.0)), float(lora.get('dropout', 0.0))
    self.embed_tokens = nnx.Embed(
        lc.vocab_size, lc.hidden, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(L.INIT_STD), ('vocab', 'embed')),
        rngs=rngs)
    def stack(kind, keys, rank):
      lr = (rank, alpha, dropout) if rank else None

      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def make(key):
        return kind(lc, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(key), lora=lr)
      return make(keys)

    # One key per decoder layer, drawn once: layer i's init does not depend on how the plan groups layers.
    layer_keys = jax.random.split(rngs.params(), lc.layers)
    for g in self.plan:
      if g.kind != P.SKIP:
        setattr(self, g.attr, stack(LAYER_KINDS[g.kind], layer_keys[g.start:g.stop], g.lora_rank))
    self.norm = L.RMSNorm(lc.hidden, lc.rms_eps, param_dtype=param_dtype)
    self.lm_head = L.dense(lc.hidden, lc.vocab_size, ('embed', 'vocab'), dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

  def groups(self):
    """[(Group, its stacked module)] in layer order (`skip` groups hold no module: left out)."""
    return [(g, getattr(self, g.attr)) for g in self.plan if g.kind != P.SKIP]

  def run_layers(self, h, positions, allowed, *, start=0, stop=None, key_keep=None,
                 mode='masked_softmax_eps', return_kv=False, remat=False, index_params=False,
                 causal_chunk=0, intermediates=False, route=None):
    """Runs decoder layers [start, stop) on h (B, T, H), one scan per plan group met.

    Returns h, then (when return_kv) the stacked (k, v), each (L', B, T, Hkv, D), then (when intermediates)
    the hidden state entering each layer (L', B, T, H) (the last layer's output is h).
    index_params: inference on a sub-range without copying those layers' weights (see `split_scan`).
    causal_chunk: query-chunked attention for causal `allowed` (inference; see `attention.dot_attention`).
    `skip` layers pass h through (their intermediates: h in = h out); they have no K/V, so return_kv
    refuses them (decode a pruned model: `dynllava_jax.tools.prune.prune_model`). Within
    `layers.lora_dropout(key)`, LoRA layers drop with per-layer keys (fold_in(key, layer)).
    route: `mod.Route` for the `mod` layers (None: they run as dense layers).
    """
    stop = self.lc.layers if stop is None else stop
    attend = full_attention(allowed, key_keep, mode, causal_chunk, self.attention_impl)
    drop_key = L.dropout_key()

    def step(layer, carry, i):
      kw = {} if route is None or not isinstance(layer, MoDLayer) else {'route': route, 'layer': i}
      if drop_key is None:
        out, kv = layer(carry, positions, attend, **kw)
      else:
        with L.lora_dropout(jax.random.fold_in(drop_key, i)):
          out, kv = layer(carry, positions, attend, **kw)
      return out, ((kv if return_kv else None), (carry if intermediates else None))

    ys = []
    for g, lo, hi in P.spans(self.plan, start, stop):
      if 0 < self.grad_floor == g.start + lo:
        h = jax.lax.stop_gradient(h)
      if g.kind == P.SKIP:
        if return_kv:
          raise ValueError(f'layer {g.start + lo} is skipped (layer plan): it has no K/V to cache; '
                           'build the pruned model (dynllava_jax.tools.prune.prune_model) to decode')
        ys.append((None, jnp.broadcast_to(h, (hi - lo,) + h.shape) if intermediates else None))
        continue
      per_layer = drop_key is not None or (route is not None and g.kind == M.KIND)
      xs = jnp.arange(g.start + lo, g.start + hi, dtype=jnp.int32) if per_layer else None
      h, y = L.split_scan(getattr(self, g.attr), step, h, start=lo, stop=hi, remat=remat,
                          index_params=index_params, xs=xs, unroll=self.scan_unroll)
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
    if g.kind == P.SKIP:
      raise ValueError(f'layer {i} is skipped in the layer plan: it has no weights')
    graphdef, state = nnx.split(getattr(self, g.attr))
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[j], state))

  def head(self, h):
    """Final norm + LM head -> fp32 logits (B, T, vocab)."""
    logits = self.lm_head(self.norm(h))
    return constrain(logits, ('act_batch', 'act_len', 'act_vocab')).astype(jnp.float32)
