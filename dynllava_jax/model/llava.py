"""LLaVA-1.5 composition: CLIP tower → projector → merge into text embeddings → LLaMA → logits.

Public call (dense):
    logits = model(input_ids, pixel_values, attention_mask)     # (B, T, vocab) float32
input_ids (B, T) int32 with one `image_token_id` placeholder per image token (HF transformers 5.x style);
pixel_values (B, H, W, 3) float32, CLIP-normalised (ignored for rows without placeholders);
attention_mask (B, T) 1 = real token, 0 = padding (left or right).

The pieces (`image_features`, `embed`, `llm.run_layers`, `llm.head`) are public so training (keep masks),
prefill (gathers) and decoding (caches) compose them without copies of the model code.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynllava_jax.errors import UserError
from dynllava_jax.model import layers as L
from dynllava_jax.model.attention import ATTENTION_IMPLS, causal_allowed, resolve_impl
from dynllava_jax.model import mod as M
from dynllava_jax.model import plan as P
from dynllava_jax.model.llama import LAYER_KINDS, Llama
from dynllava_jax.model.predictors import ImagePredictor, TextPredictor
from dynllava_jax.model.projector import make_projector, num_visual_tokens, visual_token_count
from dynllava_jax.model.vision import VisionTower, select_features


def check_model_config(mc):
  """Raises ValueError (one actionable line) for impossible model configs."""
  lc, vc, sc = mc.llm, mc.vision, mc.sparse
  if lc.hidden % lc.heads or lc.heads % lc.kv_heads:
    raise ValueError(f'llm.heads={lc.heads} must divide hidden={lc.hidden} and be a multiple of '
                     f'kv_heads={lc.kv_heads}')
  if lc.head_dim % 2:
    raise ValueError(f'llm.head_dim={lc.head_dim} must be even for RoPE')
  if vc.image_size % vc.patch_size or vc.width % vc.heads:
    raise ValueError(f'vision: image_size={vc.image_size} must be a multiple of patch_size='
                     f'{vc.patch_size} and heads={vc.heads} must divide width={vc.width}')
  if int(mc.get('scan_unroll', 1)) < 1:
    raise ValueError(f'scan_unroll={mc.scan_unroll} must be >= 1 (decoder layers per scan iteration)')
  if not 0 < mc.image_token_id < lc.vocab_size:
    raise ValueError(f'image_token_id={mc.image_token_id} is outside the vocabulary ({lc.vocab_size})')
  if not 0 <= int(lc.get('text_vocab_size', 0) or 0) <= lc.vocab_size:
    raise ValueError(f'llm.text_vocab_size={lc.text_vocab_size} must be in [0, vocab_size={lc.vocab_size}] '
                     '(0: every id is a text id)')
  if sc.enabled:
    if not 0 <= sc.sparse_layer < lc.layers:
      raise ValueError(f'sparse.sparse_layer={sc.sparse_layer} must be in [0, llm.layers={lc.layers})')
    if not -1 <= int(sc.get('text_layer', -1)) < lc.layers:
      raise ValueError(f'sparse.text_layer={sc.text_layer} must be -1 (= sparse_layer) or in '
                       f'[0, llm.layers={lc.layers})')
    for name in ('image_keep_ratio', 'text_keep_ratio', 'instruct_keep_ratio'):
      r = sc[name]
      if not 0.0 < r <= 1.0:
        raise ValueError(f'sparse.{name}={r} must be in (0, 1]')
  if mc.get('projector', 'mlp2x_gelu') == 'mqt':
    from dynllava_jax.model.mqt import check_mqt_config  # pylint: disable=g-import-not-at-top
    check_mqt_config(mc)
  elif 'mqt' in mc and mc.mqt.get('sample_m', False):
    raise ValueError(f'mqt.sample_m=True needs the MQT projector (model.projector=mqt); this model has '
                     f"model.projector={mc.get('projector', 'mlp2x_gelu')}")
  if mc.attention not in ('masked_softmax_eps', 'exact_zero'):
    raise ValueError(f"model.attention={mc.attention!r}: use 'masked_softmax_eps' or 'exact_zero'")
  if mc.get('attention_impl', 'auto') not in ATTENTION_IMPLS:
    raise ValueError(f'model.attention_impl={mc.attention_impl!r}: use one of {ATTENTION_IMPLS}')
  groups = P.resolve(mc, LAYER_KINDS)      # layer plan, MoD layers, region, LoRA ranks: one line each
  if P.kind_layers(groups, M.KIND):
    M.check(mc)
    if mc.get('projector', 'mlp2x_gelu') == 'mqt':
      raise UserError('MoD layers (model.mod / mod in model.layer_plan) with the MQT projector: not '
                      'supported (MQT pads frames to M tokens); use model.projector=mlp2x_gelu')
  lora = mc.get('lora')
  if lora is not None and not 0.0 <= float(lora.get('dropout', 0.0)) < 1.0:
    raise ValueError(f'model.lora.dropout={lora.dropout} must be in [0, 1)')
  if int(mc.get('causal_chunk', 0)) < 0:
    raise ValueError(f'model.causal_chunk={mc.causal_chunk} must be >= 0 (0: no chunking)')


def positions_from_mask(attention_mask):
  """RoPE positions that ignore padding: cumsum(mask) − 1, clipped at 0. (B, T) int32."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def dense_allowed(attention_mask):
  """Causal ∧ key-is-real mask (B, T, T) for a full sequence."""
  b, t = attention_mask.shape
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return causal_allowed(idx, idx, attention_mask)


