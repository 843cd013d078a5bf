"""The visual-token slot: projectors by name (`model.projector`) and the one place that says how many visual
tokens a sample carries.

    proj = make_projector(mc, rngs=rngs)             # 'mlp2x_gelu' (LLaVA-1.5) today
    n = num_visual_tokens(mc)                        # the LLM-side image tokens per image
    feats = proj(vision_features, count=None)        # (B, N_vision, width) -> (B, n, hidden)

A projector class declares `num_tokens(mc, count=None)`: the tokens it emits for CLIP's selected features
(a Matryoshka-style projector may emit `count` tokens chosen per call; `mlp2x_gelu` maps each patch to one
token and takes no count). Prompts and placeholder checks (`data.pipeline`, `decode.request`), FLOP and
KV-byte accounting (`eval.flops`) and the methods' budgets all ask `num_visual_tokens`.
"""
from flax import nnx

from dynllava_jax.model import layers as L


def vision_feature_tokens(vc):
  """Tokens of CLIP's selected hidden state: (image_size / patch_size)² patches (+ CLS when 'full')."""
  return (vc.image_size // vc.patch_size) ** 2 + (1 if vc.feature_select == 'full' else 0)


class MLP2xGelu(nnx.Module):
  """LLaVA-1.5 `mlp2x_gelu`: Linear(vision→H) → GELU(exact) → Linear(H→H), one token per feature."""

  def __init__(self, mc, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, bias=True)
    self.linear_1 = L.dense(mc.vision.width, mc.llm.hidden, ('patch', 'embed'), **kw)
    self.linear_2 = L.dense(mc.llm.hidden, mc.llm.hidden, ('mlp', 'embed'), **kw)

  @staticmethod
  def num_tokens(mc, count=None):
    if count is not None:
      raise ValueError('model.projector=mlp2x_gelu emits one token per patch; it takes no token count')
    return vision_feature_tokens(mc.vision)

  def __call__(self, x, count=None):
    return self.linear_2(L.gelu_exact(self.linear_1(x)))


PROJECTORS = {'mlp2x_gelu': MLP2xGelu}


def projector_class(mc):
  name = mc.get('projector', 'mlp2x_gelu')
  if name not in PROJECTORS:
    raise ValueError(f'model.projector={name!r} unknown; known: {sorted(PROJECTORS)}')
  return PROJECTORS[name]


def make_projector(mc, *, dtype, param_dtype, rngs):
  return projector_class(mc)(mc, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def num_visual_tokens(mc, count=None):
  """Visual tokens (image placeholders) per image for model config `mc` (count: a per-call choice for
  projectors that allow one)."""
  return projector_class(mc).num_tokens(mc, count)
