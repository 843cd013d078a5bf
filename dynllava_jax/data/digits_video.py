"""`digits_video`: an offline video QA set built like `digits_vqa` (same digits, canvases and splits), whose
questions need the sequence of frames (docs/mod.md).

A sample is F frames (`min_frames`..`max_frames`, drawn per sample; default 4..8): frame 1 is a digits_vqa
grid; each next frame changes at most one cell (a digit appears in an empty cell, a digit disappears, or a
digit is replaced; with probability `STILL_PROB` nothing changes). Every frame is rendered anew (its own
jitter, tint and noise), so "unchanged" means the same digits, not the same pixels. Question types:
  first_frame:  "in which frame does the digit d first appear ?"    → "frame 3" | "never"
  count_frames: "how many frames contain the digit d ?"             → "4"
  changed:      "what changed between frame i and frame i+1 ?"      → "row 2 column 1 : 3 became empty" |
                "row 1 column 3 : empty became 7" | "row 3 column 3 : 2 became 5" | "nothing"
  narrate:      "count the digits frame by frame ."                 → "frame 1 : 5 . frame 2 : 6 . ..."
With `style='echo'` (the demo's) every answer first reads the cells it needs, each value right after the one
token that names the frame and the cell ('f2b1 7': frame 2, cell b1, as `digits_vqa`'s echo names a cell),
so each value is one attention hop from its name; then the answer proper:
  first_frame:  "f1a1 3 f1a2 empty f1b1 5 f1b2 empty f2a1 3 f2a2 7 frame 2"   (frame by frame, up to the
                first cell holding d; all cells then "never" when d does not appear)
  count_frames: "f1a1 3 … f4b2 5 : 2"                                 (every cell, then the count)
  changed:      "f2a1 3 f3a1 3 f2a2 empty f3a2 7 … : a2 empty became 7" (frames i and i+1 cell by cell,
                side by side; then the change or ': nothing')
  narrate:      "f1a1 3 … f1b2 5 : 2 . f2a1 …"                     (each frame's cells, then its count)
The conversation is `<image>` × F (one tag per frame, `data/frames.py`) then the question — with
`frame_labels`, each tag follows its frame's name (`frame 2 <image>`), so a frame's tokens can read which frame
they are from the text before them (otherwise only positions tell the frames apart); the record's
image bytes are a frame container (PNG frames up to 128 px, JPEG above). Deterministic by `seed`.
Read it with `data.max_frames` ≥ the config's max_frames.
"""
import dataclasses
import io

import numpy as np
from PIL import Image
from etils import epath
import tensorflow_datasets as tfds

from dynllava_jax.data import digits_vqa as D
from dynllava_jax.data import frames as frames_lib
from dynllava_jax.data import records
from dynllava_jax.data import tokenizer as tokenizer_lib

QUESTION_TYPES = ('first_frame', 'count_frames', 'changed', 'narrate')
STYLES = ('short', 'echo')
TYPE_PROBS = (0.3, 0.25, 0.3, 0.15)
STILL_PROB = 0.2


def question(qtype, d=0, i=1):
  return {'first_frame': f'in which frame does the digit {d} first appear ?',
          'count_frames': f'how many frames contain the digit {d} ?',
          'changed': f'what changed between frame {i} and frame {i + 1} ?',
          'narrate': 'count the digits frame by frame .'}[qtype]


def _has(grid, d):
  return any(v == d for row in grid for v in row)


def _count(grid):
  return sum(v is not None for row in grid for v in row)


def change_text(a, b):
  """The one difference between grids a and b (or 'nothing')."""
  for r, (ra, rb) in enumerate(zip(a, b)):
    for c, (x, y) in enumerate(zip(ra, rb)):
      if x != y:
        word = lambda v: 'empty' if v is None else str(v)
        return f'row {r + 1} column {c + 1} : {word(x)} became {word(y)}'
  return 'nothing'


def frame_cell(f, r, c):
  """'echo' style: the one token naming frame f's cell (r, c) (1-based): 'f2b1'."""
  return f'f{f}{D.cell_name(r, c, "echo")}'


def _echoed_cells(grid, f):
  """Frame f's (1-based) cells in reading order, each 'f2b1 7'."""
  return [f'{frame_cell(f, r + 1, c + 1)} {D.value_text(v)}' for r, row in enumerate(grid) for c, v in enumerate(row)]


