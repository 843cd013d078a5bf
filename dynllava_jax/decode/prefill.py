"""Sparsified prefill: the decoder run in segments split at the method's drop points (docs/methods.md),
'drop by gather' on the one walk (`model/walk.py`).

All sequences here are *packed* (`request.py`): sample b's real tokens in slots [0, count_b), in order,
padding after. At each boundary (a drop point, or the text layer when generated tokens are present:
decoding without a KV cache) the kept tokens — every real text token, the k best present image tokens
(threshold mode: score > 0), the generated tokens `text_keep` keeps, always the last real token — are
gathered in order, with their RoPE positions (renumbered with `renumber_positions`), into the next
segment's static length: a masked forward with exact-zero attention to the dropped tokens
(docs/inference.md, "Prefill").

    out = prefill(model, cfg, method, input_ids, pixel_values, attention_mask)
    out.logits_last (B, vocab); out.segments[s].kv = (k, v) each (L_s, B, T_s, Hkv, D)
"""
import dataclasses
import types
from functools import partial
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dynllava_jax.model.projector import num_visual_tokens as num_image_tokens
from dynllava_jax.model.projector import visual_token_count
from dynllava_jax.decode import request as R
from dynllava_jax.decode.config import eval_defaults
from dynllava_jax.errors import UserError
from dynllava_jax.model import mod as M
from dynllava_jax.model import plan as P
from dynllava_jax.model.attention import causal_allowed
from dynllava_jax.model.llama import full_attention
from dynllava_jax.model.walk import walk
from dynllava_jax.sparsity.base import ScoreContext, TextContext, top_k_mask


@struct.dataclass
class Segment:
  """One segment's view of the sequence after its boundary gather (layers [start, stop)).

  kv       (k, v) each (L_s, B, T_s, Hkv, D) or None; slots [0, count) hold kept tokens, in order
  count    (B,) int32 kept tokens
  positions (B, T_s) int32 RoPE positions; orig (B, T_s) int32 slot in the packed prompt (T0 coordinates)
  valid    (B, T_s) bool; image (B, T_s) bool image tokens present
  """
  kv: Any
  count: Any
  positions: Any
  orig: Any
  valid: Any
  image: Any
  start: int = struct.field(pytree_node=False)
  stop: int = struct.field(pytree_node=False)
  next_pos: Any = None    # (B,) RoPE position of the next token when the segment's last slot is not the
                          # prompt's last token (an MoD layer skipped it); None: positions[count - 1] + 1
  routes: bool = struct.field(pytree_node=False, default=False)   # an MoD layer: image tokens routed past
                                                                  # it, none dropped for good


@struct.dataclass
class ForwardOut:
  """logits_last (B, V) at each sample's last real token; logits (B, T_last, V) of the last segment or
  None; segments: tuple of Segment; kept (n_seg, B, T0) bool: which packed prompt slots each segment holds;
  aux: None, or with intermediates=True {'scores': per drop point the method's scores (B, T_s) over segment
  s's slots (`segments[s].orig` maps them to the packed prompt), 'text_keep': the text keep decisions at the
  text layer (B, T_s) or absent}."""
  logits_last: Any
  logits: Any
  segments: Tuple[Segment, ...]
  kept: Any
  aux: Any = None


def _run(model, h, positions, valid, start, stop, return_kv):
  if start == stop:   # before a drop entering layer 0: no layers
    return h, None
  t = h.shape[1]
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), valid.shape)
  allowed = causal_allowed(idx, idx, valid)
  lm = model.language_model
  out = lm.run_layers(h, positions, allowed, start=start, stop=stop, mode=model.mc.attention,
                      return_kv=return_kv, remat=model.mc.remat, index_params=True,
                      causal_chunk=int(model.mc.get('causal_chunk', 0)))
  return out if return_kv else (out, None)


