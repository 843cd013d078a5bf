"""Dense vs Dynamic-LLaVA prefill and KV-cache decoding, side by side in one process (random weights).

    python benchmarks/prefill_decode.py --json runs/bench/prefill_decode.json [--size bench]
        [--batches 1,8] [--new_tokens 64,512] [--text_tokens 64] [--runs 3] [--methods dense,dynamic]

Per batch, every method first runs once per shape (compiles; these generations — greedy, KV cache, EOS
disabled so every sample generates M tokens — give the K/V bytes holding tokens after prefill and after M
tokens), then `--runs` timed repetitions with the methods INTERLEAVED (so dense and Dynamic see the same
machine load): prefill (`decode.prefill`, KV outputs, block_until_ready) and generate(M) for each M.
prefill_s = median; decode_ms_per_token = median over repetitions of
(decode_s(M_max) − decode_s(M_min)) / (M_max − M_min), decode_s being generate's own clock of its decode
part (`GenerateOutput.decode_s`, started once the prefill's outputs are ready), so neither the prefill's
time nor its noise enters; the per-call set-up (the decode loop's weight copy, cache init) cancels. flops_xla: XLA cost analysis
of the compiled prefill (abstract shapes). With --runs 0 nothing is timed (KV bytes only).
Random weights: Dynamic's image budget is exact (⌊N·r_I⌋); its output-text keep rate is whatever the
random output-text predictor gives (`kept_text_ratio` in the output). `--text_keep_rate R` simulates a
trained predictor's rate: it shifts the output-text predictor's last bias so that a fraction R of the
prompt's text tokens (hidden states entering sparse_layer) would be kept; the measured rate on the
generated tokens is reported as kept_text_ratio.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position


def calibrate_text_keep(model, ids, pix, mask, rate):
  """Shifts the output-text predictor's keep logit so that a fraction `rate` of the prompt's text tokens
  (hidden states entering sparse_layer) has logit0 > logit1. Returns the shift."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import dense_allowed, positions_from_mask  # pylint: disable=g-import-not-at-top
  if not 0.0 < rate <= 1.0:
    raise ValueError(f'--text_keep_rate={rate} must be in (0, 1]')
  sl = int(model.mc.sparse.sparse_layer)

  @nnx.jit
  def margins(model, ids, pix, mask):
    h, image_mask = model.embed(ids, pix)
    h = model.language_model.run_layers(h, positions_from_mask(mask), dense_allowed(mask), stop=sl)
    lg = model.output_text_score_predictor(h)
    return lg[..., 0] - lg[..., 1], image_mask

  m, image_mask = margins(model, jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask))
  text = np.asarray(m)[~np.asarray(image_mask) & (np.asarray(mask) > 0)]
  shift = float(np.quantile(text, 1.0 - rate))
  bias = model.output_text_score_predictor.fc_4.bias
  bias[...] = bias[...] + jnp.array([-shift, 0.0], bias[...].dtype)
  return shift


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--json', default=None)
  ap.add_argument('--size', default='bench')
  ap.add_argument('--batches', default='1,8')
  ap.add_argument('--new_tokens', default='64,512')
  ap.add_argument('--text_tokens', type=int, default=64)
  ap.add_argument('--runs', type=int, default=3, help='timed warm repetitions; 0 = one untimed '
                  'generation per length (KV bytes only)')
  ap.add_argument('--methods', default='dense,dynamic')
  ap.add_argument('--no_flops', action='store_true')
  ap.add_argument('--text_keep_rate', type=float, default=None,
                  help='calibrate the random output-text predictor to keep about this fraction')
  common.add_numerics_flags(ap)
  args = ap.parse_args()

  from dynllava_jax.decode.generate import generate  # pylint: disable=g-import-not-at-top
  from dynllava_jax.decode.prefill import prefill  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval import metrics as M  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval.run import engine_prefill_flops  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import Llava  # pylint: disable=g-import-not-at-top
  from dynllava_jax.sparsity.registry import make_sparsifier  # pylint: disable=g-import-not-at-top

  cfg = common.apply_numerics(common.bench_config(args.size), args)
  mc = cfg.model
  t0 = time.time()
  model = nnx.jit(lambda: Llava(mc, rngs=nnx.Rngs(0)))()
  print(f'model {args.size} built in {time.time() - t0:.1f}s', flush=True)
  if args.text_keep_rate is not None:
    ids, pix, mask = common.make_prompts(mc, 1, args.text_tokens, seed=1)
    shift = calibrate_text_keep(model, ids, pix, mask, args.text_keep_rate)
    print(f'output-text predictor bias shifted by {shift:.4g} for a keep rate of {args.text_keep_rate}')
  batches = [int(x) for x in args.batches.split(',')]
  lens = sorted(int(x) for x in args.new_tokens.split(','))
  methods = args.methods.split(',')
  rows = []
  for b in batches:
    ids, pix, mask = common.make_prompts(mc, b, args.text_tokens)
    objs = {name: make_sparsifier(name, cfg) for name in methods}
    rng = jax.random.key(0)

    def run_prefill(name):
      return jax.block_until_ready(prefill(model, cfg, objs[name], ids, pix, mask, rng=rng,
                                           max_new_tokens=max(lens)).out)

    def run_gen(name, m):
      return generate(model, cfg, objs[name], ids, pix, mask, max_new_tokens=m, sampling='greedy', rng=rng)

    # Warm-up (compiles every shape) and the outputs whose KV bytes are reported.
    outs = {name: {m: run_gen(name, m) for m in lens} for name in methods}
    for name in methods:
      run_prefill(name)
    # Timed repetitions, methods interleaved so that they see the same machine load.
    t_pre = {name: [] for name in methods}
    t_gen = {(name, m): [] for name in methods for m in lens}
    t_dec = {(name, m): [] for name in methods for m in lens}
    for _ in range(args.runs):
      for name in methods:
        t0 = time.perf_counter()
        run_prefill(name)
        t_pre[name].append(time.perf_counter() - t0)
        for m in lens:
          t0 = time.perf_counter()
          g = run_gen(name, m)
          t_gen[(name, m)].append(time.perf_counter() - t0)
          t_dec[(name, m)].append(g.decode_s)
    for name in methods:
      flops = None
      if not args.no_flops:
        flops, _ = engine_prefill_flops(mc, objs[name], args.text_tokens, b, int(cfg.eval.prefill_bucket))
      prefill_s = statistics.median(t_pre[name]) if args.runs else None
      ms_tok = None
      if args.runs and len(lens) > 1:
        per_rep = [M.decode_ms_per_token(t1, lens[-1], t0_, lens[0])
                   for t0_, t1 in zip(t_dec[(name, lens[0])], t_dec[(name, lens[-1])])]
        ms_tok = statistics.median(per_rep)
      elif args.runs:
        ms_tok = 1000.0 * (statistics.median(t_gen[(name, lens[0])]) - prefill_s) / max(lens[0] - 1, 1)
      for m in lens:
        o = outs[name][m]
        assert int(o.lengths.min()) == m, 'EOS is disabled: every sample must generate max_new_tokens'
        rows.append({
            'case': f'{args.size}_b{b}_new{m}', 'method': name, 'batch': b, 'new_tokens': m,
            'prompt_tokens': int(ids.shape[1]), 'prefill_s': prefill_s, 'decode_ms_per_token': ms_tok,
            'prefill_s_runs': t_pre[name], 'generate_s_runs': t_gen[(name, m)],
            'decode_s_runs': t_dec[(name, m)],
            'kv_cache_bytes': int(o.kv_cache_bytes_final),
            'kv_cache_bytes_prefill': int(o.kv_cache_bytes_prefill),
            'kv_cache_bytes_allocated': int(o.kv_cache_bytes_allocated),
            'kept_image_ratio': float(np.mean(o.kept_image_ratio)),
            'kept_text_ratio': float(np.mean(o.kept_text_ratio)), 'flops_xla': flops,
            'text_keep_rate_calibrated': args.text_keep_rate if name.startswith('dynamic') else None})
        print(rows[-1], flush=True)
  # Ratios dynamic / dense per (batch, new_tokens).
  by = {(r['method'], r['batch'], r['new_tokens']): r for r in rows}
  for r in rows:
    d = by.get(('dense', r['batch'], r['new_tokens']))
    if d is not None and r['method'] != 'dense':
      if r['prefill_s']:
        r['prefill_speedup_vs_dense'] = d['prefill_s'] / r['prefill_s']
      if r['decode_ms_per_token']:
        r['decode_speed_vs_dense'] = d['decode_ms_per_token'] / r['decode_ms_per_token']
      r['kv_bytes_vs_dense'] = r['kv_cache_bytes'] / d['kv_cache_bytes']
  keys = ['case', 'method', 'batch', 'prefill_s', 'decode_ms_per_token', 'kv_cache_bytes', 'kept_text_ratio',
          'flops_xla', 'prefill_speedup_vs_dense', 'decode_speed_vs_dense', 'kv_bytes_vs_dense']
  common.print_rows(rows, keys)
  common.write_json(args.json, rows, {**common.environment(), 'args': vars(args),
                                      'threads': os.environ.get('XLA_FLAGS', '')})


if __name__ == '__main__':
  main()
