"""VisionZip (arXiv 2412.04467): a training-free reducer inside the CLIP tower, before the projector.
Facts: ../shared/METHODS.md, "Training-free reducers before the LLM" (released dvlab-research/VisionZip).

    method = make_sparsifier('visionzip', cfg, tokens=64)              # D = 54 dominant (CLS included) + C = 10
    method = make_sparsifier('visionzip', cfg, dominant=108, contextual=20)
    method = make_sparsifier('visionzip', cfg, ratio=0.1)              # k = round(0.1·N) tokens

It reads the feature layer's hidden states, softmaxed attention and keys (the tower's intermediates,
`model/vision.py`; no second tower) and hands the projector k = D + C tokens: CLS + the D − 1 patches
with the largest CLS attention (dominant), then C contextual tokens merged from the rest; order
[CLS, dominant by index, contextual in target order]. Prompts carry k placeholders
(`projector.visual_token_count`). The rules, ties and budgets (`tokens=k` splits 54:10): docs/methods.md,
"Pre-LLM reducers".
"""
import jax
import jax.numpy as jnp

from dynllava_jax.errors import UserError
from dynllava_jax.model.vision import select_features
from dynllava_jax.sparsity import registry
from dynllava_jax.sparsity.base import Sparsifier

DOMINANT_SHARE = 54 / 64


def split_budget(tokens):
  """k -> (D, C) with the README's 54:10 share (D counts CLS)."""
  k = int(tokens)
  d = max(1, int(round(k * DOMINANT_SHARE)))
  return d, k - d


