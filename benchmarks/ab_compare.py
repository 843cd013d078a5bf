"""Two checkouts' prefill and decode timed side by side, paired call by call (random weights, `bench` size).

    python benchmarks/ab_compare.py --before /path/to/checkout_A --after /path/to/checkout_B
        [--size bench] [--batches 1,8] [--methods dense,dynamic] [--new_tokens 4,36] [--reps 8]
        [--json out.json]

Why: on a shared, noisy machine two runs of `prefill_decode.py` made minutes apart differ by 10 % or more
for the same code, so a before/after comparison of two such runs cannot resolve 5 %. Here each checkout
runs in its own worker process (its own `dynllava_jax` and `benchmarks/common.py`, imported from its
root; the worker refuses to start if the import resolves elsewhere), both stay alive, and the driver asks
them for one generation at a time, alternating: for every cell (batch, method, new_tokens) of every
repetition, `before` then `after` on even repetitions, `after` then `before` on odd ones. A change in the
machine's load then hits both sides of a pair alike, and a pair's ratio is what is kept.

One call = `generate` (greedy, KV cache, EOS disabled so every sample makes M tokens) timed as
  prefill_s   the call's wall time minus its own decode clock (`GenerateOutput.decode_s`): the request,
              the prefill and the wait for its outputs;
  decode_s    that decode clock.
Decode per token = (decode_s(M_max) − decode_s(M_min)) / (M_max − M_min) within a repetition (the
per-call set-up — the loop's weight copy, cache init — cancels); prefill_s is the mean of the two calls.

Reported per (batch, method) and per ratio: the median over repetitions of the per-repetition ratio
after / before and a 95 % bootstrap interval of that median (2000 resamples, fixed seed):
  time ratio   prefill_s, decode ms/token (after ÷ before; < 1 = after is faster);
  Dynamic / dense speed-up change  (dense_after / dyn_after) ÷ (dense_before / dyn_before), per rep;
  ours / HF speed-up change        HF is the same code on both sides, so its ratio changes by
                                    before ÷ after of our time (the inverse of the time ratio).
Compiles first (every shape once per worker, untimed). Nothing is timed in `make test`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.abspath(__file__)


# ----------------------------------------------------------------------------------------------- worker


def worker(root, size):
  """Serves JSON requests on stdin, one per line: {'batch', 'method', 'm'} -> {'total_s', 'decode_s'}."""
  root = os.path.abspath(root)
  sys.path.insert(0, root)
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import dynllava_jax  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from dynllava_jax.decode.generate import generate  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import Llava  # pylint: disable=g-import-not-at-top
  from dynllava_jax.sparsity.registry import make_sparsifier  # pylint: disable=g-import-not-at-top
  for mod in (dynllava_jax, common):
    if not os.path.abspath(mod.__file__).startswith(root + os.sep):
      raise SystemExit(f'ab_compare worker: {mod.__name__} imported from {mod.__file__}, not from {root}')
  cfg = common.bench_config(size)
  mc = cfg.model
  model = nnx.jit(lambda: Llava(mc, rngs=nnx.Rngs(0)))()
  prompts, objs = {}, {}
  rng = jax.random.key(0)
  out = sys.stdout
  sys.stdout = sys.stderr        # anything the package prints goes to the log, not the protocol
  print(json.dumps({'ready': True, 'root': root, 'jax': jax.__version__}), file=out, flush=True)
  for line in sys.stdin:
    req = json.loads(line)
    b, name, m = int(req['batch']), req['method'], int(req['m'])
    if b not in prompts:
      prompts[b] = common.make_prompts(mc, b, int(req.get('text_tokens', 64)))
    if name not in objs:
      objs[name] = make_sparsifier(name, cfg)
    ids, pix, mask = prompts[b]
    t0 = time.perf_counter()
    g = generate(model, cfg, objs[name], ids, pix, mask, max_new_tokens=m, sampling='greedy', rng=rng)
    total = time.perf_counter() - t0
    if int(np.asarray(g.lengths).min()) != m:
      raise SystemExit('ab_compare worker: EOS is disabled, every sample must generate max_new_tokens')
    print(json.dumps({'total_s': total, 'decode_s': float(g.decode_s)}), file=out, flush=True)


# ----------------------------------------------------------------------------------------------- driver


class Worker:
  """One checkout's worker process."""

  def __init__(self, root, size):
    self.root = root
    self.proc = subprocess.Popen([sys.executable, HERE, '--worker', root, '--size', size],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root)
    self.info = self._read()

  def _read(self):
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(f'ab_compare: the worker for {self.root} exited (rc {self.proc.wait()})')
    return json.loads(line)

  def call(self, batch, method, m, text_tokens):
    self.proc.stdin.write(json.dumps({'batch': batch, 'method': method, 'm': m,
                                      'text_tokens': text_tokens}) + '\n')
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def bootstrap_median(xs, n=2000, seed=0):
  """(median, lo, hi): the median of xs and a 95 % percentile-bootstrap interval of it."""
  xs = np.asarray(xs, np.float64)
  rng = np.random.default_rng(seed)
  meds = np.median(xs[rng.integers(0, len(xs), (n, len(xs)))], axis=1)
  return float(np.median(xs)), float(np.quantile(meds, 0.025)), float(np.quantile(meds, 0.975))


