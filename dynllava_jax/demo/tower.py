"""Stage 0 of the demo recipe: pretrain the tiny CLIP-stand-in tower on the digits (CLIP's role).

    out = pretrain_tower(config, out_dir)     # writes <out_dir>/params (orbax, {'vision_tower': ...})

The tower (`model.vision`, the same `VisionTower` LLaVA runs, up to its feature layer) is trained on the
patch tokens LLaVA feeds the projector (CLS dropped), with throw-away heads (`TowerClassifier`):
  objective 'patches' (the demo's): every patch token classifies its own cell's digit (11 classes: digits
            0..9, 10 = empty) through one LayerNorm + Linear — a dense, segmentation-like target, so each
            token the LLM reads says what its cell holds; a cell's prediction is the mean of its patches'
            logits;
  objective 'ink':    like 'patches', but only the patches a digit's ink covers (>= `tower.ink_min` of
            their pixels) name the digit; every other patch, empty cells' and the background around a
            digit alike, is class 10 (empty). A digit's identity then lives in its few ink patches, as an
            object's does in a natural image, not in every patch of its cell; a cell's prediction is its
            best digit score over its patches (`cell_logits`);
  objective 'cells':  a `CellHead` of g² learned cell queries attends over the patch tokens and classifies
            each cell;
  where_weight > 0:   every patch token also classifies which cell it lies in (`patch_cells`), so the
            tokens say where they come from (the LLM finds "row r column c" by content, not only by RoPE).
The heads are thrown away; `<out_dir>/params` holds the tower's params in the `dynllava_jax.convert`
layout, so `train.init_from` of the next stage loads them (its other modules keep their fresh init) and
`train.freeze_vision` keeps them frozen from then on.

Canvases come from `digits_vqa.draw_grid` / `render_canvas` with the dataset's geometry
(`data.digits.canvas_size`, `grid`), from the train split's source digits (a pool of `tower.pool` canvases
drawn by (seed, 'tower', i)); the held-out accuracy (per cell) uses `tower.eval_canvases` canvases from the
validation split's source digits. Pixels go through `images.preprocess`, the pipeline's own LLaVA/CLIP
preprocessing. Config section `tower`: steps, batch_size, lr, weight_decay, warmup_ratio, pool,
eval_canvases, log_every, objective, ink_min, where_weight.
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image

from dynllava_jax.data import digits_vqa
from dynllava_jax.data import images as images_lib
from dynllava_jax.model import layers as L
from dynllava_jax.model.vision import VisionTower, select_features

EMPTY_CLASS = 10
NUM_CLASSES = 11


def tower_defaults():
  """The `tower` config section (stage 0)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  # 6400 steps at batch 16 over 16384 distinct canvases: per cell 0.961 on the test split's digits, its
  # ink patches naming their digit 0.912, against 0.935 / 0.876 for 3200 steps over 4096 (docs/demo.md,
  # "The tower": width 128 or 3 layers gained less per second; warped digits gained nothing). Smaller
  # steps beat bigger ones: 3200 at 16 against 800 at 64, 0.954 / 0.910 against 0.882 / 0.799 held out.
  c.steps = 6400
  c.batch_size = 16
  c.lr = 3e-3
  c.weight_decay = 1e-4
  c.warmup_ratio = 0.05
  # Distinct training canvases (the tower fits 4096 exactly: batch accuracy 1.000 from step ~2400).
  c.pool = 16384
  c.eval_canvases = 512
  c.log_every = 100
  # Weight of the per-patch 'where' loss: every patch token also classifies which cell it lies in (a
  # segmentation-like dense objective), so the features the LLM reads say where they come from. 0 = off.
  c.where_weight = 1.0
  # 'cells': g² learned cell queries pool the patch tokens and classify each cell (`CellHead`);
  # 'patches': every patch token classifies its own cell's digit (a dense, segmentation-like objective);
  # 'ink': only the patches a digit's ink covers (>= ink_min of their pixels) name it, the rest say empty.
  # The demo's: with 'patches' all 16 tokens of a cell carried its digit, so a random 20 % budget (~3 per
  # cell) lost almost nothing; with 'ink' at 0.4 a digit lived in ~5.5 of its cell's 16 tokens and a
  # uniform stride of 12 tokens still hit 0.91 of the digits; at 0.6, ~3.6 tokens (0.75 hit).
  c.objective = 'ink'
  c.ink_min = 0.6
  return c


