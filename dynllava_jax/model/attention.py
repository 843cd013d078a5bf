"""Attention math shared by the ViT, the decoder and the decode loop: RoPE, MaskedSoftmax, dot attention.

Shapes: q (B, Tq, Hq, D), k / v (B, Tk, Hkv, D) with Hq = Hkv * G (MHA G=1, GQA, MQA Hkv=1).
`allowed` (B, Tq, Tk) bool: causal ∧ key-is-real (and anything else structural).
`key_keep` (B, Tk) float in {0, 1}: Dynamic-LLaVA's per-sample key-column keep mask G (None = dense).

Implementations (`model.attention_impl`, resolved once by `resolve_impl`): 'reference' is the code below
(MaskedSoftmax, the causal query chunks; the only one that can give the released training's ε/N
probabilities); 'xla' / 'cudnn' hand the attention to `jax.nn.dot_product_attention` (cuDNN flash on a
GPU) wherever the mask allows it: no key_keep (dense, prefill of the gathered tokens) or the 'exact_zero'
mode (a boolean mask), and no probabilities asked for; everything else stays on the reference path.
"""
import functools

import jax
import jax.numpy as jnp

NEG_INF = -1e30      # finite "−inf": exp(NEG_INF - max) == 0 exactly, and fully masked rows stay finite
MASKED_SOFTMAX_EPS = 1e-6


ATTENTION_IMPLS = ('auto', 'reference', 'xla', 'cudnn')


def resolve_impl(name='auto', backend=None):
  """'auto' -> 'reference' on CPU (its chunked causal attention is the faster one there), else 'fused'
  (jax.nn.dot_product_attention's own choice: cuDNN on a GPU for 16-bit dtypes, XLA otherwise).
  Returns one of 'reference', 'xla', 'cudnn', 'fused'."""
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention_impl={name!r}: use one of {ATTENTION_IMPLS}")
  if name != 'auto':
    return name
  backend = backend or jax.default_backend()
  return 'reference' if backend == 'cpu' else 'fused'


def fused_applies(impl, key_keep, mode, return_probs):
  """Whether `dot_attention` hands this call to jax.nn.dot_product_attention."""
  return impl != 'reference' and not return_probs and (key_keep is None or mode == 'exact_zero')


def fused_attention(q, k, v, allowed, key_keep=None, self_mask=None, impl='xla'):
  """jax.nn.dot_product_attention with the boolean mask allowed ∧ (kept key ∨ the query itself).

  q (B, Tq, Hq, D), k / v (B, Tk, Hkv, D) (GQA: Hq a multiple of Hkv), allowed (B, Tq, Tk), key_keep
  (B, Tk) {0, 1} or None -> (B, Tq, Hq, D). A query row with no allowed key (padding) averages every
  value here where the reference path's 'exact_zero' returns 0; real rows are equal.
  """
  mask = allowed
  if key_keep is not None:
    tq, tk = allowed.shape[-2:]
    if self_mask is None:
      self_mask = jnp.eye(tq, tk, dtype=bool) if tq == tk else jnp.zeros((tq, tk), bool)
    mask = mask & ((key_keep > 0)[:, None, :] | self_mask)
  implementation = None if impl == 'fused' else impl
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=implementation)


