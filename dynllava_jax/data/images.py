"""Image decoding (PIL) and LLaVA-1.5 preprocessing, channels-last float32.

LLaVA-1.5 (`image_aspect_ratio='pad'`): pad to a square with the mean colour, resize to image_size
(bicubic), scale by 1/255, normalize with the CLIP mean / std. The pad colour is
`int(mean * 255)` per channel = (122, 116, 104), as LLaVA's `expand2square(img, tuple(int(x*255) for
x in image_mean))` and HF's LlavaImageProcessor compute it (truncation; rounding would give 123, 117).
"""
import io

import numpy as np
from PIL import Image

from dynllava_jax.data import policy

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)


def decode_image(data):
  """Encoded bytes (PNG, JPEG, ...) → RGB PIL image; raises SampleProblem(corrupt_image)."""
  if not data:
    raise policy.SampleProblem(policy.MISSING_IMAGE, 'empty image bytes')
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb(img)
  except Exception as e:  # PIL raises many types on bad input
    raise policy.SampleProblem(policy.CORRUPT_IMAGE, f'{type(e).__name__}: {e}') from None


def to_rgb(img):
  """PIL image of any mode -> RGB. 16/32-bit greyscale (modes I;16*, I: 16-bit PNGs) is scaled from
  0..65535 to 0..255 (PIL's own convert would clip everything above 255 to white); float (F) from 0..1."""
  if img.mode.startswith('I;16') or img.mode in ('I', 'F'):
    a = np.asarray(img, np.float64)
    a = a * 255.0 if img.mode == 'F' else a / 257.0
    img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), 'L')
  return img.convert('RGB')


def check_image_file(path, decode=True):
  """Build-time check; returns the file's bytes or raises SampleProblem(missing/corrupt_image)."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
    raise policy.SampleProblem(policy.MISSING_IMAGE, f'no file {path}') from None
  except OSError as e:
    raise policy.SampleProblem(policy.MISSING_IMAGE, f'{path}: {e}') from None
  except (ValueError, UnicodeError) as e:     # a NUL byte or a lone surrogate in the path
    raise policy.SampleProblem(policy.MISSING_IMAGE, f'{path!r} is not a usable path: {e}') from None
  if decode:
    decode_image(data)
  return data


def expand_to_square(img, color=PAD_COLOR):
  """Pads a PIL image to a square, centred, with `color` (LLaVA's expand2square)."""
  w, h = img.size
  if w == h:
    return img
  s = max(w, h)
  out = Image.new(img.mode, (s, s), color)
  out.paste(img, ((s - w) // 2, (s - h) // 2))
  return out


def preprocess(img, image_size):
  """RGB PIL image → (image_size, image_size, 3) float32, LLaVA-1.5 / CLIP normalized."""
  img = expand_to_square(to_rgb(img))
  if img.size != (image_size, image_size):
    img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
  x = np.asarray(img, np.float32) * np.float32(1 / 255)
  return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def load_pixels(data, image_size, has_image=True):
  """Encoded bytes → (image_size, image_size, 3) float32; text-only samples get zeros."""
  if not has_image:
    return np.zeros((image_size, image_size, 3), np.float32)
  return preprocess(decode_image(data), image_size)