def check_placeholders(mc, input_ids, n=None, frames=None):
  """Eager calls only (a no-op under jit): every row holds 0 or exactly N image placeholders (n: this
  call's count, default `num_visual_tokens(mc)`) — with `frames` F (pixel_values (B, F, H, W, 3)) a
  multiple of N up to F·N, one span per frame — else a UserError in one line (a short row would silently
  use only its first features)."""
  if isinstance(input_ids, jax.core.Tracer):
    return
  n = num_visual_tokens(mc) if n is None else n
  counts = (np.asarray(input_ids) == mc.image_token_id).sum(-1).reshape(-1)   # numpy: never staged
  if frames is not None:
    bad = np.flatnonzero((counts % n != 0) | (counts > frames * n))
    if bad.size:
      c = int(counts[bad[0]])
      raise UserError(f'sample {int(bad[0])} has {c} image placeholders (image_token_id={mc.image_token_id}); '
                      f'with {frames} frames this model needs {n} per frame, at most {frames * n}')
    return
  bad = np.flatnonzero((counts != 0) & (counts != n))
  if bad.size:
    raise UserError(f'sample {int(bad[0])} has {int(counts[bad[0]])} image placeholders '
                    f'(image_token_id={mc.image_token_id}); this model needs exactly {n} per image '
                    '(or 0 for a text-only sample)')


def merge_image_features(text_emb, image_feats, image_mask):
  """Static-shape merge: the j-th placeholder of sample b gets image_feats[b, j].

  text_emb (B, T, H); image_feats (B, N, H); image_mask (B, T) bool. Rows without placeholders are untouched.
  """
  n = image_feats.shape[1]
  idx = jnp.clip(jnp.cumsum(image_mask.astype(jnp.int32), axis=-1) - 1, 0, n - 1)
  gathered = jnp.take_along_axis(image_feats, idx[..., None], axis=1)
  return jnp.where(image_mask[..., None], gathered.astype(text_emb.dtype), text_emb)


