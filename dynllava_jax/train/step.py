"""The jitted train and eval steps.

train_step(state, batch) -> (state, metrics): one optimizer step on the global batch, split into
train.grad_accum micro-batches that are scanned (gradients summed in fp32). The loss is normalised by the
whole batch's target-token count and sample count, so accumulation gives the full-batch gradient.
The method's part comes from its training hooks (`train/forward.py`, sparsity/base.py::TrainHook): loss
terms, logged ratios and the step's tau (`hook.temperature`; Dynamic-LLaVA anneals it over the sparse
steps). Sparse steps (`sparse=True`) run every hook; dense steps (the warm-up stage) skip the
`sparse_stage` ones (their terms are then 0): plain CE.

eval_step(state, batch) -> metrics: decisions as at inference (`image_topk`), loss sums, the hooks'
per-sample sums and per-sample teacher-forced correctness of the last answer span.

Frozen layers: when nothing upstream of the lowest trainable decoder layer trains (`optim.grad_floor`),
the hidden state entering it is stop-gradiented, so the backward pass ends there; a training projector
keeps the backward running down to it (docs/architecture.md). LoRA dropout draws its masks from the
step's key.
"""
import jax
import jax.numpy as jnp
import optax

from dynllava_jax.model import layers as L
from dynllava_jax.sparsity.registry import train_hooks
from dynllava_jax.train import forward as F
from dynllava_jax.train import optim
from dynllava_jax.train.state import merge_model


def _split_micro(batch, n):
  """(B, ...) -> (n, B/n, ...) with micro-batch i = rows i::n, so each keeps the batch sharding's balance."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def current_tau(config, step, hooks):
  """The step's relaxation temperature: the first hook's `temperature`, else 1."""
  taus = [t for t in (hk.temperature(config, step) for hk in hooks) if t is not None]
  return taus[0] if taus else jnp.float32(1.0)


def make_train_step(config, graphdef, tx, *, sparse):
  """Returns train_step(state, batch) -> (new_state, metrics) (not jitted; see `jit_train_step`)."""
  hooks = train_hooks(config.model)
  accum = int(config.train.grad_accum)
  cew = config.train.get('ce_weighting', 'token')
  sch = optim.schedules(config.train, optim.restart_step(config))

  lora = config.model.get('lora')
  dropout = float(lora.get('dropout', 0.0)) if lora is not None else 0.0

  def loss_fn(params, frozen, mb, key, tau, n_tok, bsz, step):
    model = merge_model(graphdef, {'params': params, 'frozen': frozen})
    model.language_model.grad_floor = optim.grad_floor(model, params)
    has_lora = dropout > 0 and any(g.lora_rank for g in model.language_model.plan)
    with L.lora_dropout(jax.random.fold_in(key, 1 << 20) if has_lora else None):
      out = F.train_forward(model, mb, tau=tau, rng=key, sparse=sparse, hooks=hooks, step=step)
    sums = F.loss_sums(out, mb, hooks)
    loss, _ = F.combine(sums, n_tok, bsz, hooks, cew)
    return loss, sums

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    step = state['step']
    params, frozen = state['params'], state['frozen']
    key = jax.random.fold_in(state['rng'], step)
    tau = current_tau(config, step, hooks)
    labels = batch['labels']
    n_tok = jnp.sum(labels[:, 1:] != F.IGNORE).astype(jnp.float32)
    bsz = jnp.asarray(labels.shape[0], jnp.float32)

    if accum == 1:
      (_, sums), grads = grad_fn(params, frozen, batch, key, tau, n_tok, bsz, step)
    else:
      micro = _split_micro(batch, accum)

      def body(carry, xs):
        i, mb = xs
        (_, s), g = grad_fn(params, frozen, mb, jax.random.fold_in(key, i), tau, n_tok, bsz, step)
        gacc, sacc = carry
        return (jax.tree.map(jnp.add, gacc, g), jax.tree.map(jnp.add, sacc, s)), None

      zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      s0 = jax.eval_shape(lambda: grad_fn(params, frozen, jax.tree.map(lambda x: x[0], micro), key,
                                          tau, n_tok, bsz, step)[0][1])
      zeros_s = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), s0)
      (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), (jnp.arange(accum), micro))
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    loss, terms = F.combine(sums, n_tok, bsz, hooks, cew)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    metrics = {'loss': loss, **terms, 'tau': tau if sparse else jnp.zeros(()),
               'grad_norm': optim.global_norm(grads), 'update_norm': optim.global_norm(updates),
               'param_norm': optim.global_norm(new_params),
               'tokens': jnp.sum(batch['attention_mask']).astype(jnp.float32)}
    metrics.update({('lr' if g == 'main' else f'{g}_lr'): fn(step) for g, fn in sch.items()})
    for hk in hooks:
      metrics.update(hk.metrics(sums))
    new_state = {**state, 'step': step + 1, 'params': new_params, 'opt_state': opt_state}
    return new_state, metrics

  return train_step


def jit_train_step(config, graphdef, tx, shardings, batch_sharding, *, sparse):
  """jax.jit of the train step with the state donated and its shardings fixed."""
  fn = make_train_step(config, graphdef, tx, sparse=sparse)
  return jax.jit(fn, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                 donate_argnums=0)


def make_eval_step(config, graphdef, *, sparse):
  """eval_step(state, batch) -> per-sample (B,) arrays: ce_sum, n_tokens, the hooks' `eval_sums`
  (Dynamic-LLaVA: kept_image, n_image, kept_answer, n_answer), answer_correct."""
  hooks = train_hooks(config.model)

  def eval_step(state, batch):
    model = merge_model(graphdef, state)
    out = F.train_forward(model, batch, sparse=sparse, image_topk=True, hooks=hooks)
    _, _, nll, valid = F.ce_sums(out['logits'], batch['labels'])
    res = {'ce_sum': jnp.sum(nll, axis=1), 'n_tokens': jnp.sum(valid, axis=1).astype(jnp.float32)}
    for hk in hooks:
      res.update(hk.eval_sums(out, batch))
    pred = jnp.argmax(out['logits'][:, :-1], axis=-1)
    tgt = batch['input_ids'][:, 1:]
    pos = jnp.arange(tgt.shape[1])[None, :]
    span = (pos >= batch['answer_start'][:, None] - 1) & (pos < batch['answer_end'][:, None] - 1)
    res['answer_correct'] = jnp.all(jnp.where(span, pred == tgt, True), axis=1) & jnp.any(span, axis=1)
    return res

  return jax.jit(eval_step)