def visionzip_tokens(hidden, attn, keys, dominant, contextual):
  """The VisionZip selection on one tower output.

  hidden (B, 1 + N, w) the feature layer's hidden states (CLS first); attn (B, heads, 1 + N, 1 + N) its
  softmaxed attention; keys (B, 1 + N, heads, hd) its keys. Returns (tokens (B, D + C, w),
  dominant_idx (B, D − 1) patch indices 0..N−1 ascending, target_idx (B, C), assign (B, R) target slot of
  each remaining patch (−1 for the targets themselves)).
  """
  b, t, w = hidden.shape
  n = t - 1
  d1 = dominant - 1
  cls_attn = jnp.sum(attn[:, :, 0, 1:].astype(jnp.float32), axis=1)                       # (B, N)
  _, top = jax.lax.top_k(cls_attn, d1)                                                   # ties: lower index
  dom = jnp.sort(top, axis=-1)                                                           # (B, D−1)
  chosen = jnp.zeros((b, n), bool).at[jnp.arange(b)[:, None], dom].set(True)
  r = n - d1
  rest = jnp.argsort(chosen, axis=-1, stable=True)[:, :r].astype(jnp.int32)            # remaining, in order
  patches = hidden[:, 1:]
  take = lambda x, idx: jnp.take_along_axis(x, idx[..., None], axis=1)
  dominant_tokens = jnp.concatenate([hidden[:, :1], take(patches, dom)], axis=1)        # (B, D, w)
  if contextual == 0:
    return dominant_tokens, dom, jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, r), jnp.int32) - 1
  metric = jnp.mean(keys[:, 1:].astype(jnp.float32), axis=2)                            # (B, N, hd)
  metric = take(metric, rest)
  metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
  step = max(1, r // contextual)
  tgt_pos = jnp.arange(0, r, step)[:contextual]                                          # (C,) in `rest`
  is_tgt = jnp.zeros((r,), bool).at[tgt_pos].set(True)
  sim = jnp.einsum('brd,bcd->brc', metric, metric[:, tgt_pos])                           # (B, R, C)
  assign = jnp.argmax(sim, axis=-1)                                                      # ties: lower target
  onehot = jax.nn.one_hot(assign, contextual, dtype=jnp.float32) * (~is_tgt)[None, :, None]
  h_rest = take(patches, rest).astype(jnp.float32)                                       # (B, R, w)
  summed = jnp.einsum('brc,brw->bcw', onehot, h_rest)
  counts = jnp.maximum(jnp.sum(onehot, axis=1), 1.0)[..., None]
  ctx = (h_rest[:, tgt_pos] + summed / counts).astype(hidden.dtype)                      # (B, C, w)
  tokens = jnp.concatenate([dominant_tokens, ctx], axis=1)
  return tokens, dom, rest[:, tgt_pos], jnp.where(is_tgt[None], -1, assign).astype(jnp.int32)


class VisionZip(Sparsifier):
  """A pre-LLM reducer: `reduce_visual` replaces the projector input; no drop points in the LLM."""
  name = 'visionzip'
  reduces_visual = True

  def __init__(self, tokens=None, dominant=None, contextual=None):
    if tokens is not None and (dominant is not None or contextual is not None):
      raise UserError('visionzip: give tokens=k or dominant=D, contextual=C, not both')
    if tokens is not None:
      dominant, contextual = split_budget(tokens)
    dominant = 54 if dominant is None else int(dominant)
    contextual = 10 if contextual is None else int(contextual)
    if dominant < 1 or contextual < 0:
      raise UserError(f'visionzip: dominant={dominant} must be >= 1 (it counts CLS) and contextual='
                      f'{contextual} >= 0')
    self.dominant, self.contextual = dominant, contextual

  def visual_tokens(self, model_cfg, n):
    return self.dominant + self.contextual

  def validate(self, model_cfg, n_image_tokens):
    super().validate(model_cfg, n_image_tokens)
    vc = model_cfg.vision
    patches = (vc.image_size // vc.patch_size) ** 2
    if model_cfg.get('projector', 'mlp2x_gelu') != 'mlp2x_gelu':
      raise UserError(f"visionzip feeds selected CLIP tokens to a per-token projector; model.projector="
                      f"{model_cfg.projector} reads the whole patch grid")
    if self.dominant - 1 + self.contextual > patches or self.dominant - 1 > patches:
      raise UserError(f'visionzip: dominant {self.dominant} (CLS + {self.dominant - 1} patches) + contextual '
                      f'{self.contextual} exceeds the {patches} patches of this tower (+ CLS)')

  def reduce_visual(self, model, pixel_values, count=None):
    """(B, H, W, 3) -> projected tokens (B, D + C, hidden)."""
    if count is not None:
      raise UserError('visionzip does not take an MQT token count')
    hidden, inter = model.vision_tower(pixel_values, remat=model.mc.remat, intermediates=True)
    tokens = visionzip_tokens(select_features(hidden, 'full'), inter['attn'], inter['keys'], self.dominant,
                              self.contextual)[0]
    return model.projector(tokens)

  def reduce_flops(self, model_cfg, count=None, batch=1):
    """Projector on D + C tokens + the key similarities (R × C × head_dim)."""
    vc, h = model_cfg.vision, model_cfg.llm.hidden
    k = self.dominant + self.contextual
    r = (vc.image_size // vc.patch_size) ** 2 - (self.dominant - 1)
    return batch * (2 * k * vc.width * h + 2 * k * h * h + 2 * r * self.contextual * (vc.width // vc.heads))

  def describe(self):
    return {'method': self.name, 'dominant': self.dominant, 'contextual': self.contextual}


def _make(mc, ratio=None, **kw):
  """`ratio=r` (a keep fraction, `eval.py --keep_ratios`) -> tokens = round(r·N) of the tower's N patches."""
  if ratio is not None:
    if 'tokens' in kw:
      raise UserError('visionzip: give tokens=k or ratio=r, not both')
    if not 0.0 < float(ratio) <= 1.0:
      raise UserError(f'visionzip: ratio={ratio} must be in (0, 1]')
    patches = (mc.vision.image_size // mc.vision.patch_size) ** 2
    kw['tokens'] = max(2, int(round(float(ratio) * patches)))   # CLS + at least one patch
  return VisionZip(**kw)


registry.register('visionzip', _make)
