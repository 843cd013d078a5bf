"""Dynamic-LLaVA training forward and loss (docs/methods.md). No token is removed; shapes are static.

    out = train_forward(model, batch, tau=tau, rng=key)          # sparse (config.model.sparse.enabled)
    sums = loss_sums(out, batch, model.mc.sparse)                # per-batch sums (see below)
    loss, terms = combine(sums, n_tokens, batch_size, lam)

Flow: embed → layers [0, sparse_layer) → predictors on the residual stream entering `sparse_layer` →
hard straight-through Gumbel decisions → key-column keep mask G (B, T) → layers [sparse_layer, L) with
MaskedSoftmax (`model/attention.py::masked_softmax`) → head.

Batch keys used: input_ids, attention_mask, labels (B, T) int32; pixel_values (B, H, W, 3); has_image (B,)
bool; image_start, instr_start, instr_end, answer_start, answer_end (B,) int32.

Decisions (1 = keep), per sample b:
  image    M_I (B, N): Gumbel decisions over the N image tokens starting at image_start[b]; samples
           without an image keep everything (M_I = 1) and their predictor output is ignored.
  answer   M_OT (B, T): on the last answer span [answer_start, answer_end) only, and only when the
           sample has an image and the span has >= len_ot tokens ("qualifies"); 1 elsewhere.
  instruct M_INS (B, T): same on [instr_start, instr_end) with instruct_min_len (off by default).
Text-only samples keep every token (the released code instead skips the predictors for a whole batch that
has one text-only sample).

MQT-LLaVA (`model.projector='mqt'`): prompts carry M placeholders and the projector emits M tokens; one m
per forward (`mqt.train_count`: M in stage 1, uniform over {2, 4, …, M} in stage 2 from the forward's key)
and the image tokens past the first m leave the attention mask (no key, no RoPE position): the forward
equals one on an m-placeholder prompt (tests/test_mqt.py). Padding to M keeps one compiled program for
every m (buckets would compile up to M/2 programs and change the batch shapes between steps); the cost is
the LLM work on M − m masked tokens. Their labels are ignored (image tokens carry no label); a labelled
token right after the image would be scored from the last padding slot (not the case in LLaVA's templates:
the image sits in the user turn).

Loss (the released code; squared): token-mean CE (shifted, labels -100 ignored)
  + λ·mean_b q_b·(r_I − mean_i M_I[b, i])²              q_b = has_image[b]
  + λ·mean_b (t_b − mean_{i∈span} M_OT[b, i])²          t_b = r_OT if qualifies else stop_grad(own mean)
  (+ the same for instruct when enabled).
Choice for text-only samples: they contribute 0 to the image term but count in the batch mean (B), exactly
like short answers in the output-text term. An empty answer span has mean 0 / max(len, 1) = 0: no NaN.
"""
import jax
import jax.numpy as jnp

from dynllava_jax.errors import UserError
from dynllava_jax.model import mqt
from dynllava_jax.model.llava import dense_allowed, positions_from_mask
from dynllava_jax.model.vocab import mask_padded, text_vocab_size
from dynllava_jax.sparsity.base import keep_budget, top_k_mask

IGNORE = -100


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


def _noise(rng, noise, name, shape):
  if noise is not None:
    return noise[name]
  if rng is None:
    return jnp.zeros(shape, jnp.float32)
  key = jax.random.fold_in(rng, {'image': 0, 'answer': 1, 'instruct': 2}[name])
  return jax.random.gumbel(key, shape, jnp.float32)


def text_decisions(predictor, h, start, end, eligible, min_len, tau, noise):
  """Decisions of a text predictor over the span [start, end) of each sample.

  h (B, T, H) residual stream; eligible (B,) bool. Returns (m (B, T) with 1 outside the span or for
  samples that do not qualify, span (B, T) bool, qualifies (B,) bool, logits (B, T, 2)).
  The predictor has no token mixing, so it runs on every position (static shape) and only the span's
  decisions are used.
  """
  t = h.shape[1]
  span = span_mask(start, end, t)
  qual = eligible & ((end - start) >= min_len)
  logits = predictor(h)
  keep = gumbel_keep(logits, tau, noise)
  m = jnp.where(span & qual[:, None], keep, 1.0)
  return m, span, qual, logits


