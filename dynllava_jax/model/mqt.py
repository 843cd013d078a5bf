"""MQT-LLaVA's Matryoshka query projector (`model.projector='mqt'`): one model, any visual-token count m.

Facts: ../shared/METHODS.md §2 (released `Resampler`, MQT-LLaVA `llava/model/multimodal_projector/builder.py`).

    proj = MatryoshkaQueryProjector(mc, dtype=..., param_dtype=..., rngs=...)
    out = proj(feats, count=m)       # feats (B, N, w) CLIP patch features -> (B, m, H), 1 <= m <= M

w = vision width, M = `mqt.queries` (grid side g = √M), N = s² patches (CLS dropped). q = ln_q(query[:m] +
pos[:m]), k = ln_k(pos_k) with pos_k the fp16-rounded 2-D sin-cos table (`vision.sincos2d`) bicubically
interpolated to the s×s grid (`bicubic_matrix`), v = ln_v(feats); one multi-head attention (packed
`in_proj`, `out_proj`, fp32 softmax), then `proj` (w -> H, no bias); LayerNorm eps `mqt.ln_eps`. The
facts and choices: docs/methods.md, "MQT-LLaVA". The keys depend on positions only, so the m-token output
is exactly the first m rows of the M-token output. `count` is static (each m is its own program);
training pads to M and masks (`train/forward.py`).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynllava_jax.model import layers as L
from dynllava_jax.model.vision import sincos2d, sincos_points
from dynllava_jax.sparsity.base import TrainHook

BICUBIC_A = -0.75   # torch's cubic-convolution coefficient


def _cubic_weights(t, a=BICUBIC_A):
  """Weights of the 4 taps at offsets −1, 0, 1, 2 for fractional position t in [0, 1) (torch's
  cubic_convolution1 / cubic_convolution2)."""
  def near(x):        # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):         # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.array([far(t + 1), near(t), near(1 - t), far(2 - t)], np.float64)


def bicubic_matrix(n_in, n_out):
  """(n_out, n_in) float64 matrix W with out = W @ in along one axis, equal to torch's
  `F.interpolate(mode='bicubic', align_corners=False)` (source x = (i + 0.5)·n_in/n_out − 0.5, taps
  clamped to the edge, no antialiasing). n_in == n_out gives the identity."""
  w = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for i in range(n_out):
    x = (i + 0.5) * scale - 0.5
    x0 = math.floor(x)
    for tap, c in zip(range(x0 - 1, x0 + 3), _cubic_weights(x - x0)):
      w[i, min(max(tap, 0), n_in - 1)] += c
  return w


def interpolate_grid(table, side_in, side_out):
  """table (side_in², w) in row-major grid order -> (side_out², w), bicubic per channel (fp32)."""
  if side_in == side_out:
    return table
  m = jnp.asarray(bicubic_matrix(side_in, side_out), jnp.float32)
  w = table.shape[-1]
  grid = table.astype(jnp.float32).reshape(side_in, side_in, w)
  cols = jnp.einsum('xj,ijc->ixc', m, grid)          # columns first, then rows (separable)
  return jnp.einsum('yi,ixc->yxc', m, cols).reshape(side_out * side_out, w)


def grid_side(n, what):
  s = math.isqrt(int(n))
  if s * s != int(n):
    raise ValueError(f'{what}={n} must be a perfect square (a g×g grid)')
  return s


def check_mqt_config(mc):
  """One-line ValueError for an impossible MQT config."""
  qc, vc = mc.mqt, mc.vision
  grid_side(qc.queries, 'mqt.queries')
  if qc.queries < 1:
    raise ValueError(f'mqt.queries={qc.queries} must be >= 1')
  if vc.width % qc.heads:
    raise ValueError(f'mqt.heads={qc.heads} must divide the vision width {vc.width}')
  if vc.feature_select != 'default':
    raise ValueError("model.projector='mqt' reads the patch grid: use vision.feature_select='default' (no CLS)")
  if qc.get('local_order', 'raster') not in ('raster', 'coarse'):
    raise ValueError(f"mqt.local_order={qc.local_order!r}: use 'raster' or 'coarse'")
  if vc.width % 4:
    raise ValueError(f'model.projector=mqt: the sine-cosine table needs a vision width divisible by 4, got '
                     f'{vc.width}')


class MatryoshkaQueryProjector(nnx.Module):
  """The Matryoshka query transformer (see the module docstring). Parameters (our names = the release's):
  query (M, w), pos_embed (M, w), ln_q / ln_k / ln_v, in_proj (w, 3w) + bias, out_proj (w, w) + bias,
  proj (w, H) without bias."""

  def __init__(self, mc, *, dtype, param_dtype, rngs):
    check_mqt_config(mc)
    qc, vc = mc.mqt, mc.vision
    w, big_m = vc.width, int(qc.queries)
    self.num_queries, self.heads, self.width = big_m, int(qc.heads), w
    self.side_q = grid_side(big_m, 'mqt.queries')
    self.side_k = vc.image_size // vc.patch_size
    self.dtype = dtype
    init = nnx.initializers.truncated_normal(0.02, lower=-2.0 / 0.02, upper=2.0 / 0.02)   # timm: ±2 absolute
    self.query = nnx.Param(init(rngs.params(), (big_m, w), param_dtype), out_sharding=('positions', 'embed'))
    with jax.ensure_compile_time_eval():      # a constant (also under eval_shape)
      table = np.asarray(sincos2d(self.side_q, w)).astype(np.float16).astype(np.float32)
    self.pos_embed = nnx.Param(jnp.asarray(table, param_dtype), out_sharding=('positions', 'embed'))
    eps = float(qc.ln_eps)
    self.ln_q = L.LayerNorm(w, eps, param_dtype=param_dtype)
    self.ln_k = L.LayerNorm(w, eps, param_dtype=param_dtype)
    self.ln_v = L.LayerNorm(w, eps, param_dtype=param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, bias=True)
    self.in_proj = L.dense(w, 3 * w, ('embed', 'heads'), **kw)
    beta = float(qc.get('local_init', 0.0))
    if beta > 0:
      self._local_init(beta, rngs)
      if qc.get('local_order', 'raster') == 'coarse':
        self.query[...] = self._coarse_queries().astype(param_dtype)
    self.out_proj = L.dense(w, w, ('heads', 'embed'), **kw)
    h = mc.llm.hidden
    self.proj = L.dense(w, h, ('patch', 'embed'), dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                        std=h ** -0.5)

  def _local_init(self, beta, rngs):
    """q and k in-projections = one c·Q (Q a random orthogonal w×w, c² = beta / sqrt(head_dim)): a
    query's logit on a key is then ≈ beta · cos(ln_q(query + pos_q), ln_k(pos_k)) per head, so with the
    sin-cos tables each query starts attending around its own grid position (beta 32 on the 8×8 grid:
    ~0.9 of a query's attention in its 4×4 block) instead of the release's near-uniform start. Not the
    release's init (loading released weights replaces it); model.mqt.local_init."""
    w = self.width
    q = nnx.initializers.orthogonal()(rngs.params(), (w, w), jnp.float32) * math.sqrt(
        beta / math.sqrt(w // self.heads))
    kernel = self.in_proj.kernel[...]
    kernel = kernel.at[:, :w].set(q.astype(kernel.dtype)).at[:, w:2 * w].set(q.astype(kernel.dtype))
    self.in_proj.kernel[...] = kernel

  def _coarse_queries(self):
    """query (M, w) such that ln_q(query_i + pos_i) = ln_q(sin-cos of target i), the targets in
    coarse-to-fine order (`coarse_targets`): with the local init the first m queries then cover the whole
    image at every m (query 0..3 the four quadrants, then their quarters, ...), where the raster order
    gives the first m queries the top rows only. model.mqt.local_order='coarse'; not the release's."""
    ty, tx = coarse_targets(self.num_queries, self.side_k)
    g, s = self.side_q, self.side_k
    to_q = lambda t: (t + 0.5) * g / s - 0.5          # key-grid coordinates -> the query table's grid
    want = sincos_points(to_q(ty), to_q(tx), self.width)
    return want - self.pos_embed[...].astype(jnp.float32)

  @staticmethod
  def num_tokens(mc, count=None):
    big_m = int(mc.mqt.queries)
    if count is None:
      return big_m
    return check_count(mc, count)

  def _in(self, x, part):
    """Slice `part` (0 q, 1 k, 2 v) of the packed in-projection: x (..., w) -> (..., w)."""
    w = self.width
    k = self.in_proj.kernel[...][:, part * w:(part + 1) * w].astype(self.dtype)
    b = self.in_proj.bias[...][part * w:(part + 1) * w].astype(self.dtype)
    return x.astype(self.dtype) @ k + b

  def key_positions(self):
    """pos_k (N, w): the query grid's table interpolated to the patch grid."""
    return interpolate_grid(self.pos_embed[...], self.side_q, self.side_k)

  def attention(self, count=None):
    """Attention probabilities (heads, m, N) float32 — a function of the parameters only (no image)."""
    m = self.num_queries if count is None else int(count)
    hd = self.width // self.heads
    q = self.ln_q(self.query[...][:m] + self.pos_embed[...][:m])
    k = self.ln_k(self.key_positions().astype(self.pos_embed[...].dtype))
    qh = self._in(q, 0).reshape(m, self.heads, hd)
    kh = self._in(k, 1).reshape(-1, self.heads, hd)
    s = jnp.einsum('mhd,nhd->hmn', qh.astype(jnp.float32), kh.astype(jnp.float32)) / math.sqrt(hd)
    return jax.nn.softmax(s, axis=-1)

  def __call__(self, x, count=None):
    """x (B, N, w) patch features -> (B, m, H); m = count or M."""
    b, n, w = x.shape
    if n != self.side_k ** 2:
      raise ValueError(f'mqt projector: got {n} features, expected {self.side_k ** 2} patches')
    hd = w // self.heads
    p = self.attention(count)
    v = self._in(self.ln_v(x), 2).reshape(b, n, self.heads, hd)
    o = jnp.einsum('hmn,bnhd->bmhd', p.astype(v.dtype), v).reshape(b, p.shape[1], w)
    return self.proj(self.out_proj(o))


def coarse_targets(m, side):
  """(y, x) float arrays (m,): centres of the quadtree blocks of a side×side patch grid, level by level
  (2×2 blocks, then 4×4, 8×8, ... while a block spans ≥ 1 patch), each level ordered by its reversed
  quadtree path so that every prefix is spread over the image (level 2 on 8×8: the top-left quarter of
  each quadrant, then the top-right quarter of each, ...); the first m of them. ValueError if the levels
  hold fewer than m points."""
  ys, xs = [], []
  level = 1
  while (1 << level) <= side and len(ys) < m:
    n = 1 << level
    blocks = [divmod(b, n) for b in range(n * n)]                  # (row, column) of each block
    # the block's quadtree path, finest digit first
    blocks.sort(key=lambda yx: [2 * ((yx[0] >> k) & 1) + ((yx[1] >> k) & 1) for k in range(level)])
    ys += [(by + 0.5) * side / n - 0.5 for by, _ in blocks]
    xs += [(bx + 0.5) * side / n - 0.5 for _, bx in blocks]
    level += 1
  if len(ys) < m:
    raise ValueError(f"mqt.local_order='coarse': a {side}×{side} patch grid has {len(ys)} quadtree "
                     f'centres, fewer than mqt.queries={m}')
  return np.asarray(ys[:m], np.float32), np.asarray(xs[:m], np.float32)


def check_count(mc, count):
  """The visual-token count m of an MQT model: an int in 1..M, else a one-line UserError."""
  from dynllava_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  big_m = int(mc.mqt.queries)
  try:
    m = int(count)
  except (TypeError, ValueError):
    raise UserError(f'visual tokens m={count!r} must be an integer in 1..{big_m}') from None
  if m != count or not 1 <= m <= big_m:
    raise UserError(f'visual tokens m={count} is outside 1..{big_m} (mqt.queries of this model)')
  return m


def mqt_flops(mc, count=None, batch=1):
  """Matmul FLOPs of one projector call as computed here: the query/key side once per call (image-
  independent: q/k projections and scores), the value side per image."""
  w, h = mc.vision.width, mc.llm.hidden
  m = int(mc.mqt.queries) if count is None else int(count)
  s = mc.vision.image_size // mc.vision.patch_size
  n = s * s
  g = grid_side(mc.mqt.queries, 'mqt.queries')
  interp = 0 if g == s else 2 * g * s * g * w + 2 * s * g * s * w   # the two separable contractions
  once = interp + 2 * m * w * w + 2 * n * w * w + 2 * m * n * w      # q proj, k proj, scores
  per_image = 2 * n * w * w + 2 * m * n * w + 2 * m * w * w + 2 * m * w * h   # v, p·v, out_proj, proj
  return once + batch * per_image


def sample_counts(rng, big_m, shape=()):
  """Stage-2 draw: m uniform over {2, 4, …, M} (M even; odd M: up to M − 1) — int32 of `shape`."""
  return 2 * jax.random.randint(rng, shape, 1, big_m // 2 + 1, dtype=jnp.int32)


MQT_STREAM = 3   # fold_in index of the m draw in a training forward's key (Gumbel streams use 0..2)


def train_count(mc, rng, step=None):
  """The m of one training forward (a traced int32 scalar): M in stage 1 (`mqt.sample_m` False), without
  a key (evaluation) or before optimizer step `mqt.sample_from_step` (`step`: traced int, None = past it);
  else a draw from {2, 4, …, M} on fold_in(rng, MQT_STREAM). The key is the micro-batch's (train/step.py:
  fold_in(fold_in(state rng, step), micro index)), so the draw is part of the checkpointed RNG stream: a
  resumed run draws the same m at the same step."""
  big_m = int(mc.mqt.queries)
  if not mc.mqt.get('sample_m', False) or rng is None:
    return jnp.int32(big_m)
  m = sample_counts(jax.random.fold_in(rng, MQT_STREAM), big_m)
  start = int(mc.mqt.get('sample_from_step', 0))
  if start > 0 and step is not None:
    m = jnp.where(jnp.asarray(step) >= start, m, jnp.int32(big_m))
  return m


def padding_slots(image_mask, m):
  """Training pads every image to M tokens: the placeholders past the first m of each row (B, T) bool.
  Masking them out of the attention mask (no key, no position) makes the forward equal to one on a
  prompt with m placeholders."""
  ordinal = jnp.cumsum(image_mask.astype(jnp.int32), axis=-1) - 1
  return image_mask & (ordinal >= m)


class MQTTrain(TrainHook):
  """MQT-LLaVA's training hook: prompts carry M placeholders and the projector emits M tokens; one m per
  forward (`train_count`) and the image tokens past the first m leave the attention mask (no key, no RoPE
  position), so the forward equals one on an m-placeholder prompt (tests/test_mqt.py). Padding to M keeps
  one compiled program for every m (buckets would compile up to M/2 programs and change the batch shapes
  between steps); the cost is the LLM work on M − m masked tokens. Their labels are ignored (image tokens
  carry no label); a labelled token right after the image would be scored from the last padding slot (not
  the case in LLaVA's templates: the image sits in the user turn). out['mqt_m']: the forward's m."""
  name = 'mqt'

  def __init__(self, mc):
    self.mc = mc

  def prepare(self, ctx, mask, out):
    out['mqt_m'] = m = train_count(self.mc, ctx.rng, ctx.step)
    return mask * ~padding_slots(ctx.batch['input_ids'] == self.mc.image_token_id, m)
