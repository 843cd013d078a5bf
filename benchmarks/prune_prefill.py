"""Layer pruning: the prefill of a pruned model vs the full one, one process, interleaved runs (random weights).

    python benchmarks/prune_prefill.py --json runs/bench/prune_prefill.json [--size bench] [--k 4]
        [--text_tokens 64] [--batch 1] [--runs 5] [--dtype float32|bfloat16] [--attention_impl auto]

The `bench` config (dense LLaVA, 16 LLM layers). The pruned model removes the --k layers outside the visual
region with the highest index (the choice does not change the cost; `tools/prune.py::prune_model`: the
smaller model, llm.layers = L − k). Both run `decode.prefill` (dense method, KV outputs, block_until_ready),
compiled once, then --runs repetitions INTERLEAVED; prefill_s = median. flops: the engine's prefill as
compiled (`eval.run.engine_prefill_flops`, analytic). speedup = prefill_s(full) / prefill_s(pruned);
flop_ratio = flops(full) / flops(pruned); the visual-region issue's target: speedup ≥ 0.9 × flop_ratio.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position
from benchmarks.mqt_prefill import prompts  # pylint: disable=wrong-import-position


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size', default='bench')
  ap.add_argument('--k', type=int, default=4, help='layers removed (outside the region)')
  ap.add_argument('--text_tokens', type=int, default=64)
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--runs', type=int, default=5)
  ap.add_argument('--json', default=None)
  common.add_numerics_flags(ap)
  args = ap.parse_args()
  from dynllava_jax.decode.prefill import prefill  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval.run import engine_prefill_flops  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import Llava  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.projector import num_visual_tokens  # pylint: disable=g-import-not-at-top
  from dynllava_jax.sparsity.dense import Dense  # pylint: disable=g-import-not-at-top
  from dynllava_jax.tools import prune  # pylint: disable=g-import-not-at-top
  cfg = common.apply_numerics(common.bench_config(args.size), args)
  cfg.model.sparse.enabled = False
  mc = cfg.model
  full = nnx.jit(lambda: Llava(mc, rngs=nnx.Rngs(0)))()
  region = set(prune.region_of(mc))
  remove = tuple(sorted([i for i in range(mc.llm.layers) if i not in region][-args.k:]))
  small, mc_small = prune.prune_model(full, mc, prune.check_remove(','.join(map(str, remove)), mc))
  variants = {'full': (full, mc), 'pruned': (small, mc_small)}
  ids, pix, mask = prompts(mc, num_visual_tokens(mc), args.batch, args.text_tokens)

  def run(name):
    model, m = variants[name]
    c = cfg.copy_and_resolve_references()
    c.model = m
    return jax.block_until_ready(prefill(model, c, Dense(), ids, pix, mask).out)

  times = common.interleaved_times(run, list(variants), args.runs)
  rows = []
  for name, (_, m) in variants.items():
    _, ana = engine_prefill_flops(m, Dense(), args.text_tokens, args.batch, int(cfg.eval.prefill_bucket),
                                  xla=False)
    rows.append({'model': name, 'layers': m.llm.layers, 'prefill_s': statistics.median(times[name]),
                 'flops_analytic': ana, 'times_s': times[name]})
  full_row = rows[0]
  for r in rows:
    r['speedup'] = full_row['prefill_s'] / r['prefill_s']
    r['flop_ratio'] = full_row['flops_analytic'] / r['flops_analytic']
    r['speedup_over_flop_ratio'] = r['speedup'] / r['flop_ratio']
  common.print_rows(rows, ['model', 'layers', 'prefill_s', 'flops_analytic', 'speedup', 'flop_ratio',
                           'speedup_over_flop_ratio'])
  common.write_json(args.json, rows, {'args': vars(args), 'removed': list(remove), **common.environment()})


if __name__ == '__main__':
  main()
