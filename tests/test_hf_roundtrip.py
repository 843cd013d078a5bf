"""Export -> re-import is bit-exact in all three layouts; HF loads our exports; Dynamic-LLaVA checkpoints
(predictors, released vocabulary without <image>, CLIP in a separate directory) load and save back."""
import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs.dynllava import get_config
from dynllava_jax import hf
from hf_utils import flat_params, hf_logits, make_tiny_hf_llava, random_llava, read_config_json, sample_batch


@pytest.fixture(scope='module')
def tiny_hf(tmp_path_factory):
  path = make_tiny_hf_llava(tmp_path_factory.mktemp('hf'), kv_heads=2, feature_layer=-3)
  model, config = hf.load_llava(path)
  return path, model, config


def assert_same_params(a, b):
  fa, fb = flat_params(a), flat_params(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert fa[k].dtype == fb[k].dtype, k
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.mark.parametrize('layout', ['hf5', 'llava15hf', 'original'])
def test_roundtrip_bit_exact(tmp_path, tiny_hf, layout):
  _, model, config = tiny_hf
  out = hf.save_llava(model, config, str(tmp_path / layout), layout=layout)
  model2, config2 = hf.load_llava(out)
  assert_same_params(model, model2)
  assert config2.to_dict() == config.to_dict()
  keys = load_file(os.path.join(out, 'model.safetensors')).keys()
  prefix = {'hf5': 'model.language_model.', 'llava15hf': 'language_model.model.', 'original': 'model.layers.'}
  assert any(k.startswith(prefix[layout]) for k in keys)


def test_hf_loads_our_export(tmp_path, tiny_hf):
  path, model, config = tiny_hf
  ids, pix, mask = sample_batch(dict(feature_layer=-3))
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask)))
  m = mask.astype(bool)
  for layout, shard in [('hf5', None), ('llava15hf', 200_000)]:
    kw = {} if shard is None else dict(max_shard_bytes=shard)
    out = hf.save_llava(model, config, str(tmp_path / layout), layout=layout, **kw)
    if shard:
      assert os.path.exists(os.path.join(out, hf.SAFE_INDEX))
      assert not os.path.exists(os.path.join(out, hf.SAFE_SINGLE))
    ref = hf_logits(out, ids, pix, mask)
    assert np.abs(ours[m] - ref[m]).max() / np.abs(ref[m]).max() <= 1e-4, layout


def test_sharded_index_and_bf16_export(tmp_path, tiny_hf):
  _, model, config = tiny_hf
  out = hf.save_llava(model, config, str(tmp_path / 'bf'), dtype=jnp.bfloat16, max_shard_bytes=100_000)
  with open(os.path.join(out, hf.SAFE_INDEX)) as f:
    index = json.load(f)
  assert len(set(index['weight_map'].values())) > 2
  assert read_config_json(out)['dtype'] == 'bfloat16'
  model_bf, config_bf = hf.load_llava(out, dtype=jnp.bfloat16)
  assert config_bf.param_dtype == 'bfloat16'
  fa, fb = flat_params(model), flat_params(model_bf)
  for k in fa:
    assert fb[k].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(fa[k].astype(ml_dtypes.bfloat16), fb[k], err_msg=k)


def sparse_model(use_instruct=False, seed=0):
  c = get_config('size=tiny').model
  c.sparse.use_instruct = use_instruct
  c.sparse.num_layers = 2
  c.source_vocab_size = 0
  return random_llava(c, seed), c


def test_dynamic_llava_predictors_roundtrip(tmp_path):
  model, config = sparse_model(use_instruct=True)
  out = hf.save_llava(model, config, str(tmp_path / 'orig'), layout='original')
  cfg = read_config_json(out)
  assert cfg['architectures'] == ['DynamicLlavaLlamaForCausalLM']
  assert cfg['sparse_config']['d_model'] == 64 and cfg['sparse_config']['sparse_layer'] == 1
  keys = set(load_file(os.path.join(out, 'model.safetensors')))
  for k in ['model.image_score_predictor.down_mlp.0.weight', 'model.image_score_predictor.down_mlp.1.bias',
            'model.image_score_predictor.transformer.1.attn.qkv.weight',
            'model.image_score_predictor.transformer.0.mlp.fc2.bias',
            'model.image_score_predictor.output_mlp.4.weight', 'model.output_text_score_predictor.output_mlp.7.bias',
            'model.instruct_score_predictor.output_mlp.0.weight', 'model.mm_projector.2.weight',
            'model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight']:
    assert k in keys, k
  assert 'model.image_score_predictor.transformer.0.attn.qkv.bias' not in keys
  model2, config2 = hf.load_llava(out)
  assert config2.sparse.enabled and config2.sparse.use_instruct
  assert (config2.sparse.d_model, config2.sparse.nhead, config2.sparse.num_layers) == (64, 4, 2)
  assert_same_params(model, model2)
  # Without sparse_config in config.json the widths are inferred from the tensors.
  del cfg['sparse_config']
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  config3 = hf.read_config(out)
  assert (config3.sparse.d_model, config3.sparse.num_layers, config3.sparse.dim_feedforward) == (64, 2, 128)


