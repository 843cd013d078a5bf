"""digits_vqa: offline build without TensorFlow, splits, long answers, tokenizer coverage."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs.dynllava import get_config
from dynllava_jax.data import builders
from dynllava_jax.data import digits_vqa
from dynllava_jax.data import pipeline
from dynllava_jax.data import records
from dynllava_jax.data import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(data_dir, **digits):
  c = get_config('size=tiny')
  c.data.data_dir = str(data_dir)
  c.data.digits.num_train, c.data.digits.num_val, c.data.digits.num_test = 96, 32, 32
  for k, v in digits.items():
    c.data.digits[k] = v
  c.data.batch_size = 8
  return c


def test_build_and_read_without_network_or_tensorflow(tmp_path):
  """In a fresh interpreter: build from scratch, read a batch; TensorFlow never gets imported."""
  code = f"""
import sys, json
sys.path.insert(0, {ROOT!r})
import builtins
real_import = builtins.__import__
def guarded(name, *a, **k):
  if name == 'tensorflow' or name.startswith('tensorflow.'):
    raise ImportError('tensorflow is not allowed')
  return real_import(name, *a, **k)
builtins.__import__ = guarded
try:
  import tensorflow
  has_tf = True
except ImportError:
  has_tf = False
from tests.test_data_digits import small_config
from dynllava_jax.data import builders, pipeline
c = small_config({str(tmp_path)!r})
ds_dir = builders.build(c)
b = next(pipeline.make_iterator(c, 'train'))
print(json.dumps({{'has_tf': has_tf, 'tf_loaded': 'tensorflow' in sys.modules, 'dir': ds_dir,
                  'shape': list(b['input_ids'].shape)}}))