class CellHead(nnx.Module):
  """g² learned cell queries, one single-head attention over the patch tokens, LayerNorm, Linear → 11
  classes. The attention logits get a learned (g², N) bias (zero at init): where each cell lies is learned
  directly per patch, far faster than through the tower's small random position embeddings.

  feats (B, N, w) -> logits (B, g², 11)."""

  def __init__(self, width, cells, num_patches, *, rngs):
    self.queries = nnx.Param(nnx.initializers.normal(L.INIT_STD)(rngs.params(), (cells, width)))
    self.where = nnx.Param(jnp.zeros((cells, num_patches), jnp.float32))
    self.ln = nnx.LayerNorm(width, rngs=rngs)
    self.k = nnx.Linear(width, width, rngs=rngs)
    self.v = nnx.Linear(width, width, rngs=rngs)
    self.out_ln = nnx.LayerNorm(width, rngs=rngs)
    self.out = nnx.Linear(width, NUM_CLASSES, rngs=rngs)

  def __call__(self, feats):
    x = self.ln(feats)
    k, v = self.k(x), self.v(x)
    s = jnp.einsum('cw,bnw->bcn', self.queries[...], k) * (k.shape[-1] ** -0.5) + self.where[...]
    pooled = jnp.einsum('bcn,bnw->bcw', jax.nn.softmax(s, axis=-1), v)
    return self.out(self.out_ln(pooled))


