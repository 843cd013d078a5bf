"""Where our training step's time goes, and variants of it side by side.

    python benchmarks/step_profile.py profile --method dense --batch 1 [--size bench] [--top 30]
    python benchmarks/step_profile.py compare --method dynamic --batch 1 --variants vjp,autodiff,vjp+unroll
    python benchmarks/step_profile.py compare --method dense,dynamic --batch 1 --variants unroll

`profile`: one jitted step (`benchmarks/train_step.py::Ours`, the bench config, fp32) under
`jax.profiler.trace`; the XLA CPU thunks' events summed per HLO instruction, each tagged with its shape,
its JAX op (HLO metadata) and a category (dots, attention probabilities, transposes, zero-initialised
buffers, the optimizer's per-parameter work, the rest); prints the categories' shares and the top
instructions. `compare`: each variant compiled in this one process, then `--runs` rounds of one step of
each in turn (the same machine load for all): wall and CPU seconds, the per-round ratios to the first
variant. Variants (words joined by '+'): `vjp` (the code as it is) | `autodiff` (MaskedSoftmax's formula
left to autodiff instead of its custom VJP; implies `softmaxvjp`) | `softmaxvjp` (the attention's gradient
through the softmax-level VJPs, Σ p·dp over the probabilities, instead of the attention-level ones) | `unroll` (model.scan_unroll = the layer count: the decoder's
scans unrolled) | `nd` (the linear layers on (B, T, din) as
they come instead of flattened to (B·T, din): the weight gradients' transposes) | `fullhead` (the LM head at every position, train.head_positions = 0, instead of the
labelled ones). `--method dense,dynamic` compiles every variant of each method, side by side.
"""
import argparse
import collections
import glob
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import train_step as TS  # pylint: disable=wrong-import-position


