"""The training forward and loss, generic over methods: each method's training side is a `TrainHook`
(sparsity/base.py) found from the model config (`sparsity/registry.py::train_hooks`): Dynamic-LLaVA's
decisions and ratio losses (sparsity/dynamic_train.py), MQT-LLaVA's m draw (model/mqt.py::MQTTrain).
No token is removed; shapes are static.

    hooks = train_hooks(model.mc)
    out = train_forward(model, batch, tau=tau, rng=key, hooks=hooks)   # sparse: config.model.sparse.enabled
    sums = loss_sums(out, batch, hooks)                                # additive per-batch sums
    loss, terms = combine(sums, n_tokens, batch_size, hooks)           # CE + each hook's terms

Flow: mask ← every hook's `prepare` → embed → layers (`model/walk.py`, 'mask keys'), split at the hooks'
`layers`: there `decide` reads the hidden state and returns a key-column keep mask G (B, T) (multiplied
over hooks) that the later layers apply with MaskedSoftmax → head. MoD layers (model/mod.py) route with the forward's `Llava.route`.

Batch keys used: input_ids, attention_mask, labels (B, T) int32; pixel_values (B, H, W, 3) (+ the hooks'
keys, e.g. Dynamic-LLaVA's spans); optional head_index (B, K) int32: the LM head runs at these positions
only (`head_index`, train.head_positions), and the loss reads the logits there.
"""
import jax
import jax.numpy as jnp
import numpy as np

from dynllava_jax.errors import UserError
from dynllava_jax.model.llava import dense_allowed, positions_from_mask
from dynllava_jax.model.vocab import mask_padded, text_vocab_size
from dynllava_jax.model.walk import KeyMask, walk
from dynllava_jax.sparsity.base import TrainContext
from dynllava_jax.sparsity.registry import train_hooks

IGNORE = -100
MIN_HEAD_BUCKET = 16


def head_index(labels, k, n_max=None):
  """The positions the LM head must run at for the loss (numpy, host side): per sample the positions p
  whose next token p + 1 is labelled, in order, padded with unlabelled positions to K columns.

  labels (B, T) int; k: train.head_positions — K > 0 a fixed width (a sample with more labelled targets is
  one UserError), -1 the batch's largest count rounded up to a power of two (>= 16, <= T - 1: a few buckets,
  so a few compiles). n_max: the largest count over every process's part (multi-host), else this batch's.
  Returns (B, K) int32. The loss over these positions equals the loss over all positions.
  """
  valid = np.asarray(labels)[:, 1:] != IGNORE                      # (B, T-1): p predicts p + 1
  n = int(valid.sum(axis=1).max(initial=0)) if n_max is None else int(n_max)
  t = valid.shape[1]
  if k < 0:
    k = min(t, max(MIN_HEAD_BUCKET, 1 << max(n - 1, 0).bit_length()))
  elif n > k:
    raise UserError(f'train.head_positions={k}: a sample of this batch has {n} labelled tokens; set it '
                    '>= the longest answer, -1 (per-batch buckets) or 0 (the head at every position)')
  k = min(k, t)
  return np.argsort(~valid, axis=1, kind='stable')[:, :k].astype(np.int32)


