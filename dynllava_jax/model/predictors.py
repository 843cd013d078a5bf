"""Dynamic-LLaVA keep-predictors (docs/methods.md). Logit index 0 = keep (the released code).

ImagePredictor: image hidden states (B, N, H) + previous keep mask (B, N) -> logits (B, N, 2).
TextPredictor (output-text and instruct): hidden states (B, T, H) -> logits (B, T, 2), no token mixing.
All LayerNorm eps 1e-5, all GELU exact, Linear init N(0, 0.02) with zero bias. Released key names map
one-to-one (`dynllava_jax.hf_keys`; the table in docs/checkpoints.md).
"""
import jax
import jax.numpy as jnp
from flax import nnx

from dynllava_jax.model import layers as L
from dynllava_jax.model.attention import dot_attention


def _kw(dtype, param_dtype, rngs, bias=True):
  return dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, bias=bias)


class PredictorBlock(nnx.Module):
  """timm-style pre-LN block: qkv without bias, proj with bias, MLP d -> ff -> d, bidirectional."""

  def __init__(self, d, nhead, ff, *, dtype, param_dtype, rngs):
    self.nhead = nhead
    self.norm1 = L.LayerNorm(d, 1e-5, param_dtype=param_dtype)
    self.qkv = L.dense(d, 3 * d, ('pred_embed', 'pred_mlp'), **_kw(dtype, param_dtype, rngs, False))
    self.proj = L.dense(d, d, ('pred_mlp', 'pred_embed'), **_kw(dtype, param_dtype, rngs))
    self.norm2 = L.LayerNorm(d, 1e-5, param_dtype=param_dtype)
    self.fc1 = L.dense(d, ff, ('pred_embed', 'pred_mlp'), **_kw(dtype, param_dtype, rngs))
    self.fc2 = L.dense(ff, d, ('pred_mlp', 'pred_embed'), **_kw(dtype, param_dtype, rngs))

  def __call__(self, x):
    b, n, d = x.shape
    qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.nhead, d // self.nhead)
    o = dot_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], jnp.ones((b, n, n), bool))
    x = x + self.proj(o.reshape(b, n, d))
    return x + self.fc2(L.gelu_exact(self.fc1(self.norm2(x))))


class ImagePredictor(nnx.Module):

  def __init__(self, hidden, sc, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    d = sc.d_model
    if d % 4 or d % sc.nhead:
      raise ValueError(f'sparse.d_model={d} must be divisible by 4 and by sparse.nhead={sc.nhead}')
    kw = _kw(dtype, param_dtype, rngs)
    self.down_ln = L.LayerNorm(hidden, 1e-5, param_dtype=param_dtype)
    self.down = L.dense(hidden, d, ('embed', 'pred_embed'), **kw)

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make(key):
      return PredictorBlock(d, sc.nhead, sc.dim_feedforward, dtype=dtype, param_dtype=param_dtype,
                            rngs=nnx.Rngs(key))

    self.num_blocks = sc.num_layers
    self.blocks = make(jax.random.split(rngs.params(), max(sc.num_layers, 1)))
    self.head_1 = L.dense(d, d // 2, ('pred_embed', 'pred_mlp'), **kw)
    self.head_2 = L.dense(d // 2, d // 4, ('pred_mlp', 'pred_embed'), **kw)
    self.head_3 = L.dense(d // 4, 2, ('pred_embed', 'pred_mlp'), **kw)

  def __call__(self, x, policy=None):
    """x (B, N, H) image hidden states; policy (B, N) previous keep mask (ones) -> logits (B, N, 2) fp32."""
    if policy is None:
      policy = jnp.ones(x.shape[:2], x.dtype)
    p = policy[..., None].astype(x.dtype)
    y = L.gelu_exact(self.down(self.down_ln(x))) * p
    if self.num_blocks:
      y, _ = L.split_scan(self.blocks, lambda blk, c, _: (blk(c), None), y, stop=self.num_blocks)
    h = y.shape[-1] // 2
    glob = jnp.sum(y[..., h:] * p, axis=1, keepdims=True) / jnp.maximum(jnp.sum(p, axis=1, keepdims=True), 1e-6)
    y = jnp.concatenate([y[..., :h], jnp.broadcast_to(glob, y[..., h:].shape)], axis=-1)
    y = L.gelu_exact(self.head_2(L.gelu_exact(self.head_1(y))))
    return self.head_3(y).astype(jnp.float32)


class TextPredictor(nnx.Module):

  def __init__(self, hidden, sc, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    d = sc.d_model
    kw = _kw(dtype, param_dtype, rngs)
    self.ln = L.LayerNorm(hidden, 1e-5, param_dtype=param_dtype)
    self.fc_1 = L.dense(hidden, d, ('embed', 'pred_embed'), **kw)
    self.fc_2 = L.dense(d, d // 2, ('pred_embed', 'pred_mlp'), **kw)
    self.fc_3 = L.dense(d // 2, d // 4, ('pred_mlp', 'pred_embed'), **kw)
    self.fc_4 = L.dense(d // 4, 2, ('pred_embed', 'pred_mlp'), **kw)

  def __call__(self, x):
    """x (B, T, H) -> logits (B, T, 2) fp32."""
    y = L.gelu_exact(self.fc_1(self.ln(x)))
    y = L.gelu_exact(self.fc_3(L.gelu_exact(self.fc_2(y))))
    return self.fc_4(y).astype(jnp.float32)
