"""Generation: sparsified prefill, then one jitted `lax.while_loop` over a static-shape state.

    out = generate(model, cfg, method, input_ids, pixel_values, attention_mask,
                   max_new_tokens=32, sampling='greedy', rng=None, use_cache=True)
    out.tokens (B, max_new) int32 (pad after each sample's end), out.lengths (B,) (EOS included)

KV-cache mode: a loop chunk exits when some active sample's next write would overflow a segment cache;
the host grows that cache in `eval.cache_bucket` steps (one compile per capacity tuple) and continues.
`use_cache=False` (`nocache.py`) re-runs the sparsified forward every step; `past=caches` continues a
conversation (`extend.py`). Streaming (`on_token`) and intermediates: docs/inference.md and
docs/architecture.md. The streaming callback is unordered (ordered effects refuse a model sharded over
several devices) and may repeat a step on a sharded model; its target is a module global, so one
streaming `generate` runs at a time per process (a lock), and without `on_token` the loop has none.
"""
import threading
import time
from functools import partial
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dynllava_jax.decode import cache as C
from dynllava_jax.decode import request as R
from dynllava_jax.decode.extend import extend
from dynllava_jax.decode.nocache import generate_nocache
from dynllava_jax.decode.output import GenerateOutput
from dynllava_jax.decode.prefill import eval_section, prefill
from dynllava_jax.decode.sampling import as_sampling
from dynllava_jax.decode.step import decode_step, unstack_layers, weight_blocks
from dynllava_jax.model.vocab import text_vocab_size
from dynllava_jax.sparsity.base import TextContext
from dynllava_jax.sparsity.registry import make_sparsifier


@struct.dataclass
class LoopState:
  """caches: tuple of SegmentCache; tokens (B, M); keep (B, M) bool; logits (B, M, V) or (B, 1, 1);
  step () int32 = tokens produced so far; done (B,); lengths (B,); rng PRNG key; aux: None, or the
  decode intermediates being recorded ({'positions' (B, M), ['text_logits' (B, M, C)]})."""
  caches: Tuple[Any, ...]
  tokens: jax.Array
  keep: jax.Array
  logits: jax.Array
  step: jax.Array
  done: jax.Array
  lengths: jax.Array
  rng: jax.Array
  aux: Any = None


def _start(caches, logits_last, rng, sampling, max_new, pad_id, eos_id, record_logits, record=None):
  """The loop state with token 0 sampled from logits_last. record: None, or the static shapes of the
  decode intermediates to record (`_record_shapes`)."""
  b = logits_last.shape[0]
  tok = sampling.sample(logits_last, jax.random.fold_in(rng, 0))
  tokens = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(tok)
  logits = (jnp.zeros((b, max_new, logits_last.shape[-1]), jnp.float32).at[:, 0].set(logits_last)
            if record_logits else jnp.zeros((b, 1, 1), jnp.float32))
  done = tok == eos_id
  aux = None
  if record is not None:
    aux = {'positions': jnp.full((b, max_new), -1, jnp.int32)}
    if record:
      aux['text_logits'] = jnp.zeros((b, max_new) + record, jnp.float32)
  return LoopState(tuple(caches), tokens, jnp.ones((b, max_new), bool), logits, jnp.int32(1), done,
                   jnp.ones((b,), jnp.int32), rng, aux)


@partial(jax.jit, static_argnames=('capacities', 'sampling', 'max_new', 'record_logits', 'record'))
def _init(out, rng, *, capacities, sampling, max_new, pad_id, eos_id, record_logits, record=None):
  """The loop state after the prefill: caches filled from its segments, the first token sampled from its
  last logits."""
  caches = tuple(C.from_segment(s, c) for s, c in zip(out.segments, capacities))
  return _start(caches, out.logits_last, rng, sampling, max_new, pad_id, eos_id, record_logits, record)


# The loop state after an `extend`: its caches, the first token sampled from its last logits.
_init_extended = jax.jit(_start, static_argnames=('sampling', 'max_new', 'record_logits', 'record'))


def _record_shapes(model, method):
  """The per-token shape of the method's text-rule scores (e.g. (2,)), or () when it has none."""
  tl = method.text_layer(model.mc)
  if tl is None:
    return ()
  h = jax.ShapeDtypeStruct((1, 1, model.mc.llm.hidden), jnp.float32)
  shape = jax.eval_shape(lambda x: method.text_logits(TextContext(h_new=x, layer=tl, model=model)), h)
  return () if shape is None else tuple(shape.shape[2:])


def _overflow(state):
  over = jnp.bool_(False)
  for c in state.caches:
    over = over | jnp.any(~state.done & (c.length >= c.capacity))
  return over


_STREAM = {'fn': None}
_STREAM_LOCK = threading.Lock()


def _emit(step, tokens, active):
  fn = _STREAM['fn']
  if fn is not None:
    fn(int(step), np.asarray(tokens), np.asarray(active))


