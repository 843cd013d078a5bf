"""The host allocator's share of a CPU train step: the demo's stage step with 4 KiB pages vs malloc on
transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1), each in its own process, rounds alternated.

    python benchmarks/host_alloc.py [--stage 2] [--steps 40] [--rounds 2] [--json OUT.json]

Per child: `configs/demo.py:stage=<stage>` from fresh weights (no init_from: the step's cost does not depend
on the values), five batches from the demo's pipeline placed on the device once, one warm-up step, then
--steps jitted steps over them. Reported per step: wall ms, user and system CPU ms and minor page faults
(getrusage around the timed steps). `variant` `4k`: GLIBC_TUNABLES removed from the child's environment;
`hugetlb`: glibc.malloc.hugetlb=1. The kernel's THP mode (/sys/kernel/mm/transparent_hugepage/enabled)
is recorded: with `never` the two variants are the same program; glibc < 2.35 ignores the tunable.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {'4k': None, 'hugetlb': 'glibc.malloc.hugetlb=1'}


def child(stage, steps):
  import resource  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from configs.demo import get_config  # pylint: disable=g-import-not-at-top
  from dynllava_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import loop  # pylint: disable=g-import-not-at-top
  c = get_config(f'stage={stage}')
  c.train.init_from = ''
  tr = loop.Trainer(c, os.path.join('/tmp', f'host_alloc_{os.getpid()}'))
  state = tr.init_state()
  it = pipeline.make_iterator(c, 'train')
  batches = [next(it) for _ in range(5)]
  fn = tr.step_fn(0)
  with jax.set_mesh(tr.mesh):
    dev = [loop.to_device(b, tr.batch_sharding, c.model.pad_token_id) for b in batches]
    state, m = fn(state, dev[0])
    jax.block_until_ready(m)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for i in range(steps):
      state, m = fn(state, dev[i % len(dev)])
    jax.block_until_ready(m)
    t, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
  per = lambda x: x / steps
  print(json.dumps({'step_ms': per(t) * 1e3, 'user_ms': per(r1.ru_utime - r0.ru_utime) * 1e3,
                    'sys_ms': per(r1.ru_stime - r0.ru_stime) * 1e3,
                    'minor_faults': per(r1.ru_minflt - r0.ru_minflt)}), flush=True)


def _thp_mode():
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return f.read().strip()
  except OSError:
    return None


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--stage', default='2')
  ap.add_argument('--steps', type=int, default=40)
  ap.add_argument('--rounds', type=int, default=2)
  ap.add_argument('--json', default=None)
  ap.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    return child(args.stage, args.steps)
  runs = {v: [] for v in VARIANTS}
  for rnd in range(args.rounds):
    for name, tunable in VARIANTS.items():
      env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
      if tunable:
        env['GLIBC_TUNABLES'] = tunable
      out = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', '--stage', args.stage,
                            '--steps', str(args.steps)], env=env, capture_output=True, text=True, check=False)
      if out.returncode:
        raise SystemExit(f'{name} child failed: {out.stderr.strip().splitlines()[-1:]}')
      runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(f'round {rnd} {name}: {runs[name][-1]}', flush=True)
  rows = []
  for name, rs in runs.items():
    row = {'variant': name, 'glibc_tunables': VARIANTS[name], 'children': len(rs)}
    for k in ('step_ms', 'user_ms', 'sys_ms', 'minor_faults'):
      row[k] = statistics.median(r[k] for r in rs)
    row['runs'] = rs
    rows.append(row)
  for r in rows:
    r['step_vs_4k'] = r['step_ms'] / rows[0]['step_ms']
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  common.print_rows(rows, ['variant', 'step_ms', 'user_ms', 'sys_ms', 'minor_faults', 'step_vs_4k'])
  meta = {'args': vars(args), 'thp_enabled': _thp_mode(), 'cpu_count': os.cpu_count()}
  common.write_json(args.json, rows, meta)


if __name__ == '__main__':
  main()