def _run_last_query(model, h, positions, valid, start, return_kv):
  """The last segment when only each sample's last real position is read (its logits): layers
  [start, L − 1) as usual, then the last layer with `select` = the last position (its K/V for every token,
  its attention output and MLP for that position only). -> (h_last (B, 1, H), kv)."""
  lm = model.language_model
  n_layers = lm.lc.layers
  h, kv = _run(model, h, positions, valid, start, n_layers - 1, return_kv)
  last = jnp.sum(valid, -1).astype(jnp.int32) - 1
  h_last, (k, v) = lm.layer_at(n_layers - 1)(h, positions, full_attention(valid[:, None, :]), select=last)
  if return_kv:
    kv = (k[None], v[None]) if kv is None else (jnp.concatenate([kv[0], k[None]], 0),
                                                jnp.concatenate([kv[1], v[None]], 0))
  return h_last, kv


def _mod_segment(model, layer_index, route, h, positions, orig, valid, image_mask, size, return_kv,
                 last_only=False):
  """An MoD layer run on its routed tokens only: the router on every token, the routed ones (text, the
  top k per frame) gathered in order into `size` slots, the dense body on them (its K/V: theirs only),
  their update weighted and scattered back; skipped tokens keep h. -> (h (B, T, H), Segment).
  last_only (the model's last layer, only the last position read): the body's queries, output and MLP at
  the last real token only (`DecoderLayer.__call__` select; K/V of every routed token) -> h (B, 1, H)."""
  layer = model.language_model.layer_at(layer_index)
  s = layer.router(h)
  routed = M.route_tokens(s, route, layer_index) & valid
  idx, rvalid, rcount = M.compact(routed, size)
  hr, pr, img_r = M.take(h, idx), M.take(positions, idx), M.take(image_mask, idx) & rvalid
  ar = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), rvalid.shape)
  w, weighted = M.update_weight(M.take(s, idx), img_r, route)
  n_valid = jnp.sum(valid, -1).astype(jnp.int32)
  last = jnp.take_along_axis(positions, (n_valid - 1)[:, None], axis=1)[:, 0]
  if last_only:       # the prompt's last token: the gathered slot rcount − 1 when it is routed
    attend = full_attention(rvalid[:, None, :], mode=model.mc.attention, impl=model.language_model.attention_impl)
    sel = (rcount - 1)[:, None]
    out, (k, v) = layer(hr, pr, attend, select=rcount - 1)
    hl = M.mix(M.take(hr, sel), out, M.take(w, sel), M.take(weighted, sel), jnp.ones(sel.shape, bool))
    h_last = M.take(h, (n_valid - 1)[:, None])
    here = M.take(routed, (n_valid - 1)[:, None])
    h = jnp.where(here[..., None], hl, h_last)
  else:
    attend = full_attention(causal_allowed(ar, ar, rvalid), mode=model.mc.attention,
                            impl=model.language_model.attention_impl)
    out, (k, v) = layer(hr, pr, attend)
    hr = M.mix(hr, out, w, weighted, rvalid)
    h = h.at[jnp.arange(h.shape[0])[:, None], idx].set(hr)      # idx is a permutation: skipped slots get h
  kv = (k[None], v[None]) if return_kv else None
  seg = Segment(kv, rcount, pr, M.take(orig, idx), rvalid, img_r, layer_index, layer_index + 1, last + 1,
                routes=True)
  return h, seg


