"""A fingerprint of this machine's floating-point path, printed with the demo's table.

    fp = fingerprint()
    # {'hash': '1f0c9a3b7d2e4c55', 'jax': '0.10.2', 'jaxlib': '0.10.2', 'backend': 'cpu',
    #  'cpu': 'AMD EPYC 9B14', 'threads': 2, 'dot': 'ynn'}
    fingerprint_line(fp)   # 'floating-point path 1f0c9a3b7d2e4c55 (jax 0.10.2, cpu AMD EPYC 9B14, ...)'
    pin_cpus(2)            # before jax's first computation: XLA CPU's thread pool gets 2 threads
    op_hashes()            # {'projection': '3be0...', 'weight_grad': ..., ...}: one hash per operation kind

    python -m dynllava_jax.demo.fingerprint [--cpus 2] [--ops]   # the line (and the per-op hashes)

The demo trains for thousands of steps, and a difference in the last bit of one matrix product grows over
them into different greedy answers (docs/demo.md, "Reproducibility"). `hash` covers the results of the
operations a training step is made of, under `jax.jit` at the demo's sizes: a projection contracting over
128 features, its weight gradient contracting over 2048 token rows (batch 8 × 256 tokens), an RMS norm, a
softmax over 256 keys, a cross-entropy over 256 words, and their gradients. Two machines with the same
hash compute these bit for bit, so the same code and seeds can train the same parameters (as far as these
operations stand for the rest); two with different hashes will train different last bits and, by what the
recorded runs show, print tables a few points apart. `dot` says which XLA CPU path ran the product:
'ynn' (a YNNPACK fusion; jax 0.10's default, whose kernels are chosen at run time from the CPU's
features, so `--xla_cpu_max_isa` does not change its result) or 'xla' (XLA's own code or Eigen).

The thread count is part of the path: XLA CPU sizes its thread pool from the CPUs the process may run on,
and a product split over another number of threads sums in another order (on the 2-core VM, this hash under
`taskset -c 0` differs from the 2-thread one). `pin_cpus(2)`, the demo's default, gives every machine with 2
or more CPUs the demo's 2-thread split; the CPU's own kernels (its instruction set, for YNNPACK) remain.

Where two machines' hashes differ, `op_hashes` says which kind of operation differs: each of the step's
operations alone, jitted on its own (inputs as arguments: XLA folds a jitted function's constants at
compile time, with its own evaluator, not the run-time kernels). On the 2-core VM one thread instead of two
changes exactly the long reductions (`weight_grad`, `token_sum`); `--xla_cpu_max_isa` below AVX2 changes
only `row_norm` (XLA's own fused code); the products are the same bit for bit in YNNPACK and in XLA/Eigen
(docs/demo.md, "Reproducibility").
"""
import hashlib
import os
import platform

import numpy as np      # jax is imported by fingerprint(): the scripts' --help and pin_cpus stay jax-free

TOKENS, WIDTH, KEYS, VOCAB = 2048, 128, 256, 256


def _cpu_name():
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


CPUS_HELP = ('run on this many of the CPUs (0: all): the thread count is part of the floating-point path, 2 '
             "gives every machine with >= 2 CPUs the recorded runs' split (docs/demo.md)")


def _cpus():
  """The CPUs this process may run on (macOS has no affinity: all of the machine's)."""
  try:
    return sorted(os.sched_getaffinity(0))
  except AttributeError:
    return list(range(os.cpu_count() or 1))


def pin_cpus(n):
  """Restricts this process to the first `n` CPUs it may run on (0: all; fewer available: all of them).
  Call it before jax's first computation: XLA CPU sizes its thread pool when the backend starts. Returns
  the CPUs kept."""
  cpus = _cpus()
  if 0 < n < len(cpus) and hasattr(os, 'sched_setaffinity'):
    cpus = cpus[:n]
    os.sched_setaffinity(0, cpus)
  return cpus


def begin(n_cpus):
  """The demo scripts' start, before any jax computation: pin to `n_cpus`, then print and return the
  fingerprint of the path the run trains on."""
  pin_cpus(n_cpus)
  fp = fingerprint()
  print(fingerprint_line(fp), flush=True)
  return fp


