"""One KV-cache decoding step: the newest token of every sample through all segments.

    layers = unstack_layers(model)            # once per generate call (outside the loop)
    logits, caches, keep = decode_step(model, method, caches, tokens, active, layers)

tokens (B,) int32 the token fed now; active (B,) bool samples still generating (finished ones write
nothing and do not advance). At the method's text layer the token's hidden state entering that layer
decides (method.text_keep, e.g. Dynamic-LLaVA's output-text predictor, keep = logit0 > logit1) whether it
is written into the caches of that layer and every later one; layers before it always write (when active).
Returns logits (B, vocab) fp32, the updated caches, keep (B,) bool (True when the method has no text rule);
with intermediates=True also aux = {'positions' (B,) int32: the fed token's RoPE position, 'text_logits'
(B, C): method.text_logits at the text layer (when the method has them)}.

The layers run unrolled, each from its own weights (`unstack_layers`, column blocks from batch 4 on:
`BlockedLinear`) and cache buffers, writing its new K/V before its attention reads them (read-then-write
made XLA copy every buffer each step). Why, and the timings: docs/inference.md, docs/benchmarks.md §4.
"""
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from dynllava_jax.decode import cache as C
from dynllava_jax.sparsity.base import TextContext


class BlockedLinear(nnx.Module):
  """A Linear whose kernel (in, out) is held as `n` column blocks, separate arrays: y = [x @ W_0 | … | x @ W_n−1].

  A batched decode step's matmuls have a few rows, and XLA CPU runs such a dot on one thread; n
  independent dots run concurrently. Each output column is the same dot over `in` as before.
  """

  def __init__(self, linear, n):
    kernel = linear.kernel[...]
    out = kernel.shape[1]
    edges = [round(j * out / n) for j in range(n + 1)]
    self.n = n
    self.dtype = linear.dtype          # compute dtype, as nnx.Linear (None: promote inputs and weights)
    for j in range(n):
      setattr(self, f'block{j}', nnx.Param(kernel[:, edges[j]:edges[j + 1]]))
    self.bias = None if linear.bias is None else nnx.Param(linear.bias[...])

  def _cast(self, a):
    return a if self.dtype is None else a.astype(self.dtype)

  def __call__(self, x):
    x = self._cast(x)
    y = jnp.concatenate([x @ self._cast(getattr(self, f'block{j}')[...]) for j in range(self.n)], axis=-1)
    return y if self.bias is None else y + self._cast(self.bias[...])


_LINEARS = (('attn', 'q_proj'), ('attn', 'k_proj'), ('attn', 'v_proj'), ('attn', 'o_proj'),
            ('mlp', 'gate_proj'), ('mlp', 'up_proj'), ('mlp', 'down_proj'))


def _blocked(graphdef, state, n):
  """One layer (graphdef + its unstacked state) with every Linear as a BlockedLinear -> (graphdef, state)."""
  layer = nnx.merge(graphdef, state)
  for parent, name in _LINEARS:
    mod = getattr(layer, parent)
    lin = getattr(mod, name)
    if hasattr(lin, 'merged_kernel'):      # a LoRA layer (model/layers.py::LoRADense): adapter folded in
      lin.kernel[...] = lin.merged_kernel()
      setattr(mod, name, BlockedLinear(lin, n))
    elif n > 1:
      setattr(mod, name, BlockedLinear(lin, n))
  return nnx.split(layer)


def weight_blocks(setting, batch):
  """eval.decode_weight_blocks: 0 = auto (8 column blocks from batch 4 on, else 1), or a count >= 1.
  Blocks help a batched step and slow a batch-1 one (docs/benchmarks.md §4)."""
  setting = int(setting)
  if setting < 0:
    raise ValueError(f'eval.decode_weight_blocks={setting} must be >= 0 (0: auto)')
  return setting or (8 if batch >= 4 else 1)


@struct.dataclass
class DecoderLayers:
  """The decoder's layers as separate modules holding copies of their slices of the stacked weights, their
  matmul kernels in column blocks (`BlockedLinear`), and the LM head likewise."""
  layers: tuple
  head: BlockedLinear

  def layer(self, i):
    return self.layers[i]


@partial(jax.jit, static_argnums=2)
def _unstack(groups, lm_head, n):
  layers = []
  for stacked in groups:
    graphdef, state = nnx.split(stacked)
    count = jax.tree.leaves(state)[0].shape[0]
    layers += [nnx.merge(*_blocked(graphdef, jax.tree.map(lambda a, i=i: a[i], state), n)) for i in range(count)]
  return DecoderLayers(tuple(layers), BlockedLinear(lm_head, n))


def unstack_layers(model, blocks=1):
  """Per-layer copies of the decoder's stacked weights (every plan group, in layer order), matmul kernels
  in `blocks` column blocks, and the LM head likewise (one jitted program; costs one copy of the weights)."""
  lm = model.language_model
  return _unstack(tuple(m for _, m in lm.groups()), lm.lm_head, blocks)


def _cache_attention(k_buf, v_buf, length, slot, write_mask):
  """The decode step's `attend` for one layer: the new token's K/V written into the cache buffers
  (B, Hkv, C, D) at `slot` where write_mask, then its query over slots [0, length) and itself
  -> (o, (k_buf', v_buf'))."""
  def attend(q, k, v):
    # Write first, then attend over the written buffers: the attention masks slots >= length (the new
    # token enters through k / v directly), so the result is the same, and with no read of the old buffer
    # after the write XLA updates it in place (reading first, then writing, made it copy every buffer).
    kc = C.write_layer(k_buf, k[:, 0], slot, write_mask)
    vc = C.write_layer(v_buf, v[:, 0], slot, write_mask)
    return C.attend(q, kc, vc, length, k, v), (kc, vc)
  return attend


def _segment(layers, cache, h, write_mask, active):
  """Runs layers [cache.start, cache.stop) on h (B, 1, H) over the cache, writing each layer's new K/V
  where write_mask -> h, the updated cache."""
  pos = cache.next_pos[:, None]
  slot = C.write_slot(cache)
  ks, vs = [], []
  for j, i in enumerate(range(cache.start, cache.stop)):
    h, (kc, vc) = layers.layer(i)(h, pos, _cache_attention(cache.k[j], cache.v[j], cache.length, slot,
                                                            write_mask))
    ks.append(kc)
    vs.append(vc)
  return h, C.advance(cache, ks, vs, write_mask, active)


def decode_step(model, method, caches, tokens, active, layers=None, intermediates=False):
  """layers: `unstack_layers(model)`, made once outside the loop (None: made here, i.e. per call)."""
  if layers is None:
    layers = unstack_layers(model)
  mc = model.mc
  tl = method.text_layer(mc)
  lm = model.language_model
  h = lm.embed_tokens(tokens[:, None])
  keep = jnp.ones_like(active)
  aux = {'positions': caches[0].next_pos}
  out = []
  for cache in caches:
    if tl is not None and cache.start == tl:
      ctx = TextContext(h_new=h, layer=tl, model=model)
      tk = method.text_keep(ctx)
      lg = method.text_logits(ctx) if intermediates else None
      if lg is not None:
        aux['text_logits'] = lg[:, 0].astype(jnp.float32)
      if tk is not None:
        keep = tk.reshape(-1)
    w = active & keep if (tl is not None and cache.start >= tl) else active
    h, cache = _segment(layers, cache, h, w, active)
    out.append(cache)
  logits = layers.head(lm.norm(h))[:, 0].astype(jnp.float32)
  return (logits, tuple(out), keep) + ((aux,) if intermediates else ())