"""
  env = dict(os.environ, NO_PROXY='*', HTTP_PROXY='http://127.0.0.1:9', HTTPS_PROXY='http://127.0.0.1:9')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                       timeout=120, cwd=str(tmp_path))
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert not res['has_tf'] and not res['tf_loaded']
  assert res['shape'][0] == 8 and res['shape'][1] in (64, 128, 256)
  assert os.path.exists(os.path.join(res['dir'], 'tokenizer.json'))
  assert 'tensorflow' not in sys.modules


@pytest.mark.parametrize('style,min_len,rounds', [('long', 50, (2, 0.1)), ('short', 16, (5, 0.75))])
def test_samples(tmp_path, style, min_len, rounds):
  """Long answers reach the output-text predictor's len_ot: 50 (released) for 'long', 16 (tiny) for 'short'.
  'long' uses the non-tiny round settings (one or two rounds), 'short' the tiny ones (up to 5)."""
  c = small_config(tmp_path, describe_style=style, max_rounds=rounds[0], extra_round_prob=rounds[1])
  ds_dir = builders.build(c)
  assert builders.build(c) == ds_dir                        # idempotent
  tok = tokenizer_lib.load_tokenizer(builders.tokenizer_path(c))
  assert tok.vocab_size <= 256
  import tensorflow_datasets as tfds
  src = tfds.builder_from_directory(ds_dir).as_data_source()
  assert {k: len(v) for k, v in src.items()} == {'train': 96, 'validation': 32, 'test': 32}
  types, long_lens, n_rounds = set(), [], []
  for split in src:
    for i in range(len(src[split])):
      r = records.decode(src[split][i])
      types.add(r['question_type'])
      for t in r['conversations']:
        ids, _ = tok.encode(t['value'])
        assert (ids != 0).all(), t['value']                    # no <unk>: vocabulary covers all
      assert r['answer'] == r['conversations'][-1]['value']
      if r['has_image']:
        n_rounds.append(len(r['conversations']) // 2)
      if r['question_type'] == 'describe':
        long_lens.append(len(tok.encode(r['answer'])[0]))
  assert types == set(digits_vqa.QUESTION_TYPES)
  assert max(n_rounds) <= rounds[0] and (np.mean(n_rounds) > 2.5 if rounds[0] == 5 else np.mean(n_rounds) < 1.3)
  assert long_lens and min(long_lens) >= min_len
  # Long answers stay whole in training samples (max_len 256) and span >= min_len tokens + </s>.
  for s in pipeline.make_eval_samples(c, 'validation'):
    if s['question_type'] == 'describe':
      f = s['full']
      assert f['answer_end'] - f['answer_start'] >= min_len + 1 and f['answer_end'] == len(f['input_ids'])


def test_generation_is_deterministic_and_splits_disjoint():
  from sklearn.datasets import load_digits
  d = load_digits()
  a = digits_vqa.make_sample('train', 5, d.images, d.target, 64, seed=3)
  b = digits_vqa.make_sample('train', 5, d.images, d.target, 64, seed=3)
  c = digits_vqa.make_sample('train', 5, d.images, d.target, 64, seed=4)
  assert a == b and a != c
  spans = sorted(digits_vqa.SOURCE_SPLITS.values())
  assert spans[0][0] == 0 and spans[-1][1] == len(d.images) == 1797
  assert all(x[1] == y[0] for x, y in zip(spans, spans[1:]))   # contiguous, disjoint index ranges


def test_canvas_336():
  rng = np.random.default_rng(0)
  from sklearn.datasets import load_digits
  img = load_digits().images[0]
  tiles = [[img, None, img], [None, img, None], [img, img, None]]
  canvas = digits_vqa.render_canvas(tiles, 336, rng)
  assert canvas.shape == (336, 336, 3) and canvas.dtype == np.uint8
  cell = 336 // 3
  assert canvas[:cell, :cell].mean() > canvas[:cell, cell:2 * cell].mean() + 10   # digit vs empty


def test_add_echo_answers_text_additions_like_a_row_sum():
  """data.digits.add_echo: a text-only addition is answered 'a plus b sum c' (operands 3 and 1 tokens before
  the sum, as in an echoed row sum), names its own dataset dir (_ae), and changes nothing else."""
  assert digits_vqa.answer('text_add', None, a=4, b=9, style='echo', add_echo=True) == '4 plus 9 sum 13'
  assert digits_vqa.answer('text_add', None, a=4, b=9, style='echo') == '13'
  grid = [[3, None], [7, 9]]
  assert digits_vqa.answer('row_sum', grid, r=1, style='echo', add_echo=True) == 'a1 3 a2 empty sum 3'
  base = digits_vqa.make_config(describe_style='echo', grid=2)
  ae = digits_vqa.make_config(describe_style='echo', grid=2, add_echo=True)
  assert ae.name == base.name + '_ae' and ae.add_echo and not base.add_echo
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  dd = load_digits()
  images, labels = dd.images.astype(np.float32), dd.target
  seen = 0
  for i in range(200):
    kw = dict(describe_style='echo', max_rounds=3, grid_size=2, type_probs=(0.2, 0.2, 0.2, 0.2, 0.2))
    a = digits_vqa.make_sample('train', i, images, labels, 64, 0, **kw)
    b = digits_vqa.make_sample('train', i, images, labels, 64, 0, add_echo=True, **kw)
    if a['question_type'] == 'text_add':
      seen += 1
      q = a['conversations']['value'][0].split()          # what is A plus B ?
      assert b['answer'] == f'{q[2]} plus {q[4]} sum {a["answer"]}'
    else:
      assert a == b
  assert seen > 10


def test_text_rounds_chain_additions_in_text_only_samples():
  """data.digits.text_rounds: a text-only sample gets further addition rounds (image samples unchanged;
  the one-question test split stays one question); each answer is its own question's sum."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  dd = load_digits()
  images, labels = dd.images.astype(np.float32), dd.target
  kw = dict(describe_style='echo', max_rounds=4, extra_round_prob=0.8, grid_size=2, add_echo=True,
            type_probs=(0.2, 0.2, 0.2, 0.2, 0.2))
  rounds = []
  for i in range(150):
    a = digits_vqa.make_sample('train', i, images, labels, 64, 0, **kw)
    b = digits_vqa.make_sample('train', i, images, labels, 64, 0, text_rounds=True, **kw)
    if b['has_image']:
      assert a == b
      continue
    v = b['conversations']['value']
    rounds.append(len(v) // 2)
    for q, ans in zip(v[0::2], v[1::2]):
      x, y = int(q.split()[2]), int(q.split()[4])
      assert ans == f'{x} plus {y} sum {x + y}'
    assert b['answer'] == v[-1] and b['question_type'] == 'text_add'
    t = digits_vqa.make_sample('test', i, images, labels, 64, 0, text_rounds=True, one_round_test=True, **kw)
    assert t['has_image'] or len(t['conversations']['value']) == 2
  assert len(rounds) > 10 and max(rounds) == 4 and np.mean(rounds) > 2
  assert digits_vqa.make_config(text_rounds=True).name.endswith('_tr')
