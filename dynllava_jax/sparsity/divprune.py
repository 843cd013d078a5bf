"""DivPrune (arXiv 2503.02175): a training-free reducer after the projector, before LLM layer 0.
Facts: ../shared/METHODS.md, "Training-free reducers before the LLM" (released vbdi/divprune).

    method = make_sparsifier('divprune', cfg, tokens=56)        # K kept tokens
    method = make_sparsifier('divprune', cfg, ratio=0.098)      # K = round(ratio · N) (the release: 56 of 576)

Per sample, on its N projected image tokens: greedy max–min selection over distance = 1 − cosine
similarity (first pick: the largest nearest-neighbour distance; ties: the lowest index); the K picks go
to the LLM in raster order, and prompts carry K placeholders (`projector.visual_token_count`). The rules
and the choices against the release: docs/methods.md, "Pre-LLM reducers"; tested ≡ removing the others
from a full prompt's attention mask and renumbering (tests/test_reducers.py).
"""
import jax
import jax.numpy as jnp

from dynllava_jax.errors import UserError
from dynllava_jax.model.projector import num_visual_tokens
from dynllava_jax.sparsity import registry
from dynllava_jax.sparsity.base import Sparsifier


def cosine_distance(x):
  """x (B, N, H) -> 1 − cos (B, N, N) float32."""
  x = x.astype(jnp.float32)
  xn = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return 1.0 - jnp.einsum('bnh,bmh->bnm', xn, xn)


def divprune_select(feats, k):
  """Greedy max–min diversity: feats (B, N, H) -> kept indices (B, K) ascending (raster order)."""
  dist = cosine_distance(feats)
  b, n, _ = dist.shape
  nearest = jnp.sort(dist, axis=1)[:, 1]                          # (B, N): 2nd smallest of each column
  first = jnp.argmax(nearest, axis=-1)                            # ties: lowest index
  rows = jnp.arange(b)

  def body(carry, _):
    mind, picked = carry
    pick = jnp.argmax(jnp.where(picked, -jnp.inf, mind), axis=-1)
    return (jnp.minimum(mind, dist[rows, pick]), picked.at[rows, pick].set(True)), pick

  init = (dist[rows, first], jnp.zeros((b, n), bool).at[rows, first].set(True))
  _, rest = jax.lax.scan(body, init, None, length=k - 1)
  picks = jnp.concatenate([first[:, None], rest.T], axis=1) if k > 1 else first[:, None]
  return jnp.sort(picks, axis=-1).astype(jnp.int32)


class DivPrune(Sparsifier):
  """A pre-LLM reducer: `reduce_visual` keeps K projected tokens; no drop points in the LLM."""
  name = 'divprune'
  reduces_visual = True

  def __init__(self, tokens=None, ratio=None):
    if tokens is not None and ratio is not None:
      raise UserError('divprune: give tokens=K or ratio=r, not both')
    if ratio is None and tokens is None:
      ratio = 0.098
    if ratio is not None and not 0.0 < float(ratio) <= 1.0:
      raise UserError(f'divprune: ratio={ratio} must be in (0, 1]')
    if tokens is not None and int(tokens) < 1:
      raise UserError(f'divprune: tokens={tokens} must be >= 1')
    self.tokens = None if tokens is None else int(tokens)
    self.ratio = None if ratio is None else float(ratio)

  def keep(self, n):
    """K for N tokens: `tokens`, or round(ratio · N) (Python's round, as the release), at least 1."""
    return self.tokens if self.tokens is not None else max(1, int(round(self.ratio * n)))

  def visual_tokens(self, model_cfg, n):
    return self.keep(n)

  def validate(self, model_cfg, n_image_tokens):
    super().validate(model_cfg, n_image_tokens)
    n = num_visual_tokens(model_cfg)
    if self.tokens is not None and self.tokens > n:
      raise UserError(f'divprune: tokens={self.tokens} exceeds the {n} image tokens of this model')

  def reduce_visual(self, model, pixel_values, count=None):
    """(B, H, W, 3) -> the K kept projected tokens (B, K, hidden), raster order."""
    feats = model.image_features(pixel_values, count)
    idx = divprune_select(feats, self.keep(feats.shape[1]))
    return jnp.take_along_axis(feats, idx[..., None], axis=1)

  def reduce_flops(self, model_cfg, count=None, batch=1):
    """The projector on all N tokens + the N × N cosine matrix."""
    from dynllava_jax.model.projector import projector_flops  # pylint: disable=g-import-not-at-top
    n = num_visual_tokens(model_cfg, count)
    return projector_flops(model_cfg, count, batch) + batch * 2 * n * n * model_cfg.llm.hidden

  def describe(self):
    return {'method': self.name, 'tokens': self.tokens, 'ratio': self.ratio}


registry.register('divprune', lambda mc, **kw: DivPrune(**kw))
