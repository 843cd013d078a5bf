"""Where decode time goes: the KV-cache `decode_step` (dense, batch B) at several cache capacities, timed as
8 steps in one jitted fori_loop with the caches loop-carried (as in generate's while_loop),
beside a cache-free 1-token forward through the same layers (weights read once, no attention over a cache).

    python benchmarks/decode_step.py --json benchmarks/results/decode_step.json [--size bench]
        [--batch 1] [--capacities 128,768,1536] [--runs 5] [--blocks 0]

If the step time grows with capacity much faster than the attention's cache read (2·L·C·Hkv·D·4 bytes),
the cache is being copied rather than updated in place.
"""
import argparse
from functools import partial
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=wrong-import-position


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--json', default=None)
  ap.add_argument('--size', default='bench')
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--capacities', default='128,768,1536')
  ap.add_argument('--runs', type=int, default=5)
  ap.add_argument('--blocks', type=int, default=0, help='eval.decode_weight_blocks (0: auto)')
  args = ap.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dynllava_jax.decode import cache as C  # pylint: disable=g-import-not-at-top
  from dynllava_jax.decode.step import decode_step, unstack_layers, weight_blocks  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import Llava  # pylint: disable=g-import-not-at-top
  from dynllava_jax.sparsity.registry import make_sparsifier  # pylint: disable=g-import-not-at-top

  cfg = common.bench_config(args.size)
  mc, lc, b = cfg.model, cfg.model.llm, args.batch
  model = nnx.jit(lambda: Llava(mc, rngs=nnx.Rngs(0)))()
  dense = make_sparsifier('dense', cfg)
  layers = unstack_layers(model, weight_blocks(args.blocks, b))   # what generate() does once per call
  n_steps = 8

  @partial(jax.jit, donate_argnums=2)
  def steps(m, ls, caches, t):
    """n_steps decode steps in one fori_loop, the caches loop-carried, as in generate's while_loop."""
    def body(_, c):
      _, c, _ = decode_step(m, dense, c, t, jnp.ones((b,), bool), ls)
      return c
    return jax.lax.fori_loop(0, n_steps, body, caches)

  def timed(fn, *a):
    jax.block_until_ready(fn(*a))
    ts = []
    for _ in range(args.runs):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*a))
      ts.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(ts)

  rows = []
  tok = jnp.full((b,), 5, jnp.int32)
  for cap in [int(x) for x in args.capacities.split(',')]:
    shape = (b, lc.kv_heads, cap, lc.head_dim)
    length = jnp.full((b,), min(100, cap // 2), jnp.int32)   # stays below capacity over the timed runs
    new = lambda: tuple(jnp.zeros(shape, jnp.float32) for _ in range(lc.layers))
    cache_bytes = 2 * lc.layers * b * cap * lc.kv_heads * lc.head_dim * 4
    state = {'caches': (C.SegmentCache(new(), new(), length, jnp.array(length), 0, lc.layers),)}

    def run(m, ls, t):   # the caches are donated and replaced
      state['caches'] = steps(m, ls, state['caches'], t)
      return state['caches'][0].length

    ms = timed(run, model, layers, tok) / n_steps
    rows.append({'case': f'{args.size}_decode_step_cap{cap}', 'method': 'dense', 'batch': b, 'capacity': cap,
                 'prefill_s': None, 'decode_ms_per_token': ms, 'kv_cache_bytes': int(cache_bytes),
                 'flops_xla': None})
    print(rows[-1], flush=True)

  @jax.jit
  def one_token(m, x):
    lm = m.language_model
    pos = jnp.zeros((b, 1), jnp.int32)
    return lm.head(lm.run_layers(x, pos, jnp.ones((b, 1, 1), bool)))

  ms = timed(one_token, model, jnp.ones((b, 1, lc.hidden), jnp.float32))
  rows.append({'case': f'{args.size}_one_token_forward_no_cache', 'method': 'dense', 'batch': b,
               'capacity': 0, 'prefill_s': None, 'decode_ms_per_token': ms, 'kv_cache_bytes': 0,
               'flops_xla': None})
  print(rows[-1], flush=True)
  common.print_rows(rows, ['case', 'batch', 'capacity', 'decode_ms_per_token', 'kv_cache_bytes'])
  common.write_json(args.json, rows, {**common.environment(), 'args': vars(args)})


if __name__ == '__main__':
  main()
