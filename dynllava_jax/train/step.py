"""The jitted train and eval steps.

train_step(state, batch) -> (state, metrics): one optimizer step on the global batch, split into
train.grad_accum micro-batches that are scanned (gradients summed in fp32). The loss is normalised by the
whole batch's target-token count and sample count, so accumulation gives the full-batch gradient.
Sparse steps (`sparse=True`) use Gumbel decisions with tau = tau_at(step − dense_warmup_steps,
steps − dense_warmup_steps); dense steps (the warm-up stage, or model.sparse.enabled=False) are plain CE.

eval_step(state, batch) -> metrics: deterministic decisions (image: per-sample top-k, k = ⌊N·r_I⌋, as at
prefill; text: keep iff logit0 > logit1),
loss sums, kept ratios and per-sample teacher-forced correctness of the last answer span.

Frozen layers (layer plan, visual region): when nothing upstream of the lowest trainable decoder layer
trains (`optim.grad_floor`: frozen projector, tower, embeddings and lower layers), the hidden state
entering it is stop-gradiented, so the backward pass ends there (no activation gradients through the
frozen layers below). When the projector trains, its gradient must pass through every layer below, so
the backward runs down to it (frozen layers then cost activation gradients only: no weight gradients).
LoRA dropout (model.lora.dropout) draws its masks from the step's key.
"""
import jax
import jax.numpy as jnp
import optax

from dynllava_jax.model import layers as L
from dynllava_jax.train import forward as F
from dynllava_jax.train import optim
from dynllava_jax.train.state import merge_model


def _split_micro(batch, n):
  """(B, ...) -> (n, B/n, ...) with micro-batch i = rows i::n, so each keeps the batch sharding's balance."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def current_tau(config, step):
  t, sc = config.train, config.model.sparse
  total = max(t.steps - t.dense_warmup_steps, 1)
  return F.tau_at(step - t.dense_warmup_steps, total, sc.tau0, sc.tau1)


def make_train_step(config, graphdef, tx, *, sparse):
  """Returns train_step(state, batch) -> (new_state, metrics) (not jitted; see `jit_train_step`)."""
  sc = config.model.sparse
  accum = int(config.train.grad_accum)
  cew = config.train.get('ce_weighting', 'token')
  sch = optim.schedules(config.train, optim.restart_step(config))

  lora = config.model.get('lora')
  dropout = float(lora.get('dropout', 0.0)) if lora is not None else 0.0

  def loss_fn(params, frozen, mb, key, tau, n_tok, bsz):
    model = merge_model(graphdef, {'params': params, 'frozen': frozen})
    model.language_model.grad_floor = optim.grad_floor(model, params)
    has_lora = dropout > 0 and any(g.lora_rank for g in model.language_model.plan)
    with L.lora_dropout(jax.random.fold_in(key, 1 << 20) if has_lora else None):
      out = F.train_forward(model, mb, tau=tau, rng=key, sparse=sparse)
    sums = F.loss_sums(out, mb, sc)
    loss, _ = F.combine(sums, n_tok, bsz, sc.lambda_ratio, cew)
    return loss, sums

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    step = state['step']
    params, frozen = state['params'], state['frozen']
    key = jax.random.fold_in(state['rng'], step)
    tau = current_tau(config, step)
    labels = batch['labels']
    n_tok = jnp.sum(labels[:, 1:] != F.IGNORE).astype(jnp.float32)
    bsz = jnp.asarray(labels.shape[0], jnp.float32)

    if accum == 1:
      (_, sums), grads = grad_fn(params, frozen, batch, key, tau, n_tok, bsz)
    else:
      micro = _split_micro(batch, accum)

      def body(carry, xs):
        i, mb = xs
        (_, s), g = grad_fn(params, frozen, mb, jax.random.fold_in(key, i), tau, n_tok, bsz)
        gacc, sacc = carry
        return (jax.tree.map(jnp.add, gacc, g), jax.tree.map(jnp.add, sacc, s)), None

      zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      s0 = jax.eval_shape(lambda: grad_fn(params, frozen, jax.tree.map(lambda x: x[0], micro), key,
                                          tau, n_tok, bsz)[0][1])
      zeros_s = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), s0)
      (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), (jnp.arange(accum), micro))
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    loss, terms = F.combine(sums, n_tok, bsz, sc.lambda_ratio, cew)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    metrics = {'loss': loss, **terms, 'tau': tau if sparse else jnp.zeros(()),
               'grad_norm': optim.global_norm(grads), 'update_norm': optim.global_norm(updates),
               'param_norm': optim.global_norm(new_params),
               'lr': sch['main'](step), 'predictor_lr': sch['predictor'](step),
               'tokens': jnp.sum(batch['attention_mask']).astype(jnp.float32)}
    if float(config.train.get('projector_lr', 0.0)) > 0:
      metrics['projector_lr'] = sch['projector'](step)
    metrics.update(_kept(sums))
    new_state = {**state, 'step': step + 1, 'params': new_params, 'opt_state': opt_state}
    return new_state, metrics

  return train_step


def _kept(sums):
  out = {}
  for name in ('image', 'answer', 'instruct'):
    n = sums[f'n_{name}']
    out[f'kept_{name}'] = jnp.where(n > 0, sums[f'kept_{name}'] / jnp.maximum(n, 1.0), 1.0)
  return out


def jit_train_step(config, graphdef, tx, shardings, batch_sharding, *, sparse):
  """jax.jit of the train step with the state donated and its shardings fixed."""
  fn = make_train_step(config, graphdef, tx, sparse=sparse)
  return jax.jit(fn, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                 donate_argnums=0)


def make_eval_step(config, graphdef, *, sparse):
  """eval_step(state, batch) -> per-sample (B,) arrays: ce_sum, n_tokens, kept_image, n_image,
  kept_answer, n_answer (kept_* are the sample's kept ratio times its indicator n_*), answer_correct."""

  def eval_step(state, batch):
    model = merge_model(graphdef, state)
    out = F.train_forward(model, batch, sparse=sparse, image_topk=True)
    _, _, nll, valid = F.ce_sums(out['logits'], batch['labels'])
    b = nll.shape[0]
    res = {'ce_sum': jnp.sum(nll, axis=1), 'n_tokens': jnp.sum(valid, axis=1).astype(jnp.float32)}
    zeros = jnp.zeros((b,), jnp.float32)
    res.update(kept_image=zeros, n_image=zeros, kept_answer=zeros, n_answer=zeros)
    if 'm_img' in out:
      has = batch['has_image'].astype(jnp.float32)
      res.update(kept_image=has * jnp.mean(out['m_img'], axis=1), n_image=has)
    if 'm_ot' in out:
      q = out['ot_qual'].astype(jnp.float32)
      span = out['ot_span']
      ratio = jnp.sum(jnp.where(span, out['m_ot'], 0.0), axis=1) / jnp.maximum(jnp.sum(span, axis=1), 1)
      res.update(kept_answer=q * ratio, n_answer=q)
    pred = jnp.argmax(out['logits'][:, :-1], axis=-1)
    tgt = batch['input_ids'][:, 1:]
    span = F.span_mask(batch['answer_start'] - 1, batch['answer_end'] - 1, tgt.shape[1])
    res['answer_correct'] = jnp.all(jnp.where(span, pred == tgt, True), axis=1) & jnp.any(span, axis=1)
    return res

  return jax.jit(eval_step)
