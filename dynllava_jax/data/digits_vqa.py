"""`digits_vqa`: an embedded, offline VQA set made of the real handwritten digits sklearn ships.

Each image is a square RGB canvas (`canvas_size`, e.g. 64 → 64 patch-8 tokens, 336 → 576 patch-14
tokens) holding a `grid` x `grid` grid (default 3) of upscaled 8x8 digit tiles (values 0..16 → ink), some
cells empty, with jitter inside the cell, a random tint per tile and background noise. A cell is
canvas_size // grid pixels: with canvas 64, grid 2 and patch 8 each cell is exactly a 4x4 block of patches
(the demo's geometry); with grid 3 cells of 21 px straddle the patches. Questions:
  digit_at:  "what digit is at row r column c ?"  → "7" | "empty"     (needs a few patches)
  count:     "how many digits are there ?"          → "6"              (needs all patches)
  row_sum:   "what is the sum of row r ?"           → "12"             (empty cells count 0)
  describe:  "describe the grid row by row ."       → a long answer, in one of two styles (config
             `describe_style`): 'long' (≥ 50 tokens, for the released len_ot = 50):
             "there are 6 digits . row 1 : column 1 is 3 , column 2 is empty , column 3 is 5 . ..."
             or 'short' (24 tokens, for the tiny model's len_ot = 16; less template, shorter sequences):
             "6 digits . row 1 : 3 empty 5 . row 2 : ..."
             or 'cells' (the demo's 2x2 grid: 51 tokens with </s>, above the released len_ot = 50):
             "the grid has 2 rows and 2 columns and 3 digits . row 1 : in column 1 the digit is 3 , in
             column 2 the cell is empty . row 2 : ..."
             or 'echo' (the demo: cells named by one token, each value right after its cell's name; look-ups
             "b1 7", row sums "a1 3 a2 empty sum 3"): "the grid has 2 rows and 2 columns and 3 digits .
             row a : a1 3 , a2 empty . row b : ..." (31 tokens with </s>)
             or 'tally' (the demo's: 'echo' with every count after the cells it counts: descriptions
             "row a : a1 3 , a2 empty . row b : ... . the grid has 2 rows and 2 columns and 3 digits .",
             counts "a1 3"-style presence first: "a1 digit a2 empty b1 digit b2 digit count 3")
  text_add:  "what is a plus b ?"                   → "9"              (text-only, no image)
Image samples have further rounds (another question about the same image, no image tag), each with
probability `extra_round_prob` up to `max_rounds` in all (defaults 0.1 and 2: about 10% have a second
round; the tiny config uses 0.75 and 5, about 3 rounds per image, which gives the from-scratch tiny model
~3x the image-grounded answers per forward pass, as LLaVA-Instruct's multi-turn conversations do). The mix of question types is `type_probs` (order of QUESTION_TYPES;
a caption set for alignment is type_probs=(0, 0, 0, 1, 0), max_rounds=1). Splits use disjoint source digits, by index: train 0..1257, validation
1258..1526, test 1527..1796. Everything is deterministic by `seed`. Canvases up to 128 px are
stored as PNG, larger ones as JPEG (quality 95).
"""
import dataclasses
import io

import numpy as np
from PIL import Image
from etils import epath
import tensorflow_datasets as tfds

from dynllava_jax.data import records
from dynllava_jax.data import templates
from dynllava_jax.data import tokenizer as tokenizer_lib

SOURCE_SPLITS = {'train': (0, 1258), 'validation': (1258, 1527), 'test': (1527, 1797)}
QUESTION_TYPES = ('digit_at', 'count', 'row_sum', 'describe', 'text_add')
TYPE_PROBS = (0.35, 0.15, 0.2, 0.25, 0.05)
EMPTY_PROB = 0.3
SECOND_ROUND_PROB = 0.1
GRID = 3
# A digit's side as a fraction of its cell's side (it sits at a random place inside the cell).
TILE_FRACTION = 0.8
PNG_MAX_SIZE = 128   # canvases up to this side are stored as PNG, larger ones as JPEG (q95)


