"""Bad input gets one clear line (exit 2 through the entry points' handler), never a silent wrong
result: configs and flags, the LLaVA JSON and its images, tokenizers, generation inputs, checkpoints of
another model size (docs/reliability.md)."""
import io
import json
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dynllava_jax import errors
from dynllava_jax.data import builders
from dynllava_jax.data import images
from dynllava_jax.data import pipeline
from dynllava_jax.data import policy
from dynllava_jax.data import tokenizer as tokenizer_lib
from dynllava_jax.data.llava_instruct import read_json_list
from dynllava_jax.train import loop
import train_utils as tu

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets', 'llava_json')


def guard_exit(fn, capsys, prog='train.py', extra=()):
  with pytest.raises(SystemExit) as e:
    errors.guard(prog, fn, extra)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert e.value.code == 2
  return err[0]


def llava_dir(tmp_path, records=None, name='data.json'):
  """A LLaVA data folder in tmp_path: the fixture's images + tokenizer, and `records` (default: the
  fixture's clean JSON) as `name`."""
  d = tmp_path / 'llava'
  if not d.exists():
    shutil.copytree(os.path.join(FIXTURE, 'images'), d / 'images')
    shutil.copy(os.path.join(FIXTURE, 'tokenizer.json'), d / 'tokenizer.json')
  if records is None:
    with open(os.path.join(FIXTURE, 'llava_fixture_clean.json')) as f:
      records = json.load(f)
  (d / name).write_text(json.dumps(records))
  return d


def llava_config(tmp_path, d, name='data.json', **data):
  c = tu.config({'data.name': 'llava_instruct', 'data.data_dir': str(tmp_path / 'tfds'),
                 'data.manual_dir': str(d), 'data.json_file': name, 'data.batch_size': 2,
                 **{f'data.{k}': v for k, v in data.items()}})
  return c


def image_record(i, path='images/red_square.png'):
  return {'id': f'r{i}', 'image': path,
          'conversations': [{'from': 'human', 'value': '<image>\nWhat color is the square?'},
                            {'from': 'gpt', 'value': 'It is red.'}]}


# ------------------------------------------------------------------------------ configs and flags

CONFIG_CASES = [
    ({'train.lr': -1e-3}, 'train.lr=-0.001 must be >= 0'),                     # case 7: gradient ascent
    ({'train.predictor_lr': -1.0}, 'train.predictor_lr=-1.0 must be >= 0'),
    ({'data.max_len': 64}, 'data.max_len=64 leaves no room for text after the 64 image tokens'),  # case 8
    ({'data.name': 'digit_vqa'}, "data.name='digit_vqa' is unknown (did you mean 'digits_vqa'?)"),
    ({'data.batch_size': 0}, 'data.batch_size=0 must be >= 1'),
    ({'data.name': 'llava_instruct', 'data.manual_dir': '/nonexistent/llava'},
     "data.manual_dir='/nonexistent/llava' is not a folder"),
    ({'data.name': 'llava_instruct', 'data.manual_dir': FIXTURE, 'data.json_file': 'nope.json'},
     'nope.json does not exist'),
]


@pytest.mark.parametrize('overrides,message', CONFIG_CASES)
def test_bad_config_is_one_line_and_exit_2(overrides, message, capsys):
  c = tu.config(overrides)
  line = guard_exit(lambda: loop.setup(c, jax.devices()[:1]), capsys)
  assert line.startswith('train.py: ') and message in line, line


@pytest.mark.parametrize('flag,message', [
    ('--config.train.step=4', "the config has no field 'step' (did you mean 'steps'?)"),
    ('--config=configs/dynllava.py:size=small', "size='small' is unknown: use tiny | bench | 7b | 13b"),
])
def test_bad_flag_is_one_line(tmp_path, flag, message):
  p = tu.run(['train.py', '--workdir', str(tmp_path), flag], timeout=120)
  line = tu.user_line(p)
  assert message in line, line
  assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------ the LLaVA JSON

@pytest.mark.parametrize('content,message', [
    (b'{"id": "x", "conversations": []}', 'expected a JSON list of records, found a dict'),
    (b'[{"id": "caf\xe9"}]', 'not UTF-8 at byte offset 12 (byte 0xe9)'),
    (b'[{"id": 1,}]', 'not valid JSON at line 1 column 11'),
])
def test_bad_json_file_is_one_line(tmp_path, content, message):
  path = tmp_path / 'bad.json'
  path.write_bytes(content)
  with pytest.raises(errors.UserError) as e:
    read_json_list(str(path))
  assert str(path) in str(e.value) and message in str(e.value) and '\n' not in str(e.value)