def rope_cos_sin(positions, head_dim, theta):
  """positions (B, T) int -> cos, sin (B, T, head_dim) float32 (HF LLaMA `rotate_half` convention)."""
  inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  f = positions.astype(jnp.float32)[..., None] * inv
  emb = jnp.concatenate([f, f], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """x (B, T, H, D); cos/sin (B, T, D). Computed in fp32, returned in x.dtype."""
  dt = x.dtype
  xf = x.astype(jnp.float32)
  h = xf.shape[-1] // 2
  rot = jnp.concatenate([-xf[..., h:], xf[..., :h]], axis=-1)
  return (xf * cos[:, :, None] + rot * sin[:, :, None]).astype(dt)


def causal_allowed(q_pos_idx, k_pos_idx, key_valid):
  """allowed[b, i, j] = k_idx[b, j] <= q_idx[b, i] and key_valid[b, j]. Indices are sequence order."""
  a = k_pos_idx[:, None, :] <= q_pos_idx[:, :, None]
  return a & key_valid[:, None, :].astype(bool)


def masked_softmax(scores, allowed, key_keep=None, self_mask=None, mode='masked_softmax_eps',
                   eps=MASKED_SOFTMAX_EPS):
  """Attention probabilities over the last axis, in fp32.

  scores (..., Tq, Tk) fp32; allowed broadcastable to it; key_keep (B, Tk) broadcast as (B, 1.., 1, Tk).
  - key_keep None: plain softmax over allowed keys.
  - 'masked_softmax_eps' (the released Dynamic-LLaVA form, default): G' = G + (1−G)·I,
    a = exp(s − max_k s) (max over all keys, dropped ones included; disallowed keys are NEG_INF first),
    p = (a·G' + ε/N) / (Σ_k a·G' + ε), N = Tk. Every key, even a disallowed one, gets ≥ ε/N / (Σ + ε).
  - 'exact_zero': p = a·G'·allowed / Σ(a·G'·allowed), dropped keys get exactly 0 (for fused kernels).
  self_mask (Tq, Tk) or broadcastable bool marks key == query token (default: identity when Tq == Tk).
  """
  s = jnp.where(allowed, scores, NEG_INF)
  if key_keep is None:
    return jax.nn.softmax(s, axis=-1)
  g, i = _keep_and_self(s.shape, key_keep, self_mask)
  if mode == 'masked_softmax_eps':
    return _masked_softmax_eps(s, g, i, eps)
  g = _kept(g, i)
  if mode == 'exact_zero':
    s = jnp.where(g > 0, s, NEG_INF)
    a = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)) * (g > 0) * allowed
    den = jnp.sum(a, axis=-1, keepdims=True)
    return jnp.where(den > 0, a / jnp.where(den > 0, den, 1.0), 0.0)
  raise ValueError(f"attention mode {mode!r} unknown: use 'masked_softmax_eps' or 'exact_zero'")


def _keep_and_self(shape, key_keep, self_mask):
  """The keep mask G as (B, 1.., 1, Tk) fp32 and the self mask I as fp32 (Tq, Tk) or broadcastable, for
  scores of `shape` (B, ..., Tq, Tk); self_mask None: the identity when Tq == Tk, else all False."""
  tq, tk = shape[-2], shape[-1]
  if self_mask is None:
    self_mask = jnp.eye(tq, tk, dtype=bool) if tq == tk else jnp.zeros((tq, tk), bool)
  g = key_keep.astype(jnp.float32).reshape(key_keep.shape[0], *([1] * (len(shape) - 3)), 1, tk)
  # G' = G + (1−G)·I in this algebraic form: its gradient w.r.t. G is 1 off the diagonal and 0 on it.
  # `maximum(G, I)` has the same value but JAX splits a tie's gradient in halves (0.5 for a dropped key off
  # the diagonal, 0.5 for a kept one on it), which shifts the predictors' gradients.
  return g, self_mask.astype(jnp.float32)


def _kept(g, i):
  """G' = G + (1−G)·I: the keep mask with every token keeping itself (the form `_keep_and_self` explains)."""
  return g + (1.0 - g) * i


def _eps_probs(ag, z, eps):
  """MaskedSoftmax's p = (a·G' + ε/N) / z from ag = a·G' (..., N) and z = Σ_k a·G' + ε (..., 1)."""
  return (ag + eps / ag.shape[-1]) / z


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _masked_softmax_eps(s, g, i, eps):
  """MaskedSoftmax's 'masked_softmax_eps' probabilities: s (..., Tq, Tk) fp32 with the disallowed keys
  already NEG_INF, g (B, 1.., 1, Tk) the keep mask G, i (Tq, Tk) (broadcastable) the self mask I.
  G' = G + (1−G)·I, a = exp(s − max_k s), p = (a·G' + ε/N) / (Σ_k a·G' + ε).

  A custom VJP with the same gradients as differentiating that formula (w.r.t. G: 1 − I times dp/dG', so
  0 on the diagonal; through the max: split evenly among tied maxima, as jnp.max's): autodiff of the
  formula materialises G' per (Tq, Tk) and sums its gradient over the heads first, a strided reduction
  that cost more than every other op of the Dynamic-LLaVA step's attention (docs/benchmarks.md §7)."""
  return _masked_softmax_eps_fwd(s, g, i, eps)[0]


def _masked_softmax_eps_fwd(s, g, i, eps):
  m = jnp.max(s, axis=-1, keepdims=True)
  ag = jnp.exp(s - m) * _kept(g, i)
  z = jnp.sum(ag, axis=-1, keepdims=True) + eps
  p = _eps_probs(ag, z, eps)
  return p, (s, m, z, p, g, i)


def _masked_softmax_eps_bwd(eps, res, dp):
  del eps
  return _masked_softmax_eps_grads(res, dp, jnp.sum(dp * res[3], axis=-1, keepdims=True))