def test_released_checkpoint_vocab_and_clip_dir(tmp_path):
  """A released-style checkpoint: no <image> in the vocabulary, CLIP weights in a separate directory."""
  model, config = sparse_model()
  full = hf.save_llava(model, config, str(tmp_path / 'full'), layout='original')
  tensors = load_file(os.path.join(full, 'model.safetensors'))
  vt = 'model.vision_tower.vision_tower.'
  released = {k: v for k, v in tensors.items() if not k.startswith(vt)}
  released['model.embed_tokens.weight'] = tensors['model.embed_tokens.weight'][:250]
  released['lm_head.weight'] = tensors['lm_head.weight'][:250]
  rel = tmp_path / 'released'
  os.makedirs(rel)
  save_file(released, str(rel / 'model.safetensors'))
  cfg = read_config_json(full)
  cfg.update(vocab_size=250, pad_token_id=0, mm_vision_tower='some/local-clip')
  for k in ('image_token_index', 'vision_config'):
    del cfg[k]
  with open(rel / 'config.json', 'w') as f:
    json.dump(cfg, f)
  clip = tmp_path / 'clip'
  os.makedirs(clip)
  clip_t = {k[len(vt):]: v for k, v in tensors.items() if k.startswith(vt)}
  clip_t['text_model.embeddings.token_embedding.weight'] = np.zeros((3, 4), np.float32)
  clip_t['logit_scale'] = np.zeros((), np.float32)
  save_file(clip_t, str(clip / 'model.safetensors'))
  v = config.vision
  with open(clip / 'config.json', 'w') as f:
    json.dump(dict(model_type='clip', vision_config=dict(
        hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth, num_attention_heads=v.heads,
        image_size=v.image_size, patch_size=v.patch_size)), f)
  with pytest.raises(ValueError, match='pass clip_dir'):
    hf.load_llava(str(rel))
  model2, config2 = hf.load_llava(str(rel), clip_dir=str(clip))
  assert config2.source_vocab_size == 250 and config2.llm.vocab_size == 256
  assert (config2.image_token_id, config2.pad_token_id) == (250, 251)
  assert config2.llm.text_vocab_size == 250         # the padded ids stay out of the loss and sampling
  assert hf.read_config(hf.save_llava(model2, config2, str(tmp_path / 'hf5'))).llm.text_vocab_size == 250
  p1, p2 = flat_params(model), flat_params(model2)
  emb = p2['language_model.embed_tokens.embedding']
  np.testing.assert_array_equal(emb[:250], p1['language_model.embed_tokens.embedding'][:250])
  np.testing.assert_allclose(emb[250:], np.broadcast_to(emb[:250].mean(0), (6, emb.shape[1])), rtol=1e-6)
  for k in p1:
    if 'embed_tokens' not in k and 'lm_head' not in k:
      np.testing.assert_array_equal(p1[k], p2[k], err_msg=k)
  back = hf.save_llava(model2, config2, str(tmp_path / 'back'), layout='original')
  back_t = load_file(os.path.join(back, 'model.safetensors'))
  assert read_config_json(back)['vocab_size'] == 250 and 'image_token_index' not in read_config_json(back)
  for k, x in released.items():
    np.testing.assert_array_equal(back_t[k], x, err_msg=k)