def fingerprint(seed=0):
  """The dict above; `hash` is 16 hex digits of the step's loss and gradients (float32 bytes)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def _step(params, x, labels):
    """One small training step's arithmetic -> (loss, grads): RMS norm, projection, attention, CE."""
    def loss_fn(p):
      h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)             # (T, D)
      q, k = h @ p['wq'], h @ p['wk']                                                 # (T, D)
      qb, kb = q.reshape(-1, KEYS, WIDTH), k.reshape(-1, KEYS, WIDTH)                 # (B, S, D)
      att = jax.nn.softmax(jnp.einsum('bqd,bkd->bqk', qb, kb) / np.sqrt(WIDTH), -1)
      o = jnp.einsum('bqk,bkd->bqd', att, kb).reshape(TOKENS, WIDTH)
      logits = o @ p['out']                                                           # (T, V)
      lse = jax.nn.logsumexp(logits, -1)
      return jnp.mean(lse - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0])
    return jax.value_and_grad(loss_fn)(params)

  rng = np.random.default_rng(seed)
  params = {'wq': rng.normal(0, 0.1, (WIDTH, WIDTH)), 'wk': rng.normal(0, 0.1, (WIDTH, WIDTH)),
            'out': rng.normal(0, 0.1, (WIDTH, VOCAB))}
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  x = jnp.asarray(rng.normal(0, 1, (TOKENS, WIDTH)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, VOCAB, TOKENS), jnp.int32)
  step = jax.jit(_step).lower(params, x, labels).compile()
  loss, grads = step(params, x, labels)
  h = hashlib.sha256(np.asarray(loss, np.float32).tobytes())
  for name in sorted(grads):
    h.update(np.asarray(grads[name], np.float32).tobytes())
  return {'hash': h.hexdigest()[:16], 'jax': jax.__version__, 'jaxlib': _jaxlib_version(),
          'backend': jax.default_backend(), 'cpu': _cpu_name(), 'threads': len(_cpus()),
          'dot': 'ynn' if 'ynn_fusion' in step.as_text() else 'xla'}


def _op_inputs(seed):
  rng = np.random.default_rng(seed)
  return {'x': rng.normal(0, 1, (TOKENS, WIDTH)), 'g': rng.normal(0, 1, (TOKENS, WIDTH)),
          'w': rng.normal(0, 0.1, (WIDTH, WIDTH)), 'out': rng.normal(0, 0.1, (WIDTH, VOCAB))}


def _ops():
  """name -> fn(inputs) for the operations a training step is made of, at the demo's sizes."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  heads = lambda a: a.reshape(-1, KEYS, WIDTH)                               # (T, D) -> (B, S, D)
  scores = lambda i: jnp.einsum('bqd,bkd->bqk', heads(i['x']), heads(i['g'])) / np.sqrt(WIDTH)
  return {
      'projection': lambda i: i['x'] @ i['w'],                               # contracts 128 features
      'input_grad': lambda i: i['g'] @ i['w'].T,                             # contracts 128 features
      'weight_grad': lambda i: i['x'].T @ i['g'],                            # contracts 2048 token rows
      'token_sum': lambda i: jnp.sum(i['g'], 0),                             # a bias's gradient: 2048 rows
      'row_norm': lambda i: i['x'] * jax.lax.rsqrt(jnp.mean(i['x'] ** 2, -1, keepdims=True) + 1e-6),
      'attention_scores': scores,                                            # contracts 128 features
      'softmax': lambda i: jax.nn.softmax(scores(i), -1),                    # over 256 keys
      'attention_values': lambda i: jnp.einsum('bqk,bkd->bqd', jax.nn.softmax(scores(i), -1), heads(i['g'])),
      'logsumexp': lambda i: jax.nn.logsumexp(i['x'] @ i['out'], -1),        # over 256 words
  }


def op_hashes(seed=0):
  """{operation: 16 hex digits of its float32 result}, each operation jitted alone (see the docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  inputs = {k: jnp.asarray(v, jnp.float32) for k, v in _op_inputs(seed).items()}
  return {name: hashlib.sha256(np.asarray(jax.jit(fn)(inputs), np.float32).tobytes()).hexdigest()[:16]
          for name, fn in _ops().items()}


def _jaxlib_version():
  import jaxlib  # pylint: disable=g-import-not-at-top
  return getattr(jaxlib, '__version__', '?')


def fingerprint_line(fp):
  return (f"floating-point path {fp['hash']} (jax {fp['jax']}, {fp['backend']} {fp['cpu']}, "
          f"{fp['threads']} threads, dot {fp['dot']})")


def foreign_stages(infos, fp):
  """The stages (names) of `infos` (run_stage's dicts) trained on another floating-point path than `fp`'s,
  e.g. cached from a run on another machine or linked in from one; stages that recorded none are left out."""
  return [k for k, i in infos.items() if i.get('fingerprint') not in (None, fp['hash'])]


def foreign_line(infos, fp):
  """'' or one line naming the stages trained on another path (printed and put in results.md's head)."""
  names = foreign_stages(infos, fp)
  if not names:
    return ''
  paths = sorted({infos[k]['fingerprint'] for k in names})
  return (f"stages {', '.join(str(k) for k in names)} trained on another floating-point path "
          f"({', '.join(paths)}): their last bits, and this table, may differ from a run on this path")


def head_note(fp, infos):
  """What results.md's head says of the path: '; <fingerprint line>[; <foreign line>]'."""
  foreign = foreign_line(infos, fp)
  return f'; {fingerprint_line(fp)}' + (f'; {foreign}' if foreign else '')


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top
  ap = argparse.ArgumentParser(description='Print this machine\'s floating-point path (docs/demo.md).')
  ap.add_argument('--cpus', type=int, default=2, help=CPUS_HELP)
  ap.add_argument('--ops', action='store_true', help='also one hash per operation kind, to compare machines')
  args = ap.parse_args(argv)
  fp = begin(args.cpus)
  if args.ops:
    for name, h in op_hashes().items():
      print(f'  {name:18s} {h}')
  return fp


if __name__ == '__main__':
  main()
