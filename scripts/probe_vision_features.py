"""Linear probe: does the frozen, randomly initialised tiny CLIP tower keep what digits_vqa needs?

    python scripts/probe_vision_features.py [--canvases 1500] [--seed 0]

Renders digits_vqa canvases (64 px, the tiny config) with known contents, runs the tiny tower (random init,
seed 0, as the demo's frozen tower) and fits a logistic regression from the LLaVA features (layer -2, CLS
dropped) of the patches covering cell (row 1, column 1) to that cell's content (digit 0..9 or empty: 11
classes), beside the same probe on the raw pixels of the cell. Prints train / held-out accuracy of both.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--canvases', type=int, default=1500)
  ap.add_argument('--seed', type=int, default=0)
  args = ap.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from configs.dynllava import get_config  # pylint: disable=g-import-not-at-top
  from dynllava_jax.data import digits_vqa, images as image_lib  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import Llava  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.vision import select_features  # pylint: disable=g-import-not-at-top

  cfg = get_config('size=tiny')
  size, patch = cfg.model.vision.image_size, cfg.model.vision.patch_size
  d = load_digits()
  digit_images, labels = d.images.astype(np.float32), d.target
  rng = np.random.default_rng(args.seed)
  n = args.canvases
  canvases, y = [], []
  for _ in range(n):
    empty = rng.random((3, 3)) < digits_vqa.EMPTY_PROB
    src = rng.integers(0, len(labels), (3, 3))
    tiles = [[None if empty[r, c] else digit_images[src[r, c]] for c in range(3)] for r in range(3)]
    canvases.append(digits_vqa.render_canvas(tiles, size, rng))
    y.append(10 if empty[0, 0] else int(labels[src[0, 0]]))
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pix = np.stack([image_lib.preprocess(Image.fromarray(c), size) for c in canvases]).astype(np.float32)
  y = np.array(y)
  model = Llava(cfg.model, rngs=nnx.Rngs(cfg.seed))
  feats_fn = jax.jit(lambda m, x: select_features(m.vision_tower(x), cfg.model.vision.feature_select))
  feats = np.concatenate([np.asarray(feats_fn(model, jnp.asarray(pix[i:i + 100]))) for i in range(0, n, 100)])
  side = size // patch
  cell_px = size // 3
  cell_patches = -(-cell_px // patch)                       # patches that cover cell (1, 1)
  x_feat = feats.reshape(n, side, side, -1)[:, :cell_patches, :cell_patches].reshape(n, -1)
  x_pix = pix[:, :cell_patches * patch, :cell_patches * patch].reshape(n, -1)
  split = int(0.8 * n)
  for name, x in (('tower features', x_feat), ('raw pixels', x_pix)):
    clf = LogisticRegression(max_iter=2000).fit(x[:split], y[:split])
    print(f'{name:15s} cell (1, 1), 11 classes: train {clf.score(x[:split], y[:split]):.3f}  '
          f'held-out {clf.score(x[split:], y[split:]):.3f}  ({split} / {n - split} canvases)')


if __name__ == '__main__':
  main()