def runner(size, method, batch, text_tokens, variant='vjp'):
  """A compiled `TS.Ours` for `variant` -> (runner, compile seconds)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model import attention as A  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model import layers as L  # pylint: disable=g-import-not-at-top
  words = variant.split('+')
  cfg = TS.step_config(size, method)
  if 'fullhead' in words:
    cfg.train.head_positions = 0
  if 'unroll' in words:
    cfg.model.scan_unroll = cfg.model.llm.layers
  r = TS.Ours(cfg, TS.make_batch(cfg.model, batch, text_tokens), method)

  def formula(s, g, i, eps):
    ag = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)) * (g + (1.0 - g) * i)
    return (ag + eps / s.shape[-1]) / (jnp.sum(ag, axis=-1, keepdims=True) + eps)

  def softmax_level(qh, kh, vh, allowed):
    return A._rows_mix(A.masked_softmax(A._rows_scores(qh, kh), allowed), vh)  # pylint: disable=protected-access

  def masked_softmax_level(qh, kh, vh, allowed, g, i, eps):
    s = jnp.where(allowed, A._rows_scores(qh, kh), A.NEG_INF)  # pylint: disable=protected-access
    return A._rows_mix(A._masked_softmax_eps(s, g, i, eps), vh)  # pylint: disable=protected-access

  softmax_level_grads = 'softmaxvjp' in words or 'autodiff' in words   # autodiff acts at the softmax level
  patches = {'_masked_softmax_eps': formula if 'autodiff' in words else None,
             '_softmax_attend': softmax_level if softmax_level_grads else None,
             '_masked_attend': masked_softmax_level if softmax_level_grads else None}
  orig = {name: getattr(A, name) for name in patches}
  linear_call = L.Linear.__call__
  t0 = time.perf_counter()
  try:
    for name, fn in patches.items():
      setattr(A, name, fn or orig[name])
    if 'nd' in words:                   # the projections on (B, T, din) as they come, not flattened
      L.Linear.__call__ = lambda self, x: self.apply_2d(x)
    r.compile()                         # traced (and so patched) here, once
  finally:
    for name, fn in orig.items():
      setattr(A, name, fn)
    L.Linear.__call__ = linear_call
  return r, time.perf_counter() - t0


def _category(name, shape, body, op):
  if ' dot(' in body or name.startswith('dot'):
    return 'dots'
  if 'broadcast' in name:
    return 'zero-initialised buffers (broadcast)'
  if name.startswith('copy') or 'transpose' in name:
    return 'transposes / copies'
  if re.search(r'\b(\d+,)*\d+,(\d+),\2\]', shape) and 'jvp' in op:
    return 'attention probabilities (elementwise, reductions)'
  if 'jvp' not in op and 'while' not in op:
    return 'optimizer and norms (per parameter)'
  return 'other'


def profile(args):
  import jax  # pylint: disable=g-import-not-at-top
  r, comp = runner(args.size, args.method, args.batch, args.text_tokens, args.variants.split(',')[0])
  hlo = r.compiled.as_text()
  r.step()
  t0 = time.perf_counter()
  r.step()
  plain = time.perf_counter() - t0
  d = tempfile.mkdtemp(prefix='step_profile_')
  with jax.profiler.trace(d):
    t0 = time.perf_counter()
    r.step()
    traced = time.perf_counter() - t0
  pd = jax.profiler.ProfileData.from_file(glob.glob(d + '/**/*.xplane.pb', recursive=True)[0])
  shutil.rmtree(d, ignore_errors=True)                      # our own temporary trace
  tot, cnt = collections.Counter(), collections.Counter()
  for plane in pd.planes:
    for line in plane.lines:
      if not line.name.startswith('tf_XLAEigen'):          # XLA CPU's worker threads: one event per thunk
        continue
      for ev in line.events:
        if ev.name.startswith(('ThunkExecutor', 'SlinkyThreadPool', 'while')):
          continue                                          # containers, not work
        tot[ev.name] += ev.duration_ns
        cnt[ev.name] += 1
  cats, rows = collections.Counter(), []
  for name, ns in tot.items():
    m = re.search(r'^\s*(?:ROOT )?%?' + re.escape(name) + r' = ([^\n]*)$', hlo, re.M)
    line = m.group(1) if m else ''
    calls = re.search(r'calls=%?([\w.\-]+)', line)
    body = line
    if calls:
      bm = re.search(r'^%?' + re.escape(calls.group(1)) + r' [^\n]*\{\n(.*?)\n\}', hlo, re.M | re.S)
      body = bm.group(1) if bm else line
    op = re.search(r'op_name="([^"]*)"', line)
    op = op.group(1) if op else ''
    shape = line.split(' ')[0]
    cat = _category(name, shape, body, op)
    cats[cat] += ns
    rows.append((ns, name, cnt[name], shape, op, cat))
  total = sum(cats.values())
  print(f'{args.method} batch {args.batch}: compile {comp:.1f} s, step {plain:.2f} s, traced step {traced:.2f} s, '
        f'thunk events {total / 1e9:.2f} s, load {os.getloadavg()[0]:.1f}')
  for k, v in cats.most_common():
    print(f'  {k:52s} {v / 1e9:7.2f} s {v / total:6.1%}')
  print(f'top {args.top} instructions (summed over the layers):')
  for ns, name, c, shape, op, cat in sorted(rows, reverse=True)[:args.top]:
    print(f'  {ns / 1e6:8.0f} ms {c:3d}x {name:32s} {shape[:34]:34s} {op[-70:]}')


def compare(args):
  """Every (method, variant) pair compiled in this process, then `--runs` rounds of one step of each in
  turn; ratios to the first pair (`--method dense,dynamic` puts two methods side by side)."""
  pairs = [(m, v) for m in args.method.split(',') for v in args.variants.split(',')]
  rs = {}
  for m, v in pairs:
    r, comp = runner(args.size, m, args.batch, args.text_tokens, v)
    rs[(m, v)] = (r, {'compile_s': round(comp, 1), 'xla_peak_bytes': r.xla_peak_bytes(), 'first_loss': r.step()})
  res = {p: {'wall': [], 'cpu': []} for p in pairs}
  for _ in range(args.runs):
    for p, (r, _) in rs.items():
      w0, c0 = time.perf_counter(), time.process_time()
      r.step()
      res[p]['wall'].append(time.perf_counter() - w0)
      res[p]['cpu'].append(time.process_time() - c0)
  base = res[pairs[0]]
  for p in pairs:
    ratios = [a / b for a, b in zip(res[p]['wall'], base['wall'])]
    print(json.dumps({'variant': p[1], 'method': p[0], 'batch': args.batch, **rs[p][1],
                      'wall_s': [round(x, 3) for x in res[p]['wall']],
                      'cpu_s': [round(x, 3) for x in res[p]['cpu']],
                      'wall_ratio_per_round': [round(x, 3) for x in ratios],
                      'wall_ratio_median': round(statistics.median(ratios), 3),
                      'cpu_ratio_of_medians': round(statistics.median(res[p]['cpu'])
                                                    / statistics.median(base['cpu']), 3)}))
  print('load', os.getloadavg())


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('mode', choices=('profile', 'compare'))
  ap.add_argument('--size', default='bench')
  ap.add_argument('--method', default='dense')
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--text_tokens', type=int, default=64)
  ap.add_argument('--top', type=int, default=30)
  ap.add_argument('--variants', default='vjp,autodiff')
  ap.add_argument('--runs', type=int, default=3)
  args = ap.parse_args()
  profile(args) if args.mode == 'profile' else compare(args)  # pylint: disable=expression-not-assigned


if __name__ == '__main__':
  main()
