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


def test_digits_video_answers_and_pipeline(tmp_path):
  """digits_video: answers follow the frames' grids; built offline and read as (B, F, S, S, 3) frames with
  one N-placeholder span per frame."""
  from dynllava_jax.data import digits_video as V
  a = [[1, None], [3, 4]]
  b = [[1, 7], [3, 4]]
  c = [[1, 7], [3, None]]
  grids = [a, b, b, c]
  assert V.answer('first_frame', grids, d=7) == 'frame 2' and V.answer('first_frame', grids, d=9) == 'never'
  assert V.answer('count_frames', grids, d=4) == '3'
  assert V.answer('changed', grids, i=1) == 'row 1 column 2 : empty became 7'
  assert V.answer('changed', grids, i=2) == 'nothing'
  assert V.answer('changed', grids, i=3) == 'row 2 column 2 : 4 became empty'
  assert V.answer('narrate', grids) == 'frame 1 : 3 . frame 2 : 4 . frame 3 : 4 . frame 4 : 3'
  c = get_config('size=tiny')
  c.data.name, c.data.data_dir, c.data.max_frames, c.data.batch_size = 'digits_video', str(tmp_path), 4, 3
  c.data.max_len = 384                       # 4 frames × 64 tokens + the question
  c.data.digits.num_train, c.data.digits.num_val, c.data.digits.num_test = 3, 1, 1
  builders.build(c)
  batch = next(iter(pipeline.make_iterator(c, 'train', shuffle=False, num_epochs=1, drop_remainder=False)))
  s = c.model.vision.image_size
  n = (s // c.model.vision.patch_size) ** 2
  assert batch['pixel_values'].shape == (3, 4, s, s, 3)
  assert ((batch['input_ids'] == c.model.image_token_id).sum(-1) == 4 * n).all()     # 4..4 frames
  assert (batch['pixel_values'].reshape(3, 4, -1).std(-1) > 0.05).all()


@pytest.mark.parametrize('style', ['short', 'tally'])
def test_digits_video_tokenizer_extends_the_image_tokenizer(tmp_path, style):
  """digits_video's tokenizer gives every word of digits_vqa's tokenizer (of data.digits.describe_style) the
  same id, the video words after them, so a model trained on the images reads the video; one file per
  style beside the one video set; every video text is covered."""
  from dynllava_jax.data import digits_video as V
  from dynllava_jax.data import digits_vqa as D
  from dynllava_jax.data import tokenizer as tokenizer_lib
  image = D.build_tokenizer(describe_style=style).tok.get_vocab()
  video_tok = V.build_tokenizer(describe_style=style)
  video = video_tok.tok.get_vocab()
  assert {w: video[w] for w in image} == image                             # the image ids, unchanged
  assert sorted(video.values()) == list(range(len(video))) and len(video) <= tokenizer_lib.MAX_WORD_VOCAB
  assert min(video[w] for w in set(video) - set(image)) == len(image)      # the video words after them
  for text in V.vocabulary_texts():
    assert (video_tok.encode(text)[0] != tokenizer_lib.UNK_ID).all(), text
  c = get_config('size=tiny')
  c.data.name, c.data.data_dir, c.data.max_frames = 'digits_video', str(tmp_path), 4
  c.data.digits.describe_style = style
  assert builders.tokenizer_path(c).endswith(f'tokenizer_{style}.json')


def test_digits_video_frame_labels_name_each_frame():
  """frame_labels: each frame's <image> tag follows its name, the dataset dir says so, the rest is equal."""
  from sklearn.datasets import load_digits
  from dynllava_jax.data import digits_video as V
  d = load_digits()
  args = ('train', 5, d.images.astype(np.float32), d.target, 64, 0, 4, 4, 2)
  plain, labelled = V.make_sample(*args), V.make_sample(*args, frame_labels=True)
  q = plain['conversations']['value'][0].split('\n')[-1]
  assert plain['conversations']['value'][0] == '<image>\n' * 4 + q
  assert labelled['conversations']['value'][0] == ''.join(f'frame {j} <image>\n' for j in (1, 2, 3, 4)) + q
  assert labelled['answer'] == plain['answer'] and labelled['image'] == plain['image']
  assert V.make_config(frame_labels=True).name == V.make_config().name + '_fl'


def test_digits_video_echo_answers_read_the_cells_first():
  """style='echo': each answer reads the cells it needs, each value after its one-token frame-cell name, then
  the answer; the words are in the tokenizer's vocabulary; the dataset dir says so; bad style -> error."""
  from dynllava_jax.data import digits_video as V
  a = [[1, None], [3, 4]]
  b = [[1, 7], [3, 4]]
  c = [[1, 7], [3, None]]
  grids = [a, b, b, c]
  f1 = 'f1a1 1 f1a2 empty f1b1 3 f1b2 4'
  f2, f3 = f1.replace('f1', 'f2').replace('empty', '7'), f1.replace('f1', 'f3').replace('empty', '7')
  f4 = 'f4a1 1 f4a2 7 f4b1 3 f4b2 empty'
  echo = lambda q, **kw: V.answer(q, grids, style='echo', **kw)
  assert echo('first_frame', d=7) == f1 + ' f2a1 1 f2a2 7 frame 2'     # stops at the first cell holding 7
  assert echo('first_frame', d=3) == 'f1a1 1 f1a2 empty f1b1 3 frame 1'
  assert echo('first_frame', d=9) == ' '.join([f1, f2, f3, f4, 'never'])
  assert echo('count_frames', d=4) == ' '.join([f1, f2, f3, f4, ': 3'])
  assert echo('changed', i=1) == 'f1a1 1 f2a1 1 f1a2 empty f2a2 7 f1b1 3 f2b1 3 f1b2 4 f2b2 4 : a2 empty became 7'
  assert echo('changed', i=2).endswith('f2b2 4 f3b2 4 : nothing')
  assert echo('narrate') == ' . '.join([f1 + ' : 3', f2 + ' : 4', f3 + ' : 4', f4 + ' : 3'])
  words = set(' '.join(V.vocabulary_texts()).split())
  assert {'f4b2', 'f8c3', 'a2', ':'} <= words
  assert V.make_config(style='echo').name == V.make_config().name + '_echo'
  with pytest.raises(ValueError, match='style'):
    V.make_config(style='long')