def row_name(r):
  """The 'named' style's name of row r (1-based): a, b, c."""
  return 'abc'[r - 1]


def cell_name(r, c, style='long'):
  """How questions name cell (r, c) (1-based): 'b1' in the 'named' style, else 'row 2 column 1'."""
  return f'{row_name(r)}{c}' if style in NAMED_STYLES else f'row {r} column {c}'


def value_text(v):
  """A cell's content as answered: the digit, or 'empty'."""
  return 'empty' if v is None else str(v)


def presence(grid, style):
  """'tally' count answer: every cell's name, then 'digit' or 'empty', then the count ('a1 empty a2 digit
  b1 digit b2 digit count 3'): each cell is one hop from its name, the count follows from the text."""
  cells = [f'{cell_name(r + 1, c + 1, style)} {"empty" if v is None else "digit"}'
           for r, row in enumerate(grid) for c, v in enumerate(row)]
  return ' '.join(cells) + f' count {sum(v is not None for row in grid for v in row)}'


def echoed(r, c, v, style):
  """'echo' style: cell (r, c)'s name, then its content ('b1 7')."""
  return f'{cell_name(r, c, style)} {value_text(v)}'


def question(qtype, r=0, c=0, a=0, b=0, style='long'):
  if style in NAMED_STYLES:   # one token names the cell (row) the question is about: a one-hop look-up
    at, row = f'in cell {cell_name(r, c, style)}', row_name(r)
  else:
    at, row = f'at {cell_name(r, c, style)}', r
  return {
      'digit_at': f'what digit is {at} ?',
      'count': 'how many digits are there ?',
      'row_sum': f'what is the sum of row {row} ?',
      'describe': 'describe the grid row by row .',
      'text_add': f'what is {a} plus {b} ?',
  }[qtype]


DESCRIBE_STYLES = ('long', 'short', 'cells', 'named', 'echo', 'tally')
# One token names a cell ('b1'). 'echo' also puts the cell's name right before its value in every answer
# (look-ups 'b1 7', row sums 'a1 3 a2 empty sum 3', descriptions '... row a : a1 3 , a2 empty . ...'): the
# value is predicted at the position whose input is the cell's name, one attention hop from that token to
# the cell's image tokens. With the answer alone supervised, a from-scratch tiny LLM does not learn the
# two-hop look-up (carry the name from the question to the answer position, then match it to the image):
# teacher-forced look-ups stay at ~0.42 (a visible digit, not the asked one); with 'echo' they reach 0.86
# in 400 steps (docs/demo.md).
# 'tally' (the demo's) is 'echo' with every count after the cells it counts: the count question answered
# cell by cell ('a1 empty a2 digit ... count 3', `presence`), the description's "the grid has 2 rows and 2
# columns and 3 digits ." after its rows. In 'echo' the count came first, one token that has to add up
# every cell's image tokens at once: the descriptions' errors were mostly that count, with every cell
# right after it (docs/demo.md, "Counts after the cells").
ECHO_STYLES = ('echo', 'tally')
NAMED_STYLES = ('named',) + ECHO_STYLES


