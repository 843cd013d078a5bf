"""Reports: the markdown results table, accuracy-vs-cost plots and kept-patch images (matplotlib, Agg).

rows: the dicts `dynllava_jax.eval.run.run_eval` returns (one per method, keys in `COLUMNS`).
"""
import json
import math
import os

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

from dynllava_jax.data.images import CLIP_MEAN, CLIP_STD

COLUMNS = ('method', 'accuracy', 'ppl', 'kept_image_ratio', 'kept_text_ratio', 'prefill_flops_eq13',
           'prefill_flops_xla', 'kv_cache_bytes', 'prefill_s', 'decode_ms_per_token')


def _fmt(key, v):
  if v is None:
    return '—'
  if isinstance(v, str):
    return v
  if isinstance(v, float) and math.isnan(v):
    return 'nan'
  if key.startswith('prefill_flops'):
    return f'{v / 1e9:.3f} G'
  if key == 'kv_cache_bytes':
    return f'{v / 2**20:.3f} MiB'
  if key in ('prefill_s',):
    return f'{v * 1000:.1f} ms'
  if isinstance(v, float):
    return f'{v:.4g}'
  return str(v)


def markdown_table(rows, columns=COLUMNS):
  """GitHub markdown table of the rows (FLOPs in GFLOPs, bytes in MiB, prefill in ms)."""
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for r in rows:
    lines.append('| ' + ' | '.join(_fmt(c, r.get(c)) for c in columns) + ' |')
  return '\n'.join(lines)


COSTS = {'prefill_flops_xla': (1e9, 'prefill GFLOPs (XLA, batch 1)'),
         'prefill_flops_analytic': (1e9, 'prefill GFLOPs (analytic, batch 1)'),
         'kv_cache_bytes': (1024.0, 'KV cache KiB per sample at the end of the answer')}


def plot_accuracy_vs_flops(rows, path, flops_key='prefill_flops_xla', cost_key=None):
  """Accuracy against a cost (`cost_key`, default `flops_key`; see COSTS): one line per method over its
  budgets (rows with the same `base_method`, sorted by cost), named in the legend (no labels on top of
  each other); sweep points carry their knob value ('r=0.75') in small type. Writes `path` (png)."""
  key = cost_key or flops_key
  scale, xlabel = COSTS.get(key, (1.0, key))
  by = {}
  for r in rows:
    x, y = r.get(key), r.get('accuracy')
    if x is None or y is None or (isinstance(y, float) and math.isnan(y)) or (
        isinstance(x, float) and math.isnan(x)):
      continue
    by.setdefault(r.get('base_method', r['method']), []).append((x / scale, y, r))
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  markers = 'o^sDvP*X<>'
  for i, (name, pts) in enumerate(sorted(by.items(), key=lambda kv: (kv[0] != 'dense', kv[0]))):
    pts.sort(key=lambda p: p[0])
    style = dict(marker='*', markersize=12, linestyle='none') if name == 'dense' else dict(
        marker=markers[i % len(markers)], markersize=6, linewidth=1.2)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **style)
    if len(pts) > 1:
      for j, (x, y, r) in enumerate(pts):
        knob = r['method'][len(name):].strip()
        ax.annotate(knob, (x, y), textcoords='offset points', xytext=(4, 6 if j % 2 else -10), fontsize=6,
                    color='0.35')
  ax.set_xlabel(xlabel)
  ax.set_ylabel('accuracy')
  ax.set_title('accuracy vs ' + xlabel.split(' (')[0])
  ax.grid(alpha=0.3)
  if by:
    ax.legend(fontsize=8, loc='best')
  return save_figure(fig, path, dpi=120)


def unnormalize(pixels):
  """CLIP-normalised (H, W, 3) -> RGB in [0, 1]."""
  x = np.asarray(pixels, np.float32) * np.asarray(CLIP_STD) + np.asarray(CLIP_MEAN)
  return np.clip(x, 0.0, 1.0)