def test_released_checkpoint_with_tower_and_config_only_clip_dir(tmp_path):
  """Tower weights inside the checkpoint, vision sizes only in a CLIP config.json (no weights beside it):
  loads with clip_dir=, or by itself when `mm_vision_tower` names that directory."""
  model, config = sparse_model(seed=1)
  full = hf.save_llava(model, config, str(tmp_path / 'full'), layout='original')
  cfg = read_config_json(full)
  del cfg['vision_config']
  cfg['mm_vision_tower'] = 'some/local-clip'
  with open(os.path.join(full, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match='unknown: pass clip_dir'):
    hf.load_llava(full)
  v = config.vision
  clip = os.path.join(full, 'clip')
  os.makedirs(clip)
  with open(os.path.join(clip, 'config.json'), 'w') as f:
    json.dump(dict(model_type='clip', vision_config=dict(
        hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth, num_attention_heads=v.heads,
        image_size=v.image_size, patch_size=v.patch_size)), f)
  model2, config2 = hf.load_llava(full, clip_dir=clip)
  assert_same_params(model, model2)
  assert config2.vision.to_dict() == config.vision.to_dict()
  cfg['mm_vision_tower'] = 'clip'                   # relative to the checkpoint directory
  with open(os.path.join(full, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  assert hf.read_config(full).vision.to_dict() == config.vision.to_dict()
  assert_same_params(model, hf.load_llava(full)[0])
  # No tower anywhere: the error says where weights are needed.
  tensors = load_file(os.path.join(full, 'model.safetensors'))
  save_file({k: x for k, x in tensors.items() if 'vision_tower' not in k}, os.path.join(full, 'model.safetensors'))
  with pytest.raises(ValueError, match='no vision tower weights'):
    hf.load_llava(full)


def test_pytorch_bin_checkpoint(tmp_path, tiny_hf):
  """Without safetensors, a (sharded) pytorch_model.bin checkpoint is read memory-mapped, bf16 included."""
  import torch
  path, model, _ = tiny_hf
  tensors = load_file(os.path.join(path, 'model.safetensors'))
  out = tmp_path / 'bin'
  os.makedirs(out)
  keys = sorted(tensors)
  halves = {'pytorch_model-00001-of-00002.bin': keys[:40], 'pytorch_model-00002-of-00002.bin': keys[40:]}
  for name, ks in halves.items():
    torch.save({k: torch.from_numpy(tensors[k]).to(torch.bfloat16) for k in ks}, str(out / name))
  with open(out / hf.BIN_INDEX, 'w') as f:
    json.dump({'weight_map': {k: name for name, ks in halves.items() for k in ks}}, f)
  with open(out / 'config.json', 'w') as f:
    json.dump(read_config_json(path), f)
  model_bf, _ = hf.load_llava(str(out), dtype=jnp.bfloat16)
  want = flat_params(model)
  for k, v in flat_params(model_bf).items():
    np.testing.assert_array_equal(v, want[k].astype(ml_dtypes.bfloat16), err_msg=k)


def test_tiny_preset_export_matches_hf(tmp_path):
  """The project's `tiny` preset (with predictors) exported as hf5: HF ignores the predictors, same logits."""
  model, config = sparse_model(seed=3)
  out = hf.save_llava(model, config, str(tmp_path / 'tiny'), layout='hf5')
  assert read_config_json(out)['sparse_config']['d_model'] == config.sparse.d_model
  ids, pix, mask = sample_batch(dict(image_size=64), left_pad=(2, 0))
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask)))
  ref = hf_logits(out, ids, pix, mask)
  m = mask.astype(bool)
  assert np.abs(ours[m] - ref[m]).max() / np.abs(ref[m]).max() <= 1e-4


def test_layer_plan_groups_load_and_save_with_global_layer_numbers(tmp_path, tiny_hf):
  """A checkpoint loads into a plan split in groups (`language_model.layers_<start>`) and saves back to the
  same file: HF layer i is global layer i whatever group holds it."""
  path, model, config = tiny_hf
  n = config.llm.layers
  plan = f'dense:frozen,dense_alt*{n - 1}'
  split, cfg2 = hf.load_llava(path, layer_plan=plan)
  assert cfg2.layer_plan == plan and [g.attr for g in split.language_model.plan] == ['layers', 'layers_1']
  a, b = flat_params(model), flat_params(split)
  for k, v in a.items():
    if k.startswith('language_model.layers.'):
      rest = k[len('language_model.layers.'):]
      np.testing.assert_array_equal(v[:1], b['language_model.layers.' + rest], err_msg=k)
      np.testing.assert_array_equal(v[1:], b['language_model.layers_1.' + rest], err_msg=k)
    else:
      np.testing.assert_array_equal(v, b[k], err_msg=k)
  ref = load_file(os.path.join(hf.save_llava(model, config, str(tmp_path / 'u')), hf.SAFE_SINGLE))
  got = load_file(os.path.join(hf.save_llava(split, cfg2, str(tmp_path / 's')), hf.SAFE_SINGLE))
  assert sorted(ref) == sorted(got)
  for k in ref:
    np.testing.assert_array_equal(ref[k], got[k], err_msg=k)
