"""Dynamic-LLaVA's learned sparsification at inference (docs/methods.md).

Image tokens: at `sparse_layer` the image predictor scores each sample's image tokens; scores are the keep
log-probability log_softmax(logits)[..., 0] and the engine keeps the top k = ⌊N_img·r_I⌋ (the paper's
"TopkArgmax", `topk=True`), or, with `topk=False` (the main text's plain argmax), the engine's threshold mode
keeps every image token with logit0 > logit1 (the score is then the margin logit0 − logit1).
Generated text: the output-text predictor on a token's hidden state entering `sparse_layer` keeps it iff
logit0 > logit1 (no rate control), for every layer from `sparse_layer` on (`model.sparse.text_layer` >= 0:
entering that layer instead, and from it on; -1 = sparse_layer, the released code). `text_margin=θ` (an option, not
the released rule; default 0 = the released rule exactly) keeps it iff logit0 − logit1 > θ instead: a
threshold calibrated on held-out answers so that the kept fraction matches the trained rate r_OT when the
predictor's margins are not bimodal (scripts/demo.py's `dynamic_cal` rows).
"""
import jax
import jax.numpy as jnp

from dynllava_jax.model.mod import compact
from dynllava_jax.sparsity.base import ScoreContext, Sparsifier, TextContext, image_count, keep_budget
from dynllava_jax.sparsity.dynamic_train import text_layer_of


def gather_image_tokens(h, image_mask, n):
  """Per sample, the first n tokens flagged in image_mask, in order.

  h (B, T, H), image_mask (B, T) bool -> (h_img (B, n, H), idx (B, n) int32 into T, present (B, n) bool).
  Samples with fewer flagged tokens get present=False in the tail (their idx point at other tokens).
  """
  idx, _, _ = compact(image_mask, n)     # n > T (a short text-only sequence): repeats of the last slot
  present = jnp.take_along_axis(image_mask, idx, axis=1) & (jnp.arange(n) < image_mask.shape[1])[None, :]
  return jnp.take_along_axis(h, idx[..., None], axis=1), idx, present


class DynamicSparsifier(Sparsifier):
  """image / text switch the two predictors; topk picks TopkArgmax (True) or plain argmax (False)."""

  def __init__(self, image=True, text=True, topk=True, keep_ratio=0.2, sparse_layer=None, text_margin=0.0):
    self.image, self.text, self.topk = bool(image), bool(text), bool(topk)
    self.text_margin = float(text_margin)
    self.keep_ratio = float(keep_ratio)
    self.sparse_layer = sparse_layer   # None = model_cfg.sparse.sparse_layer
    self.name = 'dynamic' if (self.image and self.text) else ('dynamic_image' if self.image else 'dynamic_text')
    if not (self.image or self.text):
      raise ValueError('DynamicSparsifier needs image=True or text=True (use the dense method for neither)')
    if not 0.0 < self.keep_ratio <= 1.0:
      raise ValueError(f'DynamicSparsifier keep_ratio={keep_ratio} must be in (0, 1]')

  def _layer(self, model_cfg):
    return int(model_cfg.sparse.sparse_layer if self.sparse_layer is None else self.sparse_layer)

  def drop_points(self, model_cfg):
    return (self._layer(model_cfg),) if self.image else ()

  def keep_counts(self, n_image_tokens):
    if not self.image:
      return ()
    return (keep_budget(n_image_tokens, self.keep_ratio) if self.topk else None,)

  def text_layer(self, model_cfg):
    """model.sparse.text_layer, or the image drop point when it is -1 (the released rule)."""
    return text_layer_of(model_cfg.sparse, self._layer(model_cfg)) if self.text else None

  def validate(self, model_cfg, n_image_tokens):
    super().validate(model_cfg, n_image_tokens)
    if not model_cfg.sparse.enabled:
      raise ValueError(f'{self.name} needs the keep-predictors: build the model with model.sparse.enabled=True '
                       '(or use the dense method)')

  def score(self, i, ctx: ScoreContext):
    n = image_count(ctx)
    h_img, idx, present = gather_image_tokens(ctx.h, ctx.image_mask, n)
    logits = ctx.model.image_score_predictor(h_img, present.astype(h_img.dtype))
    if self.topk:
      s = jax.nn.log_softmax(logits, axis=-1)[..., 0]
    else:
      s = logits[..., 0] - logits[..., 1]
    b = ctx.h.shape[0]
    out = jnp.zeros(ctx.h.shape[:2], jnp.float32)
    return out.at[jnp.arange(b)[:, None], jnp.where(present, idx, ctx.h.shape[1])].set(s, mode='drop')

  def text_logits(self, ctx: TextContext):
    """The output-text predictor's logits (B, S, 2) (index 0 = keep), or None without the text rule."""
    return ctx.model.output_text_score_predictor(ctx.h_new) if self.text else None

  def text_keep(self, ctx: TextContext):
    logits = self.text_logits(ctx)
    if logits is None:
      return None
    if self.text_margin == 0.0:
      return logits[..., 0] > logits[..., 1]
    return logits[..., 0] - logits[..., 1] > self.text_margin

  def scoring_flops(self, model_cfg, t, n, batch=1):
    """The image predictor on n image tokens (down, blocks, head)."""
    sc, h = model_cfg.sparse, model_cfg.llm.hidden
    d, ff = sc.d_model, sc.dim_feedforward
    block = 8 * n * d * d + 4 * n * n * d + 4 * n * d * ff
    head = 2 * n * (d * d // 2 + d // 2 * d // 4 + d // 4 * 2)
    return batch * (2 * n * h * d + sc.num_layers * block + head)

  def describe(self):
    return {'method': self.name, 'image': self.image, 'text': self.text, 'topk': self.topk,
            'keep_ratio': self.keep_ratio, 'sparse_layer': self.sparse_layer, 'text_margin': self.text_margin}
