"""Small building blocks with logical axis names: Dense (optionally with a LoRA adapter), RMSNorm,
LayerNorm, activations, the stacked-layer scan.

Every parameter carries its logical axis names (see `dynllava_jax.sharding.LOGICAL_RULES`).
Kernels are stored (in, out), the transpose of torch's Linear.weight.
"""
import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02


def dtype_of(name):
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}[str(name)]


class Linear(nnx.Linear):
  """nnx.Linear over a (N, din) matrix: x (..., din) -> (..., dout), the leading axes flattened into one.

  Why: with x (B, T, din) the weight gradient x^T dy contracts two axes, and XLA CPU then materialises a
  transpose of the larger operand (e.g. the MLP's (B·T, mlp) gradient, fused with SwiGLU's backward into a
  strided loop) before its GEMM; over one flattened axis its GEMM takes the transposed operand as it is.
  On the bench training step: 1.09x faster (docs/benchmarks.md §7). The leading axes are the batch and the
  sequence, which the rules table never shards together in a way a merge would break (`act_len` is
  replicated).
  """

  def __call__(self, x):
    lead = x.shape[:-1]
    y = self.apply_2d(x.reshape((-1, x.shape[-1])))
    return y.reshape(lead + (y.shape[-1],))

  def apply_2d(self, x):
    """x (N, din) -> (N, dout)."""
    return super().__call__(x)


def dense(din, dout, names, *, bias=False, dtype=jnp.float32, param_dtype=jnp.float32, rngs, std=INIT_STD):
  """`Linear` (kernel (din, dout) named `names`), N(0, std) init, zero bias."""
  return Linear(
      din, dout, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(nnx.initializers.normal(std), names),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
      rngs=rngs)


_DROPOUT_KEY = contextvars.ContextVar('lora_dropout_key', default=None)


@contextlib.contextmanager
def lora_dropout(key):
  """Within this block (at trace time), LoRA adapters drop their input with their `dropout` rate, masks
  drawn from `key` (None: no dropout, the default: inference never drops). `Llama.run_layers` folds
  the layer index into the key per layer, each adapter its own salt."""
  token = _DROPOUT_KEY.set(key)
  try:
    yield
  finally:
    _DROPOUT_KEY.reset(token)


def dropout_key():
  return _DROPOUT_KEY.get()


class LoRADense(Linear):
  """nnx.Linear plus a low-rank adapter: y = x W + (alpha / r) · dropout(x) A B.

  The adapter is flax's own `nnx.LoRA` (A (din, r) he-uniform, B (r, dout) zeros: a fresh adapter leaves
  the layer unchanged), held under `lora` so the base kernel keeps its path (`.../q_proj/kernel`) and
  checkpoint names. Not `nnx.LoRALinear`: it computes x W + x A B with no alpha / r scale and no dropout,
  both of which the released recipe sets (alpha 256, r 128, dropout 0.05). Dropout masks come from
  `lora_dropout(key)` (functional: nothing random is stored on the module, so the stacked, scanned
  layers stay pure params), each projection's mask its own (`salt`). `merged_kernel()` = W + (alpha / r) A B for inference / export.
  """

  def __init__(self, din, dout, *, rank, alpha, dropout=0.0, names, salt=0, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs, std=INIT_STD):
    super().__init__(din, dout, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                     kernel_init=nnx.with_partitioning(nnx.initializers.normal(std), names), rngs=rngs)
    self.lora = nnx.LoRA(din, int(rank), dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                         a_metadata={'out_sharding': (names[0], None)},
                         b_metadata={'out_sharding': (None, names[1])})
    self.scale = float(alpha) / float(rank)
    self.rate = float(dropout)
    self.salt = int(salt)   # which projection of the layer: its own dropout mask

  def merged_kernel(self):
    """W + (alpha / r) A B in fp32, cast to the kernel's dtype: (din, dout)."""
    w = self.kernel[...]
    a, b = self.lora.lora_a[...].astype(jnp.float32), self.lora.lora_b[...].astype(jnp.float32)
    return (w.astype(jnp.float32) + self.scale * (a @ b)).astype(w.dtype)

  def apply_2d(self, x):
    y = super().apply_2d(x)
    key = dropout_key()
    xa = x
    if key is not None and self.rate > 0:
      keep = jax.random.bernoulli(jax.random.fold_in(key, self.salt), 1.0 - self.rate, x.shape)
      xa = jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)
    return y + (self.scale * self.lora(xa)).astype(y.dtype)


class RMSNorm(nnx.Module):
  """LLaMA RMSNorm as HF computes it: fp32 variance, cast back, then multiply by the weight."""

  def __init__(self, dim, eps, *, param_dtype=jnp.float32):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=('norm',))

  def __call__(self, x):
    dt = x.dtype
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(dt) * xf.astype(dt)


class LayerNorm(nnx.Module):
  """LayerNorm with weight and bias, statistics in fp32."""

  def __init__(self, dim, eps=1e-5, *, param_dtype=jnp.float32):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=('norm',))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=('norm',))

  def __call__(self, x):
    dt = x.dtype
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, -1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), -1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + self.eps)
    return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(dt)


def gelu_exact(x):
  return jax.nn.gelu(x, approximate=False)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def split_scan(module, fn, carry, *, start=0, stop=None, remat=False, xs=None, index_params=False, unroll=1):
  """Runs `fn(layer, carry, x) -> (carry, y)` over layers [start, stop) of a stacked (nnx.vmap-made) module.

  Functional NNX: the stacked module is split into (graphdef, state); each scan step merges one layer's
  slice. Compile time does not grow with depth. `xs` is an optional pytree with a leading layer axis
  (already sliced to the same range), e.g. a per-layer KV cache.

  index_params: for inference on a sub-range of layers. The default slices the stacked params to
  [start, stop) before the scan, which XLA materialises as a copy of those layers' weights on every call
  (cheap next to a training step, but it dominates a one-token decode step). With index_params=True the
  full stacked params are closed over and each step reads its layer with a dynamic index: no copy. Keep it
  off under differentiation (the transpose of a closed-over dynamic index accumulates full-size buffers).
  unroll: layers per loop iteration (`jax.lax.scan`'s unroll; >= the layer count: no loop at all).
  """
  graphdef, state = nnx.split(module)
  n_total = jax.tree.leaves(state)[0].shape[0]
  stop = n_total if stop is None else stop
  full = start == 0 and stop == n_total

  if index_params and not full:
    def body_idx(c, inp):
      i, x = inp
      st = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), state)
      return fn(nnx.merge(graphdef, st), c, x)

    if remat:
      body_idx = jax.checkpoint(body_idx, prevent_cse=False)
    return jax.lax.scan(body_idx, carry, (jnp.arange(start, stop, dtype=jnp.int32), xs), unroll=unroll)

  if not full:
    state = jax.tree.map(lambda a: a[start:stop], state)

  def body(c, inp):
    st, x = inp
    return fn(nnx.merge(graphdef, st), c, x)

  if remat:
    body = jax.checkpoint(body, prevent_cse=False)
  return jax.lax.scan(body, carry, (state, xs), unroll=unroll)