def sparse_forward(model, method, h, valid, image_mask, gen_mask, rng, *, sizes, return_kv=True,
                   return_logits=False, intermediates=False, n_image=None, frames=None, mod_size=None):
  """The segmented forward on packed inputs (traceable; sizes static).

  h (B, T0, H) embeddings; valid (B, T0) bool; image_mask (B, T0) bool; gen_mask (B, T0) bool generated
  tokens (or None: a plain prompt); rng a PRNG key or None; sizes = request.segment_sizes(...);
  n_image: image tokens per image in this call (the budgets' N; default the model's count).
  frames: frames per sample at most (static; None = 1 on a model with MoD layers); each MoD layer is its
  own segment, run on its routed tokens in `mod_size` slots (static; None = T0) (`_mod_segment`).
  """
  mc = model.mc
  n_layers = mc.llm.layers
  n_img = num_image_tokens(mc) if n_image is None else int(n_image)
  pts = tuple(int(p) for p in method.drop_points(mc))
  counts = tuple(method.keep_counts(n_img))
  tl = method.text_layer(mc)
  method_bounds = bounds = R.boundaries(method, mc)
  b, t0 = valid.shape
  mods = tuple(P.kind_layers(model.language_model.plan, M.KIND))     # each its own segment
  route = None
  if mods:
    if bounds:
      raise UserError(f'{method.name} drops tokens at layers {bounds}: not supported on a model with MoD '
                      'layers (model.mod); use the dense method')
    route = M.make_route(mc, image_mask & valid, n_img, 1 if frames is None else frames)
    bounds = tuple(sorted(set(p for i in mods for p in (i, i + 1) if 0 < p < n_layers)))
  positions = jnp.broadcast_to(jnp.arange(t0, dtype=jnp.int32), (b, t0))
  # the current sequence (packed kept tokens), the segment being run (start, its K/V parts, an MoD record)
  st = types.SimpleNamespace(positions=positions, orig=positions, valid=valid, image_mask=image_mask & valid,
                             gen=None if gen_mask is None else gen_mask & valid, start=0, kv=[], seg=None)
  segments, kept, aux = [], [], {'scores': []}

  def run(h, start, stop):
    if start in mods:
      h, st.seg = _mod_segment(model, start, route, h, st.positions, st.orig, st.valid, st.image_mask,
                               t0 if mod_size is None else int(mod_size), return_kv,
                               last_only=stop == n_layers and not return_logits)
      return h
    if stop == n_layers and not return_logits:
      h, kv = _run_last_query(model, h, st.positions, st.valid, start, return_kv)
    else:
      h, kv = _run(model, h, st.positions, st.valid, start, stop, return_kv)
    st.kv.append(kv)
    return h

  def at(stop, h, h_prev):      # close the segment's record; at a method boundary, drop by gather
    count = jnp.sum(st.valid, -1).astype(jnp.int32)
    seg = st.seg
    if seg is None:           # K/V of [start, stop), or of [start, stop − 1) and [stop − 1, stop) (h_prev)
      kv = st.kv[0] if len(st.kv) == 1 or st.kv[0] is None else jax.tree.map(
          lambda a, c: jnp.concatenate([a, c], 0), *st.kv)
      seg = Segment(kv, count, st.positions, st.orig, st.valid, st.image_mask, st.start, stop)
    if stop > st.start:       # (a drop entering layer 0 has no segment, no cache, before it)
      segments.append(seg)
    kept.append(jnp.zeros((b, t0), bool).at[jnp.arange(b)[:, None], seg.orig].max(seg.valid))
    st.start, st.kv, st.seg = stop, [], None
    if stop not in method_bounds:       # the end, or an MoD layer starts: the sequence stays as it is
      return h
    keep = st.valid
    if stop in pts:
      i = pts.index(stop)
      ctx = ScoreContext(h=h, h_prev=h_prev, positions=st.positions, valid=st.valid, image_mask=st.image_mask,
                         last_index=count - 1, layer=stop, model=model, n_image=n_img,
                         rng=None if rng is None else jax.random.fold_in(rng, i))
      scores = method.score(i, ctx)
      aux['scores'].append(scores)
      keep = st.valid & (~st.image_mask | top_k_mask(scores, st.image_mask, counts[i]))
    if st.gen is not None and stop == tl:
      tk = method.text_keep(TextContext(h_new=h, layer=stop, model=model))
      if tk is not None:
        keep = keep & (~st.gen | tk)
        aux['text_keep'] = tk
    keep = keep | ((jnp.arange(h.shape[1])[None, :] == (count - 1)[:, None]) & st.valid)   # the last token
    idx, st.valid, _ = M.compact(keep, sizes[method_bounds.index(stop) + 1])
    h, st.orig = M.take(h, idx), M.take(st.orig, idx)
    st.image_mask = M.take(st.image_mask, idx) & st.valid
    st.gen = None if st.gen is None else M.take(st.gen, idx) & st.valid
    st.positions = (jnp.broadcast_to(jnp.arange(idx.shape[1], dtype=jnp.int32), idx.shape)
                    if method.renumber_positions else M.take(st.positions, idx))
    return h

  h = walk(h, n_layers, bounds, run, at, prev=pts if method.needs_prev_hidden else ())
  count = jnp.sum(st.valid, -1).astype(jnp.int32)
  lm = model.language_model
  h_last = h if not return_logits else M.take(h, (count - 1)[:, None])
  logits_last = lm.head(h_last)[:, 0]
  logits = lm.head(h) if return_logits else None
  return ForwardOut(logits_last, logits, tuple(segments), jnp.stack(kept), aux if intermediates else None)