def test_dataset_build_entry_point_names_file_and_offset(tmp_path):
  d = llava_dir(tmp_path)
  (d / 'data.json').write_bytes(b'[{"id": "ok"},\n {"id": "\xff"}]')
  p = tu.run(['-m', 'dynllava_jax.data.build', '--config', 'configs/dynllava.py:size=tiny',
              '--config.data.name=llava_instruct', f'--config.data.manual_dir={d}',
              '--config.data.json_file=data.json', f'--config.data.data_dir={tmp_path / "tfds"}'], timeout=300)
  line = tu.user_line(p, 'python -m dynllava_jax.data.build')
  assert f'{d}/data.json: not UTF-8 at byte offset 24' in line, line


def test_every_record_skipped_says_so_with_counts(tmp_path):
  bad = [{'id': 'a', 'conversations': []}, image_record(1, 'images/none.png'), image_record(2, 'images/gone.png')]
  d = llava_dir(tmp_path, bad)
  with pytest.raises(errors.UserError) as e:
    pipeline.make_iterator(llava_config(tmp_path, d), 'train')
  msg = str(e.value)
  assert 'no record of' in msg and 'skipped 3 of 3 records: malformed=1, missing_image=2' in msg, msg


def test_edited_json_is_built_anew(tmp_path):
  """Case 6: the dataset's name includes the JSON's size and mtime: an edited JSON is rebuilt (the old
  build is kept), never silently reused."""
  d = llava_dir(tmp_path, [image_record(i) for i in range(3)])
  c = llava_config(tmp_path, d)
  first = builders.build(c)
  assert builders.read_report(first)['total'] == 3
  (d / 'data.json').write_text(json.dumps([image_record(i) for i in range(5)] + [{'id': 'bad'}]))
  os.utime(d / 'data.json', ns=(time.time_ns() + 10**9,) * 2)
  c = llava_config(tmp_path, d)
  second = builders.build(c)
  assert second != first and os.path.isdir(first)
  report = builders.read_report(second)
  assert report['total'] == 6 and report['skipped'] == {'malformed': 1}
  assert builders.build(llava_config(tmp_path, d)) == second      # unchanged: reused


def test_reader_stops_when_every_sample_is_too_long(tmp_path):
  """Case 8: max_len above the image tokens but below every sample: one line, no endless retry."""
  d = llava_dir(tmp_path, [image_record(i) for i in range(4)])
  it = pipeline.make_iterator(llava_config(tmp_path, d, max_len=70), 'train')
  with pytest.raises(errors.UserError, match=r'every sample was skipped \(skipped 4 of 4 samples: over_long=4\)'):
    next(it)
  it.close()


# ------------------------------------------------------------------------------ images and tokenizers

def test_16_bit_greyscale_png_is_scaled_not_clipped():
  a = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)      # 0 .. 65520
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, 'PNG')
  assert Image.open(io.BytesIO(buf.getvalue())).mode == 'I;16'
  rgb = np.asarray(images.decode_image(buf.getvalue())).astype(np.float64)
  np.testing.assert_allclose(rgb[..., 0], a / 257.0, atol=0.51)
  assert (rgb[..., 0] == rgb[..., 2]).all() and 120 < rgb.mean() < 135     # not all white


def test_tokenizer_that_does_not_fit_the_data_warns(tmp_path, caplog):
  d = llava_dir(tmp_path)
  tokenizer_lib.build_word_tokenizer(['hello world'], str(tmp_path / 'other' / 'tokenizer.json'))
  c = llava_config(tmp_path, d, tokenizer=str(tmp_path / 'other' / 'tokenizer.json'))
  with caplog.at_level(logging.WARNING, logger='dynllava_jax.data'):
    pipeline._source(c, 'train')  # pylint: disable=protected-access
  warn = [r.getMessage() for r in caplog.records if '<unk>' in r.getMessage()]
  assert len(warn) == 1 and 'of the text tokens of the first 5 llava_instruct records to <unk>' in warn[0]
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger='dynllava_jax.data'):
    pipeline._source(llava_config(tmp_path, d), 'train')  # pylint: disable=protected-access
  assert not [r for r in caplog.records if '<unk>' in r.getMessage()]


@pytest.mark.parametrize('content', [None, b'{"version": "1.0", "model": ', b'\x00\x01binary'])
def test_missing_or_corrupt_tokenizer_is_one_line(tmp_path, content, capsys):
  path = tmp_path / 'tokenizer.json'
  if content is not None:
    path.write_bytes(content)
  line = guard_exit(lambda: tokenizer_lib.load_tokenizer(str(path)), capsys)
  assert str(path) in line and ('no tokenizer.json' in line if content is None else
                                'is not a valid tokenizer.json' in line), line


def test_image_id_disagreeing_with_the_model_config(tmp_path, capsys):
  c = tu.config({'model.image_token_id': 5})
  tok = tokenizer_lib.load_tokenizer(os.path.join(FIXTURE, 'tokenizer.json'))
  line = guard_exit(lambda: pipeline.check_tokenizer(c, tok), capsys)
  assert "'<image>' has id 4, the model config says 5" in line


# ------------------------------------------------------------------------------ model inputs

