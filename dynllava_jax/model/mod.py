"""VideoLLM-MoD: mixture-of-depths decoder layers for vision tokens (METHODS.md §3, docs/mod.md).

An MoD layer (`model.layer_plan` kind `mod`, or `model.mod.layers`) keeps every vision token in the
sequence but, per frame, sends only the top k = ⌈r·N⌉ of that frame's N vision tokens through the layer;
the others pass on unchanged; text tokens always go through. Router ('tanh', p-MoD's form): s = wᵀh + b,
a routed token gets h + (1 + α·tanh s)·(f(h) − h). Routing 'learned' | 'random' | 'uniform' (baselines:
router unused, every weight 1). Details and choices: docs/mod.md, "What an MoD layer computes".

Frames: the image placeholders of a sample are F consecutive spans of N (`frame_slots`); a sample may have
fewer frames than the batch's maximum (the missing ones are masked). Shapes below: B batch, T tokens,
F frames, N tokens per frame, k routed per frame.
"""
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dynllava_jax.errors import UserError

KIND = 'mod'              # the layer kind (`llama.LAYER_KINDS`)
ROUTERS = ('tanh',)
ROUTINGS = ('learned', 'random', 'uniform')


def settings(mc):
  """`model.mod` or its defaults (`presets.mod_config`)."""
  from dynllava_jax.presets import mod_config  # pylint: disable=g-import-not-at-top
  return mc.mod if 'mod' in mc else mod_config()


def check(mc):
  """One-line UserError for bad MoD settings (r outside (0, 1], unknown router / routing)."""
  c = settings(mc)
  if not 0.0 < float(c.r) <= 1.0:
    raise UserError(f'model.mod.r={c.r} must be in (0, 1] (the routed share of each frame)')
  if c.router not in ROUTERS:
    raise UserError(f'model.mod.router={c.router!r} unknown; implemented: {ROUTERS}')
  if c.routing not in ROUTINGS:
    raise UserError(f'model.mod.routing={c.routing!r} unknown; use one of {ROUTINGS}')


def mod_layers(spec, n_layers):
  """`model.mod.layers` -> the MoD layer indices: () for '', 'interleave' = 1, 3, 5, … (every other
  layer, the first one dense), or a list '1,3'. UserError for an index outside the plan."""
  spec = str(spec or '').replace(' ', '')
  if not spec:
    return ()
  if spec == 'interleave':
    return tuple(range(1, n_layers, 2))
  try:
    layers = [int(s) for s in spec.split(',') if s]
  except ValueError:
    raise UserError(f"model.mod.layers={spec!r}: write 'interleave' or layer numbers, e.g. 1,3") from None
  bad = [i for i in layers if not 0 <= i < n_layers]
  if bad:
    raise UserError(f'model.mod.layers: layer {bad[0]} is outside the layer plan (0..{n_layers - 1})')
  if len(set(layers)) != len(layers):
    raise UserError(f'model.mod.layers={spec!r} lists a layer twice')
  return tuple(sorted(layers))


def routed_count(n, r):
  """k = ⌈r·N⌉ vision tokens routed per frame (at least 1)."""
  return max(1, int(math.ceil(n * float(r) - 1e-9)))


# ---------------------------------------------------------------- frames

def frame_slots(image_mask, n, frames):
  """Where each frame's tokens sit: image_mask (B, T) bool, N tokens per frame, F frames at most ->
  slots (B, F, N) int32 (sequence index of frame f's j-th token; clipped for absent frames) and
  valid (B, F) bool (the sample has frame f). The frames of a sample are its placeholders in order, N each."""
  idx, _, count = compact(image_mask, frames * n)                  # image slots first, in order
  valid = jnp.arange(frames)[None, :] * n < count[:, None]
  return idx.reshape(image_mask.shape[0], frames, n), valid


def frames_of(pixel_values):
  """Static frame count of a batch: pixel_values (B, F, H, W, 3) -> F, (B, H, W, 3) -> 1, None -> 0."""
  if pixel_values is None:
    return 0
  return pixel_values.shape[1] if pixel_values.ndim == 5 else 1


@dataclasses.dataclass(frozen=True)
class Route:
  """What an MoD layer needs to route a sequence (one per forward, shared by its MoD layers).

  image (B, T) bool vision tokens; slots (B, F, N) int32 / valid (B, F) bool (`frame_slots`);
  k static routed per frame; routing, alpha, seed: `model.mod`'s."""
  image: Any
  slots: Any
  valid: Any
  k: int
  routing: str = 'learned'
  alpha: float = 0.2
  seed: int = 0
  gather: int = 0           # > 0 (training): run MoD layers on their routed real tokens in this many slots
                            # (`gathered`), falling back to the masked form when a sample has more
  real: Any = None          # (B, T) bool real tokens (with gather)
  mode: str = 'masked_softmax_eps'
  impl: str = 'reference'


