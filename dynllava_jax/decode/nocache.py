"""Decoding without a KV cache: every step re-runs the sparsified forward on prompt + generated tokens.

The packed buffer (B, T) holds each sample's prompt, then its generated tokens (appended in place);
each step runs `prefill.sparse_forward` with `gen_mask` marking them, all decisions recomputed (the
newest token always kept), in one jitted `lax.while_loop` (docs/inference.md, "Decoding without a KV cache").
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from dynllava_jax.model.projector import visual_token_count
from dynllava_jax.decode import request as R
from dynllava_jax.decode.output import GenerateOutput
from dynllava_jax.decode.prefill import sparse_forward
from dynllava_jax.model.mod import frames_of


@partial(jax.jit, static_argnames=('method', 'sizes', 'sampling', 'max_new', 'record_logits', 'text_seg',
                                   'count'))
def _loop(model, method, ids, n_real, pixel_values, rng, *, sizes, sampling, max_new, pad_id, eos_id,
          record_logits, text_seg, count=None):
  b, t = ids.shape
  p_rng, d_rng = jax.random.split(rng)          # as in KV-cache mode: prefill / drop rng, sampling rng
  h0, image_mask = model.embed(ids, pixel_values, count, method)
  n_vis = visual_token_count(model.mc, method, count)
  slots = jnp.arange(t)[None, :]
  gen_idx = n_real[:, None] + jnp.arange(max_new)[None, :]         # (B, M) buffer slot of token g
  v = model.mc.llm.vocab_size
  init = dict(
      h=h0, count=n_real, tokens=jnp.full((b, max_new), pad_id, jnp.int32),
      keep=jnp.ones((b, max_new), bool),
      logits=jnp.zeros((b, max_new, v) if record_logits else (b, 1, 1), jnp.float32),
      step=jnp.int32(0), done=jnp.zeros((b,), bool), lengths=jnp.zeros((b,), jnp.int32),
      image=jnp.zeros((b,), jnp.int32))

  def cond(st):
    return (st['step'] < max_new) & ~jnp.all(st['done'])

  def body(st):
    step, count = st['step'], st['count']
    valid = slots < count[:, None]
    gen = valid & (slots >= n_real[:, None])
    out = sparse_forward(model, method, st['h'], valid, image_mask, gen, p_rng,
                         sizes=sizes, return_kv=False, n_image=n_vis, frames=frames_of(pixel_values))
    active = ~st['done']
    nxt = sampling.sample(out.logits_last, jax.random.fold_in(d_rng, step))
    nxt = jnp.where(active, nxt, pad_id)
    finished = active & (nxt == eos_id)
    tokens = jax.lax.dynamic_update_index_in_dim(st['tokens'], nxt, step, axis=1)
    keep = st['keep']
    if text_seg is not None:
      kept = jnp.take_along_axis(out.kept[text_seg], jnp.minimum(gen_idx, t - 1), axis=1)
      fed = gen_idx < count[:, None]
      keep = jnp.where(fed, kept, True)
    rec = st['logits']
    if record_logits:
      rec = jax.lax.dynamic_update_index_in_dim(rec, jnp.where(active[:, None], out.logits_last, 0.0), step,
                                                axis=1)
    append = active & ~finished & (step + 1 < max_new)
    emb = model.language_model.embed_tokens(nxt)
    idx = jnp.where(append, count, t)
    h = st['h'].at[jnp.arange(b), idx].set(emb.astype(st['h'].dtype), mode='drop')
    image = jnp.sum(out.segments[-1].image, -1).astype(jnp.int32)
    return dict(h=h, count=count + append.astype(jnp.int32), tokens=tokens, keep=keep, logits=rec,
                step=step + 1, done=st['done'] | finished, lengths=st['lengths'] + active.astype(jnp.int32),
                image=jnp.where(active, image, st['image']))

  return jax.lax.while_loop(cond, body, init)


def generate_nocache(model, ev, method, input_ids, pixel_values, attention_mask, *, max_new_tokens, sampling,
                     rng, return_logits=False, eos_token_id=None, visual_tokens=None):
  """`generate(..., use_cache=False)`; ev: the eval config section. Returns GenerateOutput."""
  mc = model.mc
  m = int(max_new_tokens)
  n_vis = visual_token_count(mc, method, visual_tokens)
  method.validate(mc, n_vis)
  req = R.check_and_pack(mc, input_ids, pixel_values, attention_mask, max_new_tokens=m,
                         bucket=ev.prefill_bucket, extra_len=m, n_visual=n_vis)
  sizes = R.segment_sizes(method, mc, req.n_real, req.n_img, req.ids.shape[1], ev.prefill_bucket, extra=m,
                          n_visual=n_vis)
  bounds = R.boundaries(method, mc)
  tl = method.text_layer(mc)
  text_seg = bounds.index(tl) + 1 if tl is not None else None
  pix = None if req.pixel_values is None else jnp.asarray(req.pixel_values)
  st = _loop(model, method, jnp.asarray(req.ids), jnp.asarray(req.n_real), pix, rng, sizes=sizes,
             sampling=sampling, max_new=m, pad_id=int(mc.pad_token_id), eos_id=int(mc.eos_token_id if eos_token_id is None else eos_token_id),
             record_logits=bool(return_logits), text_seg=text_seg,
             count=None if visual_tokens is None else int(visual_tokens))
  lengths = np.asarray(st['lengths'])
  keep = np.asarray(st['keep'])
  fed = np.maximum(lengths - 1, 0)
  mask = np.arange(m)[None, :] < fed[:, None]
  txt_ratio = np.where(fed > 0, (keep & mask).sum(-1) / np.maximum(fed, 1), 1.0).astype(np.float32)
  img = np.asarray(st['image'])
  img_ratio = np.where(req.n_img > 0, img / np.maximum(req.n_img, 1), 1.0).astype(np.float32)
  return GenerateOutput(
      tokens=np.asarray(st['tokens']), lengths=lengths, kept_image_ratio=img_ratio, kept_text_ratio=txt_ratio,
      kv_cache_bytes_prefill=0, kv_cache_bytes_final=0, kv_cache_bytes_allocated=0, text_keep=keep,
      capacities=[], logits=np.asarray(st['logits']) if return_logits else None, method=method.name,
      use_cache=False)