def per_rep(times, lens):
  """times[rep] = {m: {'total_s', 'decode_s'}} -> (prefill_s per rep, decode ms/token per rep)."""
  lo, hi = min(lens), max(lens)
  pre = [statistics.mean(t[m]['total_s'] - t[m]['decode_s'] for m in lens) for t in times]
  dec = [1000.0 * (t[hi]['decode_s'] - t[lo]['decode_s']) / (hi - lo) for t in times]
  return pre, dec


def git_head(root):
  try:
    return subprocess.run(['git', '-C', root, 'rev-parse', '--short', 'HEAD'], capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def summarize(raw, batches, methods, lens):
  """raw[side][(b, method)] = [{m: call}, ...] -> rows of medians and after/before ratios."""
  rows = []
  series = {}
  for b in batches:
    for name in methods:
      pa, da = per_rep(raw['before'][(b, name)], lens)
      pb, db = per_rep(raw['after'][(b, name)], lens)
      series[(b, name)] = (pa, da, pb, db)
      row = {'batch': b, 'method': name,
             'prefill_s_before': statistics.median(pa), 'prefill_s_after': statistics.median(pb),
             'decode_ms_before': statistics.median(da), 'decode_ms_after': statistics.median(db)}
      for key, a, c in (('prefill_time_ratio', pa, pb), ('decode_time_ratio', da, db)):
        med, lo, hi = bootstrap_median([y / x for x, y in zip(a, c)])
        row[key], row[key + '_ci95'] = med, [lo, hi]
      rows.append(row)
  speedups = []
  if 'dense' in methods:
    for b in batches:
      for name in methods:
        if name == 'dense':
          continue
        pa, da, pb, db = series[(b, name)]
        qa, ea, qb, eb = series[(b, 'dense')]
        for what, dn_a, dy_a, dn_b, dy_b in (('prefill', qa, pa, qb, pb), ('decode', ea, da, eb, db)):
          change = [(nb / yb) / (na / ya) for na, ya, nb, yb in zip(dn_a, dy_a, dn_b, dy_b)]
          med, lo, hi = bootstrap_median(change)
          speedups.append({'batch': b, 'method': name, 'what': what,
                           'speedup_before': statistics.median([n / y for n, y in zip(dn_a, dy_a)]),
                           'speedup_after': statistics.median([n / y for n, y in zip(dn_b, dy_b)]),
                           'change': med, 'change_ci95': [lo, hi]})
  return rows, speedups


def main():
  if len(sys.argv) > 1 and sys.argv[1] == '--worker':
    ap = argparse.ArgumentParser()
    ap.add_argument('--worker')
    ap.add_argument('--size', default='bench')
    a = ap.parse_args()
    worker(a.worker, a.size)
    return
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--before', required=True, help='checkout root of the reference code')
  ap.add_argument('--after', required=True, help='checkout root of the changed code')
  ap.add_argument('--size', default='bench')
  ap.add_argument('--batches', default='1,8')
  ap.add_argument('--methods', default='dense,dynamic')
  ap.add_argument('--new_tokens', default='4,36')
  ap.add_argument('--text_tokens', type=int, default=64)
  ap.add_argument('--reps', type=int, default=8)
  ap.add_argument('--json', default=None)
  args = ap.parse_args()
  batches = [int(x) for x in args.batches.split(',')]
  methods = args.methods.split(',')
  lens = sorted(int(x) for x in args.new_tokens.split(','))
  if len(lens) != 2 or lens[0] == lens[1]:
    raise SystemExit('ab_compare: --new_tokens takes two different lengths (the decode clock is their '
                     'difference)')
  for side in (args.before, args.after):
    if not os.path.isdir(os.path.join(side, 'dynllava_jax')):
      raise SystemExit(f'ab_compare: {side} is not a checkout (no dynllava_jax/ in it)')
  t_start = time.time()
  load_start = list(os.getloadavg())
  commits = {'before_commit': git_head(args.before), 'after_commit': git_head(args.after)}   # what runs
  workers = {'before': Worker(os.path.abspath(args.before), args.size),
             'after': Worker(os.path.abspath(args.after), args.size)}
  cells = [(b, name, m) for b in batches for name in methods for m in lens]
  for side, w in workers.items():                    # compile every shape, untimed
    t0 = time.time()
    for b, name, m in cells:
      w.call(b, name, m, args.text_tokens)
    print(f'{side} ({git_head(w.root)}) warm in {time.time() - t0:.0f}s', flush=True)
  raw = {side: {(b, name): [] for b in batches for name in methods} for side in workers}
  for rep in range(args.reps):
    order = ('before', 'after') if rep % 2 == 0 else ('after', 'before')
    got = {side: {(b, name): {} for b in batches for name in methods} for side in workers}
    for b, name, m in cells:
      for side in order:
        got[side][(b, name)][m] = workers[side].call(b, name, m, args.text_tokens)
    for side in workers:
      for key, v in got[side].items():
        raw[side][key].append(v)
    print(f'rep {rep + 1}/{args.reps} done ({time.time() - t_start:.0f}s, load {os.getloadavg()[0]:.2f})',
          flush=True)
  for w in workers.values():
    w.close()
  rows, speedups = summarize(raw, batches, methods, lens)
  print('\n| batch | method | prefill s before / after | after ÷ before (95 % CI) | decode ms/token before / after '
        '| after ÷ before (95 % CI) |\n|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['batch']} | {r['method']} | {r['prefill_s_before']:.3f} / {r['prefill_s_after']:.3f} | "
          f"{r['prefill_time_ratio']:.3f} ({r['prefill_time_ratio_ci95'][0]:.3f}–{r['prefill_time_ratio_ci95'][1]:.3f}) | "
          f"{r['decode_ms_before']:.1f} / {r['decode_ms_after']:.1f} | "
          f"{r['decode_time_ratio']:.3f} ({r['decode_time_ratio_ci95'][0]:.3f}–{r['decode_time_ratio_ci95'][1]:.3f}) |")
  print('\n| batch | method / dense speed-up | before | after | after ÷ before (95 % CI) |\n|---|---|---|---|---|')
  for s in speedups:
    print(f"| {s['batch']} | {s['method']} {s['what']} | {s['speedup_before']:.3f}× | {s['speedup_after']:.3f}× | "
          f"{s['change']:.3f} ({s['change_ci95'][0]:.3f}–{s['change_ci95'][1]:.3f}) |")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    meta = {'args': vars(args), **commits,
            'workers': {s: w.info for s, w in workers.items()}, 'cpu_count': os.cpu_count(),
            'loadavg_start': load_start, 'loadavg_end': list(os.getloadavg()), 'wall_s': time.time() - t_start}
    raw_json = {side: {f'b{b}_{name}': reps for (b, name), reps in d.items()} for side, d in raw.items()}
    with open(args.json, 'w') as f:
      json.dump({'meta': meta, 'rows': rows, 'speedups': speedups, 'raw': raw_json}, f, indent=1)


if __name__ == '__main__':
  main()
