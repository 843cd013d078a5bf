"""Property test of the LLaVA JSON reader (build time): random records never crash the build, and every
skipped record is counted under the reason it was generated for.

Each generated record carries the outcome it must have (None = kept, else a policy reason), so the
report is compared with an independent oracle, not with the reader's own checks. Free-form JSON values
(not records) must come out as `malformed`."""
import collections
import json
import os
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings, strategies as st
import pytest
import tensorflow_datasets as tfds

from dynllava_jax import errors
from dynllava_jax.data import builders
from dynllava_jax.data import policy
import train_utils as tu

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets', 'llava_json')
TEXT = st.lists(st.sampled_from(list('ab <>/\n\t"\\é字🙂') + ['\ud800', '<image', 'image>']),
                max_size=8).map(''.join)
GOOD_IMAGE, MISSING_IMAGE, CORRUPT_IMAGE = 'images/red_square.png', 'images/none.png', 'images/corrupt.jpg'
ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3),
                        max_leaves=6)


def _turns(draw, n, tag_turn=None, tags=1):
  out = []
  for i in range(n):
    value = draw(TEXT).replace(policy.IMAGE_TAG, '')
    if i == tag_turn:
      value = (policy.IMAGE_TAG + '\n') * tags + value
    out.append({'from': 'human' if i % 2 == 0 else 'gpt', 'value': value})
  return out


@st.composite
def labelled_record(draw):
  """(record, expected reason or None)."""
  kind = draw(st.sampled_from(['text', 'image', 'not_object', 'no_conversations', 'empty', 'bad_turn',
                               'bad_roles', 'odd_turns', 'missing_image', 'corrupt_image',
                               'tag_without_image', 'image_without_tag', 'two_tags', 'bad_id',
                               'bad_image_value']))
  rid = draw(st.one_of(st.integers(-5, 10**12), TEXT))
  rounds = draw(st.integers(1, 3))
  rec = {'id': rid}
  if kind == 'text':
    rec['conversations'] = _turns(draw, 2 * rounds)
    return rec, None
  if kind == 'image':
    rec.update(image=GOOD_IMAGE, conversations=_turns(draw, 2 * rounds, tag_turn=0))
    return rec, None
  if kind == 'not_object':
    return draw(st.one_of(st.none(), st.integers(), TEXT, st.lists(ANY_JSON, max_size=3))), policy.MALFORMED
  if kind == 'no_conversations':
    return {**rec, **draw(st.dictionaries(st.sampled_from(['image', 'value', 'from']), ANY_JSON, max_size=2))}, \
        policy.MALFORMED
  if kind == 'empty':
    rec['conversations'] = draw(st.sampled_from([[], None, 'hello', 7, {}]))
    return rec, policy.MALFORMED
  if kind == 'bad_turn':
    turns = _turns(draw, 2 * rounds)
    turns[draw(st.integers(0, len(turns) - 1))] = draw(st.one_of(
        st.none(), TEXT, st.fixed_dictionaries({'from': st.just('human')}),
        st.fixed_dictionaries({'from': st.integers(), 'value': TEXT}),
        st.fixed_dictionaries({'from': st.just('gpt'), 'value': st.lists(TEXT, max_size=2)})))
    rec['conversations'] = turns
    return rec, policy.MALFORMED
  if kind == 'bad_roles':
    turns = _turns(draw, 2 * rounds)
    turns[draw(st.integers(0, len(turns) - 1))]['from'] = draw(st.sampled_from(['system', 'Human', '', 'user']))
    rec['conversations'] = turns
    return rec, policy.BAD_ROLES
  if kind == 'odd_turns':
    rec['conversations'] = _turns(draw, 2 * rounds - 1)
    return rec, policy.BAD_ROLES
  if kind in ('missing_image', 'corrupt_image'):
    rec.update(image=MISSING_IMAGE if kind == 'missing_image' else CORRUPT_IMAGE,
               conversations=_turns(draw, 2 * rounds, tag_turn=0))
    return rec, kind
  if kind == 'tag_without_image':
    rec['conversations'] = _turns(draw, 2 * rounds, tag_turn=draw(st.integers(0, 2 * rounds - 1)))
    return rec, policy.TAG_WITHOUT_IMAGE
  if kind == 'image_without_tag':
    rec.update(image=GOOD_IMAGE, conversations=_turns(draw, 2 * rounds))
    return rec, policy.IMAGE_WITHOUT_TAG
  if kind == 'two_tags':
    rec.update(image=draw(st.sampled_from([GOOD_IMAGE, None])),
               conversations=_turns(draw, 2 * rounds, tag_turn=0, tags=2))
    if rec['image'] is None:
      del rec['image']
    return rec, policy.MULTIPLE_TAGS
  if kind == 'bad_id':
    rec.update(id=draw(st.one_of(st.floats(allow_nan=False), st.lists(st.integers(), max_size=2),
                                 st.dictionaries(TEXT, st.integers(), max_size=1))),
               conversations=_turns(draw, 2))
    return rec, policy.MALFORMED
  rec.update(image=draw(st.sampled_from(['', 3, ['a.png'], {'path': GOOD_IMAGE}])),
             conversations=_turns(draw, 2, tag_turn=0))
  return rec, policy.MALFORMED


def _surrogate(obj):
  """True when a string in obj holds a lone surrogate (not encodable as UTF-8)."""
  if isinstance(obj, str):
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in obj)
  if isinstance(obj, list):
    return any(_surrogate(x) for x in obj)
  if isinstance(obj, dict):
    return any(_surrogate(k) or _surrogate(v) for k, v in obj.items())
  return False


@pytest.fixture(scope='module')
def base():
  d = tempfile.mkdtemp(prefix='llava_prop_')
  shutil.copytree(os.path.join(FIXTURE, 'images'), os.path.join(d, 'images'))
  shutil.copy(os.path.join(FIXTURE, 'tokenizer.json'), d)
  yield d
  shutil.rmtree(d, ignore_errors=True)


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(labelled_record(), min_size=1, max_size=8))
def test_random_records_never_crash_and_every_skip_is_counted(base, items):
  records = [r for r, _ in items]
  want = collections.Counter()
  for r, reason in items:
    if reason is None and _surrogate(r):
      reason = policy.MALFORMED          # text that cannot be stored as UTF-8
    want[reason] += 1
  run = tempfile.mkdtemp(dir=base)
  name = os.path.basename(run) + '.json'
  with open(os.path.join(base, name), 'w') as f:
    json.dump(records, f)
  c = tu.config({'data.name': 'llava_instruct', 'data.manual_dir': base, 'data.json_file': name,
                 'data.data_dir': os.path.join(run, 'tfds')})
  kept = want.pop(None, 0)
  try:
    ds_dir = builders.build(c)
  except errors.UserError as e:             # only when no record survives, with the counts
    assert kept == 0, e
    total = sum(want.values())
    assert f'skipped {total} of {total} records' in str(e) and '\n' not in str(e)
    for reason, n in want.items():
      assert f'{reason}={n}' in str(e)
    return
  report = builders.read_report(ds_dir)
  assert report['total'] == len(records)
  assert report['skipped'] == dict(want)
  assert len(tfds.builder_from_directory(ds_dir).as_data_source(split='train')) == kept