def _echo_answer(qtype, grids, d, i):
  if qtype == 'first_frame':      # frame by frame, stopping at the first cell that holds d
    cells = [(p, v, f) for f, g in enumerate(grids) for p, v in zip(_echoed_cells(g, f + 1), sum(g, []))]
    hit = next((i for i, (_, v, _) in enumerate(cells) if v == d), None)
    if hit is None:
      return ' '.join([p for p, _, _ in cells] + ['never'])
    return ' '.join([p for p, _, _ in cells[:hit + 1]] + [f'frame {cells[hit][2] + 1}'])
  if qtype == 'count_frames':
    cells = [p for f, g in enumerate(grids) for p in _echoed_cells(g, f + 1)]
    return ' '.join(cells + [f': {sum(_has(g, d) for g in grids)}'])
  if qtype == 'changed':          # the two frames side by side, cell by cell, then the change
    a, b = grids[i - 1], grids[i]
    pairs = [p for x, y in zip(_echoed_cells(a, i), _echoed_cells(b, i + 1)) for p in (x, y)]
    change = 'nothing'
    for r, (ra, rb) in enumerate(zip(a, b)):
      for c, (x, y) in enumerate(zip(ra, rb)):
        if x != y and change == 'nothing':
          change = f'{D.cell_name(r + 1, c + 1, "echo")} {D.value_text(x)} became {D.value_text(y)}'
    return ' '.join(pairs + [f': {change}'])
  return ' . '.join(' '.join(_echoed_cells(g, f + 1) + [f': {_count(g)}']) for f, g in enumerate(grids))


def answer(qtype, grids, d=0, i=1, style='short'):
  if style == 'echo':
    return _echo_answer(qtype, grids, d, i)
  if style != 'short':
    raise ValueError(f'digits_video style={style!r}: use one of {STYLES}')
  if qtype == 'first_frame':
    first = next((f for f, g in enumerate(grids) if _has(g, d)), None)
    return 'never' if first is None else f'frame {first + 1}'
  if qtype == 'count_frames':
    return str(sum(_has(g, d) for g in grids))
  if qtype == 'changed':
    return change_text(grids[i - 1], grids[i])
  return ' . '.join(f'frame {f + 1} : {_count(g)}' for f, g in enumerate(grids))


def vocabulary_texts():
  """Every text the generator can produce (the digits_vqa vocabulary plus the video words)."""
  texts = D.vocabulary_texts('short')
  texts += [question(t, 0, 1) for t in QUESTION_TYPES]
  texts += ['frame never nothing row column empty became']
  texts += [' '.join(frame_cell(f, r, c) for f in range(1, 9) for r in range(1, 4) for c in range(1, 4))]
  texts += [' '.join(D.cell_name(r, c, 'echo') for r in range(1, 4) for c in range(1, 4))]
  return texts


def build_tokenizer(path=None, describe_style='short'):
  """digits_vqa's tokenizer for `describe_style` (the same id for every word it has), extended by the
  video's words: a model trained on digits_vqa with that style reads the video without a new embedding
  for the words both have (the demo's video stages start from its image LLaVA)."""
  return tokenizer_lib.build_word_tokenizer(D.vocabulary_texts(describe_style), path, extend=vocabulary_texts())


def evolve(rng, empty, src, grid, labels, split):
  """The next frame's cells: at most one cell changed (appear / disappear / replace) -> (empty, src, grid)."""
  empty, src = empty.copy(), src.copy()
  g = empty.shape[0]
  if rng.random() >= STILL_PROB:
    r, c = int(rng.integers(g)), int(rng.integers(g))
    lo, hi = D.SOURCE_SPLITS[split]
    if empty[r, c]:
      empty[r, c] = False
      src[r, c] = rng.integers(lo, hi)
    elif rng.random() < 0.5 and (~empty).sum() > 1:
      empty[r, c] = True
    else:
      old = labels[src[r, c]]
      while labels[src[r, c]] == old:
        src[r, c] = rng.integers(lo, hi)
  grid = [[None if empty[r, c] else int(labels[src[r, c]]) for c in range(g)] for r in range(g)]
  return empty, src, grid


def _encode(img_array, canvas_size):
  buf = io.BytesIO()
  img = Image.fromarray(img_array, 'RGB')
  if canvas_size <= D.PNG_MAX_SIZE:
    img.save(buf, format='PNG')
  else:
    img.save(buf, format='JPEG', quality=95)
  return buf.getvalue()