def describe(grid, style='long'):
  """Long answer for `grid` (g x g list of int or None), row by row; `style` in DESCRIBE_STYLES."""
  n = sum(v is not None for row in grid for v in row)
  cell = value_text
  if style in ECHO_STYLES:
    g = len(grid)
    head = f'the grid has {g} rows and {g} columns and {n} digits .'
    parts = []
    for r, row in enumerate(grid):
      cells = [echoed(r + 1, c + 1, v, style) for c, v in enumerate(row)]
      parts.append(f'row {row_name(r + 1)} : ' + ' , '.join(cells) + ' .')
    return ' '.join([head] + parts if style == 'echo' else parts + [head])
  if style in ('cells', 'named'):
    g, named = len(grid), style == 'named'
    parts = [f'the grid has {g} rows and {g} columns and {n} digits .']
    for r, row in enumerate(grid):
      rn = row_name(r + 1) if named else str(r + 1)
      cells = [(f'in cell {rn}{c + 1} ' if named else f'in column {c + 1} ') +
               ('the cell is empty' if v is None else f'the digit is {v}') for c, v in enumerate(row)]
      parts.append(f'row {rn} : ' + ' , '.join(cells) + ' .')
    return ' '.join(parts)
  if style == 'short':
    rows = [f'row {r + 1} : ' + ' '.join(cell(v) for v in row) + ' .' for r, row in enumerate(grid)]
    return ' '.join([f'{n} digits .'] + rows)
  if style != 'long':
    raise ValueError(f'digits_vqa describe_style={style!r}: use one of {DESCRIBE_STYLES}')
  parts = [f'there are {n} digits .']
  for r, row in enumerate(grid):
    cells = [f'column {c + 1} is {cell(v)}' for c, v in enumerate(row)]
    parts.append(f'row {r + 1} : ' + ' , '.join(cells) + ' .')
  return ' '.join(parts)


def answer(qtype, grid, r=0, c=0, a=0, b=0, style='long', add_echo=False):
  if qtype == 'digit_at':
    v = grid[r - 1][c - 1]
    return echoed(r, c, v, style) if style in ECHO_STYLES else value_text(v)
  if qtype == 'count':
    if style == 'tally':
      return presence(grid, style)
    return str(sum(v is not None for row in grid for v in row))
  if qtype == 'row_sum':
    total = str(sum(v or 0 for v in grid[r - 1]))
    if style in ECHO_STYLES:   # the row's cells first, each value right after its name, then the sum
      return ' '.join(echoed(r, j + 1, v, style) for j, v in enumerate(grid[r - 1])) + f' sum {total}'
    return total
  if qtype == 'describe':
    return describe(grid, style)
  if add_echo:   # the operands, then the sum: a row sum's adder ('a1 3 a2 9 sum 12') on text alone
    return f'{a} plus {b} sum {a + b}'
  return str(a + b)


def vocabulary_texts(describe_style='long'):
  """Every text the generator can produce, word-wise (builds the word-level tokenizer). The 'long' and
  'short' describe words are always in (the vocabulary of the default sets does not change); 'cells' adds
  its own words only to datasets built with it."""
  texts = [templates.SYSTEM, ' '.join(templates.ROLES) + ' : ' + templates.SEP2, 'empty']
  styles = ('long', 'short') + ((describe_style,) if describe_style not in ('long', 'short') else ())
  texts += [question(t, r, c, 0, 0, style) for t in QUESTION_TYPES for style in styles
            for r in range(1, GRID + 1) for c in range(1, GRID + 1)]
  texts += [describe([[None] * 3] * 3, style) for style in styles]
  texts += [answer('count', [[1] * 3] * 3, style=style) for style in styles]
  texts.append(' '.join(str(i) for i in range(9 * GRID * GRID + 1)))
  return texts


def build_tokenizer(path=None, describe_style='long'):
  return tokenizer_lib.build_word_tokenizer(vocabulary_texts(describe_style), path)


