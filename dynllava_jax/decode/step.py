"""One KV-cache decoding step: the newest token of every sample through all segments.

    layers = unstack_layers(model)            # once per generate call (outside the loop)
    logits, caches, keep = decode_step(model, method, caches, tokens, active, layers)

tokens (B,) int32 the token fed now; active (B,) bool samples still generating (finished ones write
nothing and do not advance). At the method's text layer the token's hidden state entering that layer
decides (method.text_keep, e.g. Dynamic-LLaVA's output-text predictor, keep = logit0 > logit1) whether it
is written into the caches of that layer and every later one; layers before it always write (when active).
Returns logits (B, vocab) fp32, the updated caches, keep (B,) bool (True when the method has no text rule).

The layers run unrolled, each from its own weight arrays (`unstack_layers`) and its own cache buffers, and
each layer writes its new K/V into its buffers right after computing them, before its attention reads
them (read-then-write made XLA copy every buffer each step). A one-token step is bound by
reading the weights once; a scan over the stacked weights would first copy each layer's slice (XLA CPU
materialises the dynamic slice feeding a dot), which made the step ~2x slower
(benchmarks/decode_step.py, docs/benchmarks.md §4).
"""
import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from dynllava_jax.decode import cache as C
from dynllava_jax.sparsity.base import TextContext


@struct.dataclass
class DecoderLayers:
  """The decoder's layers as separate per-layer weight states (a copy of the stacked ones)."""
  states: tuple
  graphdef: nnx.GraphDef = struct.field(pytree_node=False)

  def layer(self, i):
    return nnx.merge(self.graphdef, self.states[i])


@jax.jit
def _unstack(state):
  n = jax.tree.leaves(state)[0].shape[0]
  return tuple(jax.tree.map(lambda a, i=i: a[i], state) for i in range(n))


def unstack_layers(model):
  """Per-layer copies of the decoder's stacked weights (one jitted program; costs one copy of them)."""
  graphdef, state = nnx.split(model.language_model.layers)
  return DecoderLayers(_unstack(state), graphdef)


def _segment(layers, cache, h, write_mask, active):
  """Runs layers [cache.start, cache.stop) on h (B, 1, H) over the cache, writing each layer's new K/V
  where write_mask -> h, the updated cache."""
  pos = cache.next_pos[:, None]
  slot = C.write_slot(cache)
  ks, vs = [], []
  for j, i in enumerate(range(cache.start, cache.stop)):
    layer = layers.layer(i)
    q, k, v = layer.attn.qkv(layer.input_norm(h), pos)
    # Write first, then attend over the written buffers: the attention masks slots >= length (the new
    # token enters through k / v directly), so the result is the same, and with no read of the old buffer
    # after the write XLA updates it in place (reading first, then writing, made it copy every buffer).
    kc = C.write_layer(cache.k[j], k[:, 0], slot, write_mask)
    vc = C.write_layer(cache.v[j], v[:, 0], slot, write_mask)
    o = C.attend(q, kc, vc, cache.length, k, v)
    h = h + layer.attn.out(o)
    h = h + layer.mlp(layer.post_norm(h))
    ks.append(kc)
    vs.append(vc)
  return h, C.advance(cache, ks, vs, write_mask, active)


def decode_step(model, method, caches, tokens, active, layers=None):
  """layers: `unstack_layers(model)`, made once outside the loop (None: made here, i.e. per call)."""
  if layers is None:
    layers = unstack_layers(model)
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
    w = active & keep if (tl is not None and cache.start >= tl) else active
    h, cache = _segment(layers, cache, h, w, active)
    out.append(cache)
  logits = lm.head(h)[:, 0]
  return logits, tuple(out), keep
