"""grain pipeline: determinism, resume, per-process shards, buckets, global arrays, eval samples."""
import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs.dynllava import get_config
from dynllava_jax.data import pipeline

KEYS = ('input_ids', 'attention_mask', 'labels', 'pixel_values', 'has_image', 'image_start',
        'instr_start', 'instr_end', 'answer_start', 'answer_end', 'id')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def cfg(data_dir, **data):
  c = get_config('size=tiny')
  c.data.data_dir = data_dir
  c.data.digits.num_train, c.data.digits.num_val, c.data.digits.num_test = 96, 32, 32
  c.data.batch_size = 8
  for k, v in data.items():
    c.data[k] = v
  return c


def take(it, n):
  return [next(it) for _ in range(n)]


def same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_layout(data_dir):
  c = cfg(data_dir)
  b = next(pipeline.make_iterator(c, 'train'))
  assert set(b) == set(KEYS)
  bsz, t = b['input_ids'].shape
  assert bsz == 8 and t in pipeline.buckets(c) == (64, 128, 256)
  assert b['pixel_values'].shape == (8, 64, 64, 3) and b['pixel_values'].dtype == np.float32
  for k in KEYS:
    if k not in ('pixel_values', 'has_image'):
      assert b[k].dtype == np.int32, k
  assert b['has_image'].dtype == np.bool_
  lens = b['attention_mask'].sum(1)
  assert t == next(x for x in pipeline.buckets(c) if x >= lens.max())
  for i in range(bsz):                       # right padding
    assert b['attention_mask'][i, :lens[i]].all() and not b['attention_mask'][i, lens[i]:].any()
    assert (b['input_ids'][i, lens[i]:] == 3).all() and (b['labels'][i, lens[i]:] == -100).all()
    assert b['input_ids'][i, 0] == 1 and b['answer_end'][i] == lens[i]
    assert b['labels'][i, b['answer_end'][i] - 1] == 2
    if b['has_image'][i]:
      s = b['image_start'][i]
      assert (b['input_ids'][i, s:s + 64] == 4).all() and b['instr_start'][i] == s + 64
    else:
      assert not (b['input_ids'][i] == 4).any() and not b['pixel_values'][i].any()


def test_deterministic_and_resume(data_dir):
  c = cfg(data_dir)
  a = take(pipeline.make_iterator(c, 'train'), 3)
  b = take(pipeline.make_iterator(c, 'train'), 3)
  assert all(same(x, y) for x, y in zip(a, b))
  other = take(pipeline.make_iterator(cfg(data_dir, seed=1), 'train'), 3)
  assert not all(same(x, y) for x, y in zip(a, other))
  k = 5
  it = pipeline.make_iterator(c, 'train')
  take(it, k)
  state = json.loads(json.dumps(it.get_state()))            # JSON-able dict
  expected = take(it, 3)                                     # batches k+1.. (crosses the epoch end)
  restored = pipeline.make_iterator(c, 'train')
  restored.set_state(state)
  assert all(same(x, y) for x, y in zip(expected, take(restored, 3)))


def test_process_shards_disjoint_and_cover_epoch(data_dir):
  c = cfg(data_dir)
  ids = []
  for pi in range(2):
    it = pipeline.make_iterator(c, 'train', num_epochs=1, process_index=pi, process_count=2,
                                drop_remainder=False)
    batches = list(it)
    assert all(len(b['id']) <= 4 for b in batches)          # per-process batch = 8 // 2
    ids.append(np.concatenate([b['id'] for b in batches]))
  assert len(ids[0]) == len(ids[1]) == 48
  assert not set(ids[0]) & set(ids[1])
  assert set(ids[0]) | set(ids[1]) == set(range(96))


def test_epochs_reshuffle_and_unshuffled_order(data_dir):
  c = cfg(data_dir)
  ids = np.concatenate([b['id'] for b in pipeline.make_iterator(c, 'train', num_epochs=2)])
  assert len(ids) == 192 and sorted(ids[:96]) == sorted(ids[96:]) == list(range(96))
  assert not np.array_equal(ids[:96], ids[96:])
  plain = [b['id'] for b in pipeline.make_iterator(c, 'train', shuffle=False, num_epochs=1)]
  again = [b['id'] for b in pipeline.make_iterator(c, 'train', shuffle=False, num_epochs=1)]
  assert all(np.array_equal(x, y) for x, y in zip(plain, again))


def test_worker_processes_match_main_process(data_dir):
  c = cfg(data_dir)
  a = take(pipeline.make_iterator(c, 'validation', num_epochs=1), 2)
  it = pipeline.make_iterator(cfg(data_dir, num_workers=1), 'validation', num_epochs=1)
  try:
    b = take(it, 2)
    json.dumps(it.get_state())
  finally:
    it.close()
  assert all(same(x, y) for x, y in zip(a, b))


def test_to_global(data_dir):
  c = cfg(data_dir)
  b = next(pipeline.make_iterator(c, 'train'))
  mesh = Mesh(np.array(jax.devices()), ('data',))
  g = pipeline.to_global(b, NamedSharding(mesh, P('data')))
  assert set(g) == set(b)
  for k in b:
    assert isinstance(g[k], jax.Array) and g[k].shape == b[k].shape
    np.testing.assert_array_equal(np.asarray(g[k]), b[k])


def test_eval_samples_and_left_pad(data_dir):
  c = cfg(data_dir)
  ev = pipeline.make_eval_samples(c, 'test', limit=6)
  assert len(ev) == 6
  for s in ev:
    f = s['full']
    assert s['prompt_ids'].dtype == np.int32
    np.testing.assert_array_equal(s['prompt_ids'], f['input_ids'][:f['answer_start']])
    assert s['answer'] and s['question_type'] and s['pixel_values'].shape == (64, 64, 3)
    assert f['attention_mask'].shape == f['input_ids'].shape == f['labels'].shape
  ids, mask = pipeline.left_pad_batch([s['prompt_ids'] for s in ev[:3]], pad_id=3)
  lens = [len(s['prompt_ids']) for s in ev[:3]]
  assert ids.shape == (3, max(lens)) and mask.sum(1).tolist() == lens
  for i, s in enumerate(ev[:3]):
    np.testing.assert_array_equal(ids[i, max(lens) - lens[i]:], s['prompt_ids'])
    assert (ids[i, :max(lens) - lens[i]] == 3).all() and mask[i, -1] == 1
