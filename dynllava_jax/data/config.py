"""Defaults of the `data` config section (owned by the data pipeline).

See docs/data.md. Fields:
  name: tfds builder, `digits_vqa` (embedded, offline) | `llava_instruct` (LLaVA JSON + image folder).
  data_dir: where the tfds builders write their array_record files.
  manual_dir: llava_instruct: folder holding `json_file` and the image folders (LLaVA layout).
  json_file: llava_instruct: the JSON list, relative to manual_dir (or absolute).
  image_folder: llava_instruct: root the JSON `image` paths are relative to ('' = manual_dir).
  tokenizer: path to a tokenizer.json ('' = digits_vqa: the one built beside the dataset;
    llava_instruct: `<manual_dir>/tokenizer.json`).
  val_permille: llava_instruct: records (by a hash of their id) held out as the `validation` split.
  check_images: llava_instruct build-time image check: 'decode' (full decode) | 'exists'.
  max_len: longest token sequence (image tokens included); longer samples are truncated at turn
    boundaries, or skipped as `over_long` when even the first turn does not fit.
  buckets: padded lengths of batches ((): max_len/4, max_len/2, max_len).
  batch_size: global batch (each process reads batch_size // process_count).
  seed: shuffle seed of the reader.
  strict: any bad record is an error naming its id and reason (default: skip, count and log).
  num_workers: grain worker processes (0 = read in the main process).
  digits: digits_vqa generation settings (canvas size, grid, question-type mix, split sizes, generation
    seed, describe style, rounds).
"""
import ml_collections


def digits_defaults(size='tiny'):
  """digits_vqa builder settings: 3x3 canvases of sklearn digits, deterministic by `seed`."""
  c = ml_collections.ConfigDict()
  c.canvas_size = 64 if size == 'tiny' else 336   # square RGB canvas (pixels)
  c.num_train = 4000
  c.num_val = 300
  c.num_test = 300
  c.seed = 0
  # describe answers: 'long' (≥ 50 tokens, the released len_ot = 50) | 'short' (24 tokens, tiny len_ot = 16)
  c.describe_style = 'short' if size == 'tiny' else 'long'
  # Rounds per image sample: further questions about the same image while a draw < extra_round_prob,
  # up to max_rounds. tiny: ~3 rounds per image (more grounded answers per forward pass).
  c.max_rounds = 5 if size == 'tiny' else 2
  c.extra_round_prob = 0.75 if size == 'tiny' else 0.1
  # grid x grid cells (canvas_size // grid px each: 64 // 2 = 32 = a 4x4 block of patch-8 tokens) and the
  # question-type mix (order digit_at, count, row_sum, describe, text_add); both name the dataset dir.
  c.grid = 3
  c.type_probs = (0.35, 0.15, 0.2, 0.25, 0.05)
  # A digit's side as a fraction of its cell's (random place inside the cell); != 0.8 names the dataset dir.
  c.tile_fraction = 0.8
  # Every test sample one question (no earlier answer in its conversation gives the asked value away).
  c.one_round_test = False
  # Text-only additions answered 'a plus b sum c' (the operands echoed before the sum, as an echoed row
  # sum's 'a1 3 a2 9 sum 12') instead of 'c'; names the dataset dir (_ae).
  c.add_echo = False
  # Text-only samples get further addition rounds (max_rounds / extra_round_prob, as image samples get
  # further questions): more additions per forward pass; names the dataset dir (_tr).
  c.text_rounds = False
  # The same conversations with no image at all: a text corpus for pretraining the LLM alone (make
  # demo-more's language stage, the toy's stand-in for a pretrained LLM); names the dataset dir (_to).
  c.text_only = False
  # With text_only: the grid written in words stands where the image was (the visual answers follow from
  # the context: the toy LLM learns to read a grid from its context); names the dataset dir (_tg).
  c.text_grid = False
  # digits_video: each frame's <image> tag follows its name ('frame 2 <image>'); names the dataset dir (_fl).
  c.frame_labels = False
  # digits_video answers: 'short' ('frame 2') or 'echo' (the cells read first, each value after its one-token
  # frame-cell name 'f2b1', then the answer; digits_video's docstring); 'echo' names the dataset dir (_echo).
  c.video_style = 'short'
  return c


def data_defaults(size='tiny'):
  c = ml_collections.ConfigDict()
  c.name = 'digits_vqa'            # tfds builder: digits_vqa | llava_instruct
  c.data_dir = 'data_cache/tfds'   # where tfds builders write array_record files
  c.manual_dir = ''                # llava_instruct: folder with the JSON + images
  c.json_file = 'llava_v1_5_mix665k.json'
  c.image_folder = ''
  c.tokenizer = ''
  c.val_permille = 0
  c.check_images = 'decode'
  c.max_len = 256 if size == 'tiny' else 2048
  c.max_frames = 1                 # frames per sample at most (video / multi-image; data/frames.py)
  c.buckets = ()
  c.batch_size = 16 if size == 'tiny' else 64   # global batch
  c.seed = 0
  c.strict = False
  c.num_workers = 0
  c.digits = digits_defaults(size)
  return c
