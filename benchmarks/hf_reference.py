"""Our dense engine vs HF transformers (torch, CPU, fp32) on the SAME random weights, one process.

    python benchmarks/hf_reference.py --json runs/bench/hf_reference.json [--size bench] [--batches 1]
        [--new_tokens 8,24] [--text_tokens 64] [--runs 3]

The dense `bench` model (random init, seed 0) is written with `dynllava_jax.hf.save_llava` and loaded by
`transformers.LlavaForConditionalGeneration.from_pretrained` (nothing from a hub), so both run identical
weights. Threads: torch.set_num_threads(os.cpu_count()) and XLA's CPU default (all cores).
Both are warmed up first, then `--runs` repetitions run ours and HF interleaved (the same machine load).
  prefill_s            warm median. Ours: `decode.prefill` (KV caches out, last-position logits). HF: one
                       forward with use_cache=True, logits_to_keep=1.
  decode_ms_per_token  warm median of (generate(M_max) − generate(M_min)) / (M_max − M_min), greedy,
                       EOS disabled (HF: min_new_tokens = max_new_tokens).
  kv_cache_bytes       K/V bytes after M_max tokens (ours: used bytes; HF: its DynamicCache tensors).
The first generated tokens of both are compared (they should agree on the same weights).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--json', default=None)
  ap.add_argument('--size', default='bench')
  ap.add_argument('--batches', default='1')
  ap.add_argument('--new_tokens', default='8,24')
  ap.add_argument('--text_tokens', type=int, default=64)
  ap.add_argument('--runs', type=int, default=3)
  args = ap.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from configs.dynllava import get_config  # pylint: disable=g-import-not-at-top
  from dynllava_jax import hf  # pylint: disable=g-import-not-at-top
  from dynllava_jax.decode.generate import generate  # pylint: disable=g-import-not-at-top
  from dynllava_jax.decode.prefill import prefill  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval import metrics as M  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import Llava  # pylint: disable=g-import-not-at-top
  from dynllava_jax.sparsity.registry import make_sparsifier  # pylint: disable=g-import-not-at-top

  threads = os.cpu_count()
  torch.set_num_threads(threads)
  cfg = get_config(f'size={args.size},dense=True')
  mc = cfg.model
  model = nnx.jit(lambda: Llava(mc, rngs=nnx.Rngs(0)))()
  tmp = tempfile.mkdtemp(prefix='hfref_')
  hf.save_llava(model, mc, tmp)
  hf_model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32).eval()
  mc.eos_token_id = -1        # our engine: never stop early (HF: min_new_tokens below)
  dense = make_sparsifier('dense', cfg)
  lens = sorted(int(x) for x in args.new_tokens.split(','))
  rows = []
  for b in [int(x) for x in args.batches.split(',')]:
    ids, pix, mask = common.make_prompts(mc, b, args.text_tokens)
    rng = jax.random.key(0)
    tid = torch.from_numpy(ids.astype(np.int64))
    tmask = torch.from_numpy(mask.astype(np.int64))
    tpix = torch.from_numpy(np.ascontiguousarray(pix.transpose(0, 3, 1, 2)))

    def ours_prefill():
      return jax.block_until_ready(prefill(model, cfg, dense, ids, pix, mask, rng=rng,
                                           max_new_tokens=max(lens)).out)

    def ours_generate(m):
      return generate(model, cfg, dense, ids, pix, mask, max_new_tokens=m, sampling='greedy', rng=rng)

    def hf_prefill():
      with torch.inference_mode():
        return hf_model(input_ids=tid, pixel_values=tpix, attention_mask=tmask, use_cache=True,
                        logits_to_keep=1)

    def hf_generate(m):
      with torch.inference_mode():
        return hf_model.generate(input_ids=tid, pixel_values=tpix, attention_mask=tmask, max_new_tokens=m,
                                 min_new_tokens=m, do_sample=False, use_cache=True,
                                 return_dict_in_generate=True, pad_token_id=mc.pad_token_id)

    # Warm-up (compiles), then repetitions with ours and HF interleaved (same machine load for both).
    outs = {m: ours_generate(m) for m in lens}
    hout = {m: hf_generate(m) for m in lens}
    ours_prefill()
    hf_prefill()
    tp = {'ours': [], 'hf': []}
    tg = {(k, m): [] for k in ('ours', 'hf') for m in lens}
    for _ in range(args.runs):
      for key, pre_fn, gen_fn in (('ours', ours_prefill, ours_generate), ('hf', hf_prefill, hf_generate)):
        t0 = time.perf_counter()
        pre_fn()
        tp[key].append(time.perf_counter() - t0)
        for m in lens:
          t0 = time.perf_counter()
          gen_fn(m)
          tg[(key, m)].append(time.perf_counter() - t0)

    def per_token(key):
      return statistics.median(M.decode_ms_per_token(t1, lens[-1], t0, lens[0])
                               for t0, t1 in zip(tg[(key, lens[0])], tg[(key, lens[-1])]))

    p_s, hp_s = statistics.median(tp['ours']), statistics.median(tp['hf'])
    ours_ms, hf_ms = per_token('ours'), per_token('hf')
    ours_tokens = outs[lens[-1]].tokens
    rows.append({'case': f'{args.size}_b{b}', 'method': 'dense', 'impl': 'dynllava_jax', 'batch': b,
                 'prefill_s': p_s, 'decode_ms_per_token': ours_ms,
                 'kv_cache_bytes': int(outs[lens[-1]].kv_cache_bytes_final), 'flops_xla': None,
                 'threads': threads, 'prefill_s_runs': tp['ours']})
    print(rows[-1], flush=True)
    pkv = hout[lens[-1]].past_key_values
    kv_bytes = 0
    for layer in getattr(pkv, 'layers', []):
      for x in (getattr(layer, 'keys', None), getattr(layer, 'values', None)):
        if x is not None:
          kv_bytes += x.numel() * x.element_size()
    hf_tokens = hout[lens[-1]].sequences[:, ids.shape[1]:].numpy()
    agree = float(np.mean(hf_tokens[:, :lens[0]] == ours_tokens[:, :lens[0]]))
    rows.append({'case': f'{args.size}_b{b}', 'method': 'dense', 'impl': f'hf_transformers_{transformers.__version__}',
                 'batch': b, 'prefill_s': hp_s, 'decode_ms_per_token': hf_ms, 'kv_cache_bytes': kv_bytes,
                 'flops_xla': None, 'threads': threads, 'token_agreement_first_m': agree,
                 'ours_prefill_speedup': hp_s / p_s, 'ours_decode_speedup': hf_ms / ours_ms,
                 'prefill_s_runs': tp['hf']})
    print(rows[-1], flush=True)
  common.print_rows(rows, ['case', 'impl', 'batch', 'prefill_s', 'decode_ms_per_token', 'kv_cache_bytes',
                           'ours_prefill_speedup', 'ours_decode_speedup', 'token_agreement_first_m'])
  common.write_json(args.json, rows, {**common.environment(), 'args': vars(args), 'torch': torch.__version__,
                                      'torch_threads': threads})


if __name__ == '__main__':
  main()