def _put(rec, x, active, j):
  """rec (B, M, ...) with column j set to x (B, ...) where active."""
  old = jax.lax.dynamic_index_in_dim(rec, j, axis=1, keepdims=False)
  x = jnp.where(active.reshape((-1,) + (1,) * (x.ndim - 1)), x.astype(rec.dtype), old)
  return jax.lax.dynamic_update_index_in_dim(rec, x, j, axis=1)


@partial(jax.jit, static_argnames=('method', 'sampling', 'record_logits', 'stream'),
         donate_argnames=('state',))
def _run_chunk(model, layers, method, state, *, sampling, pad_id, eos_id, record_logits, stream=False):
  m = state.tokens.shape[1]

  def cond(st):
    return (st.step < m) & ~jnp.all(st.done) & ~_overflow(st)

  def body(st):
    active = ~st.done
    cur = jax.lax.dynamic_index_in_dim(st.tokens, st.step - 1, axis=1, keepdims=False)
    logits, caches, keep, *aux = decode_step(model, method, st.caches, cur, active, layers,
                                             intermediates=st.aux is not None)
    nxt = sampling.sample(logits, jax.random.fold_in(st.rng, st.step))
    nxt = jnp.where(active, nxt, pad_id)
    if stream:
      jax.debug.callback(_emit, st.step, nxt, active)
    tokens = jax.lax.dynamic_update_index_in_dim(st.tokens, nxt, st.step, axis=1)
    old = jax.lax.dynamic_index_in_dim(st.keep, st.step - 1, axis=1, keepdims=False)
    keep_rec = jax.lax.dynamic_update_index_in_dim(st.keep, jnp.where(active, keep, old), st.step - 1, axis=1)
    rec = st.logits
    if record_logits:
      rec = jax.lax.dynamic_update_index_in_dim(rec, jnp.where(active[:, None], logits, 0.0), st.step, axis=1)
    rec_aux = st.aux
    if rec_aux is not None:       # token step − 1's intermediates, where active
      rec_aux = {k: _put(v, aux[0][k], active, st.step - 1) for k, v in rec_aux.items()}
    return st.replace(caches=caches, tokens=tokens, keep=keep_rec, logits=rec, step=st.step + 1,
                      done=st.done | (active & (nxt == eos_id)), lengths=st.lengths + active.astype(jnp.int32),
                      aux=rec_aux)

  return jax.lax.while_loop(cond, body, state)


def _grown(state, bucket):
  """Host: capacities after growing every cache some active sample would overflow on its next write."""
  done = np.asarray(state.done)
  caps = []
  for c in state.caches:
    length = np.asarray(c.length)
    cap = c.capacity
    if np.any(~done & (length >= cap)):
      cap = max(cap + bucket, R.round_up(int(length.max()) + 1, bucket))
    caps.append(cap)
  return tuple(caps)


def _last_kept_segment(segments):
  """The last segment that is not an MoD layer (`Segment.routes`: it routes image tokens past itself and
  drops none): its image tokens are those the model still holds (the last segment when every one routes)."""
  return next((s for s in reversed(segments) if not s.routes), segments[-1])


def _ratios(seg_image, n_img, keep, lengths):
  kept_img = np.asarray(seg_image).sum(-1)
  img_ratio = np.where(n_img > 0, kept_img / np.maximum(n_img, 1), 1.0)
  keep = np.asarray(keep)
  fed = np.maximum(np.asarray(lengths) - 1, 0)
  m = np.arange(keep.shape[1])[None, :] < fed[:, None]
  txt_ratio = np.where(fed > 0, (keep & m).sum(-1) / np.maximum(fed, 1), 1.0)
  return img_ratio.astype(np.float32), txt_ratio.astype(np.float32)