def topk_keep(logits, k):
  """Inference-style image decisions: per sample the k tokens with the highest keep log-prob -> (B, N)."""
  score = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[..., 0]
  return top_k_mask(score, jnp.ones(score.shape, bool), k).astype(jnp.float32)


def image_decisions(model, h, batch, tau, noise, topk=False):
  """Image-predictor decisions M_I (B, N) (1 for samples without an image) and its logits (B, N, 2).

  topk: keep exactly floor(N·r_I) tokens per sample (the prefill's TopkArgmax; no gradient) instead of
  Gumbel decisions."""
  n = model.num_image_tokens
  x = gather_tokens(h, batch['image_start'], n)
  logits = model.image_score_predictor(x)
  if topk:
    keep = topk_keep(logits, keep_budget(n, model.mc.sparse.image_keep_ratio))
  else:
    keep = gumbel_keep(logits, tau, noise)
  return jnp.where(batch['has_image'][:, None], keep, 1.0), logits


def image_keep_columns(m_img, image_start, has_image, t):
  """Scatters M_I (B, N) to key columns (B, T) (1 outside the image span), differentiably (a gather)."""
  n = m_img.shape[1]
  rel = jnp.arange(t)[None, :] - image_start[:, None]
  inside = (rel >= 0) & (rel < n) & has_image[:, None]
  vals = jnp.take_along_axis(m_img, jnp.clip(rel, 0, n - 1), axis=1)
  return jnp.where(inside, vals, 1.0)


def train_forward(model, batch, *, tau=1.0, rng=None, noise=None, sparse=None, remat=None,
                  image_topk=False):
  """Training forward. Returns a dict: logits (B, T, V) fp32 (ids >= model.llm.text_vocab_size at NEG_INF,
  `model/vocab.py`), and when sparse: keep (B, T) G, m_img (B, N),
  m_ot / ot_span (B, T), ot_qual (B,), [m_ins / ins_span / ins_qual], the predictor logits.

  rng: PRNG key for the Gumbel noise, or `noise` = {'image': (B, N, 2), 'answer': (B, T, 2),
  'instruct': (B, T, 2)} given explicitly (tests); neither = zero noise (deterministic argmax decisions).
  sparse None = config.model.sparse.enabled. Dense mode: plain LLaVA forward.
  image_topk: image decisions by per-sample top-k (evaluation, as at inference) instead of Gumbel.
  """
  mc = model.mc
  sc = mc.sparse
  sparse = sc.enabled if sparse is None else sparse
  remat = mc.remat if remat is None else remat
  ids, mask = batch['input_ids'], batch['attention_mask']
  b, t = ids.shape
  mqt_m = None
  if mc.get('projector', 'mlp2x_gelu') == 'mqt':
    # MQT-LLaVA: M placeholders and M projector tokens (static shapes, one program for every m); the
    # image tokens past the first m leave the attention mask, so layers, positions and loss see m tokens.
    mqt_m = mqt.train_count(mc, rng)
    mask = mask * ~mqt.padding_slots(ids == mc.image_token_id, mqt_m)
  positions = positions_from_mask(mask)
  allowed = dense_allowed(mask)
  lm = model.language_model
  h, image_mask = model.embed(ids, batch['pixel_values'])
  # MoD layers (model/mod.py): routed per frame; dense training gathers their routed tokens
  route = model.route(image_mask, batch['pixel_values'], real=None if sparse else mask.astype(bool))
  if not sparse:
    h = lm.run_layers(h, positions, allowed, mode=mc.attention, remat=remat, route=route)
    out = {'logits': mask_padded(lm.head(h), text_vocab_size(mc))}
    if mqt_m is not None:
      out['mqt_m'] = mqt_m
    return out
  if batch['pixel_values'].ndim == 5:
    raise UserError('Dynamic-LLaVA training (model.sparse.enabled) takes one image per sample: its image '
                    'predictor scores N tokens from image_start; frames (data.max_frames > 1) need dense=1')
  k = sc.sparse_layer
  h = lm.run_layers(h, positions, allowed, start=0, stop=k, mode=mc.attention, remat=remat, route=route)
  out = {}
  has_image = batch['has_image'].astype(bool)
  keep = jnp.ones((b, t), jnp.float32)
  if sc.use_image:
    n = model.num_image_tokens
    m_img, out['image_logits'] = image_decisions(model, h, batch, tau, _noise(rng, noise, 'image', (b, n, 2)),
                                                 topk=image_topk)
    out['m_img'] = m_img
    keep = keep * image_keep_columns(m_img, batch['image_start'], has_image, t)
  if sc.use_output_text:
    m, span, qual, out['ot_logits'] = text_decisions(
        model.output_text_score_predictor, h, batch['answer_start'], batch['answer_end'], has_image,
        sc.len_ot, tau, _noise(rng, noise, 'answer', (b, t, 2)))
    out.update(m_ot=m, ot_span=span, ot_qual=qual)
    keep = keep * m
  if sc.use_instruct:
    m, span, qual, out['ins_logits'] = text_decisions(
        model.instruct_score_predictor, h, batch['instr_start'], batch['instr_end'], has_image,
        sc.instruct_min_len, tau, _noise(rng, noise, 'instruct', (b, t, 2)))
    out.update(m_ins=m, ins_span=span, ins_qual=qual)
    keep = keep * m
  h = lm.run_layers(h, positions, allowed, start=k, key_keep=keep, mode=mc.attention, remat=remat,
                    route=route)
  out['logits'] = mask_padded(lm.head(h), text_vocab_size(mc))
  out['keep'] = keep
  if mqt_m is not None:
    out['mqt_m'] = mqt_m
  return out


