"""CLIP ViT vision tower (HF `CLIPVisionModel` semantics) and LLaVA's feature selection.

pixel_values (B, H, W, 3) float32, CLIP-normalised -> hidden states (B, 1 + N, width), N = (H/p)·(W/p).
Patch embedding is a matmul over flattened (p, p, 3) patches, identical to a stride-p conv without bias.

Intermediates by request (`tower(pix, intermediates=True) -> (hidden, {'attn', 'keys'})`, for VisionZip):
the last layer LLaVA runs (e.g. HF `attentions[-2]` for feature_layer −2): its softmaxed attention
(B, heads, 1 + N, 1 + N) fp32 and its keys (B, 1 + N, heads, head_dim). Off, the program is the plain one.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from dynllava_jax.model import layers as L
from dynllava_jax.model.attention import dot_attention
from dynllava_jax.sharding import constrain


class VisionLayer(nnx.Module):
  """Pre-LN encoder block: x + attn(ln1(x)); x + fc2(quick_gelu(fc1(ln2(x))))."""

  def __init__(self, vc, *, dtype, param_dtype, rngs):
    w, kw = vc.width, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, bias=True)
    self.heads = vc.heads
    self.ln1 = L.LayerNorm(w, vc.layer_norm_eps, param_dtype=param_dtype)
    self.q = L.dense(w, w, ('embed', 'heads'), **kw)
    self.k = L.dense(w, w, ('embed', 'heads'), **kw)
    self.v = L.dense(w, w, ('embed', 'heads'), **kw)
    self.o = L.dense(w, w, ('heads', 'embed'), **kw)
    self.ln2 = L.LayerNorm(w, vc.layer_norm_eps, param_dtype=param_dtype)
    self.fc1 = L.dense(w, vc.mlp_dim, ('embed', 'mlp'), **kw)
    self.fc2 = L.dense(vc.mlp_dim, w, ('mlp', 'embed'), **kw)

  def __call__(self, x, return_attn=False):
    """x (B, T, w) -> (B, T, w); with return_attn -> (x, (probs (B, heads, T, T) fp32, keys (B, T, heads, hd)))."""
    b, t, w = x.shape
    y = self.ln1(x)
    split = lambda z: z.reshape(b, t, self.heads, w // self.heads)
    allowed = jnp.ones((b, t, t), bool)
    k = split(self.k(y))
    o = dot_attention(split(self.q(y)), k, split(self.v(y)), allowed, return_probs=return_attn)
    if return_attn:
      o, probs = o
    x = x + self.o(o.reshape(b, t, w))
    x = x + self.fc2(L.quick_gelu(self.fc1(self.ln2(x))))
    return (x, (probs, k)) if return_attn else x


def sincos_points(y, x, width, temperature=10000.0):
  """Sine-cosine embeddings (P, width) of P grid points (y, x) (P,), fractional coordinates allowed:
  [sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω)] with ω_i = temperature^(−i / (width/4)), i < width/4."""
  if width % 4:
    raise ValueError(f'vision.pos_init=sincos2d needs width divisible by 4, got {width}')
  q = width // 4
  omega = 1.0 / temperature ** (jnp.arange(q, dtype=jnp.float32) / q)
  fx = jnp.asarray(x, jnp.float32).reshape(-1, 1) * omega
  fy = jnp.asarray(y, jnp.float32).reshape(-1, 1) * omega
  return jnp.concatenate([jnp.sin(fx), jnp.cos(fx), jnp.sin(fy), jnp.cos(fy)], axis=1)


def sincos2d(side, width, temperature=10000.0):
  """Fixed 2-D sine-cosine position table (side·side, width), row-major patches (`sincos_points` of the
  integer grid)."""
  y, x = jnp.meshgrid(jnp.arange(side, dtype=jnp.float32), jnp.arange(side, dtype=jnp.float32), indexing='ij')
  return sincos_points(y.reshape(-1), x.reshape(-1), width, temperature)


class VisionTower(nnx.Module):
  """CLIP vision transformer with stacked, scanned layers."""

  def __init__(self, vc, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    self.vc = vc
    self.dtype = dtype
    p, w = vc.patch_size, vc.width
    n = (vc.image_size // p) ** 2
    self.patch_embed = L.dense(p * p * 3, w, ('patch', 'embed'), dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
    self.class_embed = nnx.Param(
        nnx.initializers.normal(L.INIT_STD)(rngs.params(), (w,), param_dtype), out_sharding=('norm',))
    pos_key = rngs.params()
    if vc.get('pos_init', 'normal') == 'sincos2d':
      pos = jnp.concatenate([jnp.zeros((1, w)), sincos2d(vc.image_size // p, w)]).astype(param_dtype)
    else:
      pos = nnx.initializers.normal(L.INIT_STD)(pos_key, (n + 1, w), param_dtype)
    self.pos_embed = nnx.Param(pos, out_sharding=('positions', 'embed'))
    self.pre_ln = L.LayerNorm(w, vc.layer_norm_eps, param_dtype=param_dtype)

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make(key):
      return VisionLayer(vc, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(key))

    self.layers = make(jax.random.split(rngs.params(), vc.depth))
    # Kept for checkpoint round-trips; LLaVA reads pre-post-LN hidden states and never applies it.
    self.post_ln = L.LayerNorm(w, vc.layer_norm_eps, param_dtype=param_dtype)

  def layers_to_run(self):
    """HF hidden_states[feature_layer] is the output after this many encoder layers."""
    d, fl = self.vc.depth, self.vc.feature_layer
    n = d + 1 + fl if fl < 0 else fl
    if not 0 <= n <= d:
      raise ValueError(f'vision feature_layer {fl} is outside the tower of depth {d}')
    return n

  def patchify(self, pixel_values):
    """(B, H, W, 3) -> (B, N, p·p·3) in (row, col, channel) order inside each patch."""
    b, h, w, c = pixel_values.shape
    p = self.vc.patch_size
    if h != self.vc.image_size or w != self.vc.image_size or c != 3:
      raise ValueError(f'pixel_values has shape {pixel_values.shape}; this model expects '
                       f'(B, {self.vc.image_size}, {self.vc.image_size}, 3)')
    x = pixel_values.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)

  def __call__(self, pixel_values, remat=False, intermediates=False):
    """Returns the selected hidden state (B, 1 + N, width) (CLS first; selection is the caller's); with
    intermediates=True (hidden, {'attn', 'keys'}) of the last layer run (module docstring)."""
    x = self.patch_embed(self.patchify(pixel_values.astype(self.dtype)))
    b = x.shape[0]
    cls = jnp.broadcast_to(self.class_embed[...].astype(x.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)[None]
    x = self.pre_ln(x)
    x = constrain(x, ('act_batch', 'act_len', 'act_embed'))
    n = self.layers_to_run()
    if not intermediates:
      if n == 0:
        return x
      x, _ = L.split_scan(self.layers, lambda layer, h, _: (layer(h), None), x, stop=n, remat=remat)
      return x
    if n == 0:
      raise ValueError('vision intermediates need at least one layer run (feature_layer selects the embeddings)')
    if n > 1:
      x, _ = L.split_scan(self.layers, lambda layer, h, _: (layer(h), None), x, stop=n - 1, remat=remat)
    x, (probs, keys) = L.split_scan(self.layers, lambda layer, h, _: layer(h, return_attn=True), x,
                                    start=n - 1, stop=n, remat=remat)
    return x, {'attn': probs[0], 'keys': keys[0]}


def select_features(hidden, strategy):
  """'default' drops CLS (LLaVA-1.5), 'full' keeps it."""
  if strategy == 'default':
    return hidden[:, 1:]
  if strategy == 'full':
    return hidden
  raise ValueError(f"vision feature_select {strategy!r} unknown: use 'default' or 'full'")