def make_sample(split, i, images, labels, canvas_size, seed, min_frames=4, max_frames=8, grid_size=D.GRID,
                type_probs=TYPE_PROBS, frame_labels=False, style='short'):
  """One record (records.features layout) of `split`, deterministic in (seed, split, i)."""
  rng = np.random.default_rng([seed, 100 + list(D.SOURCE_SPLITS).index(split), i])
  f = int(rng.integers(min_frames, max_frames + 1))
  empty, src, grid = D.draw_grid(rng, labels, split, grid_size)
  cells, grids = [(empty, src)], [grid]
  for _ in range(f - 1):
    empty, src, grid = evolve(rng, empty, src, grid, labels, split)
    cells.append((empty, src))
    grids.append(grid)
  qtype = QUESTION_TYPES[int(rng.choice(len(QUESTION_TYPES), p=type_probs))]
  d, k = int(rng.integers(0, 10)), int(rng.integers(1, f))
  if qtype in ('first_frame', 'count_frames') and rng.random() < 0.8:    # mostly digits that do occur
    seen = sorted({v for g in grids for row in g for v in row if v is not None})
    d = seen[int(rng.integers(len(seen)))]
  frames = [_encode(D.render_canvas(D.tiles_of(images, e, s), canvas_size, rng), canvas_size)
            for e, s in cells]
  tags = ''.join(f'frame {j + 1} <image>\n' for j in range(f)) if frame_labels else '<image>\n' * f
  conv = [{'from': 'human', 'value': tags + question(qtype, d, k)},
          {'from': 'gpt', 'value': answer(qtype, grids, d, k, style)}]
  return {'index': i, 'id': f'{split}-{i}', 'image': frames_lib.pack_frames(frames), 'has_image': True,
          'conversations': {'from': [t['from'] for t in conv], 'value': [t['value'] for t in conv]},
          'question_type': qtype, 'answer': conv[1]['value']}


@dataclasses.dataclass
class DigitsVideoConfig(tfds.core.BuilderConfig):
  canvas_size: int = 64
  num_train: int = 2000
  num_val: int = 200
  num_test: int = 200
  seed: int = 0
  min_frames: int = 4
  max_frames: int = 8
  grid: int = D.GRID
  frame_labels: bool = False
  style: str = 'short'


def make_config(canvas_size=64, num_train=2000, num_val=200, num_test=200, seed=0, min_frames=4,
                max_frames=8, grid=D.GRID, frame_labels=False, style='short'):
  """The builder config; every option that changes the data is in its name."""
  if not 2 <= min_frames <= max_frames:
    raise ValueError(f'digits_video: frames {min_frames}..{max_frames}: need 2 <= min_frames <= max_frames')
  if not 1 <= grid <= 3 or canvas_size < 8 * grid:
    raise ValueError(f'digits_video: grid={grid} must be in 1..3 with canvas_size={canvas_size} >= 8·grid')
  name = f'c{canvas_size}_n{num_train}-{num_val}-{num_test}_s{seed}_f{min_frames}-{max_frames}_g{grid}'
  if style not in STYLES:
    raise ValueError(f'digits_video: style={style!r}: use one of {STYLES}')
  name += '_fl' if frame_labels else ''
  name += '_echo' if style == 'echo' else ''
  return DigitsVideoConfig(name=name, canvas_size=canvas_size, num_train=num_train, num_val=num_val,
                           num_test=num_test, seed=seed, min_frames=min_frames, max_frames=max_frames, grid=grid,
                           frame_labels=frame_labels, style=style)


class DigitsVideo(tfds.core.GeneratorBasedBuilder):
  """The digits_video builder (see the module docstring). Configs come from `make_config`."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First version.'}
  code_path = epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=records.features())

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    return {'train': self._generate_examples('train', c.num_train),
            'validation': self._generate_examples('validation', c.num_val),
            'test': self._generate_examples('test', c.num_test)}

  def _generate_examples(self, split, num):
    from sklearn.datasets import load_digits  # local: only needed when building
    d = load_digits()
    images, labels = d.images.astype(np.float32), d.target
    c = self.builder_config
    for i in range(num):
      yield i, make_sample(split, i, images, labels, c.canvas_size, c.seed, c.min_frames, c.max_frames, c.grid,
                           frame_labels=c.frame_labels, style=c.style)

