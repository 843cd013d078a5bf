"""Dynamic-LLaVA's training side (docs/methods.md): its `TrainHook` (sparsity/base.py). No token is removed;
shapes are static. Inference: sparsity/dynamic.py.

At `sparse_layer` the predictors read the residual stream entering that layer → hard straight-through
Gumbel decisions (1 = keep) on the image tokens M_I (B, N), the qualifying last answer span M_OT (B, T)
and optionally the instruction span M_INS (M_OT entering `sparse.text_layer` instead when that is
set) → key-column keep mask G (B, T) → MaskedSoftmax in the layers
from there on. Batch keys used: has_image (B,) bool; image_start, instr_start, instr_end, answer_start,
answer_end (B,) int32. The decisions, the squared ratio losses (`reg_image`, `reg_answer`,
`reg_instruct`) and the choices against the release (text-only samples keep every token and count in the
batch mean): docs/training.md, "The method as trained here".
"""
import jax
import jax.numpy as jnp

from dynllava_jax.errors import UserError
from dynllava_jax.sparsity.base import TrainHook, keep_budget, top_k_mask

PREDICTORS = ('image_score_predictor', 'output_text_score_predictor', 'instruct_score_predictor')
_NAMES = ('image', 'answer', 'instruct')


def text_layer_of(sc, sparse_layer=None):
  """The layer the output-text decisions are taken entering: `sc.text_layer`, or the image drop point
  (`sparse_layer`, default sc.sparse_layer) when it is -1 (the released code)."""
  t = int(sc.get('text_layer', -1))
  if t >= 0:
    return t
  return int(sc.sparse_layer if sparse_layer is None else sparse_layer)


def tau_at(step, total, tau0=1.0, tau1=0.1):
  """tau = tau0 · (tau1 / tau0) ** (step / total) (the released per-optimizer-step schedule)."""
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / jnp.maximum(jnp.asarray(total, jnp.float32), 1.0), 0, 1)
  return tau0 * (tau1 / tau0) ** frac