def highlight(pixels, keep, dim=0.25):
  """Image (H, W, 3) CLIP-normalised with the kept patches bright and the dropped ones dimmed.

  keep (N,) bool over the g×g patch grid in row-major order (N = g²)."""
  img = unnormalize(pixels)
  keep = np.asarray(keep, bool)
  g = int(round(math.sqrt(keep.size)))
  if g * g != keep.size:
    raise ValueError(f'keep has {keep.size} entries; expected a square patch grid')
  p = img.shape[0] // g
  mask = np.kron(keep.reshape(g, g), np.ones((p, p), bool))[..., None]
  return np.where(mask, img, img * dim)


def plot_kept_patches(images, keeps, titles, path):
  """One row per method (titles), one column per sample: images with kept patches highlighted.

  images: list over samples of (H, W, 3); keeps: {title: list over samples of (N,) bool}."""
  cols, rows = len(images), len(titles)
  fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.9 * rows), squeeze=False)
  for i, t in enumerate(titles):
    for j, img in enumerate(images):
      ax = axes[i][j]
      ax.imshow(highlight(img, keeps[t][j]), interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if j == 0:
        ax.set_ylabel(t, fontsize=8)
  return save_figure(fig, path, dpi=100)


def plot_tradeoff(methods, path, title='accuracy–cost trade-off'):
  """Two panels: overall accuracy vs prefill GFLOPs and vs KV-cache KiB at the end of the answer, one line
  per method over its budgets (points labelled with the kept image fraction). Writes `path` (png).

  methods: {'<method>@<budget>': {'method', 'accuracy': {'all', ...}, 'prefill_flops', 'kv_cache_bytes',
  'image_keep', ...}} (the demo's summary.json `methods`)."""
  by = {}
  for k, m in methods.items():
    by.setdefault(m['method'], []).append((float(k.split('@')[1]), m))
  fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8), sharey=True)
  panels = (('prefill_flops', 1e9, 'prefill GFLOPs (batch 1)'),
            ('kv_cache_bytes', 1024.0, 'KV cache KiB at the end of the answer'))
  markers = 'o^sDvPXhp<>d'
  colors = plt.get_cmap('tab20').colors
  for ax, (field, scale, label) in zip(axes, panels):
    for i, (name, pts) in enumerate(sorted(by.items(), key=lambda kv: (kv[0] != 'dense', kv[0]))):
      pts.sort(key=lambda p: p[0])
      x = [p[1][field] / scale for p in pts]
      y = [p[1]['accuracy']['all'] for p in pts]
      style = dict(marker='*', markersize=12, linestyle='none', color='black') if name == 'dense' else dict(
          marker=markers[i % len(markers)], markersize=5, color=colors[(2 * i) % 20 + (2 * i) // 20 % 2])
      ax.plot(x, y, label=name, **style)
      if field == 'prefill_flops' and name == 'dynamic':
        for b, xx, yy in zip([p[0] for p in pts], x, y):
          ax.annotate(f'{b:g}', (xx, yy), textcoords='offset points', xytext=(3, -10), fontsize=7)
    ax.set_xlabel(label, fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
  axes[0].set_ylabel('exact match (all test questions)', fontsize=9)
  axes[1].legend(fontsize=8, loc='center left', bbox_to_anchor=(1.02, 0.5))
  fig.suptitle(title, fontsize=10)
  return save_figure(fig, path, dpi=90)


def save_figure(fig, path, dpi):
  """Writes `fig` to `path` (png; parent dirs made), closes it, returns `path`."""
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


def write_jsonl(path, rows):
  """One JSON object per line (atomic: written beside, then renamed; parent dirs made). Returns path."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False, default=_json_item) + '\n')
  os.replace(tmp, path)
  return path


def write_results(out_dir, stem, title, rows, columns=COLUMNS, json_path=None):
  """<out_dir>/<stem>.md (`# title` and the table) and <stem>.json (+ json_path) -> the table."""
  table = markdown_table(rows, columns)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, stem + '.md'), 'w') as f:
    f.write(f'# {title}\n\n{table}\n')
  for path in [os.path.join(out_dir, stem + '.json')] + ([json_path] if json_path else []):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(rows, f, indent=1, default=_json_item)
  return table


def _json_item(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return str(x)
