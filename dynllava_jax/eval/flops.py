"""Prefill FLOPs three ways: the paper's Eq. 13, an analytic whole-prefill count, and XLA's cost analysis.

1. `eq13_flops(model_cfg, method)`: Dynamic-LLaVA Eq. 13, image tokens only: per LLM layer `32·B·N·C² +
   4·B·N²·C` (N image tokens there, C hidden) with the method's drop schedule; reproduces the paper's 7B
   10.07 → 2.49 TFLOPs, 13B 19.6 → 4.66, 3.2 at K=3, R=0.75 (tests).
2. `prefill_flops(model_cfg, method, text_tokens)`: every matmul of one prefill as 2·M·N·K: ViT (patch
   embedding + the layers LLaVA runs), projector, each LLM layer on the tokens present there (q/k/v/o, full
   T_q·T_k attention products, SwiGLU), the method's scoring, the LM head at the last position
   (`lm_head='last'`, what prefill returns) or all ('all'). Element-wise work is left out (a few % on toys).
3. `xla_flops(fn, *abstract_args)`: XLA's cost analysis on abstract shapes; it counts a while-loop body
   once, so the layer scans are unrolled while tracing (`unrolled_scans`). None where the backend gives no
   count; `matmul_flops` counts the jaxpr's matmuls on any backend.
"""
import contextlib
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dynllava_jax.model import projector as P
from dynllava_jax.model.projector import num_visual_tokens as num_image_tokens
from dynllava_jax.sparsity.base import keep_budget


# ---------------------------------------------------------------- drop schedule

def image_token_schedule(model_cfg, method=None, n_image=None):
  """Image tokens present in each LLM layer under `method`'s drop points -> list of length llm.layers.

  A threshold-mode drop (keep count None) is counted at the configured budget ⌊N·r_I⌋.
  """
  n = P.visual_token_count(model_cfg, method) if n_image is None else n_image
  layers = model_cfg.llm.layers
  sched = [n] * layers
  if method is None:
    return sched
  points = tuple(method.drop_points(model_cfg))
  counts = tuple(method.keep_counts(n))
  if len(points) != len(counts):
    raise ValueError(f'{method.name}: {len(points)} drop points but {len(counts)} keep counts')
  for p, k in zip(points, counts):
    if k is None:   # threshold mode: a data-dependent count; use the configured keep ratio's budget
      k = keep_budget(n, model_cfg.sparse.image_keep_ratio)
    for layer in range(p, layers):
      sched[layer] = k
  return sched


# ---------------------------------------------------------------- Eq. 13

def eq13_flops(model_cfg, method=None, batch=1):
  """Eq. 13 (per layer 32·B·N·C² + 4·B·N²·C) summed over the LLM's layers with the method's image-token
  schedule (FLOPs, not TFLOPs)."""
  c = model_cfg.llm.hidden
  return float(sum(32 * batch * n * c * c + 4 * batch * n * n * c for n in image_token_schedule(model_cfg, method)))


# ---------------------------------------------------------------- analytic whole prefill

