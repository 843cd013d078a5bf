"""llava_instruct on the committed fixture: every bad-input kind counted, strict mode, kept samples."""
import logging
import os

import numpy as np
import pytest

from configs.dynllava import get_config
from dynllava_jax.data import builders
from dynllava_jax.data import pipeline
from dynllava_jax.data import policy

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets', 'llava_json')
BUILD_SKIPS = {'missing_image': 1, 'corrupt_image': 1, 'malformed': 2, 'bad_roles': 2,
               'tag_without_image': 1, 'image_without_tag': 1, 'multiple_image_tags': 1}


def cfg(data_dir, json_file='llava_fixture.json', strict=False):
  c = get_config('size=tiny')
  c.data.name = 'llava_instruct'
  c.data.data_dir = str(data_dir)
  c.data.manual_dir = FIXTURE
  c.data.json_file = json_file
  c.data.strict = strict
  c.data.batch_size = 2
  return c


def test_build_counts_every_bad_kind(tmp_path, caplog):
  c = cfg(tmp_path)
  with caplog.at_level(logging.INFO, logger='dynllava_jax.data'):
    ds_dir = builders.build(c)
  report = builders.read_report(ds_dir)
  assert report['skipped'] == BUILD_SKIPS and report['total'] == 14
  assert 'skipped 9 of 14 records: malformed=2, bad_roles=2, missing_image=1, corrupt_image=1' in (
      caplog.text)
  assert ('bad-missing-image', 'missing_image') in [tuple(x) for x in report['skipped_ids']]
  assert builders.build(c) == ds_dir                        # idempotent, no rebuild
  assert builders.tokenizer_path(c) == os.path.join(FIXTURE, 'tokenizer.json')

  # Read time: the over-long record is skipped and counted; everything else is kept.
  it = pipeline.make_iterator(c, 'train', shuffle=False, num_epochs=1, drop_remainder=False)
  with caplog.at_level(logging.INFO, logger='dynllava_jax.data'):
    batches = list(it)
  assert it.counter.skipped == {'over_long': 1} and it.counter.total == 5
  assert 'skipped 1 of 5 samples: over_long=1' in caplog.text
  ids = sorted(np.concatenate([b['id'] for b in batches]).tolist())
  assert ids == [0, 1, 2, 13]                               # JSON positions of the kept records
  by_id = {}
  for b in batches:
    for i, rid in enumerate(b['id']):
      by_id[int(rid)] = {k: v[i] for k, v in b.items()}
  assert not by_id[2]['has_image'] and not by_id[2]['pixel_values'].any()      # text-only kept
  assert by_id[1]['has_image'] and by_id[1]['pixel_values'].std() > 0.1        # multi-turn kept
  assert (by_id[1]['labels'] != -100).sum() > (by_id[0]['labels'] != -100).sum()
  long = by_id[13]                                          # 4 rounds, truncated at a round end
  n = long['attention_mask'].sum()
  assert n <= 256 and long['answer_end'] == n and long['input_ids'][n - 1] == 2


def test_strict_build_names_record(tmp_path):
  with pytest.raises(policy.BadSampleError, match='bad-missing-image: missing_image') as e:
    builders.build(cfg(tmp_path, strict=True))
  assert '\n' not in str(e.value)


def test_strict_after_lenient_build(tmp_path):
  builders.build(cfg(tmp_path))
  with pytest.raises(policy.BadSampleError, match='id=bad-missing-image: missing_image'):
    builders.build(cfg(tmp_path, strict=True))


def test_strict_read_time_over_long(tmp_path):
  c = cfg(tmp_path, json_file='llava_fixture_clean.json', strict=True)
  assert builders.read_report(builders.build(c))['skipped'] == {}
  it = pipeline.make_iterator(c, 'train', shuffle=False, num_epochs=1, drop_remainder=False)
  with pytest.raises(policy.BadSampleError, match='id=read-over-long: over_long'):
    list(it)
  evals = pipeline.make_eval_samples(cfg(tmp_path, json_file='llava_fixture_clean.json'), 'train')
  assert sorted(s['record_id'] for s in evals) == ['good-long-multi', 'good-multi', 'good-single',
                                                   'good-text']
  multi = next(s for s in evals if s['record_id'] == 'good-multi')
  assert multi['answer'] == 'There are three bars.'
  long = next(s for s in evals if s['record_id'] == 'good-long-multi')   # truncated: last kept round
  np.testing.assert_array_equal(long['prompt_ids'], long['full']['input_ids'][:long['full']['answer_start']])
  assert long['answer'].startswith('The square is red')


def test_validation_split_by_id_hash(tmp_path):
  c = cfg(tmp_path, json_file='llava_fixture_clean.json')
  c.data.val_permille = 500
  import tensorflow_datasets as tfds
  src = tfds.builder_from_directory(builders.build(c)).as_data_source()
  assert set(src) == {'train', 'validation'}
  assert len(src['train']) + len(src['validation']) == 5 and len(src['validation']) > 0