def ce_sums(logits, labels):
  """Shifted CE: (sum of -log p over labelled targets, number of labelled targets, per-token loss (B, T-1),
  target mask (B, T-1))."""
  lg, tgt = logits[:, :-1], labels[:, 1:]
  valid = tgt != IGNORE
  logp = jax.nn.log_softmax(lg, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, tgt, 0)[..., None], axis=-1)[..., 0]
  nll = jnp.where(valid, nll, 0.0)
  return jnp.sum(nll), jnp.sum(valid), nll, valid


def _span_mean(m, span):
  length = jnp.sum(span, axis=1)
  return jnp.sum(jnp.where(span, m, 0.0), axis=1) / jnp.maximum(length, 1)


def ratio_sums(out, batch, sc):
  """Sums over the batch of the squared ratio terms and of the kept ratios (for logging).

  Returns a dict of scalars: reg_image, reg_answer, reg_instruct (Σ_b of the squared terms),
  kept_image / n_image (Σ and count over samples with an image), kept_answer / n_answer (over qualifying
  samples), kept_instruct / n_instruct.
  """
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


def loss_sums(out, batch, sc):
  """All additive per-batch sums: ce_sum, n_tokens and `ratio_sums` (empty ratios when dense)."""
  ce, n, nll, valid = ce_sums(out['logits'], batch['labels'])
  s = ratio_sums(out, batch, sc)
  per_sample = jnp.sum(nll, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1)
  s.update(ce_sum=ce, n_tokens=n.astype(jnp.float32), ce_sample_sum=jnp.sum(per_sample))
  return s


def combine(sums, n_tokens, batch_size, lam, ce_weighting='token'):
  """Loss from sums with global normalisers (so micro-batches add up to the full-batch loss).

  ce_weighting: 'token' (the released recipe: CE averaged over every labelled token of the batch) or
  'sample' (each sample's own token-mean CE, averaged over samples: long answers no longer dominate).

  Returns (loss, terms): loss = ce_sum / n_tokens + λ·(reg_image + reg_answer + reg_instruct) / B;
  terms: ce, reg_image, reg_answer, reg_instruct (each already λ-weighted and normalised).
  """
  nt = jnp.maximum(n_tokens, 1.0)
  if ce_weighting == 'token':
    terms = {'ce': sums['ce_sum'] / nt}
  elif ce_weighting == 'sample':
    terms = {'ce': sums['ce_sample_sum'] / batch_size}
  else:
    raise ValueError(f"train.ce_weighting={ce_weighting!r}: use 'token' or 'sample'")
  for k in ('reg_image', 'reg_answer', 'reg_instruct'):
    terms[k] = lam * sums[k] / batch_size
  loss = terms['ce'] + terms['reg_image'] + terms['reg_answer'] + terms['reg_instruct']
  return loss, terms
