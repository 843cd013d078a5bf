"""The one interface every token-sparsification method implements, so all run through the same
prefill / decode code (`dynllava_jax.decode`).

A method prunes IMAGE tokens at prefill at a static list of drop points, and may prune GENERATED TEXT tokens
during decoding. Text tokens of the prompt are never dropped by these methods.

Prefill contract (the engine in `dynllava_jax.decode.prefill` calls these, all under jit, static shapes):
  points = method.drop_points(model_cfg)          # ascending 0-based layer indices p: the drop happens on
                                                  # the hidden state ENTERING layer p; () = dense
  k_i    = method.keep_counts(n_image_tokens)[i]  # image tokens still present after drop i (static ints,
                                                  # counted against the ORIGINAL image-token count)
  scores = method.score(i, ctx)                   # (B, T_cur) float: higher = keep; only entries where
                                                  # ctx.image_mask is True are compared. The engine keeps,
                                                  # per sample, the k_i best present image tokens and every
                                                  # real text token, in original order, original RoPE
                                                  # positions unless method.renumber_positions is True.
Decode contract:
  keep = method.text_keep(ctx)                    # (B,) bool for the newest generated token at layers >=
                                                  # points[0] (KV-cache mode), or None = keep all
"""
import dataclasses
from typing import Any, Optional, Sequence

import jax


@dataclasses.dataclass
class ScoreContext:
  """What a method may look at when scoring at a drop point (all arrays for the CURRENT sequence).

  h        (B, T, H)  hidden state entering layer `layer`
  h_prev   (B, T, H)  hidden state entering layer `layer - 1` (only if method.needs_prev_hidden), else None
  positions(B, T)     RoPE positions of the current tokens
  valid    (B, T)     bool, real (non-padding) tokens
  image_mask (B, T)   bool, image tokens still present
  last_index (B,)     index (in the current sequence) of the last real prompt token
  layer    int        static, the drop point
  model               the Llava module (for its layers' weights and the predictors)
  rng      PRNG key   for random methods
  """
  h: Any
  h_prev: Optional[Any]
  positions: Any
  valid: Any
  image_mask: Any
  last_index: Any
  layer: int
  model: Any
  rng: Any = None


@dataclasses.dataclass
class TextContext:
  """Decode-time context for the newest token: h_new (B, 1, H) entering layer `layer`."""
  h_new: Any
  layer: int
  model: Any


class Sparsifier:
  """Base class = dense (no pruning). Subclasses override what they need. Instances are static
  (hashable by name and settings) so they can be jit static arguments."""
  name = 'dense'
  needs_prev_hidden = False
  renumber_positions = False

  def drop_points(self, model_cfg) -> Sequence[int]:
    return ()

  def keep_counts(self, n_image_tokens: int) -> Sequence[int]:
    return ()

  def score(self, i: int, ctx: ScoreContext) -> jax.Array:
    raise ValueError(f'{self.name} has no drop points; score() should not be called')

  def text_keep(self, ctx: TextContext):
    return None

  def describe(self) -> dict:
    """Settings for reports (JSON-able)."""
    return {'method': self.name}

  def __hash__(self):
    return hash((type(self).__name__, tuple(sorted(self.describe().items()))))

  def __eq__(self, other):
    return type(self) is type(other) and self.describe() == other.describe()
