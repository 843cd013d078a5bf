"""XLA cost analysis of the 7B / 13B prefill (abstract shapes: no weights are allocated), dense and
sparse, against the analytic whole-prefill count and the paper's Eq. 13.

    python benchmarks/xla_cost.py --json runs/bench/xla_cost.json [--sizes 7b,13b] [--text_tokens 60]
        [--methods dense,dynamic,fastv,pdrop] [--batch 1]

Per (size, method): XLA FLOPs of the engine's compiled prefill (`eval.run.engine_prefill_flops`: ViT,
projector, every LLM layer on the engine's padded segment lengths, scoring, LM head on the last token; the
layer scans unrolled so every layer is counted), the analytic count of the same program and its relative
error, Eq. 13, the whole-prefill reduction vs dense, and the K/V bytes the prefill leaves (bf16, real tokens).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=wrong-import-position


def prefill_kv_bytes(model_cfg, method, text_tokens, batch, dtype_bytes=2):
  """K/V bytes after prefill: every layer holds the tokens present in it (real tokens, no padding)."""
  from dynllava_jax.eval import flops as F  # pylint: disable=g-import-not-at-top
  lc = model_cfg.llm
  per_tok = 2 * lc.kv_heads * lc.head_dim * dtype_bytes
  return int(sum(batch * (text_tokens + n) * per_tok for n in F.image_token_schedule(model_cfg, method)))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--json', default=None)
  ap.add_argument('--sizes', default='7b,13b')
  ap.add_argument('--methods', default='dense,dynamic,fastv,pdrop')
  ap.add_argument('--text_tokens', type=int, default=60)
  ap.add_argument('--batch', type=int, default=1)
  args = ap.parse_args()

  from dynllava_jax.eval import flops as F  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval.run import engine_prefill_flops  # pylint: disable=g-import-not-at-top
  from dynllava_jax.sparsity.registry import make_sparsifier  # pylint: disable=g-import-not-at-top

  rows = []
  for size in args.sizes.split(','):
    cfg = common.bench_config(size, ignore_eos=False)
    mc = cfg.model
    dense_xla = None
    for name in args.methods.split(','):
      method = make_sparsifier(name, cfg)
      t0 = time.time()
      xla, analytic = engine_prefill_flops(mc, method, args.text_tokens, args.batch,
                                           int(cfg.eval.prefill_bucket))
      exact = F.prefill_flops(mc, method, args.text_tokens, args.batch)['total']   # no bucket padding
      if name == 'dense':
        dense_xla, dense_exact = xla, exact
      row = {'case': f'{size}_prefill_text{args.text_tokens}', 'method': name, 'batch': args.batch,
             'prefill_s': None, 'decode_ms_per_token': None,
             'kv_cache_bytes': prefill_kv_bytes(mc, method, args.text_tokens, args.batch),
             'flops_xla': xla, 'flops_analytic': analytic, 'analytic_rel_err': analytic / xla - 1.0,
             'flops_analytic_unpadded': exact, 'flops_eq13': F.eq13_flops(mc, method, args.batch),
             'compile_s': time.time() - t0}
      if dense_xla:
        row['reduction_xla_vs_dense'] = F.reduction(dense_xla, xla)
        row['reduction_analytic_unpadded_vs_dense'] = F.reduction(dense_exact, exact)
      rows.append(row)
      print(row, flush=True)
  common.print_rows(rows, ['case', 'method', 'flops_xla', 'flops_analytic', 'analytic_rel_err',
                           'flops_eq13', 'reduction_xla_vs_dense', 'reduction_analytic_unpadded_vs_dense',
                           'kv_cache_bytes'])
  common.write_json(args.json, rows, {**common.environment(), 'args': vars(args)})


if __name__ == '__main__':
  main()