def gumbel_keep(logits, tau, noise):
  """Hard straight-through keep decision: gumbel_softmax(log_softmax(logits), tau, hard=True)[..., 0].

  logits (..., 2) (index 0 = keep); noise (..., 2) Gumbel(0, 1) samples (zeros = deterministic argmax).
  Returns (...,) float32 in {0, 1} forward; the gradient is that of the soft sample.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  soft = jax.nn.softmax((logp + noise) / tau, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), 2, dtype=soft.dtype)
  return (hard - jax.lax.stop_gradient(soft) + soft)[..., 0]


def span_mask(start, end, t):
  """(B,) start/end -> (B, T) bool, start <= t < end."""
  idx = jnp.arange(t)[None, :]
  return (idx >= start[:, None]) & (idx < end[:, None])


def gather_tokens(h, start, n):
  """h (B, T, H), start (B,) -> h[b, start[b] : start[b] + n] (B, n, H); indices clipped to T - 1."""
  idx = jnp.clip(start[:, None] + jnp.arange(n)[None, :], 0, h.shape[1] - 1)
  return jnp.take_along_axis(h, idx[..., None], axis=1)


def _noise(ctx, name, shape):
  if ctx.noise is not None:
    return ctx.noise[name]
  if ctx.rng is None or ctx.deterministic:
    return jnp.zeros(shape, jnp.float32)
  key = jax.random.fold_in(ctx.rng, {'image': 0, 'answer': 1, 'instruct': 2}[name])
  return jax.random.gumbel(key, shape, jnp.float32)


def text_decisions(predictor, h, start, end, eligible, min_len, tau, noise):
  """Decisions of a text predictor over the span [start, end) of each sample.

  h (B, T, H) residual stream; eligible (B,) bool. Returns (m (B, T) with 1 outside the span or for
  samples that do not qualify, span (B, T) bool, qualifies (B,) bool, logits (B, T, 2)).
  The predictor has no token mixing, so it runs on every position (static shape) and only the span's
  decisions are used.
  """
  span = span_mask(start, end, h.shape[1])
  qual = eligible & ((end - start) >= min_len)
  logits = predictor(h)
  m = jnp.where(span & qual[:, None], gumbel_keep(logits, tau, noise), 1.0)
  return m, span, qual, logits


def topk_keep(logits, k):
  """Inference-style image decisions: per sample the k tokens with the highest keep log-prob -> (B, N)
  float32 in {0, 1}, no gradient (top_k_mask is a comparison)."""
  score = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[..., 0]
  return top_k_mask(score, jnp.ones(score.shape, bool), k).astype(jnp.float32)


def image_keep_columns(m_img, image_start, has_image, t):
  """Scatters M_I (B, N) to key columns (B, T) (1 outside the image span), differentiably (a gather)."""
  n = m_img.shape[1]
  rel = jnp.arange(t)[None, :] - image_start[:, None]
  inside = (rel >= 0) & (rel < n) & has_image[:, None]
  vals = jnp.take_along_axis(m_img, jnp.clip(rel, 0, n - 1), axis=1)
  return jnp.where(inside, vals, 1.0)


def _span_mean(m, span):
  return jnp.sum(jnp.where(span, m, 0.0), axis=1) / jnp.maximum(jnp.sum(span, axis=1), 1)


def ratio_sums(out, batch, sc):
  """Sums over the batch of the squared ratio terms and of the kept ratios (for logging): reg_image,
  reg_answer, reg_instruct (Σ_b of the squared terms), kept_image / n_image (Σ and count over samples with
  an image), kept_answer / n_answer (over qualifying samples), kept_instruct / n_instruct. Zeros for the
  decisions `out` lacks (a dense step)."""
  z = jnp.zeros((), jnp.float32)
  s = dict(reg_image=z, reg_answer=z, reg_instruct=z, kept_image=z, n_image=z, kept_answer=z,
           n_answer=z, kept_instruct=z, n_instruct=z)
  if 'm_img' in out:
    has = batch['has_image'].astype(jnp.float32)
    ratio = jnp.mean(out['m_img'], axis=1)
    s['reg_image'] = jnp.sum(has * (sc.image_keep_ratio - ratio) ** 2)
    s['kept_image'], s['n_image'] = jnp.sum(has * ratio), jnp.sum(has)
  for key, tgt, name in (('ot', sc.text_keep_ratio, 'answer'), ('ins', sc.instruct_keep_ratio, 'instruct')):
    if f'm_{key}' not in out:
      continue
    ratio = _span_mean(out[f'm_{key}'], out[f'{key}_span'])
    qual = out[f'{key}_qual']
    target = jnp.where(qual, tgt, jax.lax.stop_gradient(ratio))
    s[f'reg_{name}'] = jnp.sum((target - ratio) ** 2)
    q = qual.astype(jnp.float32)
    s[f'kept_{name}'], s[f'n_{name}'] = jnp.sum(q * ratio), jnp.sum(q)
  return s


class DynamicTrain(TrainHook):
  """Dynamic-LLaVA's training hook, set by the model config's `sparse` section."""
  name = 'dynamic'
  param_rules = (('^(' + '|'.join(PREDICTORS) + ')/', 'predictor'),)
  sparse_stage = True
  masks_keys = True

  def __init__(self, mc):
    self.sc = mc.sparse

  def layers(self, model_cfg):
    """sparse_layer (image and instruct decisions) and the output-text layer (`text_layer_of`)."""
    return tuple(sorted({int(self.sc.sparse_layer), text_layer_of(self.sc)}))

  def prepare(self, ctx, mask, out):
    if ctx.batch['pixel_values'].ndim == 5:
      raise UserError('Dynamic-LLaVA training (model.sparse.enabled) takes one image per sample: its image '
                      'predictor scores N tokens from image_start; frames (data.max_frames > 1) need dense=1')
    return mask

  def _hard(self, ctx):
    """Traced bool: this step takes the inference image decisions (`sparse.hard_from_step`), or None."""
    start = int(self.sc.get('hard_from_step', -1))
    if start < 0 or ctx.step is None or ctx.deterministic:
      return None
    return jnp.asarray(ctx.step) >= start

  def decide(self, ctx, h, out, layer):
    """The decisions on h (B, T, H) entering `layer` -> G (B, T): at sparse_layer image and instruct, at
    `text_layer_of(sc)` the output text. out gets m_img (B, N), m_ot / ot_span (B, T), ot_qual (B,),
    [m_ins / ins_span / ins_qual] and the predictor logits (image_logits (B, N, 2), ot_logits, ins_logits
    (B, T, 2)). Deterministic: image by per-sample top-k, k = ⌊N·r_I⌋ (no gradient). From
    `sparse.hard_from_step` on, training keeps the image top-k too (no gradient to the image predictor)."""
    sc, batch, model = self.sc, ctx.batch, ctx.model
    hard = self._hard(ctx)
    b, t = h.shape[:2]
    has_image = batch['has_image'].astype(bool)
    keep = jnp.ones((b, t), jnp.float32)
    at_sparse, at_text = layer == int(sc.sparse_layer), layer == text_layer_of(sc)
    if sc.use_image and at_sparse:
      n = model.num_image_tokens
      logits = model.image_score_predictor(gather_tokens(h, batch['image_start'], n))
      if ctx.deterministic:
        m_img = topk_keep(logits, keep_budget(n, sc.image_keep_ratio))
      else:
        m_img = gumbel_keep(logits, ctx.tau, _noise(ctx, 'image', (b, n, 2)))
        if hard is not None:
          m_img = jnp.where(hard, topk_keep(logits, keep_budget(n, sc.image_keep_ratio)), m_img)
      out['m_img'] = jnp.where(has_image[:, None], m_img, 1.0)
      out['image_logits'] = logits
      keep = keep * image_keep_columns(out['m_img'], batch['image_start'], has_image, t)
    for key, name, on, pred, lo, hi, min_len in (
        ('ot', 'answer', sc.use_output_text and at_text, 'output_text_score_predictor', 'answer_start',
         'answer_end', sc.len_ot),
        ('ins', 'instruct', sc.use_instruct and at_sparse, 'instruct_score_predictor', 'instr_start',
         'instr_end', sc.instruct_min_len)):
      if on:
        m, span, qual, out[f'{key}_logits'] = text_decisions(
            getattr(model, pred), h, batch[lo], batch[hi], has_image, min_len, ctx.tau,
            _noise(ctx, name, (b, t, 2)))
        out.update({f'm_{key}': m, f'{key}_span': span, f'{key}_qual': qual})
        keep = keep * m
    return keep

  def sums(self, out, batch):
    return ratio_sums(out, batch, self.sc)

  def terms(self, sums, batch_size):
    return {k: self.sc.lambda_ratio * sums[k] / batch_size for k in ('reg_image', 'reg_answer', 'reg_instruct')}

  def metrics(self, sums):
    """Mean kept ratio over samples with an image / qualifying spans (1.0 when none)."""
    return {f'kept_{n}': jnp.where(sums[f'n_{n}'] > 0, sums[f'kept_{n}'] / jnp.maximum(sums[f'n_{n}'], 1.0), 1.0)
            for n in _NAMES}

  def eval_sums(self, out, batch):
    """Per sample (B,): kept_image, n_image, kept_answer, n_answer (kept_* = the sample's kept ratio times
    its indicator n_*)."""
    zeros = jnp.zeros(batch['input_ids'].shape[:1], jnp.float32)
    res = dict(kept_image=zeros, n_image=zeros, kept_answer=zeros, n_answer=zeros)
    if 'm_img' in out:
      has = batch['has_image'].astype(jnp.float32)
      res.update(kept_image=has * jnp.mean(out['m_img'], axis=1), n_image=has)
    if 'm_ot' in out:
      q = out['ot_qual'].astype(jnp.float32)
      res.update(kept_answer=q * _span_mean(out['m_ot'], out['ot_span']), n_answer=q)
    return res

  def temperature(self, config, step):
    """τ annealed from tau0 to tau1 over the sparse steps (after train.dense_warmup_steps)."""
    t = config.train
    return tau_at(step - t.dense_warmup_steps, max(t.steps - t.dense_warmup_steps, 1), self.sc.tau0, self.sc.tau1)