def generate(model, cfg, method, input_ids, pixel_values, attention_mask=None, *, max_new_tokens=None,
             sampling=None, rng=None, use_cache=None, return_logits=False, return_caches=False,
             eos_token_id=None, visual_tokens=None, on_token=None, past=None, intermediates=False,
             _stream=False):
  """Generates up to max_new_tokens per sample (stops per sample at EOS). Returns GenerateOutput.

  cfg: the root config (its `eval` section gives buckets and defaults) or None; method: a Sparsifier or a
  registry name; input_ids / attention_mask (B, T) left- or right-padded; pixel_values (B, H, W, 3) or None
  for text-only batches; sampling: None (eval config), 'greedy', dict(temperature=, top_p=) or Sampling;
  rng: PRNG key (needed only for sampling and random methods; default key 0); eos_token_id: stop token
  (default model.mc.eos_token_id); visual_tokens: MQT m for this call; on_token: the streaming callback;
  past: the caches of an earlier `generate(..., return_caches=True)` (same batch and method): input_ids
  (and pixel_values) are then the next turn's only, appended by `extend.extend` (kept_image_ratio: of the
  turn's image, NaN for a text turn); intermediates: record the decode intermediates.
  """
  mc = model.mc
  ev = eval_section(cfg, mc)
  if isinstance(method, str):
    method = make_sparsifier(method, mc)
  m = int(ev.max_new_tokens if max_new_tokens is None else max_new_tokens)
  use_cache = bool(ev.use_cache if use_cache is None else use_cache)
  samp = as_sampling(sampling, ev, text_vocab_size(mc))
  rng = jax.random.PRNGKey(0) if rng is None else rng
  eos = int(mc.eos_token_id if eos_token_id is None else eos_token_id)
  if on_token is not None:
    if not use_cache:
      raise ValueError('on_token (streaming) needs the KV-cache loop (use_cache=True)')
    with _STREAM_LOCK:
      _STREAM['fn'] = on_token
      try:
        return generate(model, cfg, method, input_ids, pixel_values, attention_mask,
                        max_new_tokens=m, sampling=samp, rng=rng, use_cache=True, return_logits=return_logits,
                        return_caches=return_caches, eos_token_id=eos, visual_tokens=visual_tokens,
                        past=past, intermediates=intermediates, _stream=True)
      finally:
        jax.effects_barrier()       # every callback of this call has run
        _STREAM['fn'] = None
  if past is not None and not use_cache:
    raise ValueError('generate(past=...) extends KV caches: it needs use_cache=True')
  if not use_cache:
    if intermediates:
      raise ValueError('generate(intermediates=True) records the KV-cache loop: it needs use_cache=True')
    return generate_nocache(model, ev, method, input_ids, pixel_values, attention_mask, max_new_tokens=m,
                            sampling=samp, rng=rng, return_logits=return_logits, eos_token_id=eos,
                            visual_tokens=visual_tokens)
  p_rng, d_rng = jax.random.split(rng)
  bucket = int(ev.cache_bucket)
  # pad / eos ids are traced (a new stop token compiles nothing new)
  kw = dict(sampling=samp, pad_id=jnp.int32(mc.pad_token_id), eos_id=jnp.int32(eos),
            record_logits=bool(return_logits))
  record = _record_shapes(model, method) if intermediates else None
  pre_aux = None
  if past is not None:
    ext = extend(model, cfg, method, past, input_ids, attention_mask, pixel_values, max_new_tokens=m,
                 rng=p_rng, visual_tokens=visual_tokens)
    jax.block_until_ready(ext.logits_last)
    t_decode = time.perf_counter()
    caps = tuple(c.capacity for c in ext.caches)
    state = _init_extended(ext.caches, ext.logits_last, d_rng, max_new=m, record=record, **kw)
  else:
    pre = prefill(model, cfg, method, input_ids, pixel_values, attention_mask, rng=p_rng,
                  max_new_tokens=m, visual_tokens=visual_tokens, intermediates=intermediates)
    req, out = pre.request, pre.out
    pre_aux = out.aux
    counts = [int(np.asarray(s.count).max()) for s in out.segments]      # waits for the prefill
    t_decode = time.perf_counter()
    caps = [R.round_up(counts[0] + m, bucket)] + [R.round_up(c + 1, bucket) for c in counts[1:]]
    caps = tuple(caps)
    state = _init(out, d_rng, capacities=caps, max_new=m, record=record, **kw)
  if _stream:
    _emit(0, state.tokens[:, 0], np.ones(state.tokens.shape[0], bool))
  bytes_prefill = C.used_bytes(state.caches)
  history = [caps]
  finished = lambda st: int(st.step) >= m or bool(np.all(np.asarray(st.done)))
  blocks = weight_blocks(ev.get('decode_weight_blocks', 0), int(np.asarray(input_ids).shape[0]))
  layers = None if finished(state) else unstack_layers(model, blocks)   # the decode loop's weights
  while not finished(state):
    state = _run_chunk(model, layers, method, state, stream=_stream, **kw)
    if finished(state):
      break
    caps = _grown(state, bucket)
    history.append(caps)
    state = state.replace(caches=tuple(C.grow(c, cap) for c, cap in zip(state.caches, caps)))
  tokens = np.asarray(state.tokens)
  decode_s = time.perf_counter() - t_decode
  if past is not None:
    b = tokens.shape[0]
    _, txt_ratio = _ratios(np.zeros((b, 1), bool), np.zeros(b), state.keep, state.lengths)
    img_ratio = ext.kept_image_ratio
  else:
    img_ratio, txt_ratio = _ratios(_last_kept_segment(out.segments).image, req.n_img, state.keep,
                                   state.lengths)
  return GenerateOutput(
      tokens=tokens, lengths=np.asarray(state.lengths), kept_image_ratio=img_ratio,
      kept_text_ratio=txt_ratio, kv_cache_bytes_prefill=bytes_prefill,
      kv_cache_bytes_final=C.used_bytes(state.caches), kv_cache_bytes_allocated=C.allocated_bytes(state.caches),
      text_keep=np.asarray(state.keep), capacities=history,
      logits=np.asarray(state.logits) if return_logits else None,
      caches=state.caches if return_caches else None, method=method.name, use_cache=True, decode_s=decode_s,
      intermediates=None if state.aux is None else {'prefill': pre_aux, **jax.device_get(state.aux)})