class Llava(nnx.Module):

  def __init__(self, mc, *, rngs):
    check_model_config(mc)
    self.mc = mc
    dtype, pdt = L.dtype_of(mc.dtype), L.dtype_of(mc.param_dtype)
    kw = dict(dtype=dtype, param_dtype=pdt, rngs=rngs)
    self.vision_tower = VisionTower(mc.vision, **kw)
    self.projector = make_projector(mc, **kw)
    self.language_model = Llama(mc.llm, plan=P.resolve(mc, LAYER_KINDS), lora=mc.get('lora'),
                                attention_impl=resolve_impl(mc.get('attention_impl', 'auto')),
                                scan_unroll=mc.get('scan_unroll', 1), **kw)
    sc = mc.sparse
    if sc.enabled:
      self.image_score_predictor = ImagePredictor(mc.llm.hidden, sc, **kw)
      self.output_text_score_predictor = TextPredictor(mc.llm.hidden, sc, **kw)
      if sc.use_instruct:
        self.instruct_score_predictor = TextPredictor(mc.llm.hidden, sc, **kw)

  @property
  def num_image_tokens(self):
    return num_visual_tokens(self.mc)

  def image_features(self, pixel_values, count=None):
    """(B, H, W, 3) -> projected image tokens (B, N, hidden), N = `num_visual_tokens(mc, count)`;
    frames (B, F, H, W, 3) -> (B, F·N, hidden), frame after frame."""
    if pixel_values.ndim == 5:
      b, f = pixel_values.shape[:2]
      feats = self.image_features(pixel_values.reshape((b * f,) + pixel_values.shape[2:]), count)
      return feats.reshape(b, f * feats.shape[1], feats.shape[2])
    hidden = self.vision_tower(pixel_values, remat=self.mc.remat)
    feats = select_features(hidden, self.mc.vision.feature_select)
    return self.projector(feats, count)

  def visual_tokens(self, pixel_values, count=None, method=None):
    """The visual-token slot for one call -> (B, n, hidden): the projector at `count` (MQT m; None = its
    default), then `method.reduce_visual` when the method is a pre-LLM reducer (VisionZip, DivPrune)."""
    if method is not None and getattr(method, 'reduces_visual', False):
      if pixel_values.ndim == 5:
        raise UserError(f'{method.name} reduces one image at a time: give pixel_values (B, H, W, 3)')
      return method.reduce_visual(self, pixel_values, count)
    return self.image_features(pixel_values, count)

  def embed(self, input_ids, pixel_values=None, count=None, method=None):
    """Token embeddings with image features merged at the placeholders -> (h (B, T, H), image_mask).
    count / method: this call's visual-token slot (`visual_tokens`); prompts carry that many placeholders."""
    if pixel_values is not None:
      check_placeholders(self.mc, input_ids, visual_token_count(self.mc, method, count),
                         pixel_values.shape[1] if pixel_values.ndim == 5 else None)
    image_mask = input_ids == self.mc.image_token_id
    h = self.language_model.embed_tokens(input_ids)
    if pixel_values is not None:
      h = merge_image_features(h, self.visual_tokens(pixel_values, count, method), image_mask)
    return h, image_mask

  @property
  def has_mod(self):
    """Whether the layer plan holds MoD layers (`model/mod.py`)."""
    return bool(P.kind_layers(self.language_model.plan, M.KIND))

  def route(self, image_mask, pixel_values, count=None, method=None, real=None):
    """The MoD layers' `mod.Route` for a forward (None without MoD layers or without images). real (B, T)
    bool: training gathers the routed real tokens (`mod.make_route`)."""
    if not self.has_mod or pixel_values is None:
      return None
    return M.make_route(self.mc, image_mask, visual_token_count(self.mc, method, count),
                        M.frames_of(pixel_values), real, self.language_model.attention_impl)

  def __call__(self, input_ids, pixel_values=None, attention_mask=None, positions=None, *,
               intermediates=False, visual_tokens=None, method=None):
    """Dense forward -> logits (B, T, vocab) float32; with intermediates=True -> (logits, aux), aux =
    {'hidden_in', 'hidden_out'}: each decoder layer's input and output (L, B, T, H) (nothing extra is
    computed or kept when False). visual_tokens: MQT m (prompts with m placeholders); method: a pre-LLM
    reducer (VisionZip / DivPrune: prompts with its k placeholders)."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if positions is None:
      positions = positions_from_mask(attention_mask)
    h, image_mask = self.embed(input_ids, pixel_values, visual_tokens, method)
    out = self.language_model.run_layers(h, positions, dense_allowed(attention_mask), mode=self.mc.attention,
                                         remat=self.mc.remat, intermediates=intermediates,
                                         route=self.route(image_mask, pixel_values, visual_tokens, method))
    if not intermediates:
      return self.language_model.head(out)
    h, h_in = out
    return self.language_model.head(h), {'hidden_in': h_in,
                                         'hidden_out': jnp.concatenate([h_in[1:], h[None]], axis=0)}
