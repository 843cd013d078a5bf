"""The visual-token slot: projectors by name (`model.projector`) and the one place that says how many visual
tokens a sample carries.

    proj = make_projector(mc, rngs=rngs)             # 'mlp2x_gelu' (LLaVA-1.5) | 'mqt' (MQT-LLaVA)
    n = num_visual_tokens(mc)                        # the LLM-side image tokens per image (default count)
    n = num_visual_tokens(mc, count=16)              # an MQT model at m = 16 (UserError outside 1..M, or
                                                     # on a projector without an elastic count)
    feats = proj(vision_features, count=None)        # (B, N_vision, width) -> (B, n, hidden)

A projector class declares `num_tokens(mc, count=None)` (`mqt`: m chosen per call, default M; `mlp2x_gelu`:
one token per patch, no count). Prompts, placeholder checks, FLOP / KV-byte accounting and the methods'
budgets all ask `num_visual_tokens`; a pre-LLM reducer (`reduces_visual`) turns the slot's n tokens into
its k (docs/architecture.md, "The visual-token slot").
"""
from flax import nnx

from dynllava_jax.errors import UserError
from dynllava_jax.model import layers as L
from dynllava_jax.model.mqt import MatryoshkaQueryProjector


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
      raise UserError(f'visual tokens m={count} asked of a model without the MQT projector '
                      '(model.projector=mlp2x_gelu emits one token per patch); drop the MQT option')
    return vision_feature_tokens(mc.vision)

  def __call__(self, x, count=None):
    return self.linear_2(L.gelu_exact(self.linear_1(x)))


PROJECTORS = {'mlp2x_gelu': MLP2xGelu, 'mqt': MatryoshkaQueryProjector}


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


def elastic(mc):
  """True when the projector takes a per-call token count (MQT)."""
  return mc.get('projector', 'mlp2x_gelu') == 'mqt'


def projector_flops(mc, count=None, batch=1):
  """Matmul FLOPs of the projector on `batch` images at `count` tokens (eval/flops.py asks here)."""
  if elastic(mc):
    from dynllava_jax.model.mqt import mqt_flops  # pylint: disable=g-import-not-at-top
    return mqt_flops(mc, count, batch)
  n, h = num_visual_tokens(mc, count), mc.llm.hidden
  return batch * (2 * n * mc.vision.width * h + 2 * n * h * h)


def visual_token_count(mc, method=None, count=None):
  """Visual tokens per image in one call: the projector's count (`count` = MQT m, checked: UserError
  outside 1..M or on a projector without an elastic count), then a pre-LLM reducer's k
  (`method.visual_tokens(n)` when `method.reduces_visual`)."""
  n = num_visual_tokens(mc, count)
  if method is not None and getattr(method, 'reduces_visual', False):
    n = int(method.visual_tokens(mc, n))
  return n