def render_canvas(tiles, canvas_size, rng, tile_fraction=TILE_FRACTION, with_ink=False):
  """Draws a g x g grid canvas (g = len(tiles)).

  Args:
    tiles: g x g list of (8, 8) float arrays in 0..16, or None for empty cells.
    canvas_size: S, output side in pixels; cell c of a row spans pixels [margin + c·(S//g), +S//g).
    tile_fraction: a digit's side as a fraction of its cell's (at a random place inside the cell).
    with_ink: also return where the digits' ink is.
  Returns:
    (S, S, 3) uint8; with_ink: and (S, S) bool, the pixels a digit's ink covers (>= 1/4 intensity).
  """
  s, g = canvas_size, len(tiles)
  cell = s // g
  margin = (s - g * cell) // 2
  tile = max(8, int(round(cell * tile_fraction)))
  ink_mask = np.zeros((s, s), bool)
  f = max(1, s // 96)   # noise grain: 1 px for small canvases, f x f blocks for large ones
  base = -(-s // f)
  noise = rng.standard_normal((base, base, 3), dtype=np.float32)
  noise = noise.repeat(f, 0).repeat(f, 1)[:s, :s] if f > 1 else noise
  canvas = np.clip(0.06 + 0.03 * noise, 0, 1)
  for r in range(g):
    for c in range(g):
      t = tiles[r][c]
      if t is None:
        continue
      ink = Image.fromarray((t / 16.0 * 255).astype(np.uint8), 'L').resize(
          (tile, tile), Image.Resampling.BILINEAR)
      ink = np.asarray(ink, np.float32)[..., None] / 255.0
      tint = rng.uniform(0.6, 1.0, 3).astype(np.float32)
      y = margin + r * cell + int(rng.integers(0, cell - tile + 1))
      x = margin + c * cell + int(rng.integers(0, cell - tile + 1))
      region = canvas[y:y + tile, x:x + tile]
      canvas[y:y + tile, x:x + tile] = np.maximum(region, ink * tint)
      ink_mask[y:y + tile, x:x + tile] |= ink[..., 0] >= 0.25
  canvas += 0.02 * noise[::-1]   # pixel noise over the ink too (reuses the draw, flipped)
  out = (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8)
  return (out, ink_mask) if with_ink else out


def _random_question(rng, grid, allow_text=True, style='long', type_probs=TYPE_PROBS, allow_describe=True,
                     add_echo=False):
  p = np.asarray(type_probs, np.float64)
  if not allow_describe and p.sum() > p[3]:
    p = np.where(np.arange(len(p)) == 3, 0.0, p)
    p = p / p.sum()
  qtype = QUESTION_TYPES[int(rng.choice(len(QUESTION_TYPES), p=p))]
  if qtype == 'text_add' and not allow_text:
    qtype = 'count'
  g = len(grid)
  r, c = int(rng.integers(1, g + 1)), int(rng.integers(1, g + 1))
  if qtype == 'digit_at' and grid[r - 1][c - 1] is None and rng.random() < 0.8:
    filled = [(i + 1, j + 1) for i in range(g) for j in range(g) if grid[i][j] is not None]
    r, c = filled[int(rng.integers(len(filled)))]
  a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
  return qtype, question(qtype, r, c, a, b, style), answer(qtype, grid, r, c, a, b, style, add_echo)


def draw_grid(rng, labels, split, g=GRID):
  """The cells of one canvas: (empty (g, g) bool, src (g, g) source-digit indices of `split`, grid
  g x g list of the digit labels or None)."""
  lo, hi = SOURCE_SPLITS[split]
  empty = rng.random((g, g)) < EMPTY_PROB
  if empty.all():
    empty[int(rng.integers(g)), int(rng.integers(g))] = False
  src = rng.integers(lo, hi, (g, g))
  grid = [[None if empty[r, c] else int(labels[src[r, c]]) for c in range(g)] for r in range(g)]
  return empty, src, grid


def tiles_of(images, empty, src):
  g = empty.shape[0]
  return [[None if empty[r, c] else images[src[r, c]] for c in range(g)] for r in range(g)]


def make_sample(split, i, images, labels, canvas_size, seed, describe_style='long', max_rounds=2,
                extra_round_prob=SECOND_ROUND_PROB, grid_size=GRID, type_probs=TYPE_PROBS,
                describe_alone=False, tile_fraction=TILE_FRACTION, one_round_test=False, add_echo=False,
                text_rounds=False, text_only=False, text_grid=False):
  """One record (records.features layout) of `split`, deterministic in (seed, split, i).

  Image samples get further rounds (questions about the same image) while a draw < extra_round_prob, up
  to max_rounds in all; `question_type` / `answer` describe the last round. describe_alone: a
  description is a sample's only round (no look-up can copy its answer from a description earlier in the
  conversation, and every description is the last answer, which output-text sparsification acts on).
  one_round_test: every test sample is one question (evaluation answers a sample's last question with the
  earlier rounds' answers in the prompt: an earlier look-up or row sum would give the asked value away).
  add_echo: a text-only addition is answered 'a plus b sum c' (operands 3 and 1 tokens before the sum, as
  in an echoed row sum) instead of 'c'. text_rounds: a text-only sample gets further addition rounds as
  an image sample gets further questions (same draw; each answer follows from its own question).
  text_only: the same conversations with no image (no `<image>` tag, no canvas): a language corpus of the
  answers' grammar, counts, descriptions and sums for pretraining the LLM alone (the toy's stand-in for a
  pretrained LLM; the visual answers follow from nothing it sees, only their form and the sums do).
  text_grid (with text_only): the grid written in words (the description's text) stands where the image
  was, so the visual answers follow from the context: the LLM learns to read a grid from what precedes the
  question, as a pretrained LLM reads its context.
  """
  rng = np.random.default_rng([seed, list(SOURCE_SPLITS).index(split), i])
  empty, src, grid = draw_grid(rng, labels, split, grid_size)
  qtype, q, a = _random_question(rng, grid, style=describe_style, type_probs=type_probs, add_echo=add_echo)
  grounded = qtype != 'text_add'           # a question about the grid (its image is left out if text_only)
  has_image = grounded and not text_only
  if text_only and text_grid and grounded:
    q = describe(grid, describe_style) + '\n' + q
  conv = [{'from': 'human', 'value': ('<image>\n' + q) if has_image else q},
          {'from': 'gpt', 'value': a}]
  more = (grounded and not (describe_alone and qtype == 'describe')
          and not (one_round_test and split == 'test'))
  while more and len(conv) < 2 * max_rounds and rng.random() < extra_round_prob:
    qtype, q, a = _random_question(rng, grid, allow_text=False, style=describe_style, type_probs=type_probs,
                                   allow_describe=not describe_alone)
    conv += [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': a}]
  more = text_rounds and not grounded and not (one_round_test and split == 'test')
  while more and len(conv) < 2 * max_rounds and rng.random() < extra_round_prob:
    x, y = int(rng.integers(0, 10)), int(rng.integers(0, 10))
    a = answer('text_add', grid, a=x, b=y, style=describe_style, add_echo=add_echo)
    conv += [{'from': 'human', 'value': question('text_add', a=x, b=y, style=describe_style)},
             {'from': 'gpt', 'value': a}]
  image = b''
  if has_image:
    buf = io.BytesIO()
    img = Image.fromarray(render_canvas(tiles_of(images, empty, src), canvas_size, rng, tile_fraction), 'RGB')
    if canvas_size <= PNG_MAX_SIZE:
      img.save(buf, format='PNG')
    else:   # noisy large canvases: PNG is ~5x bigger and ~25x slower to write
      img.save(buf, format='JPEG', quality=95)
    image = buf.getvalue()
  return {'index': i, 'id': f'{split}-{i}', 'image': image, 'has_image': has_image,
          'conversations': {'from': [t['from'] for t in conv], 'value': [t['value'] for t in conv]},
          'question_type': qtype, 'answer': a}


@dataclasses.dataclass
class DigitsVqaConfig(tfds.core.BuilderConfig):
  canvas_size: int = 64
  num_train: int = 4000
  num_val: int = 300
  num_test: int = 300
  seed: int = 0
  describe_style: str = 'long'
  max_rounds: int = 2
  extra_round_prob: float = SECOND_ROUND_PROB
  grid: int = GRID
  type_probs: tuple = TYPE_PROBS
  describe_alone: bool = False
  tile_fraction: float = TILE_FRACTION
  one_round_test: bool = False
  add_echo: bool = False
  text_rounds: bool = False
  text_only: bool = False
  text_grid: bool = False


def make_config(canvas_size=64, num_train=4000, num_val=300, num_test=300, seed=0, describe_style='long',
                max_rounds=2, extra_round_prob=SECOND_ROUND_PROB, grid=GRID, type_probs=TYPE_PROBS,
                describe_alone=False, tile_fraction=TILE_FRACTION, one_round_test=False, add_echo=False,
                text_rounds=False, text_only=False, text_grid=False):
  """The builder config; every option that changes the data is in its name (a different dataset dir)."""
  type_probs = tuple(float(p) for p in type_probs)
  if not 1 <= grid <= 3 or canvas_size < 8 * grid:
    raise ValueError(f'data.digits.grid={grid} must be in 1..3 with canvas_size={canvas_size} >= 8·grid')
  if (len(type_probs) != len(QUESTION_TYPES) or min(type_probs) < 0
      or abs(sum(type_probs) - 1.0) > 1e-6):
    raise ValueError(f'data.digits.type_probs={type_probs}: {len(QUESTION_TYPES)} probabilities '
                     f'(order {QUESTION_TYPES}) summing to 1')
  tile_fraction = float(tile_fraction)
  if not 8 * grid / canvas_size <= tile_fraction <= 1.0:
    raise ValueError(f'data.digits.tile_fraction={tile_fraction} must be in [8·grid/canvas_size, 1] '
                     f'(a digit is at least 8 px and fits its cell)')
  if text_grid and not text_only:
    raise ValueError('data.digits.text_grid writes the grid in place of the image: it needs text_only=True')
  if describe_style not in DESCRIBE_STYLES:
    raise ValueError(f'data.digits.describe_style={describe_style!r}: use one of {DESCRIBE_STYLES}')
  if max_rounds < 1 or not 0.0 <= extra_round_prob <= 1.0:
    raise ValueError(f'data.digits: max_rounds={max_rounds} must be >= 1 and extra_round_prob='
                     f'{extra_round_prob} in [0, 1]')
  name = f'c{canvas_size}_n{num_train}-{num_val}-{num_test}_s{seed}'
  if describe_style != 'long':
    name += f'_{describe_style}'
  if (max_rounds, extra_round_prob) != (2, SECOND_ROUND_PROB):
    name += f'_r{max_rounds}p{extra_round_prob:g}'
  if grid != GRID:
    name += f'_g{grid}'
  if type_probs != TYPE_PROBS:
    name += '_t' + '-'.join(f'{p:g}' for p in type_probs)
  if describe_alone:
    name += '_da'
  if tile_fraction != TILE_FRACTION:
    name += f'_tf{tile_fraction:g}'
  if one_round_test:
    name += '_t1'
  if add_echo:
    name += '_ae'
  if text_rounds:
    name += '_tr'
  if text_only:
    name += '_to'
  if text_grid:
    name += '_tg'
  return DigitsVqaConfig(name=name, canvas_size=canvas_size, num_train=num_train, num_val=num_val,
                         num_test=num_test, seed=seed, describe_style=describe_style, max_rounds=max_rounds,
                         extra_round_prob=extra_round_prob, grid=grid, type_probs=type_probs,
                         describe_alone=bool(describe_alone), tile_fraction=tile_fraction,
                         one_round_test=bool(one_round_test), add_echo=bool(add_echo),
                         text_rounds=bool(text_rounds), text_only=bool(text_only),
                         text_grid=bool(text_grid))


class DigitsVqa(tfds.core.GeneratorBasedBuilder):
  """The digits_vqa builder (see the module docstring). Configs come from `make_config`."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First version.'}
  # tfds' own lookup of the code path needs the `importlib_resources` package; give it directly.
  code_path = epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=records.features(),
        homepage='https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html')

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
      yield i, make_sample(split, i, images, labels, c.canvas_size, c.seed, c.describe_style, c.max_rounds,
                           c.extra_round_prob, c.grid, c.type_probs, c.describe_alone, c.tile_fraction,
                           c.one_round_test, c.add_echo, c.text_rounds, c.text_only, c.text_grid)
