"""Multi-frame samples in the LLaVA JSON (data/frames.py): `"video": [paths]` / `"image": [paths]` with one
`<image>` tag per frame, built and read into (B, F, H, W, 3) frames with N placeholders per frame; the
bad-input rules per frame (tag / frame count, a missing frame file) counted; more frames than
data.max_frames stops the reader with one line."""
import json
import os
import shutil

import numpy as np
import pytest

from configs.dynllava import get_config
from dynllava_jax.data import builders
from dynllava_jax.data import frames as frames_lib
from dynllava_jax.data import images
from dynllava_jax.data import pipeline
from dynllava_jax.errors import UserError

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets', 'llava_json')
RED, BLUE = 'images/red_square.png', 'images/blue_bars.jpg'
RECORDS = [
    {'id': 'two-frames', 'video': [RED, BLUE], 'conversations': [
        {'from': 'human', 'value': '<image>\n<image>\nWhat changed?'}, {'from': 'gpt', 'value': 'The color.'}]},
    {'id': 'streaming', 'image': [BLUE, RED], 'conversations': [
        {'from': 'human', 'value': '<image>\nWhat do you see?'}, {'from': 'gpt', 'value': 'Blue bars.'},
        {'from': 'human', 'value': '<image>\nAnd now?'}, {'from': 'gpt', 'value': 'A red square.'}]},
    {'id': 'single', 'image': RED, 'conversations': [
        {'from': 'human', 'value': 'What color?\n<image>'}, {'from': 'gpt', 'value': 'Red.'}]},
    {'id': 'one-tag-short', 'video': [RED, BLUE], 'conversations': [
        {'from': 'human', 'value': '<image>\nWhat changed?'}, {'from': 'gpt', 'value': 'Nothing.'}]},
    {'id': 'missing-frame', 'video': [RED, 'images/nope.png'], 'conversations': [
        {'from': 'human', 'value': '<image><image> What?'}, {'from': 'gpt', 'value': 'Red.'}]},
]


def _cfg(tmp_path, max_frames=2):
  manual = tmp_path / 'manual'
  if not manual.exists():
    manual.mkdir()
    (manual / 'video.json').write_text(json.dumps(RECORDS))
    shutil.copy(os.path.join(FIXTURE, 'tokenizer.json'), manual / 'tokenizer.json')
  c = get_config('size=tiny')
  c.data.name, c.data.data_dir, c.data.manual_dir = 'llava_instruct', str(tmp_path / 'tfds'), str(manual)
  c.data.json_file, c.data.image_folder, c.data.batch_size = 'video.json', FIXTURE, 4
  c.data.max_frames = max_frames
  return c


def test_frames_build_read_and_bad_input(tmp_path):
  c = _cfg(tmp_path)
  ds_dir = builders.build(c)
  report = builders.read_report(ds_dir)
  assert report['skipped'] == {'image_without_tag': 1, 'missing_image': 1}
  assert ('missing-frame', 'missing_image') in [tuple(x) for x in report['skipped_ids']]
  it = pipeline.make_iterator(c, 'train', shuffle=False, num_epochs=1, drop_remainder=False)
  batch = next(iter(it))
  n = (c.model.vision.image_size // c.model.vision.patch_size) ** 2
  s = c.model.vision.image_size
  assert batch['pixel_values'].shape == (3, 2, s, s, 3)
  placeholders = (batch['input_ids'] == c.model.image_token_id).sum(-1)
  np.testing.assert_array_equal(placeholders, [2 * n, 2 * n, n])
  for b, paths in enumerate([[RED, BLUE], [BLUE, RED], [RED]]):
    for f in range(2):
      want = (images.load_pixels(open(os.path.join(FIXTURE, paths[f]), 'rb').read(), s) if f < len(paths)
              else np.zeros((s, s, 3), np.float32))
      np.testing.assert_allclose(batch['pixel_values'][b, f], want, atol=1e-6)
  ids = batch['input_ids'][1]                # streaming: frame, question, answer, frame, question, answer
  spans = np.flatnonzero(np.diff(np.concatenate([[0], (ids == c.model.image_token_id).astype(int)])) == 1)
  assert len(spans) == 2 and (batch['labels'][1][spans[0]:spans[1]] != -100).any()
  assert batch['image_start'][1] == spans[0]
  with pytest.raises(UserError, match='has 2 frames; data.max_frames=1'):
    next(iter(pipeline.make_iterator(_cfg(tmp_path, max_frames=1), 'train', shuffle=False, num_epochs=1,
                                     drop_remainder=False)))


def test_frame_container_roundtrip():
  files = [b'\x89PNG one', b'two', b'']
  assert frames_lib.unpack_frames(frames_lib.pack_frames(files)) == files
  assert frames_lib.unpack_frames(b'plain jpeg') == [b'plain jpeg']
  with pytest.raises(ValueError, match='truncated'):
    frames_lib.unpack_frames(frames_lib.pack_frames(files)[:-5] + b'\xff\xff\xff\xff')