def _masked_softmax_eps_grads(res, dp, dsum):
  """(ds, dG, dI) from dp = dL/dp and dsum = Σ_k dp·p (B, ..., Tq, 1): computed from dp here, or handed
  in by `_masked_attend` as do·o (the same sum, o = Σ_k p_k v_k), which spares a pass over (Tq, Tk)."""
  s, m, z, _, g, i = res
  a = jnp.exp(s - m)
  da_g = (dp - dsum) / z                                          # dL/d(a·G')
  t = da_g * _kept(g, i) * a                              # dL/ds through exp, before the max
  hit = (s == m).astype(s.dtype)
  ds = t - jnp.sum(t, axis=-1, keepdims=True) * hit / jnp.sum(hit, axis=-1, keepdims=True)
  # dL/dG_k = Σ over every row (heads, queries) of dL/dG'·(1 − I): one reduction of the rows onto the
  # key axis, (B, rows, Tk) -> (B, Tk), which XLA CPU runs as a streaming column sum.
  x = (da_g * a * (1.0 - i)).reshape(s.shape[0], -1, s.shape[-1])
  dg = jnp.sum(x, axis=1).reshape(g.shape)
  return ds, dg, jnp.zeros_like(i)


_masked_softmax_eps.defvjp(_masked_softmax_eps_fwd, _masked_softmax_eps_bwd)


def dot_attention(q, k, v, allowed, key_keep=None, self_mask=None, mode='masked_softmax_eps',
                  return_probs=False, causal_chunk=0, impl='reference'):
  """Scaled dot-product attention with GQA. Returns (B, Tq, Hq, D) in q.dtype (and probs if asked).

  allowed (B, Tq, Tk) bool. Probabilities are computed in fp32 and returned as (B, Hq, Tq, Tk). The
  products run heads-major ((B, Hkv, G, T, D) operands; why: docs/benchmarks.md §5).

  causal_chunk > 0 (inference): queries in chunks of that many rows, chunk [a, e) against keys [0, e)
  only. The caller promises `allowed` is causal in sequence order (allowed[b, i, j] implies j <= i), so the
  skipped keys are disallowed and the result is the same; it needs key_keep None (MaskedSoftmax gives
  disallowed keys ε/N) and Tq == Tk. Halves the attention FLOPs of a long prefill; see `_causal_chunked`
  for how it keeps each score block in cache.
  """
  b, tq, hq, d = q.shape
  if fused_applies(impl, key_keep, mode, return_probs):
    return fused_attention(q, k, v, allowed, key_keep, self_mask, impl).astype(q.dtype)
  if causal_chunk and tq > causal_chunk:
    if key_keep is not None or return_probs or tq != k.shape[1]:
      raise ValueError('causal_chunk needs key_keep=None, return_probs=False and as many queries as keys')
    return _causal_chunked(q, k, v, allowed, causal_chunk).astype(q.dtype)
  qh, kh, vh = _heads_major(q, k, v)
  o, p = _attend_block(qh, kh, vh, allowed, key_keep, self_mask, mode, need_probs=return_probs)
  o = o.transpose(0, 3, 1, 2, 4).reshape(b, tq, hq, d).astype(q.dtype)
  if return_probs:
    return o, p.reshape(b, hq, tq, -1)
  return o


