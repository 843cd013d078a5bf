"""VideoLLM-MoD against dense, side by side in one process: training step time and memory, prefill time,
FLOPs and KV bytes (docs/mod.md).

    python benchmarks/mod_step.py --json runs/bench/mod_step.json [--size bench] [--frames 8]
        [--image_size 168] [--text_tokens 64] [--batch 1] [--r 0.2] [--layers interleave] [--runs 3]
    python benchmarks/mod_step.py --tiny            # tiny sizes: proves the script runs (seconds)

Rows: `dense` (every layer dense) and `mod` (model.mod.layers = --layers at --r), the same random weights
for the shared parameters (seed 0). Each prompt: BOS, 8 text tokens, then --frames frames of N placeholders
each followed by one text token, then text up to --text_tokens; the last half of the text is the
labelled answer. `bench` with --image_size 168 gives N = 144 tokens per frame (12 × 12 patches of 14), so
8 frames = 1152 vision tokens.
  train_step_s   median of --runs jitted optimizer steps (`train.step.make_train_step`, the CLIP tower
                 frozen, AdamW), after a warm-up step; MoD layers train on their gathered routed tokens
                 (`model.mod.train_gather`), or masked with --masked_training
  train_xla_bytes XLA's memory analysis of the compiled step (arguments + outputs + temporaries − aliased)
  train_peak_bytes the device's peak bytes in use after the row's steps (GPU; None on CPU)
  prefill_s      median of --runs `decode.prefill` calls (the engine: MoD layers on their routed tokens)
  prefill_flops  the analytic prefill count (`eval.flops.prefill_flops`, last-query shortcut)
  kv_bytes       K/V bytes the prefill leaves (bf16, real tokens; `eval.flops.mod_kv_bytes`)
Timings are interleaved over rows (the same machine load for all); ratios are mod / dense.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position


def row_config(args, mod):
  from configs.dynllava import get_config  # pylint: disable=g-import-not-at-top
  cfg = get_config(f'size={args.size},dense=1')
  mc = cfg.model
  if args.image_size:
    mc.vision.image_size = args.image_size
  mc.llm.max_position = max(mc.llm.max_position, 4096)
  mc.mod.r = args.r
  mc.mod.layers = args.layers if mod else ''
  mc.mod.train_gather = not args.masked_training
  t = cfg.train
  t.freeze_vision, t.lr, t.weight_decay, t.grad_clip, t.warmup_ratio, t.grad_accum = True, 2e-5, 0.0, 1.0, 0.0, 1
  t.steps, t.dense_warmup_steps = 1000, 0
  cfg.eval.prefill_bucket = 16
  return cfg


def make_batch(mc, batch, frames, text_tokens, seed=0):
  """The training batch (numpy) with frames: pixel_values (B, F, S, S, 3)."""
  from dynllava_jax.presets import num_image_tokens  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  n = num_image_tokens(mc)
  v = mc.llm.vocab_size
  rows = []
  for _ in range(batch):
    row = [mc.bos_token_id] + list(rng.integers(5, v, 8))
    for _ in range(frames):
      row += [mc.image_token_id] * n + [int(rng.integers(5, v))]
    row += list(rng.integers(5, v, max(text_tokens - 8 - frames, 2)))
    rows.append(row)
  ids = np.asarray(rows, np.int32)
  t = ids.shape[1]
  ans = max((text_tokens - 8 - frames) // 2, 1)
  labels = np.full_like(ids, -100)
  labels[:, t - ans:] = ids[:, t - ans:]
  s = mc.vision.image_size
  pix = rng.normal(size=(batch, frames, s, s, 3)).astype(np.float32)
  col = lambda x: np.full((batch,), x, np.int32)
  return {'input_ids': ids, 'attention_mask': np.ones_like(ids), 'labels': labels, 'pixel_values': pix,
          'has_image': np.ones((batch,), bool), 'image_start': col(9), 'instr_start': col(t - ans),
          'instr_end': col(t - ans), 'answer_start': col(t - ans), 'answer_end': col(t)}


class Row:
  """One row's train state, jitted step and prefill."""

  def __init__(self, args, mod, batch):
    import jax  # pylint: disable=g-import-not-at-top
    from dynllava_jax.sharding import make_mesh  # pylint: disable=g-import-not-at-top
    from dynllava_jax.train import optim  # pylint: disable=g-import-not-at-top
    from dynllava_jax.train import state as S  # pylint: disable=g-import-not-at-top
    from dynllava_jax.train.step import make_train_step  # pylint: disable=g-import-not-at-top
    self.jax, self.name = jax, 'mod' if mod else 'dense'
    self.cfg = row_config(args, mod)
    tx = optim.make_optimizer(self.cfg.train)
    mesh = make_mesh(self.cfg.mesh, jax.devices()[:1])
    self.graphdef, self.state, _ = S.create_state(mesh, self.cfg, tx)
    self.step_fn = jax.jit(make_train_step(self.cfg, self.graphdef, tx, sparse=False), donate_argnums=0)
    self.batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
    self.times, self.prefill_times = [], []

  def xla_bytes(self):
    ma = self.step_fn.lower(self.state, self.batch).compile().memory_analysis()
    if ma is None:
      return None
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
               - ma.alias_size_in_bytes)

  def step(self):
    t = time.perf_counter()
    self.state, m = self.step_fn(self.state, self.batch)
    self.jax.block_until_ready(m['loss'])
    return time.perf_counter() - t

  def prefill(self, ids, pix):
    from dynllava_jax.decode.prefill import prefill  # pylint: disable=g-import-not-at-top
    from dynllava_jax.sparsity.base import Sparsifier  # pylint: disable=g-import-not-at-top
    from dynllava_jax.train.state import merge_model  # pylint: disable=g-import-not-at-top
    model = merge_model(self.graphdef, self.state)
    t = time.perf_counter()
    out = prefill(model, self.cfg, Sparsifier(), ids, pix, return_kv=True)
    self.jax.block_until_ready(out.out.logits_last)
    return time.perf_counter() - t


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--json', default=None)
  ap.add_argument('--size', default='bench')
  ap.add_argument('--frames', type=int, default=8)
  ap.add_argument('--image_size', type=int, default=168)
  ap.add_argument('--text_tokens', type=int, default=64)
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--r', type=float, default=0.2)
  ap.add_argument('--layers', default='interleave')
  ap.add_argument('--runs', type=int, default=3)
  ap.add_argument('--masked_training', action='store_true',
                  help='MoD trains masked (model.mod.train_gather=False) instead of gathered')
  ap.add_argument('--tiny', action='store_true', help='tiny sizes (32x32 frames, 2 frames): a smoke run')
  args = ap.parse_args()
  if args.tiny:
    args.size, args.image_size, args.frames, args.text_tokens, args.runs = 'tiny', 32, 2, 24, 2

  import jax  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval import flops as F  # pylint: disable=g-import-not-at-top
  probe = row_config(args, True).model
  batch = make_batch(probe, args.batch, args.frames, args.text_tokens)
  rows = [Row(args, False, batch), Row(args, True, batch)]
  mem = {r.name: r.xla_bytes() for r in rows}
  peaks = {}
  for r in rows:                                   # warm-up (compiles)
    r.step()
    r.prefill(batch['input_ids'], batch['pixel_values'])
  for _ in range(args.runs):
    for r in rows:
      r.times.append(r.step())
      r.prefill_times.append(r.prefill(batch['input_ids'], batch['pixel_values']))
  for r in rows:
    stats = getattr(jax.devices()[0], 'memory_stats', lambda: None)()
    peaks[r.name] = None if not stats else stats.get('peak_bytes_in_use')
  text = args.text_tokens
  out = []
  for r in rows:
    mc = r.cfg.model
    fl = F.prefill_flops(mc, None, text, args.batch, last_query=True, frames=args.frames)
    out.append({'row': r.name, 'size': args.size, 'frames': args.frames,
                'tokens_per_frame': F.num_image_tokens(mc), 'seq_len': int(batch['input_ids'].shape[1]),
                'batch': args.batch, 'r': args.r if r.name == 'mod' else None,
                'train_step_s': statistics.median(r.times), 'train_xla_bytes': mem[r.name],
                'train_peak_bytes': peaks[r.name], 'prefill_s': statistics.median(r.prefill_times),
                'prefill_flops': fl['total'], 'prefill_flops_per_kind': fl['per_kind'],
                'kv_bytes': F.mod_kv_bytes(mc, text, args.frames, args.batch)['total']})
  d, m = out
  ratios = {'train_step': m['train_step_s'] / d['train_step_s'],
            'train_xla_bytes': (m['train_xla_bytes'] / d['train_xla_bytes']) if d['train_xla_bytes'] else None,
            'prefill_speedup': d['prefill_s'] / m['prefill_s'], 'prefill_flops': m['prefill_flops'] / d['prefill_flops'],
            'kv_bytes': m['kv_bytes'] / d['kv_bytes']}
  common.print_rows(out, ['row', 'frames', 'tokens_per_frame', 'train_step_s', 'train_xla_bytes', 'prefill_s',
                          'prefill_flops', 'kv_bytes'])
  print('mod / dense:', {k: (round(v, 3) if v is not None else None) for k, v in ratios.items()})
  common.write_json(args.json, out + [{'row': 'ratio_mod_over_dense', **ratios}],
                    {'argv': sys.argv, **common.environment()})


if __name__ == '__main__':
  main()
