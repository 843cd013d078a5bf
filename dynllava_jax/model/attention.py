"""Attention math shared by the ViT, the decoder and the decode loop: RoPE, MaskedSoftmax, dot attention.

Shapes: q (B, Tq, Hq, D), k / v (B, Tk, Hkv, D) with Hq = Hkv * G (MHA G=1, GQA, MQA Hkv=1).
`allowed` (B, Tq, Tk) bool: causal ∧ key-is-real (and anything else structural).
`key_keep` (B, Tk) float in {0, 1}: Dynamic-LLaVA's per-sample key-column keep mask G (None = dense).
"""
import jax
import jax.numpy as jnp

NEG_INF = -1e30      # finite "−inf": exp(NEG_INF - max) == 0 exactly, and fully masked rows stay finite
MASKED_SOFTMAX_EPS = 1e-6


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
  tq, tk = s.shape[-2], s.shape[-1]
  if self_mask is None:
    self_mask = jnp.eye(tq, tk, dtype=bool) if tq == tk else jnp.zeros((tq, tk), bool)
  g = key_keep.astype(jnp.float32).reshape(key_keep.shape[0], *([1] * (s.ndim - 3)), 1, tk)
  g = jnp.maximum(g, self_mask.astype(jnp.float32))
  if mode == 'masked_softmax_eps':
    a = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    ag = a * g
    return (ag + eps / tk) / (jnp.sum(ag, axis=-1, keepdims=True) + eps)
  if mode == 'exact_zero':
    s = jnp.where(g > 0, s, NEG_INF)
    a = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)) * (g > 0) * allowed
    den = jnp.sum(a, axis=-1, keepdims=True)
    return jnp.where(den > 0, a / jnp.where(den > 0, den, 1.0), 0.0)
  raise ValueError(f"attention mode {mode!r} unknown: use 'masked_softmax_eps' or 'exact_zero'")


def dot_attention(q, k, v, allowed, key_keep=None, self_mask=None, mode='masked_softmax_eps',
                  return_probs=False):
  """Scaled dot-product attention with GQA. Returns (B, Tq, Hq, D) in q.dtype (and probs if asked).

  allowed (B, Tq, Tk) bool. Probabilities are computed in fp32 and returned as (B, Hq, Tq, Tk).
  """
  b, tq, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  qg = q.reshape(b, tq, hkv, g, d)
  s = jnp.einsum('bqhgd,bkhd->bhgqk', qg, k, preferred_element_type=jnp.float32) * (d ** -0.5)
  p = masked_softmax(s, allowed[:, None, None], key_keep, self_mask, mode)
  o = jnp.einsum('bhgqk,bkhd->bqhgd', p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  o = o.reshape(b, tq, hq, d).astype(q.dtype)
  if return_probs:
    return o, p.reshape(b, hq, tq, -1)
  return o
