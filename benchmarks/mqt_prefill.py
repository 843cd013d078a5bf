"""MQT-LLaVA: prefill at m visual tokens vs at M, one model, one process, interleaved runs (random weights).

    python benchmarks/mqt_prefill.py --json runs/bench/mqt_prefill.json [--size bench] [--counts 64,576]
        [--text_tokens 64] [--batch 1] [--runs 5] [--dtype float32|bfloat16] [--attention_impl auto]

The `bench` config with `model.projector='mqt'` (M = 576 queries on 576 patches). Per m: prompts with m
image placeholders (the same text), `decode.prefill(..., visual_tokens=m)` (dense method, KV outputs,
block_until_ready) compiled once, then `--runs` repetitions with the counts INTERLEAVED; prefill_s = median.
flops_analytic / flops_xla: the engine's prefill as compiled (buckets, query-chunked causal attention, the
last layer on the last position: `eval.run.engine_prefill_flops`) counted analytically and by XLA's cost
analysis; flops_model_level: `eval.flops.prefill_flops` of the plain model (full t² attention, no buckets). speedup_vs_M = prefill_s(M) /
prefill_s(m); flop_ratio = flops(M) / flops(m); the issue's target: speedup ≥ 0.85 × flop_ratio.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position


def prompts(mc, m, batch, text_tokens, seed=0):
  rng = np.random.default_rng(seed)
  pre = min(8, text_tokens - 1)
  row = np.concatenate([[mc.bos_token_id], rng.integers(5, mc.llm.vocab_size, pre), [mc.image_token_id] * m,
                        rng.integers(5, mc.llm.vocab_size, text_tokens - 1 - pre)]).astype(np.int32)
  ids = np.stack([row] * batch)
  s = mc.vision.image_size
  return ids, rng.normal(size=(batch, s, s, 3)).astype(np.float32), np.ones_like(ids)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size', default='bench')
  ap.add_argument('--counts', default='64,576')
  ap.add_argument('--text_tokens', type=int, default=64)
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--runs', type=int, default=5)
  ap.add_argument('--no_xla', action='store_true', help='skip the XLA FLOP count (a compile per m)')
  ap.add_argument('--json', default=None)
  common.add_numerics_flags(ap)
  args = ap.parse_args()
  from configs.mqt import get_config  # pylint: disable=g-import-not-at-top
  from dynllava_jax.decode.prefill import prefill  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval import flops as F  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval.run import engine_prefill_flops  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import Llava  # pylint: disable=g-import-not-at-top
  from dynllava_jax.sparsity.dense import Dense  # pylint: disable=g-import-not-at-top
  cfg = common.apply_numerics(get_config(f'size={args.size}'), args)
  mc = cfg.model
  counts = [int(c) for c in args.counts.split(',')]
  model = nnx.jit(lambda: Llava(mc, rngs=nnx.Rngs(0)))()
  data = {m: prompts(mc, m, args.batch, args.text_tokens) for m in counts}

  def run(m):
    ids, pix, mask = data[m]
    return jax.block_until_ready(prefill(model, cfg, Dense(), ids, pix, mask, visual_tokens=m).out)

  times = common.interleaved_times(run, counts, args.runs)
  rows = []
  for m in counts:
    xla, ana = engine_prefill_flops(mc, Dense(), args.text_tokens, args.batch, int(cfg.eval.prefill_bucket),
                                    xla=not args.no_xla, visual_tokens=m)
    model_level = F.prefill_flops(mc, None, args.text_tokens, args.batch, visual_tokens=m)['total']
    rows.append({'m': m, 'prefill_s': statistics.median(times[m]), 'flops_analytic': ana, 'flops_xla': xla,
                 'flops_model_level': model_level, 'times_s': times[m]})
  top = max(rows, key=lambda r: r['m'])
  for r in rows:
    r['speedup_vs_M'] = top['prefill_s'] / r['prefill_s']
    r['flop_ratio'] = top['flops_analytic'] / r['flops_analytic']
    r['speedup_over_flop_ratio'] = r['speedup_vs_M'] / r['flop_ratio']
  common.print_rows(rows, ['m', 'prefill_s', 'flops_analytic', 'flops_xla', 'speedup_vs_M', 'flop_ratio',
                           'speedup_over_flop_ratio'])
  common.write_json(args.json, rows, {'args': vars(args), **common.environment()})


if __name__ == '__main__':
  main()