@partial(jax.jit, static_argnames=('method', 'sizes', 'return_kv', 'return_logits', 'intermediates', 'count',
                                   'mod_size'))
def _prefill_jit(model, method, ids, n_real, pixel_values, rng, *, sizes, return_kv, return_logits,
                 intermediates, count=None, mod_size=None):
  h, image_mask = model.embed(ids, pixel_values, count, method)
  valid = jnp.arange(ids.shape[1])[None, :] < n_real[:, None]
  return sparse_forward(model, method, h, valid, image_mask, None, rng, sizes=sizes, return_kv=return_kv,
                        return_logits=return_logits, intermediates=intermediates,
                        n_image=visual_token_count(model.mc, method, count),
                        frames=M.frames_of(pixel_values), mod_size=mod_size)


def mod_gather_size(model, req, n_visual, bucket):
  """Static slots of an MoD layer's routed sequence: the longest sample's text + k per frame, rounded up
  to the bucket (None when the model has no MoD layer or the batch no image)."""
  if not model.has_mod or req.pixel_values is None:
    return None
  k = M.routed_count(n_visual, M.settings(model.mc).r)
  need = req.n_real - req.n_img + (req.n_img // n_visual) * k
  return min(int(req.ids.shape[1]), R.round_up(int(need.max()), bucket))


def eval_section(cfg, model_cfg=None):
  """The `eval` section of a root config, or the defaults (tiny ones for a model of hidden size < 1024)."""
  if cfg is not None and 'eval' in cfg:
    return cfg.eval
  small = model_cfg is None or model_cfg.llm.hidden < 1024
  return eval_defaults('tiny' if small else '7b')


@dataclasses.dataclass
class PrefillOutput:
  """Host-facing prefill result: `out` (ForwardOut, device arrays), the packed `request`, static `sizes`."""
  out: ForwardOut
  request: R.Request
  sizes: Tuple[int, ...]

  @property
  def logits_last(self):
    return self.out.logits_last


def prefill(model, cfg, method, input_ids, pixel_values, attention_mask=None, *, rng=None,
            return_kv=True, return_logits=False, max_new_tokens=1, extra_len=0, intermediates=False,
            visual_tokens=None):
  """Validates, packs and runs the sparsified prefill. cfg: root config (its `eval` buckets) or None.
  visual_tokens: MQT m for this call (prompts carry m placeholders per image; UserError outside 1..M or
  on a model without the MQT projector); a pre-LLM reducer method (VisionZip, DivPrune) sets its own k.

  Returns PrefillOutput; `.out.logits_last` (B, vocab) float32, `.out.segments[s].kv` the caches.
  """
  mc = model.mc
  ev = eval_section(cfg, mc)
  n_vis = visual_token_count(mc, method, visual_tokens)
  method.validate(mc, n_vis)
  if pixel_values is not None and np.ndim(pixel_values) == 5 and R.boundaries(method, mc):
    raise UserError(f'{method.name} drops image tokens by a per-image budget: give one image per sample '
                    '(pixel_values (B, H, W, 3)), not frames')
  req = R.check_and_pack(mc, input_ids, pixel_values, attention_mask, max_new_tokens=max_new_tokens,
                         bucket=ev.prefill_bucket, extra_len=extra_len, n_visual=n_vis)
  sizes = R.segment_sizes(method, mc, req.n_real, req.n_img, req.ids.shape[1], ev.prefill_bucket,
                          n_visual=n_vis)
  pix = None if req.pixel_values is None else jnp.asarray(req.pixel_values)
  out = _prefill_jit(model, method, jnp.asarray(req.ids), jnp.asarray(req.n_real), pix, rng, sizes=sizes,
                     return_kv=return_kv, return_logits=return_logits, intermediates=intermediates,
                     count=None if visual_tokens is None else int(visual_tokens),
                     mod_size=mod_gather_size(model, req, n_vis, ev.prefill_bucket))
  return PrefillOutput(out, req, sizes)
