"""How many image tokens show a digit, and how often a fixed keep rule hits one (docs/demo.md, "The tower
target").

    python scripts/demo_ink_hits.py [--ink_min 0.4,0.6] [--tile_fraction 0.8] [--keep 12,6] [--canvases 300]

On held-out demo canvases (`configs/demo.py`'s geometry, stage 0's validation stream) it counts, per digit,
the patch tokens of its cell whose pixels the digit's ink covers by at least `ink_min` (the tokens stage 0
trains to name the digit, `tower.objective='ink'`), and the share of digits of which a keep rule of k of
the 64 image tokens keeps at least one such token: the uniform stride (`sparsity/uniform.py`) and a random
draw (seed 0). A model that reads a digit only from those tokens cannot answer its look-up otherwise, so
the shares bound what uniform and random keeping can answer. No model is run.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  from dynllava_jax.eval.budgets import parse_list  # pylint: disable=g-import-not-at-top
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--ink_min', type=lambda t: parse_list(t, '--ink_min'), default=[0.4, 0.6])
  ap.add_argument('--tile_fraction', type=lambda t: parse_list(t, '--tile_fraction'), default=[0.8])
  ap.add_argument('--keep', type=lambda t: [int(x) for x in t.split(',')], default=[12, 6])
  ap.add_argument('--canvases', type=int, default=300)
  args = ap.parse_args()

  from configs import demo  # pylint: disable=g-import-not-at-top
  from dynllava_jax.demo import tower  # pylint: disable=g-import-not-at-top
  from dynllava_jax.sparsity.uniform import stride_table  # pylint: disable=g-import-not-at-top

  table = ['| tile_fraction | ink_min | tokens per digit | digits with none | k | uniform hits | random hits |',
           '|---|---|---|---|---|---|---|']
  for tf in args.tile_fraction:
    cfg = demo.get_config('0')
    cfg.data.digits.tile_fraction = tf
    _, labels, ink = tower.make_canvases(cfg, 'validation', args.canvases, 102)
    g = int(cfg.data.digits.grid)
    side = int(cfg.model.vision.image_size) // int(cfg.model.vision.patch_size)
    per_cell = side // g
    rows, cols = np.divmod(np.arange(side * side), side)
    cell_of = (rows // per_cell) * g + cols // per_cell          # (N,) the cell each patch lies in
    digits = [(i, q) for i in range(args.canvases) for q in range(g * g) if labels[i, q] != tower.EMPTY_CLASS]
    print(f'tile_fraction {tf:g}: {args.canvases} validation canvases, {len(digits)} digits')
    for t in args.ink_min:
      shows = [(cell_of == q) & (ink[i] >= t) for i, q in digits]   # per digit: (N,) its named tokens
      counts = np.array([m.sum() for m in shows])
      for k in args.keep:
        rng = np.random.default_rng(0)
        drawn = np.zeros((args.canvases, side * side), bool)     # one random keep set per canvas
        for i in range(args.canvases):
          drawn[i, rng.choice(side * side, k, replace=False)] = True
        uniform = stride_table(side * side, k)
        hit_u = [(m & uniform).any() for m in shows]
        hit_r = [(m & drawn[i]).any() for (i, _), m in zip(digits, shows)]
        table.append(f'| {tf:g} | {t:g} | {counts.mean():.2f} | {(counts == 0).mean():.3f} | {k} | '
                     f'{np.mean(hit_u):.3f} | {np.mean(hit_r):.3f} |')
  print('\n'.join(table))


if __name__ == '__main__':
  main()
