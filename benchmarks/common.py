"""Shared pieces of the benchmark scripts: model / prompt construction and JSON output.

Prompts: `text_tokens` random text ids (vocabulary ids 5..31999) around the image placeholders, in the
LLaVA layout `<s> [pre text] <image>×N [post text]`; every sample has the same length (no padding), which
is what a batched benchmark of one prompt shape measures.
"""
import json
import os
import platform
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def bench_config(size='bench', ignore_eos=True):
  """Root config for `size` with the predictors on. ignore_eos sets model.eos_token_id = -1 so that every
  generation runs its full length (random weights could emit EOS at any step)."""
  from configs.dynllava import get_config  # pylint: disable=g-import-not-at-top
  cfg = get_config(f'size={size}')
  if ignore_eos:
    cfg.model.eos_token_id = -1
  return cfg


def add_numerics_flags(ap):
  """--dtype / --param_dtype / --attention_impl / --remat / --scan_unroll, applied to a root config by
  `apply_numerics`."""
  ap.add_argument('--dtype', default='float32', help='compute dtype: float32 | bfloat16')
  ap.add_argument('--param_dtype', default=None, help='default: --dtype')
  ap.add_argument('--attention_impl', default='auto', help='auto | reference | xla | cudnn')
  ap.add_argument('--remat', action='store_true', help='jax.checkpoint per layer (training)')
  ap.add_argument('--scan_unroll', type=int, default=1,
                  help='model.scan_unroll: decoder layers per scan iteration (>= the layers: no loop)')


def apply_numerics(cfg, args):
  mc = cfg.model
  mc.dtype, mc.param_dtype = args.dtype, args.param_dtype or args.dtype
  mc.attention_impl = args.attention_impl
  mc.remat = bool(args.remat)
  mc.scan_unroll = int(getattr(args, 'scan_unroll', 1))
  return cfg


def make_prompts(model_cfg, batch, text_tokens=64, seed=0):
  """(input_ids (B, T) int32, pixel_values (B, S, S, 3) float32, attention_mask (B, T) int32)."""
  from dynllava_jax.presets import num_image_tokens  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  n = num_image_tokens(model_cfg)
  pre = min(8, text_tokens - 1)
  rows = []
  for _ in range(batch):
    rows.append(np.concatenate([[model_cfg.bos_token_id], rng.integers(5, 32000, pre) % model_cfg.llm.vocab_size,
                                [model_cfg.image_token_id] * n,
                                rng.integers(5, 32000, text_tokens - 1 - pre) % model_cfg.llm.vocab_size]))
  ids = np.stack(rows).astype(np.int32)
  text = np.ones(ids.shape[1], bool)          # a small vocabulary's random text can hit the image token
  text[pre + 1:pre + 1 + n] = False
  ids[:, text] = np.where(ids[:, text] == model_cfg.image_token_id, 5, ids[:, text])
  s = model_cfg.vision.image_size
  pix = rng.normal(size=(batch, s, s, 3)).astype(np.float32)
  return ids, pix, np.ones_like(ids)


def environment():
  """Host facts recorded beside every result."""
  import jax  # pylint: disable=g-import-not-at-top
  return {'python': platform.python_version(), 'jax': jax.__version__, 'backend': jax.default_backend(),
          'cpu_count': os.cpu_count(), 'machine': platform.machine(),
          'loadavg_1_5_15min_at_end': list(os.getloadavg())}


def write_json(path, rows, meta):
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump({'meta': meta, 'results': rows}, f, indent=1)


def print_rows(rows, keys):
  print('| ' + ' | '.join(keys) + ' |')
  print('|' + '---|' * len(keys))
  for r in rows:
    cells = []
    for k in keys:
      v = r.get(k)
      cells.append(f'{v:.4g}' if isinstance(v, float) else str(v))
    print('| ' + ' | '.join(cells) + ' |')


def interleaved_times(run, names, runs):
  """Each of `names` run once (compile), then `runs` rounds of one timed run each, in turn (so a change in
  the machine's load hits every variant alike) -> {name: [seconds, ...]}."""
  import time  # pylint: disable=g-import-not-at-top
  for name in names:
    run(name)
  times = {name: [] for name in names}
  for _ in range(runs):
    for name in names:
      t0 = time.perf_counter()
      run(name)
      times[name].append(time.perf_counter() - t0)
  return times