def test_raw_uint8_pixels_are_refused():
  from dynllava_jax.decode import request  # pylint: disable=g-import-not-at-top
  c = tu.config()
  n = 64
  ids = np.concatenate([[1], np.full(n, c.model.image_token_id), [10, 11]])[None]
  pix = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3)).astype(np.uint8)
  for bad in (pix, pix.astype(np.float32)):
    with pytest.raises(ValueError, match=r'look like raw 0\.\.255 pixels') as e:
      request.check_and_pack(c.model, ids, bad, None, max_new_tokens=4)
    assert '\n' not in str(e.value)
  ok = images.preprocess(Image.fromarray(pix[0]), 64)[None]
  request.check_and_pack(c.model, ids, ok, None, max_new_tokens=4)


def test_model_call_with_too_few_placeholders_is_refused():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import Llava  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import check_placeholders  # pylint: disable=g-import-not-at-top
  c = tu.config()
  model = nnx.eval_shape(lambda: Llava(c.model, rngs=nnx.Rngs(0)))   # the check comes before any param
  ids = jnp.asarray(np.concatenate([[1, 4], np.arange(10, 20)])[None], jnp.int32)   # 1 placeholder of 64
  pix = jnp.zeros((1, 64, 64, 3))
  with pytest.raises(ValueError, match='sample 0 has 1 image placeholders .* needs exactly 64') as e:
    model(ids, pix)
  assert '\n' not in str(e.value)
  full = jnp.asarray(np.concatenate([[1], np.full(64, 4), [10]])[None], jnp.int32)
  check_placeholders(c.model, full)                  # exactly N, or none (text-only), pass
  check_placeholders(c.model, ids[:, 2:])


# ------------------------------------------------------------------------------ checkpoints of another size

def test_init_from_a_checkpoint_of_another_size(tmp_path, capsys):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import Llava  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  def params(c):      # the dynllava_jax.convert layout (pure dict of the Params), abstract
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Llava(c.model, rngs=nnx.Rngs(0))), nnx.Param))
  small = params(tu.config({'model.llm.hidden': 64, 'model.llm.head_dim': 16, 'model.llm.mlp_dim': 128}))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(str(tmp_path / 'small'), jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), small))
  ckptr.wait_until_finished()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params(tu.config()))
  line = guard_exit(lambda: ckpt_lib.load_params(str(tmp_path / 'small'), abstract), capsys)
  assert 'has shape' in line and 'a checkpoint of another model size?' in line, line
  line = guard_exit(lambda: ckpt_lib.load_params(str(tmp_path / 'nowhere'), abstract), capsys)
  assert 'train.init_from=' in line and 'is not a directory' in line


def test_eval_on_a_checkpoint_of_another_size(tmp_path, capsys):
  from dynllava_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval import run as eval_run  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import optim  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import state as st  # pylint: disable=g-import-not-at-top
  c2 = tu.config()
  c2.mesh.fsdp = -1
  mesh = shd.make_mesh(c2.mesh, jax.devices()[:1])
  tx = optim.make_optimizer(c2.train, optim.restart_step(c2))
  _, abstract, sh = st.state_shardings(mesh, c2, tx)
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ck.save(2, jax.tree.map(lambda x, s: jax.device_put(jnp.zeros(x.shape, x.dtype), s), abstract, sh), {})
  ck.close()
  c3 = tu.config({'model.llm.layers': 3})
  c3.mesh.fsdp = -1
  line = guard_exit(lambda: eval_run.load_model(c3, str(tmp_path), report_fn=lambda m: None), capsys,
                    'eval.py', extra=(ValueError,))
  assert 'was trained with another model size' in line and 'language_model' in line, line


# ------------------------------------------------------------------------------ the handler itself

def test_handler_keeps_tracebacks_of_bugs_and_reports_disk_errors(capsys):
  def bug():
    raise RuntimeError('a bug')
  with pytest.raises(RuntimeError, match='a bug'):
    errors.guard('train.py', bug)
  with pytest.raises(KeyError):
    errors.guard('eval.py', lambda: {}['x'], extra=(ValueError,))
  assert errors.guard('train.py', lambda: 7) == 7

  def full():
    try:
      raise OSError(28, 'No space left on device', '/w/checkpoints/4.orbax-checkpoint-tmp/x')
    except OSError as e:
      raise RuntimeError('orbax save failed') from e
  line = guard_exit(full, capsys)
  assert line == ('train.py: cannot write (/w/checkpoints/4.orbax-checkpoint-tmp/x): No space left on device; '
                  'free disk space or choose a writable directory (a half-written checkpoint is never restored)')
  line = guard_exit(lambda: (_ for _ in ()).throw(policy.BadSampleError('r7', 'missing_image', 'no file')),
                    capsys, 'python -m dynllava_jax.data.build')
  assert line == 'python -m dynllava_jax.data.build: bad record id=r7: missing_image: no file'
