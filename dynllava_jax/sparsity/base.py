"""The one interface every token-sparsification method implements, so all run through the same
prefill / decode code (`dynllava_jax.decode`).

A method prunes IMAGE tokens at prefill at a static list of drop points, and may prune GENERATED TEXT tokens
from one layer on (`text_layer`). Text tokens of the prompt are never dropped by these methods.

Prefill contract (the engine in `dynllava_jax.decode.prefill` calls these, all under jit, static shapes):
  points = method.drop_points(model_cfg)          # ascending 0-based layer indices p: the drop happens on
                                                  # the hidden state ENTERING layer p; () = dense
  k_i    = method.keep_counts(n_image_tokens)[i]  # image tokens still present after drop i (static ints,
                                                  # counted against the ORIGINAL image-token count), or
                                                  # None = threshold mode: keep every present image token
                                                  # whose score is > 0 (a data-dependent count)
  scores = method.score(i, ctx)                   # (B, T_cur) float: higher = keep; only entries where
                                                  # ctx.image_mask is True are compared. The engine keeps,
                                                  # per sample, the k_i best present image tokens (ties:
                                                  # the earlier token), every real text token and the last
                                                  # real token, in original order, original RoPE positions
                                                  # unless method.renumber_positions is True (then kept
                                                  # tokens are numbered 0, 1, 2, ... after each drop).
  method.validate(model_cfg, n_image_tokens)      # called once by the engine before anything runs
Decode contract:
  layer  = method.text_layer(model_cfg)           # int or None: generated tokens may be dropped from the
                                                  # layers >= layer (Dynamic-LLaVA: sparse_layer)
  keep   = method.text_keep(ctx)                  # ctx.h_new (B, S, H): hidden states of S generated tokens
                                                  # entering `text_layer` -> (B, S) bool, or None = keep
                                                  # all. KV-cache decoding calls it with S = 1 for the
                                                  # newest token; decoding without a cache with every
                                                  # generated token (the newest is kept regardless).
  logits = method.text_logits(ctx)                # (B, S, C) the scores behind text_keep, or None
                                                  # (recorded by generate(..., intermediates=True))
The engine splits the decoder into segments at sorted(set(drop_points) | {text_layer}); layers before the
first boundary keep a full KV cache, every later segment a compact cache of the tokens it kept.
"""
import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp


def keep_budget(n, ratio):
  """The one ⌊N·r⌋ budget (at least 1), e.g. 576 · 0.2 -> 115 (Dynamic-LLaVA's k, random / uniform)."""
  return max(1, int(math.floor(n * ratio + 1e-6)))


