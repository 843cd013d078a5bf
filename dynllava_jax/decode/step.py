"""One KV-cache decoding step: the newest token of every sample through all segments.

    logits, caches, keep = decode_step(model, method, caches, tokens, active)

tokens (B,) int32 the token fed now; active (B,) bool samples still generating (finished ones write
nothing and do not advance). At the method's text layer the token's hidden state entering that layer
decides (method.text_keep, e.g. Dynamic-LLaVA's output-text predictor, keep = logit0 > logit1) whether it
is written into the caches of that layer and every later one; layers before it always write (when active).
Returns logits (B, vocab) fp32, the updated caches, keep (B,) bool (True when the method has no text rule).
"""
import jax.numpy as jnp

from dynllava_jax.decode.cache import attend, write
from dynllava_jax.model import layers as L
from dynllava_jax.sparsity.base import TextContext


def _segment(model, cache, h):
  """Runs layers [cache.start, cache.stop) on h (B, 1, H) over the cache -> h, (k_new, v_new) (L_s, B, Hkv, D)."""
  pos = cache.next_pos[:, None]

  def body(layer, x, kv):
    k_cache, v_cache = kv
    q, k, v = layer.attn.qkv(layer.input_norm(x), pos)
    x = x + layer.attn.out(attend(q, k_cache, v_cache, cache.length, k, v))
    x = x + layer.mlp(layer.post_norm(x))
    return x, (k[:, 0], v[:, 0])

  lm = model.language_model
  h, kv_new = L.split_scan(lm.layers, body, h, start=cache.start, stop=cache.stop, xs=(cache.k, cache.v),
                           index_params=True)
  return h, kv_new


def decode_step(model, method, caches, tokens, active):
  mc = model.mc
  tl = method.text_layer(mc)
  lm = model.language_model
  h = lm.embed_tokens(tokens[:, None])
  keep = jnp.ones_like(active)
  out = []
  for cache in caches:
    if tl is not None and cache.start == tl:
      tk = method.text_keep(TextContext(h_new=h, layer=tl, model=model))
      if tk is not None:
        keep = tk.reshape(-1)
    h, (k_new, v_new) = _segment(model, cache, h)
    w = active & keep if (tl is not None and cache.start >= tl) else active
    out.append(write(cache, k_new, v_new, w, active))
  logits = lm.head(h)[:, 0]
  return logits, tuple(out), keep