def vit_flops(vc, batch=1):
  """CLIP tower matmuls: patch embedding + the encoder layers LLaVA runs (up to feature_layer)."""
  n = (vc.image_size // vc.patch_size) ** 2
  t, w = n + 1, vc.width
  run = vc.depth + 1 + vc.feature_layer if vc.feature_layer < 0 else vc.feature_layer
  patch = 2 * n * (vc.patch_size ** 2 * 3) * w
  layer = 8 * t * w * w + 4 * t * t * w + 4 * t * w * vc.mlp_dim
  return batch * (patch + run * layer)


def slot_flops(model_cfg, method=None, visual_tokens=None, batch=1):
  """The visual-token slot of one call: projector at m, plus a pre-LLM reducer's own work
  (`method.reduce_flops`), whose projector runs on the tokens it feeds it."""
  if method is not None and getattr(method, 'reduces_visual', False):
    return method.reduce_flops(model_cfg, visual_tokens, batch)
  return P.projector_flops(model_cfg, visual_tokens, batch)


def attention_pairs(t, causal_chunk=0):
  """Query-key pairs the attention computes on t tokens: t², or with query chunks of `causal_chunk` rows
  (`model.causal_chunk`, inference) Σ over chunks of rows × keys up to the chunk's end."""
  if not causal_chunk or t <= causal_chunk:
    return t * t
  return sum((min(a + causal_chunk, t) - a) * min(a + causal_chunk, t) for a in range(0, t, causal_chunk))


def llm_layer_flops(lc, t_q, t_k=None, batch=1, pairs=None):
  """One decoder layer on t_q query tokens attending over t_k keys (or `pairs` query-key pairs)."""
  t_k = t_q if t_k is None else t_k
  h, hd = lc.hidden, lc.head_dim
  proj = 2 * t_q * h * hd * (2 * lc.heads + 2 * lc.kv_heads)
  attn = 4 * (t_q * t_k if pairs is None else pairs) * lc.heads * hd
  mlp = 6 * t_q * h * lc.mlp_dim
  return batch * (proj + attn + mlp)


def last_query_layer_flops(lc, t, batch=1):
  """The engine's last decoder layer when only the last position is read (`DecoderLayer.__call__` with `select`):
  K/V projections of t tokens, then q, attention over t keys, output projection and MLP of one token."""
  kv = 2 * t * lc.hidden * lc.head_dim * 2 * lc.kv_heads
  return llm_layer_flops(lc, 1, t, batch) - batch * 2 * lc.hidden * lc.head_dim * 2 * lc.kv_heads + batch * kv


def prefill_flops(model_cfg, method=None, text_tokens=64, batch=1, lm_head='last', seq_lens=None,
                  include_vision=True, causal_chunk=0, last_query=False, visual_tokens=None, frames=1,
                  mod_len=None):
  """Analytic FLOPs of one prefill of `batch` prompts, each `text_tokens` text + N image tokens.

  seq_lens: optional per-layer sequence lengths (e.g. the engine's padded buckets); default = text tokens
  + the image tokens the method keeps in that layer. causal_chunk: the engine's query-chunked attention
  (`model.causal_chunk`; 0 = full t² attention, the model-level count). last_query: the engine's last
  layer computes its output for the last position only (`last_query_layer_flops`; needs lm_head='last').
  visual_tokens: MQT m (the slot's count, `projector.visual_token_count`; a pre-LLM reducer method sets
  its own k). frames: images (video frames) per prompt, N tokens each (ViT and projector run per frame).
  MoD layers (`model/mod.py`, the plan's `mod` kind) run on the text + k routed tokens per frame
  (`mod_len`: the engine's padded length instead), plus the router on every token (as the last-query
  layer: the routed tokens' K/V and one query). Returns a dict of parts, 'total', and
  'per_kind': the LLM layers' FLOPs by layer kind.
  """
  if lm_head not in ('last', 'all'):
    raise ValueError(f"lm_head={lm_head!r}: use 'last' or 'all'")
  from dynllava_jax.model import mod as M  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model import plan as PL  # pylint: disable=g-import-not-at-top
  lc = model_cfg.llm
  n = P.visual_token_count(model_cfg, method, visual_tokens)
  sched = [frames * k for k in image_token_schedule(model_cfg, method, n)]
  lens = [text_tokens + k for k in sched] if seq_lens is None else list(seq_lens)
  if len(lens) != lc.layers:
    raise ValueError(f'seq_lens has {len(lens)} entries; the LLM has {lc.layers} layers')
  groups = PL.resolve(model_cfg)
  kinds = [g.kind for g in groups for _ in range(g.size)]
  tr = text_tokens + frames * M.routed_count(n, M.settings(model_cfg).r) if mod_len is None else int(mod_len)
  out = {}
  out['vision'] = frames * vit_flops(model_cfg.vision, batch) if include_vision else 0
  out['projector'] = frames * slot_flops(model_cfg, method, visual_tokens, batch) if include_vision else 0
  per_layer = []
  for i, t in enumerate(lens):
    if kinds[i] == M.KIND and frames:
      per_layer.append(llm_layer_flops(lc, tr, tr, batch) + M.router_flops(lc, t, batch))   # no query chunks
    elif kinds[i] == PL.SKIP:
      per_layer.append(0)
    else:
      per_layer.append(llm_layer_flops(lc, t, t, batch, attention_pairs(t, causal_chunk)))
  if last_query:
    if lm_head != 'last':
      raise ValueError("last_query=True needs lm_head='last'")
    if kinds[-1] == M.KIND and frames:      # the routed tokens' K/V, one query; the router on every token
      per_layer[-1] = last_query_layer_flops(lc, tr, batch) + M.router_flops(lc, lens[-1], batch)
    elif kinds[-1] != PL.SKIP:
      per_layer[-1] = last_query_layer_flops(lc, lens[-1], batch)
  out['llm_layers'] = sum(per_layer)
  per_kind = {kind: sum(f for k, f in zip(kinds, per_layer) if k == kind) for kind in dict.fromkeys(kinds)}
  out['scoring'] = 0 if method is None else sum(   # the method's work at each drop point
      method.scoring_flops(model_cfg, lens[p - 1] if p else lens[0], sched[p - 1] if p else n, batch)
      for p in method.drop_points(model_cfg))
  out['lm_head'] = batch * 2 * lc.hidden * lc.vocab_size * (1 if lm_head == 'last' else lens[-1])
  out['total'] = float(sum(out.values()))
  out['per_kind'] = per_kind
  return out


def mod_kv_bytes(model_cfg, text_tokens, frames, batch=1, dtype_bytes=2):
  """K/V bytes a prefill leaves: every layer holds text + frames·N tokens, an MoD layer text + frames·k
  (real tokens, no padding) -> {'total', 'per_kind'}."""
  from dynllava_jax.model import mod as M  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model import plan as PL  # pylint: disable=g-import-not-at-top
  lc = model_cfg.llm
  n = P.visual_token_count(model_cfg)
  k = M.routed_count(n, M.settings(model_cfg).r)
  per_tok = 2 * lc.kv_heads * lc.head_dim * dtype_bytes * batch
  per_kind = {}
  for g in PL.resolve(model_cfg):
    if g.kind == PL.SKIP:
      continue
    t = text_tokens + frames * (k if g.kind == M.KIND else n)
    per_kind[g.kind] = per_kind.get(g.kind, 0) + g.size * t * per_tok
  return {'total': int(sum(per_kind.values())), 'per_kind': per_kind}


def mod_engine_prefill_flops(model_cfg, text_tokens, frames, batch=1, xla=True):
  """(XLA FLOPs, analytic FLOPs) of the engine's prefill of `batch` prompts of `text_tokens` text and
  `frames` frames of N tokens (no bucket padding: the prompt and every MoD layer's routed sequence at
  their exact lengths), on abstract shapes. The analytic side is `prefill_flops` with last_query."""
  from dynllava_jax.decode.prefill import sparse_forward  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model import mod as M  # pylint: disable=g-import-not-at-top
  from dynllava_jax.sparsity.base import Sparsifier  # pylint: disable=g-import-not-at-top
  n = num_image_tokens(model_cfg)
  t0 = text_tokens + frames * n
  mod_size = text_tokens + frames * M.routed_count(n, M.settings(model_cfg).r)
  analytic = prefill_flops(model_cfg, None, text_tokens, batch, causal_chunk=int(model_cfg.get('causal_chunk', 0)),
                           last_query=True, frames=frames)['total']
  if not xla:
    return float('nan'), analytic
  graphdef, state = abstract_model(model_cfg)
  method = Sparsifier()

  def fn(state, ids, pix):
    model = nnx.merge(graphdef, state)
    h, image_mask = model.embed(ids, pix)
    valid = jnp.ones(ids.shape, bool)
    out = sparse_forward(model, method, h, valid, image_mask, None, None, sizes=(t0,), frames=frames,
                         mod_size=mod_size)
    return out.logits_last, [seg.kv for seg in out.segments]

  s = model_cfg.vision.image_size
  pix = (batch, frames, s, s, 3) if frames > 1 else (batch, s, s, 3)
  got = xla_flops(fn, state, jax.ShapeDtypeStruct((batch, t0), jnp.int32),
                  jax.ShapeDtypeStruct(pix, jnp.float32))
  return got, analytic


def reduction(dense, sparse):
  """Relative FLOPs saved, e.g. 0.75 for −75%."""
  return 1.0 - sparse / dense


# ---------------------------------------------------------------- XLA cost analysis

@contextlib.contextmanager
def unrolled_scans():
  """Traces every `jax.lax.scan` fully unrolled (so XLA's cost analysis sees each layer once each)."""
  orig = jax.lax.scan

  @functools.wraps(orig)
  def scan(f, init, xs=None, length=None, reverse=False, unroll=1, **kw):
    return orig(f, init, xs, length=length, reverse=reverse, unroll=True, **kw)

  jax.lax.scan = scan
  try:
    yield
  finally:
    jax.lax.scan = orig


def xla_flops(fn, *args, compile=True, **kwargs):
  """XLA's FLOP count of `fn(*args, **kwargs)` (args may be jax.ShapeDtypeStruct pytrees; nothing is
  allocated). Scans are unrolled while tracing. kwargs are static."""
  with unrolled_scans():
    lowered = jax.jit(functools.partial(fn, **kwargs)).lower(*args)
  cost = lowered.compile().cost_analysis() if compile else lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  if not cost or 'flops' not in cost:   # no count from this backend (a GPU before compiling): see matmul_flops
    return None
  return float(cost['flops'])


def matmul_flops(fn, *args, **kwargs):
  """2·M·N·K summed over every dot_general of `fn(*args, **kwargs)`'s jaxpr (args may be ShapeDtypeStructs;
  scan bodies times their length, nested jaxprs walked). Backend-independent; matmuls only, so it reads
  a little under XLA's count (97 % on the tiny train step)."""
  return jaxpr_matmul_flops(jax.make_jaxpr(functools.partial(fn, **kwargs))(*args).jaxpr)


def jaxpr_matmul_flops(jaxpr, mult=1):
  """`matmul_flops` of a traced jaxpr (mult: the enclosing scans' trip count)."""
  import jax.extend as jex  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  total = 0.0
  for e in jaxpr.eqns:
    if e.primitive.name == 'dot_general':
      (lc, _), _ = e.params['dimension_numbers']
      k = np.prod([e.invars[0].aval.shape[d] for d in lc]) if lc else 1
      total += mult * 2.0 * float(np.prod(e.outvars[0].aval.shape)) * float(k)
    inner = mult * e.params['length'] if e.primitive.name == 'scan' else mult
    for p in e.params.values():
      for j in (p if isinstance(p, (list, tuple)) else [p]):
        if isinstance(j, jex.core.ClosedJaxpr):
          total += jaxpr_matmul_flops(j.jaxpr, inner)
        elif isinstance(j, jex.core.Jaxpr):
          total += jaxpr_matmul_flops(j, inner)
  return total


def abstract_model(model_cfg):
  """(graphdef, abstract state) of a Llava for `model_cfg`; no weights are allocated."""
  from dynllava_jax.model.llava import Llava  # pylint: disable=g-import-not-at-top
  model = nnx.eval_shape(lambda: Llava(model_cfg, rngs=nnx.Rngs(0)))
  return nnx.split(model)


def tflops(x):
  return x / 1e12