def top_k_mask(scores, eligible, k):
  """The one top-k rule: per sample the k best eligible entries (ties: the earlier index), or every
  eligible entry with score > 0 when k is None (threshold mode). scores (B, T), eligible (B, T) bool
  -> (B, T) bool."""
  if k is None:
    return eligible & (scores > 0)
  s = jnp.where(eligible, scores.astype(jnp.float32), -jnp.inf)
  b, t = s.shape
  order = jnp.argsort(-s, axis=-1, stable=True)
  rank = jnp.zeros((b, t), jnp.int32).at[jnp.arange(b)[:, None], order].set(
      jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
  return eligible & (rank < k)


@dataclasses.dataclass
class ScoreContext:
  """What a method may look at when scoring at a drop point (all arrays for the CURRENT sequence).

  The current sequence is packed: real tokens first, in original order, padding after.
  h        (B, T, H)  hidden state entering layer `layer`
  h_prev   (B, T, H)  hidden state entering layer `layer - 1` (only if method.needs_prev_hidden), else None
  positions(B, T)     RoPE positions of the current tokens
  valid    (B, T)     bool, real (non-padding) tokens
  image_mask (B, T)   bool, image tokens still present
  last_index (B,)     index (in the current sequence) of the last real token
  layer    int        static, the drop point
  model               the Llava module (for its layers' weights and the predictors)
  rng      PRNG key   for random methods
  n_image  int        static, image tokens per image in this call (MQT m, a reducer's k); None = the
                      model's count (`image_count(ctx)`)
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
  n_image: Optional[int] = None


def image_count(ctx):
  """Image tokens per image in the scored call: ctx.n_image, else the model's count."""
  return int(ctx.model.num_image_tokens if ctx.n_image is None else ctx.n_image)


@dataclasses.dataclass
class TextContext:
  """Decode-time context: h_new (B, S, H) hidden states of generated tokens entering layer `layer`."""
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

  def keep_counts(self, n_image_tokens: int) -> Sequence[Optional[int]]:
    return ()

  def score(self, i: int, ctx: ScoreContext) -> jax.Array:
    raise ValueError(f'{self.name} has no drop points; score() should not be called')

  def text_layer(self, model_cfg) -> Optional[int]:
    return None

  def validate(self, model_cfg, n_image_tokens: int) -> None:
    """Raises ValueError (one actionable line) if this method cannot run on this model."""
    for p in self.drop_points(model_cfg):
      if not 0 <= p < model_cfg.llm.layers:
        raise ValueError(f'{self.name}: drop point {p} must be in 0..{model_cfg.llm.layers - 1} (the hidden '
                         'state entering that decoder layer)')
    t = self.text_layer(model_cfg)
    if t is not None and not 0 <= t < model_cfg.llm.layers:
      raise ValueError(f'{self.name}: text_layer {t} must be in 0..{model_cfg.llm.layers - 1}')

  def text_keep(self, ctx: TextContext):
    return None

  def text_logits(self, ctx: TextContext):
    """The text rule's raw scores on ctx.h_new (B, S, H) -> (B, S, C) (decode intermediates), or None."""
    return None

  def scoring_flops(self, model_cfg, t, n, batch=1) -> int:
    """Extra FLOPs of one `score` call on a t-token sequence holding n image tokens (`eval.flops`)."""
    return 0

  def describe(self) -> dict:
    """Settings for reports (JSON-able)."""
    return {'method': self.name}

  def __hash__(self):
    return hash((type(self).__name__, tuple(sorted(self.describe().items()))))

  def __eq__(self, other):
    return type(self) is type(other) and self.describe() == other.describe()


@dataclasses.dataclass
class TrainContext:
  """What a method's training hook sees in one training forward (`train/forward.py`).

  model      the Llava module; batch: the training batch (input_ids, attention_mask, labels (B, T), …)
  tau        Gumbel temperature (traced scalar); rng: the forward's PRNG key or None (deterministic)
  noise      explicit noise arrays by name (tests) or None
  deterministic  evaluation: decisions as at inference (e.g. per-sample top-k), no noise
  step       the optimizer step (traced int32 scalar) or None outside the train step (schedules by step)
  """
  model: Any
  batch: Any
  tau: Any = 1.0
  rng: Any = None
  noise: Optional[dict] = None
  deterministic: bool = False
  step: Any = None


class TrainHook:
  """The training side of a method, looked up from the model config (`sparsity/registry.py::train_hooks`).
  The generic forward and step (`train/forward.py`, `train/step.py`) call, in order, for every hook:

    mask = hook.prepare(ctx, mask, out)       # input side: may take tokens out of the attention mask (B, T)
    keep = hook.decide(ctx, h, out, p)        # at each p in hook.layers(mc): h (B, T, H) entering p -> key-column
                                              # keep G (B, T) float (1 = kept; MaskedSoftmax in the layers
                                              # from there on), or None; writes its outputs into `out`
    sums = hook.sums(out, batch)              # additive per-batch sums (dict of scalars; micro-batches add)
    terms = hook.terms(sums, batch_size)      # its loss terms {name: scalar}, added to the CE by the step
    hook.metrics(sums), hook.eval_sums(out, batch)   # logged ratios; per-sample (B,) eval sums
    hook.temperature(config, step)            # the step's tau (traced), or None
  param_rules: ((regex over '/'-joined param paths, optimizer group), ...) for its own modules
  (`train/optim.py`). sparse_stage: the hook runs only in sparse steps (after train.dense_warmup_steps);
  its sums / terms / metrics are still reported (as zeros) in dense steps. masks_keys: decide returns a
  key mask (MoD layers then route without gathering)."""
  name = 'none'
  param_rules = ()
  sparse_stage = False
  masks_keys = False

  def layers(self, model_cfg) -> tuple:
    return ()

  def prepare(self, ctx: TrainContext, mask, out):
    return mask

  def decide(self, ctx: TrainContext, h, out, layer):
    return None

  def sums(self, out, batch) -> dict:
    return {}

  def terms(self, sums, batch_size) -> dict:
    return {}

  def metrics(self, sums) -> dict:
    return {}

  def eval_sums(self, out, batch) -> dict:
    return {}

  def temperature(self, config, step):
    return None
