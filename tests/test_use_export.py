"""A training workdir carries its config; `convert --export --workdir` writes it as HF / released
checkpoints that transformers (HF layout) and our loader read back with the same model."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dynllava_jax import convert, source
from hf_utils import flat_params, hf_logits, sample_batch
import use_utils


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return use_utils.shared_workdir(tmp_path_factory)


def test_run_config_round_trip(workdir, tmp_path):
  path, cfg = workdir
  back = source.read_run_config(path)
  assert back.to_dict() == cfg.to_dict()          # tuples included
  # A different config later: the old one is kept beside it, never lost.
  other = source.config_from_json(source.config_to_json(cfg))
  other.train.lr = 0.5
  d = tmp_path / 'w'
  source.save_run_config(cfg, str(d))
  source.save_run_config(other, str(d))
  assert source.read_run_config(str(d)).train.lr == 0.5
  kept = [f for f in os.listdir(d) if f.startswith('config.') and f != 'config.json']
  assert len(kept) == 1 and json.loads((d / kept[0]).read_text())['train']['lr'] == cfg.train.lr


def test_train_writes_config_only_when_it_can_train(tmp_path):
  from dynllava_jax.errors import UserError
  from dynllava_jax.train.workdir import WorkdirLock
  import train_utils
  cfg = train_utils.config({'data.batch_size': 8})      # fsdp over the tests' 8 devices
  cfg.mesh.fsdp = -1
  assert source.save_train_config(cfg, str(tmp_path / 'a')) == str(tmp_path / 'a' / 'config.json')
  assert source.read_run_config(str(tmp_path / 'a')).to_dict() == cfg.to_dict()
  bad = train_utils.config({'train.steps': 0, 'data.batch_size': 8})
  bad.mesh.fsdp = -1
  with pytest.raises(UserError, match='train.steps=0'):
    source.save_train_config(bad, str(tmp_path / 'a'))
  assert source.read_run_config(str(tmp_path / 'a')).train.steps == cfg.train.steps     # not replaced
  with WorkdirLock(str(tmp_path / 'b')):
    with pytest.raises(UserError, match='in use'):
      source.save_train_config(cfg, str(tmp_path / 'b'))
  assert not (tmp_path / 'b' / 'config.json').exists()


def test_export_workdir_hf_logits_and_params(workdir, tmp_path, tmp_path_factory):
  path, cfg = workdir
  src = source.load_source(workdir=path, report=lambda _: None, one_device=True)
  assert src.step == 1 and src.config.to_dict() == cfg.to_dict()
  out = use_utils.shared_export(tmp_path_factory)        # convert --export --workdir W --layout hf
  assert {'config.json', 'model.safetensors', 'run_config.json', 'tokenizer.json'} <= set(os.listdir(out))
  ids, pix, mask = sample_batch(dict(image_size=64), left_pad=(2, 0))
  ours = np.asarray(src.model(jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask)))
  ref = hf_logits(out, ids, pix, mask)              # transformers' LlavaForConditionalGeneration
  m = mask.astype(bool)
  assert np.abs(ours[m] - ref[m]).max() / np.abs(ref[m]).max() <= 1e-4
  back = source.load_source(model_dir=out)          # our loader: every param, predictors included
  assert back.kind == 'hf' and back.config.eval.to_dict() == cfg.eval.to_dict()
  want, got = flat_params(src.model), flat_params(back.model)
  assert sorted(got) == sorted(want) and any(k.startswith('image_score_predictor') for k in got)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # Bad input: one line, exit 2.
  assert convert.main(['--export', '--workdir', path, '--step', '7', '--out', str(tmp_path / 'x')]) == 2
  assert convert.main(['--export', '--workdir', path, '--out', out]) == 2          # exists