def train_forward(model, batch, *, tau=1.0, rng=None, noise=None, sparse=None, remat=None,
                  image_topk=False, hooks=None, step=None):
  """Training forward. Returns a dict: logits (B, T, V) fp32 (B, K, V at batch['head_index']) (ids >= model.llm.text_vocab_size at NEG_INF,
  `model/vocab.py`), keep (B, T) G when a hook masked keys, and the hooks' outputs (Dynamic-LLaVA: m_img,
  m_ot, …; MQT: mqt_m).

  rng: PRNG key for the hooks' noise, or `noise` = {name: array} given explicitly (tests); neither = zero
  noise (deterministic argmax decisions). sparse None = config.model.sparse.enabled; False runs no
  `sparse_stage` hook (the dense stage). hooks: None = `train_hooks(model.mc)`.
  image_topk: decisions as at inference (evaluation: Dynamic-LLaVA's per-sample top-k image tokens).
  step: the optimizer step (traced), for hooks whose decisions follow a schedule.
  """
  mc = model.mc
  sparse = mc.sparse.enabled if sparse is None else sparse
  remat = mc.remat if remat is None else remat
  hooks = [h for h in (train_hooks(mc) if hooks is None else hooks) if sparse or not h.sparse_stage]
  ctx = TrainContext(model, batch, tau, rng, noise, image_topk, step)
  ids, mask = batch['input_ids'], batch['attention_mask']
  out = {}
  for hk in hooks:
    mask = hk.prepare(ctx, mask, out)
  lm = model.language_model
  h, image_mask = model.embed(ids, batch['pixel_values'])
  # MoD layers (model/mod.py): routed per frame; without masked keys training gathers their routed tokens
  route = model.route(image_mask, batch['pixel_values'],
                      real=None if any(hk.masks_keys for hk in hooks) else mask.astype(bool))
  keys = KeyMask(lm, positions_from_mask(mask), dense_allowed(mask), mc.attention, remat=remat, route=route)
  at_layer = [(hk, tuple(hk.layers(mc))) for hk in hooks]

  def at(p, h, _):     # the hooks acting at layer p (in their order) narrow the keys with their G
    for hk in (hk for hk, ps in at_layer if p in ps):
      g = hk.decide(ctx, h, out, p)
      if g is not None:
        keys.keep = g if keys.keep is None else keys.keep * g
    return h

  h = walk(h, mc.llm.layers, sorted({p for _, ps in at_layer for p in ps}), keys.run, at)
  if 'head_index' in batch:                  # the loss's positions only: (B, K, D)
    h = jnp.take_along_axis(h, batch['head_index'][..., None], axis=1)
  out['logits'] = mask_padded(lm.head(h), text_vocab_size(mc))
  if keys.keep is not None:
    out['keep'] = keys.keep
  return out


def ce_sums(logits, labels, index=None):
  """Shifted CE: (sum of -log p over labelled targets, number of labelled targets, per-token loss (B, T-1),
  target mask (B, T-1)). index (B, K): the logits (B, K, V) are those of these positions (`head_index`);
  then the per-token arrays are (B, K)."""
  if index is None:
    lg, tgt = logits[:, :-1], labels[:, 1:]
  else:
    lg, tgt = logits, jnp.take_along_axis(labels[:, 1:], index, axis=1)
  valid = tgt != IGNORE
  logp = jax.nn.log_softmax(lg, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, tgt, 0)[..., None], axis=-1)[..., 0]
  nll = jnp.where(valid, nll, 0.0)
  return jnp.sum(nll), jnp.sum(valid), nll, valid


def loss_sums(out, batch, hooks=()):
  """All additive per-batch sums: each hook's `sums`, then ce_sum, n_tokens, ce_sample_sum."""
  ce, n, nll, valid = ce_sums(out['logits'], batch['labels'], batch.get('head_index'))
  s = {}
  for hk in hooks:
    s.update(hk.sums(out, batch))
  per_sample = jnp.sum(nll, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1)
  s.update(ce_sum=ce, n_tokens=n.astype(jnp.float32), ce_sample_sum=jnp.sum(per_sample))
  return s


def combine(sums, n_tokens, batch_size, hooks=(), ce_weighting='token'):
  """Loss from sums with global normalisers (so micro-batches add up to the full-batch loss).

  ce_weighting: 'token' (the released recipe: CE averaged over every labelled token of the batch) or
  'sample' (each sample's own token-mean CE, averaged over samples: long answers no longer dominate).
  Returns (loss, terms): terms = {'ce', then each hook's `terms(sums, batch_size)`}; loss = their sum.
  """
  if ce_weighting == 'token':
    terms = {'ce': sums['ce_sum'] / jnp.maximum(n_tokens, 1.0)}
  elif ce_weighting == 'sample':
    terms = {'ce': sums['ce_sample_sum'] / batch_size}
  else:
    raise ValueError(f"train.ce_weighting={ce_weighting!r}: use 'token' or 'sample'")
  for hk in hooks:
    terms.update(hk.terms(sums, batch_size))
  loss = terms['ce']
  for k, v in terms.items():
    if k != 'ce':
      loss = loss + v
  return loss, terms