def _heads_major(q, k, v):
  """q (B, T, Hq, D), k / v (B, T, Hkv, D) -> (B, Hkv, G, T, D), (B, Hkv, T, D), (B, Hkv, T, D)."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  qh = q.reshape(b, t, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4)
  return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _causal_chunked(q, k, v, allowed, chunk):
  """Exact causal attention by query chunks, one sample at a time. q (B, T, Hq, D), k / v (B, T, Hkv, D),
  allowed (B, T, T) causal -> o (B, T, Hq, D) fp32. Laid out for XLA CPU (a scan over the batch so each
  chunk's scores stay in cache, scale on q, softmax normalised after the product with v, scores and
  exponentials kept apart by `optimization_barrier`; why: docs/benchmarks.md §5). A batch sharded over
  devices would be gathered by the loop: use causal_chunk = 0 there.
  """
  b, t, hq, d = q.shape
  q = q * jnp.asarray(d ** -0.5, q.dtype)

  def one(args):
    qs, ks, vs, allow = args                  # (T, Hq, D), (T, Hkv, D), (T, Hkv, D), (T, T)
    qh, kh, vh = (x[0] for x in _heads_major(qs[None], ks[None], vs[None]))
    hkv, g = qh.shape[:2]
    outs = []
    for a in range(0, t, chunk):    # (G, rows) as one row axis: a G axis, even of 1, is slower on XLA CPU
      e = min(a + chunk, t)
      rows = g * (e - a)
      s = jnp.einsum('hqd,hkd->hqk', qh[:, :, a:e].reshape(hkv, rows, d), kh[:, :e],
                     preferred_element_type=jnp.float32)
      s = jax.lax.optimization_barrier(s)
      s = jnp.where(jnp.tile(allow[a:e, :e], (g, 1))[None], s, NEG_INF)
      p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
      den = jnp.sum(p, axis=-1, keepdims=True)
      p = jax.lax.optimization_barrier(p)
      o = jnp.einsum('hqk,hkd->hqd', p.astype(vh.dtype), vh[:, :e], preferred_element_type=jnp.float32)
      outs.append((o / den).reshape(hkv, g, e - a, d))
    o = jnp.concatenate(outs, axis=2)                                 # (Hkv, G, T, D)
    return o.transpose(2, 0, 1, 3).reshape(t, hq, d)

  # jax.lax.scan is looked up at call time, so `eval.flops.unrolled_scans` unrolls it for the cost analysis.
  return jax.lax.scan(lambda c, x: (c, one(x)), None, (q, k, v, allowed))[1]


def _attend_block(qh, kh, vh, allowed, key_keep, self_mask, mode, need_probs=True):
  """qh (B, Hkv, G, Tq, D), kh / vh (B, Hkv, Tk, D), allowed (B, Tq, Tk) -> o (B, Hkv, G, Tq, D) fp32,
  probs (B, Hkv, G, Tq, Tk) (None when not `need_probs` and the attention-level VJP applies)."""
  if not need_probs and mode == 'masked_softmax_eps':
    # (G, Tq) as one row axis: every product then contracts a single axis, which XLA CPU's GEMMs take as
    # laid out; with G apart (even of 1) the backward's pᵀ·do and dsᵀ·q first materialised a transpose
    # of the (Tq, Tk) operand (docs/benchmarks.md §7). allowed / the self mask are tiled over G (G = 1,
    # MHA as in Vicuna: a bitcast).
    b, hkv, grp, tq, d = qh.shape
    tk = kh.shape[2]
    rows = lambda x: jnp.tile(x, (1,) * (x.ndim - 2) + (grp, 1)) if grp > 1 else x
    q4 = qh.reshape(b, hkv, grp * tq, d)
    allowed4 = rows(allowed[:, None])                                # (B, 1, G·Tq, Tk)
    if key_keep is None:
      o = _softmax_attend(q4, kh, vh, allowed4)
    else:
      g, i = _keep_and_self((b, 1, tq, tk), key_keep, self_mask)     # (B, 1, 1, Tk), (Tq, Tk)
      o = _masked_attend(q4, kh, vh, allowed4, g, rows(jnp.broadcast_to(i, (tq, tk))), MASKED_SOFTMAX_EPS)
    return o.reshape(b, hkv, grp, tq, d), None
  allowed = allowed[:, None, None]
  p = masked_softmax(_scores(qh, kh), allowed, key_keep, self_mask, mode)
  return _mix(p, vh), p


def _scores(qh, kh):
  """qh (B, Hkv, G, Tq, D), kh (B, Hkv, Tk, D) -> scaled scores (B, Hkv, G, Tq, Tk) fp32."""
  s = jnp.einsum('bhgqd,bhkd->bhgqk', qh, kh, preferred_element_type=jnp.float32)
  return s * (qh.shape[-1] ** -0.5)


def _mix(p, vh):
  """p (B, Hkv, G, Tq, Tk) fp32, vh (B, Hkv, Tk, D) -> o (B, Hkv, G, Tq, D) fp32."""
  return jnp.einsum('bhgqk,bhkd->bhgqd', p.astype(vh.dtype), vh, preferred_element_type=jnp.float32)


# The training step's attention: custom VJPs at the level of o = softmax(s)·v. The gradients are those of
# autodiff through `_scores`, the softmax and `_mix`, except that Σ_k p·dp, the softmax backward's one
# reduction over (Tq, Tk), is taken as do·o, a reduction over (Tq, D) (the identity FlashAttention's
# backward uses): autodiff's row sum over the probabilities was the largest single cost of a CPU step at
# batch 4 (docs/benchmarks.md §7). Probabilities are kept for the backward as before.


def _rows_scores(qh, kh):
  """qh (B, Hkv, R, D) (R = G·Tq rows), kh (B, Hkv, Tk, D) -> scaled scores (B, Hkv, R, Tk) fp32."""
  s = jnp.einsum('bhqd,bhkd->bhqk', qh, kh, preferred_element_type=jnp.float32)
  return s * (qh.shape[-1] ** -0.5)


def _rows_mix(p, vh):
  """p (B, Hkv, R, Tk) fp32, vh (B, Hkv, Tk, D) -> o (B, Hkv, R, D) fp32."""
  return jnp.einsum('bhqk,bhkd->bhqd', p.astype(vh.dtype), vh, preferred_element_type=jnp.float32)


def _attend_grads(qh, kh, vh, allowed, p, o, do, softmax_grads):
  """The shared backward (row layout, (B, Hkv, R, ·)): dv, dp = do·vᵀ, Σ p·dp = do·o, then
  ds = softmax_grads(dp, dsum) -> dq, dk."""
  pv = p.astype(vh.dtype)
  dv = jnp.einsum('bhqk,bhqd->bhkd', pv, do.astype(vh.dtype), preferred_element_type=jnp.float32)
  dp = jnp.einsum('bhqd,bhkd->bhqk', do.astype(vh.dtype), vh, preferred_element_type=jnp.float32)
  dsum = jnp.sum(do * o, axis=-1, keepdims=True)
  ds, rest = softmax_grads(dp, dsum)
  ds = jnp.where(allowed, ds, 0.0) * (qh.shape[-1] ** -0.5)
  dq = jnp.einsum('bhqk,bhkd->bhqd', ds.astype(kh.dtype), kh, preferred_element_type=jnp.float32)
  dk = jnp.einsum('bhqk,bhqd->bhkd', ds.astype(qh.dtype), qh, preferred_element_type=jnp.float32)
  return (dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None) + rest


@jax.custom_vjp
def _softmax_attend(qh, kh, vh, allowed):
  """o = softmax(s)·v over the allowed keys (disallowed: NEG_INF): qh (B, Hkv, R, D) (R = G·Tq, the
  query rows of the group's heads), kh / vh (B, Hkv, Tk, D), allowed broadcastable to (B, Hkv, R, Tk)
  -> o (B, Hkv, R, D) fp32."""
  return _softmax_attend_fwd(qh, kh, vh, allowed)[0]


def _softmax_attend_fwd(qh, kh, vh, allowed):
  p = jax.nn.softmax(jnp.where(allowed, _rows_scores(qh, kh), NEG_INF), axis=-1)
  o = _rows_mix(p, vh)
  return o, (qh, kh, vh, allowed, p, o)


def _softmax_attend_bwd(res, do):
  qh, kh, vh, allowed, p, o = res
  return _attend_grads(qh, kh, vh, allowed, p, o, do, lambda dp, dsum: (p * (dp - dsum), ()))


_softmax_attend.defvjp(_softmax_attend_fwd, _softmax_attend_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _masked_attend(qh, kh, vh, allowed, g, i, eps):
  """o = MaskedSoftmax(s; G, I, ε)·v ('masked_softmax_eps', `_masked_softmax_eps`), the same shapes as
  `_softmax_attend` plus g (B, 1, 1, Tk) the keep mask G and i (R, Tk) the self mask I (fp32)."""
  return _masked_attend_fwd(qh, kh, vh, allowed, g, i, eps)[0]


def _masked_attend_fwd(qh, kh, vh, allowed, g, i, eps):
  p, (s, m, z, _, g, i) = _masked_softmax_eps_fwd(jnp.where(allowed, _rows_scores(qh, kh), NEG_INF), g, i,
                                                   eps)
  o = _rows_mix(p, vh)
  # p is not kept: the backward recomputes it from s with the exp(s − m) it needs anyway, so the layer
  # stores one (R, Tk) array for the backward instead of two (s and p)
  return o, (qh, kh, vh, allowed, (s, m, z, g, i), o)


def _masked_attend_bwd(eps, res, do):
  qh, kh, vh, allowed, (s, m, z, g, i), o = res
  p = _eps_probs(jnp.exp(s - m) * _kept(g, i), z, eps)
  sm = (s, m, z, p, g, i)
  def softmax_grads(dp, dsum):
    ds, dg, di = _masked_softmax_eps_grads(sm, dp, dsum)
    return ds, (dg, di)
  return _attend_grads(qh, kh, vh, allowed, p, o, do, softmax_grads)


_masked_attend.defvjp(_masked_attend_fwd, _masked_attend_bwd)
