"""FastV (Chen et al., 2024): drop image tokens once, entering layer K, by the attention the LAST prompt
token paid them in layer K−1 (mean over heads); keep round(N·(1−R)); kept tokens keep their original RoPE
positions. With a KV cache it prunes once, at prefill (the decode steps then see only the kept tokens).

`needs_prev_hidden=True`: the engine hands the hidden state entering layer K−1 (`ctx.h_prev`), and the
score recomputes that layer's attention row with the layer's own norm and `Attention.q` / `.kv` (RoPE
included) and `dot_attention` — the probabilities the dense forward used there (plain softmax over causal,
real keys).
"""
import math

import jax.numpy as jnp

from dynllava_jax.model.attention import dot_attention
from dynllava_jax.sparsity.base import ScoreContext, Sparsifier


def query_attention(layer, h, positions, valid, query_index):
  """Attention probabilities of one query token per sample over all keys, mean over heads.

  layer: a DecoderLayer; h (B, T, H) hidden state ENTERING that layer; positions (B, T) RoPE positions;
  valid (B, T) bool real tokens; query_index (B,) int index of the query token. Keys j ≤ query_index that
  are valid are allowed (causal); plain softmax in fp32, with the layer's own norm, q / k projections and
  RoPE. Returns (B, T) float32 (0 on disallowed keys).
  """
  b, t, _ = h.shape
  x = layer.input_norm(h)
  qi = query_index.astype(jnp.int32)[:, None]
  pick = lambda a: jnp.take_along_axis(a, qi.reshape((b, 1) + (1,) * (a.ndim - 2)), axis=1)
  k, v = layer.attn.kv(x, positions)
  q = layer.attn.q(pick(x), pick(positions))
  allowed = (jnp.arange(t)[None, :] <= qi) & valid.astype(bool)               # (B, T)
  _, p = dot_attention(q, k, v, allowed[:, None, :], return_probs=True)        # (B, Hq, 1, T)
  return jnp.mean(p[:, :, 0] * allowed[:, None, :], axis=1)


def query_attention_flops(lc, t, batch=1):
  """`query_attention` on t tokens: k projection of every token, q of one, its scores over t keys."""
  return batch * (2 * t * lc.hidden * lc.kv_heads * lc.head_dim + 2 * lc.hidden * lc.heads * lc.head_dim
                  + 2 * t * lc.heads * lc.head_dim)


def round_half_up(x):
  return int(math.floor(x + 0.5))


class FastV(Sparsifier):
  """FastV(K, R). K = the 0-based layer entered after the drop (K ≥ 1), R = fraction of image tokens dropped."""
  name = 'fastv'
  needs_prev_hidden = True
  renumber_positions = False

  def __init__(self, k=3, r=0.75):
    if int(k) < 1:
      raise ValueError(f'fastv: K={k} must be >= 1 (the score uses layer K-1\'s attention)')
    if not 0.0 <= float(r) < 1.0:
      raise ValueError(f'fastv: R={r} must be in [0, 1) (the fraction of image tokens dropped)')
    self.k, self.r = int(k), float(r)

  def drop_points(self, model_cfg):
    if self.k >= model_cfg.llm.layers:
      raise ValueError(f'fastv: K={self.k} must be < llm.layers={model_cfg.llm.layers}')
    return (self.k,)

  def keep_counts(self, n_image_tokens):
    return (max(1, round_half_up(n_image_tokens * (1.0 - self.r))),)

  def score(self, i, ctx: ScoreContext):
    if ctx.h_prev is None:
      raise ValueError('fastv needs ctx.h_prev (the hidden state entering layer K-1); the engine must '
                       'honour needs_prev_hidden=True')
    layer = ctx.model.language_model.layer_at(ctx.layer - 1)
    return query_attention(layer, ctx.h_prev, ctx.positions, ctx.valid, ctx.last_index)

  def scoring_flops(self, model_cfg, t, n, batch=1):
    return query_attention_flops(model_cfg.llm, t, batch)

  def describe(self):
    return {'method': self.name, 'K': self.k, 'R': self.r}