def make_route(mc, image_mask, n, frames, real=None, impl='reference'):
  """The Route of a forward: image_mask (B, T), N tokens per frame, F frames at most (None when the
  model has no MoD layer or the batch no image). real (B, T) bool: gather the routed tokens (training,
  `model.mod.train_gather`) into T − F·(N − k) slots; impl: the attention implementation there."""
  if not frames:
    return None
  c = settings(mc)
  k = routed_count(n, c.r)
  slots, valid = frame_slots(image_mask, n, frames)
  gather = 0
  if real is not None and c.get('train_gather', True):
    size = image_mask.shape[1] - frames * (n - k)
    gather = size if 0 < size < image_mask.shape[1] else 0
  return Route(image_mask, slots, valid, k, str(c.routing), float(c.alpha), int(c.seed), gather,
               real, str(mc.attention), impl)


def compact(keep, size):
  """Stable compaction: keep (B, T) bool -> idx (B, size) int32 of the kept slots first (in order, then
  the others), valid (B, size) bool, count (B,) int32. size > T repeats the last slot."""
  t = keep.shape[1]
  idx = jnp.argsort(~keep, axis=-1, stable=True).astype(jnp.int32)
  if size > t:
    idx = jnp.concatenate([idx, jnp.full((keep.shape[0], size - t), t - 1, jnp.int32)], axis=1)
  idx = idx[:, :size]
  count = jnp.sum(keep, axis=-1).astype(jnp.int32)
  valid = jnp.arange(size)[None, :] < count[:, None]
  return idx, valid, count


def take(x, idx):
  """x (B, T, ...) gathered along axis 1 at idx (B, S) -> (B, S, ...)."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _fixed_scores(routing, seed, layer, frames, n, k):
  """(F, N) scores of the baselines: 'uniform' = 1 at the k stride centres ⌊(i + ½)·N/k⌋ (as the `uniform`
  sparsifier keeps), else 0; 'random' = a fixed uniform draw per (layer, frame, token)."""
  if routing == 'uniform':
    from dynllava_jax.sparsity.uniform import stride_table  # pylint: disable=g-import-not-at-top
    return jnp.broadcast_to(jnp.asarray(stride_table(n, k), jnp.float32), (frames, n))
  key = jax.random.fold_in(jax.random.PRNGKey(seed), layer)
  return jax.random.uniform(key, (frames, n))


def route_tokens(scores, route, layer=0):
  """The routed tokens: scores (B, T) router outputs -> routed (B, T) bool: every non-vision token, and
  per present frame the top k of its N tokens (`sparsity.base.top_k_mask`, ties: the earlier token)."""
  from dynllava_jax.sparsity.base import top_k_mask  # pylint: disable=g-import-not-at-top
  b, f, n = route.slots.shape
  if route.routing == 'learned':
    fs = jnp.take_along_axis(scores, route.slots.reshape(b, f * n), axis=1).reshape(b * f, n)
  else:
    fs = jnp.broadcast_to(_fixed_scores(route.routing, route.seed, layer, f, n, route.k)[None], (b, f, n)).reshape(b * f, n)
  elig = jnp.broadcast_to(route.valid[:, :, None], (b, f, n)).reshape(b * f, n)
  pick = top_k_mask(fs, elig, route.k).reshape(b, f * n)
  chosen = jnp.zeros(scores.shape, bool).at[jnp.arange(b)[:, None], route.slots.reshape(b, f * n)].max(pick)
  return ~route.image | chosen


class Router(nnx.Module):
  """p-MoD's router: Linear(H → 1), zero init. h (..., H) -> s (...,) float32."""

  def __init__(self, hidden, *, dtype, param_dtype, rngs):
    del rngs
    self.kernel = nnx.Param(jnp.zeros((hidden, 1), param_dtype))
    self.bias = nnx.Param(jnp.zeros((1,), param_dtype))
    self.dtype = dtype

  def __call__(self, h):
    s = h.astype(self.dtype) @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)
    return s[..., 0].astype(jnp.float32)


def update_weight(s, image, route):
  """The factor on a routed token's update -> (w (B, T) float32, weighted (B, T) bool): 1 + α·tanh(s) on
  vision tokens (`image` (B, T) bool) under learned routing (weighted), 1 elsewhere (text; every token
  under the baselines)."""
  weighted = image if route.routing == 'learned' else jnp.zeros(image.shape, bool)
  return jnp.where(weighted, 1.0 + route.alpha * jnp.tanh(s), 1.0), weighted


def mix(h, out, w, weighted, routed):
  """A MoD layer's output from its input h and the dense block's output `out` (B, T, H): h + w·(out − h)
  on weighted tokens (routed vision tokens: the router's gradient), out on the other routed tokens (text),
  h unchanged on skipped ones. w (B, T) float32; weighted, routed (B, T) bool."""
  upd = jnp.where(weighted[..., None], h + w[..., None].astype(h.dtype) * (out - h), out)
  return jnp.where(routed[..., None], upd, h)


def router_flops(lc, n_vision, batch=1):
  """The router's FLOPs on one MoD layer: 2·H per vision token scored (every token of every frame)."""
  return batch * 2 * lc.hidden * n_vision
