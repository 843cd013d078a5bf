"""The kernels under the `bench` model's prefill and decode, XLA CPU vs torch (fp32, same threads).

    python benchmarks/cpu_kernels.py --json benchmarks/results/cpu_kernels.json [--size bench]
        [--tokens 656] [--batches 1,8] [--runs 15]

Cases (best of --runs, warm; one process, XLA and torch interleaved), per batch B:
  gemm_{qkv,up,down}_bB  x (B·tokens, in) @ W (in, out) of a prefill layer (q/k/v/o: hidden -> hidden,
                   gate/up: hidden -> mlp, down: mlp -> hidden) -> GFLOP/s, XLA's dot and torch's.
  gemm_decode_bM   16 chained (M, hidden) @ (hidden, mlp) matmuls, M = 1 and 8 (a decode step's MLP
                   reads) -> GB/s of weights read.
  attention_bB     causal attention of one prefill layer (B, tokens, heads, head_dim): ours in one block
                   (batch 1) and in query chunks of `model.causal_chunk`; torch's
                   scaled_dot_product_attention(is_causal).
It says how far an fp32 CPU prefill can go with XLA's GEMMs: the layer is GEMM-bound, so its floor is the
GEMM rate (docs/benchmarks.md §5).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=wrong-import-position


def best_of(fn, runs):
  fn()
  best = float('inf')
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--json', default=None)
  ap.add_argument('--size', default='bench')
  ap.add_argument('--tokens', type=int, default=656)
  ap.add_argument('--batches', default='1,8')
  ap.add_argument('--runs', type=int, default=15)
  args = ap.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.attention import causal_allowed, dot_attention  # pylint: disable=g-import-not-at-top

  threads = os.cpu_count()
  torch.set_num_threads(threads)
  cfg = common.bench_config(args.size)
  lc = cfg.model.llm
  e, m, t, h, d = lc.hidden, lc.mlp_dim, args.tokens, lc.heads, lc.head_dim
  rng = np.random.default_rng(0)

  def arr(*shape):
    return rng.standard_normal(shape, dtype=np.float32)

  def jax_timer(f, *a):
    f = jax.jit(f)
    a = [jnp.asarray(x) for x in a]
    return best_of(lambda: jax.block_until_ready(f(*a)), args.runs)

  def torch_timer(f, *a):
    a = [torch.from_numpy(x.copy()) for x in a]

    def run():
      with torch.inference_mode():
        f(*a)
    return best_of(run, args.runs)

  rows = []

  def add(case, impl, seconds, batch=1, **extra):
    rows.append({'case': case, 'method': 'dense', 'impl': impl, 'batch': batch, 'ms': 1000.0 * seconds,
                 'prefill_s': None, 'decode_ms_per_token': None, 'kv_cache_bytes': None, 'flops_xla': None,
                 **extra})
    print(rows[-1], flush=True)

  batches = [int(b) for b in args.batches.split(',')]
  for b in batches:
    for name, (k_in, n_out) in (('qkv', (e, e)), ('up', (e, m)), ('down', (m, e))):
      x, w = arr(b * t, k_in), arr(k_in, n_out) * 0.02
      flops = 2 * b * t * k_in * n_out
      for impl, timer in (('xla', jax_timer), ('torch', torch_timer)):
        s = timer(lambda a, c: a @ c, x, w)
        add(f'gemm_{name}_b{b}', impl, s, batch=b, gflops_per_s=flops / s / 1e9, shape=[b * t, k_in, n_out])

  ws = [arr(e, m) * 0.02 for _ in range(16)]
  for rows_m in (1, 8):
    xm = arr(rows_m, e)

    def chain(a, *wl):
      for wi in wl:
        a = (a @ wi)[:, :e]
      return a
    for impl, timer in (('xla', jax_timer), ('torch', torch_timer)):
      s = timer(chain, xm, *ws)
      add(f'gemm_decode_b{rows_m}', impl, s, weight_gb_per_s=16 * e * m * 4 / s / 1e9, shape=[rows_m, e, m])

  chunk = int(cfg.model.causal_chunk)

  def sdpa(a, b, c):
    tr = [z.transpose(1, 2) for z in (a, b, c)]
    return torch.nn.functional.scaled_dot_product_attention(*tr, is_causal=True)

  for b in batches:
    q, k, v = arr(b, t, h, d), arr(b, t, h, d), arr(b, t, h, d)
    idx = np.broadcast_to(np.arange(t), (b, t))
    allowed = causal_allowed(jnp.asarray(idx), jnp.asarray(idx), jnp.ones((b, t), bool))
    for name, c in ((('one_block', 0),) if b == 1 else ()) + ((f'chunks_of_{chunk}', chunk),):
      s = jax_timer(lambda qq, kk, vv, cc=c: dot_attention(qq, kk, vv, allowed, causal_chunk=cc), q, k, v)
      add(f'attention_b{b}', f'xla_{name}', s, batch=b)
    add(f'attention_b{b}', 'torch_sdpa_causal', torch_timer(sdpa, q, k, v), batch=b)

  common.print_rows(rows, ['case', 'impl', 'ms', 'gflops_per_s', 'weight_gb_per_s'])
  common.write_json(args.json, rows, {**common.environment(), 'args': vars(args), 'torch': torch.__version__,
                                      'torch_threads': threads})


if __name__ == '__main__':
  main()
