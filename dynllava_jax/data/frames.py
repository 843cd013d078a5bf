"""Multi-frame samples (video frames, or several images): how a record stores them, the per-frame checks,
and the frames' pixels (docs/mod.md, "Frames").

A record's `image` bytes field (records.py) holds one encoded image file, or — for F > 1 frames — a frame
container: the magic `FRAMES_MAGIC`, then per frame a 4-byte big-endian length and the encoded file. The
record layout (tfds features) is unchanged; a reader that meets a container without frames support fails
on decoding it rather than misreading it.

LLaVA JSON: `"video": [paths]` or `"image": [paths]` gives F frames, with exactly one `<image>` tag per
frame, in frame order, anywhere in the human turns; a single `"image": path` keeps the single-image rules.
The per-frame checks and `data.max_frames`: docs/mod.md, "Frames".
"""
import struct

import numpy as np

from dynllava_jax.data import images
from dynllava_jax.data import policy
from dynllava_jax.errors import UserError

FRAMES_MAGIC = b'DLJXFRAMES1\n'


def pack_frames(files):
  """[encoded image bytes] -> the frame container (one file: the file itself)."""
  if len(files) == 1:
    return files[0]
  return FRAMES_MAGIC + b''.join(struct.pack('>I', len(f)) + f for f in files)


def unpack_frames(data):
  """A record's image bytes -> [encoded image bytes] (one entry for a plain image file, [] for b'')."""
  if not data:
    return []
  if not data.startswith(FRAMES_MAGIC):
    return [data]
  out, i = [], len(FRAMES_MAGIC)
  while i < len(data):
    if i + 4 > len(data):
      raise ValueError('truncated frame container')
    (n,) = struct.unpack('>I', data[i:i + 4])
    if i + 4 + n > len(data):
      raise ValueError('truncated frame container')
    out.append(data[i + 4:i + 4 + n])
    i += 4 + n
  return out


def record_frames(record):
  """The frame paths of a LLaVA JSON record: `video` (a list) or `image` as a list -> [paths]; a single
  `image` string -> [path]; none -> []."""
  v = record.get('video')
  v = record.get('image') if v is None else v
  if v is None:
    return []
  return list(v) if isinstance(v, (list, tuple)) else [v]


def check_frame_tags(conversations, n_frames):
  """One `<image>` tag per frame over the human turns (none in the answers) -> (reason, detail) or None."""
  counts = [t['value'].count(policy.IMAGE_TAG) for t in conversations]
  in_answers = sum(c for i, c in enumerate(counts) if i % 2 == 1)
  total = sum(counts)
  if in_answers:
    return policy.TAG_WITHOUT_IMAGE, f'{in_answers} `<image>` tags in gpt turns'
  if total < n_frames:
    return policy.IMAGE_WITHOUT_TAG, f'{n_frames} frames but {total} `<image>` tags (one per frame)'
  if total > n_frames:
    return policy.TAG_WITHOUT_IMAGE, f'{total} `<image>` tags but {n_frames} frames (one per frame)'
  return None


def check_frame_files(paths, check):
  """Reads every frame file (`check(path)` -> bytes, raising SampleProblem) -> [bytes]; the problem's
  detail names the frame."""
  out = []
  for i, p in enumerate(paths):
    try:
      out.append(check(p))
    except policy.SampleProblem as e:
      raise policy.SampleProblem(e.reason, f'frame {i}: {e.detail}') from None
  return out


def load_frames(data, image_size, max_frames, record_id='?'):
  """A record's image bytes -> (pixels (max_frames, S, S, 3) float32, frames present); absent frames are
  zeros. UserError (one line) when the record has more frames than max_frames."""
  files = unpack_frames(data)
  if len(files) > max_frames:
    raise UserError(f'record id={record_id} has {len(files)} frames; data.max_frames={max_frames}: raise '
                    'data.max_frames or drop the record')
  out = np.zeros((max_frames, image_size, image_size, 3), np.float32)
  for i, f in enumerate(files):
    out[i] = images.load_pixels(f, image_size)
  return out, len(files)
