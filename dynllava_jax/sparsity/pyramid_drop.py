"""PyramidDrop (Xing et al., 2024): after (1-based) layers 8, 16, 24 of a 32-layer LLM keep 50%, 25% and
12.5% of the ORIGINAL image tokens, ranked by the attention of the last instruction token (the last real
prompt token), recomputed with the NEXT layer's input_norm, q/k projections and RoPE, mean over heads.
Positions are renumbered contiguously after each drop (`renumber_positions=True`); drops happen only at
prefill.

For other depths the default drop layers scale with the model: round(L·{1/4, 1/2, 3/4}) (= 8, 16, 24 at
L = 32); an explicit `layers=(…)` (1-based "after layer" numbers = 0-based "entering layer" indices)
overrides it.
"""
from dynllava_jax.sparsity.base import ScoreContext, Sparsifier
from dynllava_jax.sparsity.fastv import query_attention, query_attention_flops, round_half_up

DEFAULT_FRACTIONS = (0.25, 0.5, 0.75)
DEFAULT_RATIOS = (0.5, 0.25, 0.125)


class PyramidDrop(Sparsifier):
  name = 'pdrop'
  needs_prev_hidden = False
  renumber_positions = True

  def __init__(self, layers=None, ratios=DEFAULT_RATIOS):
    ratios = tuple(float(r) for r in ratios)
    if layers is not None:
      layers = tuple(int(x) for x in layers)
      if len(layers) != len(ratios):
        raise ValueError(f'pdrop: {len(layers)} layers but {len(ratios)} ratios; give one ratio per layer')
    if any(not 0.0 < r <= 1.0 for r in ratios) or list(ratios) != sorted(ratios, reverse=True):
      raise ValueError(f'pdrop: ratios={ratios} must be in (0, 1] and non-increasing')
    self.layers, self.ratios = layers, ratios

  def drop_points(self, model_cfg):
    n_layers = model_cfg.llm.layers
    if self.layers is None:
      pts = tuple(max(1, round_half_up(n_layers * f)) for f in DEFAULT_FRACTIONS[:len(self.ratios)])
    else:
      pts = self.layers
    if list(pts) != sorted(set(pts)) or pts[0] < 1 or pts[-1] >= n_layers:
      raise ValueError(f'pdrop: drop layers {pts} must be strictly increasing and within [1, '
                       f'{n_layers - 1}] for a {n_layers}-layer LLM')
    return pts

  def keep_counts(self, n_image_tokens):
    return tuple(max(1, round_half_up(n_image_tokens * r)) for r in self.ratios)

  def score(self, i, ctx: ScoreContext):
    layer = ctx.model.language_model.layer_at(ctx.layer)
    return query_attention(layer, ctx.h, ctx.positions, ctx.valid, ctx.last_index)

  def scoring_flops(self, model_cfg, t, n, batch=1):
    return query_attention_flops(model_cfg.llm, t, batch)

  def describe(self):
    return {'method': self.name, 'layers': str(self.layers or 'scaled'), 'ratios': str(self.ratios)}
