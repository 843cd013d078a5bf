"""`llava_instruct`: data in the LLaVA instruction format (as LLaVA-665K ships), written to array_record.

Input: a JSON list of `{"id", "image"?: "coco/train2017/x.jpg", "conversations": [{"from": "human" |
"gpt", "value"}]}` and an image folder the `image` paths are relative to. Frames: `"video": [paths]` or
`"image": [paths]` with one `<image>` tag per frame (`data/frames.py`: checks per frame, one frame
container in the record's image bytes). Multi-turn and text-only
samples are kept (`has_image` per record). Images are stored as their encoded file bytes (not
decoded; the reader decodes with PIL).

The JSON must be UTF-8 and a list (else one line naming the file and the byte offset / line). The
dataset's name includes the JSON's size and mtime, so an edited JSON is built anew.

Build-time checks (policy.check_record + the image file): malformed, bad_roles, tag_without_image,
image_without_tag, multiple_image_tags, missing_image, corrupt_image. Bad records are skipped and
counted (`builder.counter`), or raise BadSampleError in strict mode. Split `train`, plus
`validation` when `val_permille` > 0 (records whose crc32(id) % 1000 < val_permille).
"""
import dataclasses
import hashlib
import json
import os
import zlib

from etils import epath
import tensorflow_datasets as tfds

from dynllava_jax.data import frames as frames_lib
from dynllava_jax.data import images
from dynllava_jax.data import policy
from dynllava_jax.data import records
from dynllava_jax.errors import UserError


@dataclasses.dataclass
class LlavaInstructConfig(tfds.core.BuilderConfig):
  json_path: str = ''
  image_folder: str = ''
  val_permille: int = 0
  check_images: str = 'decode'    # 'decode' | 'exists'
  strict: bool = False


def make_config(json_path, image_folder, val_permille=0, check_images='decode', strict=False):
  """A config named after the JSON file and a hash of the absolute paths, the options and the JSON's
  size and modification time: a JSON edited after a build gets a new name, so it is built anew (the old
  build stays where it was)."""
  json_path, image_folder = os.path.abspath(json_path), os.path.abspath(image_folder)
  try:
    st = os.stat(json_path)
    stamp = [st.st_size, st.st_mtime_ns]
  except OSError:
    stamp = None        # missing: reported when the build opens it
  key = json.dumps([json_path, image_folder, val_permille, check_images] + ([stamp] if stamp else []))
  stem = os.path.splitext(os.path.basename(json_path))[0]
  stem = ''.join(ch if ch.isalnum() else '_' for ch in stem)
  name = f'{stem}_{hashlib.sha1(key.encode()).hexdigest()[:10]}'
  return LlavaInstructConfig(name=name, json_path=json_path, image_folder=image_folder,
                             val_permille=val_permille, check_images=check_images, strict=strict)


def read_json_list(path):
  """The LLaVA JSON at `path` as a list; UserError (one line: file, byte offset / line) when it is
  missing, not UTF-8, not JSON, or not a list."""
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except OSError as e:
    raise UserError(f'{path}: cannot read the LLaVA JSON ({e.strerror}); check data.manual_dir / '
                    'data.json_file') from None
  try:
    text = raw.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    raise UserError(f'{path}: not UTF-8 at byte offset {e.start} (byte 0x{raw[e.start]:02x}); save the '
                    'file as UTF-8') from None
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f'{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}') from None
  if not isinstance(data, list):
    raise UserError(f'{path}: expected a JSON list of records, found a {type(data).__name__}')
  return data


def in_validation(record_id, val_permille):
  return zlib.crc32(str(record_id).encode()) % 1000 < val_permille


class LlavaInstruct(tfds.core.GeneratorBasedBuilder):
  """The llava_instruct builder (see the module docstring). Configs come from `make_config`."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First version.'}
  # tfds' own lookup of the code path needs the `importlib_resources` package; give it directly.
  code_path = epath.Path(__file__)
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Point config.data.manual_dir at a folder with llava_v1_5_mix665k.json and the image folders '
      'coco/ gqa/ ocr_vqa/ textvqa/ vg/ (see docs/data.md).')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=records.features(),
                                 homepage='https://github.com/haotian-liu/LLaVA')

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    self.counter = policy.SkipCounter('records', strict=c.strict)
    data = read_json_list(c.json_path)
    parts = {'train': [], 'validation': []}
    for index, record in enumerate(data):
      rid = record.get('id', index) if isinstance(record, dict) else index
      split = 'validation' if c.val_permille and in_validation(rid, c.val_permille) else 'train'
      parts[split].append((index, record))
    out = {'train': self._generate_examples(parts['train'])}
    if c.val_permille:
      out['validation'] = self._generate_examples(parts['validation'])
    return out

  def _generate_examples(self, items):
    c = self.builder_config
    for index, record in items:
      rid = record.get('id', index) if isinstance(record, dict) else index
      try:
        example = self._example(index, record, c)
      except policy.SampleProblem as p:
        self.counter.skip(rid, p.reason, p.detail)
        continue
      self.counter.ok()
      yield index, example

  def _example(self, index, record, c):
    if isinstance(record, dict) and (record.get('video') is not None or
                                     isinstance(record.get('image'), (list, tuple))):
      return self._frames_example(index, record, c)
    bad = policy.check_record(record)
    if bad:
      raise policy.SampleProblem(*bad)
    data = b''
    if record.get('image') is not None:
      data = images.check_image_file(os.path.join(c.image_folder, record['image']),
                                     decode=c.check_images == 'decode')
    return self._finish(index, record, data, record.get('image') is not None)

  def _frames_example(self, index, record, c):
    """A record with frames (`"video": [paths]` or `"image": [paths]`, one `<image>` tag per frame;
    `data/frames.py`): every frame checked, stored as one frame container."""
    paths = frames_lib.record_frames(record)
    if not paths or not all(isinstance(p, str) and p for p in paths):
      raise policy.SampleProblem(policy.MALFORMED, '`video` / `image` must be a non-empty list of paths')
    if 'conversations' not in record:
      raise policy.SampleProblem(policy.MALFORMED, 'missing key `conversations`')
    bad = (policy.check_conversation(record['conversations'])
           or frames_lib.check_frame_tags(record['conversations'], len(paths)))
    if bad:
      raise policy.SampleProblem(*bad)
    check = lambda p: images.check_image_file(os.path.join(c.image_folder, p),
                                              decode=c.check_images == 'decode')
    data = frames_lib.pack_frames(frames_lib.check_frame_files(paths, check))
    return self._finish(index, record, data, True)

  def _finish(self, index, record, data, has_image):
    conv = record['conversations']
    bad = policy.check_unicode(record)
    if bad:
      raise policy.SampleProblem(*bad)
    return {'index': index, 'id': str(record.get('id', index)), 'image': data, 'has_image': has_image,
            'conversations': {'from': [t['from'] for t in conv], 'value': [t['value'] for t in conv]},
            'question_type': '', 'answer': conv[-1]['value']}
