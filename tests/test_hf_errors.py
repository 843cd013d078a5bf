"""Bad checkpoints give one clear error line that names the problem."""
import json
import os
import shutil

import numpy as np
import pytest

from dynllava_jax import hf
from hf_utils import make_tiny_hf_llava, read_config_json, rewrite_safetensors


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  return make_tiny_hf_llava(tmp_path_factory.mktemp('base'))


@pytest.fixture
def ckpt(tmp_path, base):
  path = str(tmp_path / 'ckpt')
  shutil.copytree(base, path)
  return path


def one_line_error(exc_type, fn, *args, **kw):
  with pytest.raises(exc_type) as e:
    fn(*args, **kw)
  msg = str(e.value)
  assert '\n' not in msg
  return msg


def test_directory_without_weights(tmp_path):
  os.makedirs(tmp_path / 'empty')
  with open(tmp_path / 'empty' / 'config.json', 'w') as f:
    json.dump({'model_type': 'llava'}, f)
  msg = one_line_error(FileNotFoundError, hf.load_llava, str(tmp_path / 'empty'))
  assert 'model.safetensors' in msg and 'empty' in msg
  msg = one_line_error(FileNotFoundError, hf.load_llava, str(tmp_path / 'nowhere'))
  assert 'does not exist' in msg


def test_missing_config_json(ckpt):
  os.remove(os.path.join(ckpt, 'config.json'))
  assert 'config.json' in one_line_error(FileNotFoundError, hf.load_llava, ckpt)


def test_other_architecture(ckpt):
  with open(os.path.join(ckpt, 'config.json'), 'w') as f:
    json.dump({'model_type': 'bert', 'architectures': ['BertModel'], 'hidden_size': 64}, f)
  msg = one_line_error(ValueError, hf.load_llava, ckpt)
  assert 'BertModel' in msg and 'LlavaForConditionalGeneration' in msg


def test_unsupported_rope_scaling(ckpt):
  def cfg(c):
    c['text_config']['rope_parameters'] = {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 1e4}
    return c
  rewrite_safetensors(ckpt, lambda t: t, cfg)
  assert "rope_type 'linear'" in one_line_error(ValueError, hf.load_llava, ckpt)


@pytest.mark.parametrize('key,bad,want', [
    ('model.language_model.layers.1.mlp.up_proj.weight', (161, 64), (160, 64)),
    ('model.vision_tower.embeddings.patch_embedding.weight', (48, 3, 7, 7), (48, 3, 8, 8)),
])
def test_wrong_shape(ckpt, key, bad, want):
  def fn(t):
    t[key] = np.zeros(bad, np.float32)
    return t
  rewrite_safetensors(ckpt, fn)
  msg = one_line_error(ValueError, hf.load_llava, ckpt)
  assert key in msg and str(bad) in msg and str(want) in msg


def test_missing_key(ckpt):
  key = 'model.vision_tower.encoder.layers.0.self_attn.k_proj.bias'
  rewrite_safetensors(ckpt, lambda t: {k: v for k, v in t.items() if k != key})
  msg = one_line_error(ValueError, hf.load_llava, ckpt)
  assert 'missing' in msg and key in msg


def test_unknown_key(ckpt):
  key = 'model.language_model.layers.0.self_attn.q_norm.weight'

  def fn(t):
    t[key] = np.ones((16,), np.float32)
    return t
  rewrite_safetensors(ckpt, fn)
  msg = one_line_error(ValueError, hf.load_llava, ckpt)
  assert 'unknown' in msg and key in msg


def test_layer_beyond_config(ckpt):
  key = 'model.language_model.layers.2.input_layernorm.weight'

  def fn(t):
    t[key] = np.ones((64,), np.float32)
    return t
  rewrite_safetensors(ckpt, fn)
  msg = one_line_error(ValueError, hf.load_llava, ckpt)
  assert 'unknown' in msg and key in msg


def test_bad_layout_and_dtype(ckpt, tmp_path):
  assert 'layout' in one_line_error(ValueError, hf.save_llava, None, None, str(tmp_path), layout='gguf')
  assert read_config_json(ckpt)['model_type'] == 'llava'
  assert 'dtype=int8' in one_line_error(ValueError, hf.load_llava, ckpt, dtype='int8')


def test_truncated_safetensors(ckpt, capsys):
  from dynllava_jax import convert  # pylint: disable=g-import-not-at-top
  path = os.path.join(ckpt, 'model.safetensors')
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  msg = one_line_error(ValueError, hf.load_llava, ckpt)
  assert path in msg and 'truncated' in msg
  assert convert.main(['--hf_dir', ckpt, '--out', os.path.join(ckpt, 'out')]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'truncated' in err[0] and not os.path.exists(os.path.join(ckpt, 'out'))


def test_bin_with_a_pickle_payload(ckpt, capsys):
  """A pytorch_model.bin that is a pickle of arbitrary objects is refused (never unpickled) in one line."""
  import pickle  # pylint: disable=g-import-not-at-top
  from dynllava_jax import convert  # pylint: disable=g-import-not-at-top
  os.remove(os.path.join(ckpt, 'model.safetensors'))
  path = os.path.join(ckpt, 'pytorch_model.bin')
  with open(path, 'wb') as f:
    pickle.dump({'model.weight': os.getcwd}, f)
  msg = one_line_error(ValueError, hf.load_llava, ckpt)
  assert msg.startswith(f'{path}: not a plain tensor file') and msg.endswith('convert it to safetensors')
  assert convert.main(['--hf_dir', ckpt, '--out', os.path.join(ckpt, 'out')]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'not a plain tensor file' in err[0]