class TowerClassifier(nnx.Module):
  """The tower and its throw-away heads. objective 'cells': a `CellHead` classifies each cell; 'patches':
  every patch token classifies its own cell's digit (a linear head; a cell's logits are the mean over its
  patches). Both: every patch token also classifies which cell it lies in (the 'where' head).

  pixels (B, S, S, 3) -> (cell logits (B, g², 11) or None, per-patch digit logits (B, N, 11) or None,
  per-patch cell logits (B, N, g²)); `cell_logits` turns the second into the first."""

  def __init__(self, vision_cfg, cells, objective='cells', *, rngs):
    self.vision_tower = VisionTower(vision_cfg, rngs=rngs)
    n, w = (vision_cfg.image_size // vision_cfg.patch_size) ** 2, vision_cfg.width
    self.objective = objective
    if objective == 'cells':
      self.head = CellHead(w, cells, n, rngs=rngs)
    elif objective in ('patches', 'ink'):
      self.head_ln = nnx.LayerNorm(w, rngs=rngs)
      self.head = nnx.Linear(w, NUM_CLASSES, rngs=rngs)
    else:
      raise ValueError(f"tower.objective={objective!r}: use 'cells', 'patches' or 'ink'")
    self.where_ln = nnx.LayerNorm(w, rngs=rngs)
    self.where_head = nnx.Linear(w, cells, rngs=rngs)
    self.feature_select = vision_cfg.feature_select

  def __call__(self, pixels):
    feats = select_features(self.vision_tower(pixels), self.feature_select)
    if self.feature_select == 'full':
      feats = feats[:, 1:]
    where = self.where_head(self.where_ln(feats))
    if self.objective == 'cells':
      return self.head(feats), None, where
    return None, self.head(self.head_ln(feats)), where


def cell_logits(out, patch_cell, cells, objective='patches'):
  """The per-cell scores (B, g², 11) of a `TowerClassifier` output (patch_cell (N,) int: each patch's
  cell): 'cells' its own; 'patches' the mean of the per-patch logits over each cell's patches; 'ink' per
  cell the largest probability of each digit over its patches, and for 'empty' the smallest (a cell is
  empty when none of its patches shows ink)."""
  if out[0] is not None:
    return out[0]
  onehot = jax.nn.one_hot(patch_cell, cells, dtype=out[1].dtype)              # (N, g²)
  if objective != 'ink':
    return jnp.einsum('bnk,nc->bck', out[1], onehot / jnp.maximum(onehot.sum(0), 1.0))
  p = jax.nn.softmax(out[1], -1)[:, :, None, :]                               # (B, N, 1, 11)
  inside = onehot.T[None, :, :, None] > 0                                      # (1, g², N, 1) -> per cell
  p = jnp.swapaxes(p, 1, 2)                                                    # (B, 1, N, 11)
  best = jnp.where(inside, p, 0.0).max(2)                                      # (B, g², 11)
  least = jnp.where(inside, p, 1.0).min(2)
  return jnp.concatenate([best[..., :EMPTY_CLASS], least[..., EMPTY_CLASS:]], -1)


def patch_cells(canvas_size, grid, image_size, patch_size):
  """(N,) int32: the cell (row-major, 0..g²-1) holding each patch's centre (canvas resized to image_size,
  as `images.preprocess` does; cells as `digits_vqa.render_canvas` lays them out)."""
  side = image_size // patch_size
  centre = (np.arange(side) + 0.5) * patch_size * canvas_size / image_size
  cell = canvas_size // grid
  margin = (canvas_size - grid * cell) // 2
  rc = np.clip(np.floor((centre - margin) / cell).astype(np.int32), 0, grid - 1)
  return (rc[:, None] * grid + rc[None, :]).reshape(-1)


def patch_ink(ink, image_size, patch_size):
  """(N,) float: the share of each patch's pixels that a digit's ink covers (ink (S, S) bool on the
  canvas; the canvas resized to image_size as `images.preprocess` does)."""
  m = Image.fromarray(ink.astype(np.uint8) * 255, 'L')
  if m.size[0] != image_size:
    m = m.resize((image_size, image_size), Image.Resampling.BILINEAR)
  side = image_size // patch_size
  m = np.asarray(m, np.float32)[:side * patch_size, :side * patch_size] / 255.0
  return m.reshape(side, patch_size, side, patch_size).mean((1, 3)).reshape(-1)


def make_canvases(config, split, count, stream):
  """(pixels (count, S, S, 3) float32 CLIP-normalised, labels (count, g²) int32 (10 = empty), patch ink
  (count, N) float32: the share of each patch a digit's ink covers)."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  images, targets = d.images.astype(np.float32), d.target
  g, size = int(config.data.digits.get('grid', digits_vqa.GRID)), int(config.data.digits.canvas_size)
  image_size, patch_size = int(config.model.vision.image_size), int(config.model.vision.patch_size)
  frac = float(config.data.digits.get('tile_fraction', digits_vqa.TILE_FRACTION))
  pix = np.zeros((count, image_size, image_size, 3), np.float32)
  lab = np.zeros((count, g * g), np.int32)
  ink = np.zeros((count, (image_size // patch_size) ** 2), np.float32)
  for i in range(count):
    rng = np.random.default_rng([int(config.seed), stream, i])
    empty, src, grid = digits_vqa.draw_grid(rng, targets, split, g)
    canvas, ink_px = digits_vqa.render_canvas(digits_vqa.tiles_of(images, empty, src), size, rng, frac,
                                              with_ink=True)
    pix[i] = images_lib.preprocess(Image.fromarray(canvas, 'RGB'), image_size)
    lab[i] = [EMPTY_CLASS if v is None else v for row in grid for v in row]
    ink[i] = patch_ink(ink_px, image_size, patch_size)
  return pix, lab, ink


def _save_tower(model, path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  tree = {'vision_tower': nnx.to_pure_dict(nnx.state(model.vision_tower, nnx.Param))}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(path), tree, force=True)
  ckptr.wait_until_finished()


def pretrain_tower(config, out_dir, report=print):
  """Trains the tower + cell head (`config.tower`), saves the tower to <out_dir>/params.

  Returns {'steps', 'train_accuracy' (last logged batch), 'eval_accuracy' (held-out per-cell accuracy),
  'wall_s'}; also written to <out_dir>/tower.json."""
  t = config.tower
  t0 = time.time()
  g = int(config.data.digits.get('grid', digits_vqa.GRID))
  pool_x, pool_y, pool_ink = make_canvases(config, 'train', int(t.pool), 101)
  ev_x, ev_y, ev_ink = make_canvases(config, 'validation', int(t.eval_canvases), 102)
  report(f'stage 0: {len(pool_x)} train canvases, {len(ev_x)} held-out ({time.time() - t0:.0f} s); '
         f'{t.steps} steps at batch {t.batch_size}')
  where = patch_cells(int(config.data.digits.canvas_size), g, int(config.model.vision.image_size),
                      int(config.model.vision.patch_size))
  objective = str(t.get('objective', 'cells'))
  model = TowerClassifier(config.model.vision, g * g, objective, rngs=nnx.Rngs(int(config.seed)))
  ink_min = float(t.get('ink_min', 0.1))
  if objective == 'ink':    # per patch: its cell's digit where ink covers >= ink_min of it, else empty
    pool_ink = pool_ink >= ink_min
    per_digit = pool_ink.sum() / max(int((pool_y != EMPTY_CLASS).sum()), 1)
    report(f'stage 0: {pool_ink.mean():.3f} of the patches show ink ({per_digit:.1f} per digit)')
  sched = optax.warmup_cosine_decay_schedule(0.0, float(t.lr), max(1, int(t.warmup_ratio * t.steps)),
                                             max(int(t.steps), 2))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=float(t.weight_decay)))
  graphdef, params = nnx.split(model, nnx.Param)
  opt_state = tx.init(params)

  where = jnp.asarray(where)
  ww = float(t.get('where_weight', 0.0))

  def loss_fn(p, x, y, ink):
    out = nnx.merge(graphdef, p)(x)
    logits, per_patch, where_logits = cell_logits(out, where, g * g, objective), out[1], out[2]
    if per_patch is None:
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    else:   # each patch token: its cell's class ('ink': only where ink covers it)
      target = y[:, where]
      if objective == 'ink':
        target = jnp.where(ink, target, EMPTY_CLASS)
      ce = optax.softmax_cross_entropy_with_integer_labels(per_patch, target).mean()
    if ww:
      ce = ce + ww * optax.softmax_cross_entropy_with_integer_labels(
          where_logits, jnp.broadcast_to(where, where_logits.shape[:2])).mean()
    return ce, jnp.mean(jnp.argmax(logits, -1) == y)

  @jax.jit
  def step(p, o, x, y, ink):
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, x, y, ink)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss, acc

  @jax.jit
  def predict(p, x):
    out = nnx.merge(graphdef, p)(x)
    per_patch = None if out[1] is None else jnp.argmax(out[1], -1)
    return jnp.argmax(cell_logits(out, where, g * g, objective), -1), per_patch

  order_rng = np.random.default_rng([int(config.seed), 103])
  loss = acc = float('nan')
  for i in range(int(t.steps)):
    idx = order_rng.integers(0, len(pool_x), int(t.batch_size))
    params, opt_state, loss, acc = step(params, opt_state, pool_x[idx], pool_y[idx], pool_ink[idx])
    if t.log_every and ((i + 1) % int(t.log_every) == 0 or i + 1 == int(t.steps)):
      report(f'  stage 0 step {i + 1}: loss {float(loss):.4f} batch accuracy {float(acc):.3f}')
  correct, ink_hits = [], []
  for j in range(0, len(ev_x), 256):
    cells_pred, patch_pred = predict(params, ev_x[j:j + 256])
    correct.append(np.asarray(cells_pred) == ev_y[j:j + 256])
    if objective == 'ink':   # the patches that show ink: does each name its digit?
      shown = ev_ink[j:j + 256] >= ink_min
      ink_hits.append((np.asarray(patch_pred) == ev_y[j:j + 256][:, np.asarray(where)])[shown])
  eval_acc = float(np.concatenate(correct).mean()) if correct else float('nan')
  nnx.update(model, params)
  os.makedirs(out_dir, exist_ok=True)
  _save_tower(model, os.path.join(out_dir, 'params'))
  out = {'steps': int(t.steps), 'train_accuracy': float(acc), 'eval_accuracy': eval_acc,
         'wall_s': time.time() - t0}
  if ink_hits:
    out['eval_ink_patch_accuracy'] = float(np.concatenate(ink_hits).mean())
    report(f'stage 0: held-out ink patches naming their digit {out["eval_ink_patch_accuracy"]:.3f}')
  with open(os.path.join(out_dir, 'tower.json'), 'w') as f:
    json.dump(out, f, indent=1)
  report(f'stage 0: held-out per-cell accuracy {eval_acc:.3f} ({out["wall_s"]:.0f} s)')
  return out
