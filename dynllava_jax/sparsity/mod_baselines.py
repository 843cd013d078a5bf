"""The "drop for good" baseline of VideoLLM-MoD at equal capacity (docs/mod.md): instead of letting vision
tokens skip the MoD layers, drop image tokens once, at the first MoD layer's depth, keeping as many as make
the LLM's vision-token work equal to MoD's.

    drop_equal_flops   DropEqualFlops   overrides: r, layers, sparse_layer   (defaults: model.mod.r,
                                        model.mod.layers or 'interleave', the first MoD layer)

Equal capacity (docs/mod.md): k' = round((N·(L − M) + k·M − N·p) / (L − p)) clipped to [1, N], kept at the
stride centres (`uniform.stride_table`); on a model without MoD layers (the engine refuses drops on one).
"""
from dynllava_jax.model import mod as M
from dynllava_jax.sparsity import registry
from dynllava_jax.sparsity.uniform import UniformKeep


def equal_keep(n, n_layers, mod_layers, r, p):
  """k' image tokens kept from layer p on so that Σ_layers vision tokens equals MoD's."""
  k = M.routed_count(n, r)
  m = len(mod_layers)
  if not 0 <= p < n_layers:
    raise ValueError(f'drop_equal_flops: sparse_layer={p} must be in [0, {n_layers})')
  total = n * (n_layers - m) + k * m
  return max(1, min(n, int(round((total - n * p) / (n_layers - p)))))


class DropEqualFlops(UniformKeep):
  """UniformKeep at `sparse_layer` with the equal-capacity count (its keep_ratio = k'/N for N = n_ref)."""
  name = 'drop_equal_flops'

  def __init__(self, sparse_layer=1, r=0.2, layers=(1,), n_layers=2, seed=0):
    self.r, self.layers, self.n_layers = float(r), tuple(int(i) for i in layers), int(n_layers)
    if not 0.0 < self.r <= 1.0:
      raise ValueError(f'drop_equal_flops: r={r} must be in (0, 1]')
    super().__init__(sparse_layer=sparse_layer, keep_ratio=1.0, seed=seed)

  def keep_counts(self, n_image_tokens):
    return (equal_keep(n_image_tokens, self.n_layers, self.layers, self.r, self.sparse_layer),)

  def describe(self):
    return {'method': self.name, 'sparse_layer': self.sparse_layer, 'r': self.r,
            'layers': ','.join(map(str, self.layers)), 'n_layers': self.n_layers}


def make_drop_equal_flops(cfg, **overrides):
  mc = cfg.model if 'model' in cfg else cfg
  c = M.settings(mc)
  n_layers = mc.llm.layers
  layers = M.mod_layers(overrides.pop('layers', None) or c.layers or 'interleave', n_layers)
  if not layers:
    raise ValueError('drop_equal_flops: no MoD layers to match (set model.mod.layers)')
  r = float(overrides.pop('r', c.r))
  p = int(overrides.pop('sparse_layer', layers[0]))
  return DropEqualFlops(sparse_layer=p, r=r, layers=layers, n_layers=n_layers, **overrides)


registry.register('drop_equal_flops', make_drop_equal_flops)
