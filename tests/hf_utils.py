"""Tiny random HF `LlavaForConditionalGeneration` checkpoints for tests, and HF reference logits.

    path = make_tiny_hf_llava(tmp_path)                       # HF 5.x layout, float32, MHA
    path = make_tiny_hf_llava(tmp_path / 'g', kv_heads=2, feature_layer=-3, layout='llava15hf')
    ref = hf_logits(path, input_ids, pixel_values, attention_mask)   # numpy (B, T, vocab) float32

Everything is generated locally with torch + transformers (no hub access). Token ids follow the
digits_vqa tokenizer: <unk> 0, <s> 1, </s> 2, <pad> 3, <image> 4.
"""
import json
import os

import numpy as np

TINY_DEFAULTS = dict(
    vocab=256, hidden=64, layers=2, heads=4, kv_heads=4, intermediate=160, rope_theta=10000.0,
    rms_eps=1e-5, max_position=512,
    image_size=32, patch_size=8, vision_width=48, vision_layers=3, vision_heads=4, vision_mlp=96,
    feature_layer=-2, select_strategy='default',
    image_token_index=4, pad_token_id=3, bos_token_id=1, eos_token_id=2,
    layout='hf5', dtype='float32', seed=0, init_std=0.05)

LAYOUTS = ('hf5', 'llava15hf')


def hf_config(**overrides):
  """A transformers `LlavaConfig` from TINY_DEFAULTS updated with `overrides`."""
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
  unknown = set(overrides) - set(TINY_DEFAULTS)
  if unknown:
    raise ValueError(f'make_tiny_hf_llava: unknown overrides {sorted(unknown)}; known: {sorted(TINY_DEFAULTS)}')
  c = dict(TINY_DEFAULTS, **overrides)
  vision = CLIPVisionConfig(
      hidden_size=c['vision_width'], intermediate_size=c['vision_mlp'],
      num_hidden_layers=c['vision_layers'], num_attention_heads=c['vision_heads'],
      image_size=c['image_size'], patch_size=c['patch_size'], hidden_act='quick_gelu',
      layer_norm_eps=1e-5, projection_dim=32)
  text = LlamaConfig(
      vocab_size=c['vocab'], hidden_size=c['hidden'], intermediate_size=c['intermediate'],
      num_hidden_layers=c['layers'], num_attention_heads=c['heads'], num_key_value_heads=c['kv_heads'],
      rms_norm_eps=c['rms_eps'], max_position_embeddings=c['max_position'],
      rope_parameters={'rope_type': 'default', 'rope_theta': float(c['rope_theta'])},
      pad_token_id=c['pad_token_id'], bos_token_id=c['bos_token_id'], eos_token_id=c['eos_token_id'],
      initializer_range=c['init_std'], tie_word_embeddings=False)
  n = (c['image_size'] // c['patch_size']) ** 2 + (1 if c['select_strategy'] == 'full' else 0)
  return LlavaConfig(
      vision_config=vision, text_config=text, image_token_index=c['image_token_index'],
      image_seq_length=n, vision_feature_layer=c['feature_layer'],
      vision_feature_select_strategy=c['select_strategy'], projector_hidden_act='gelu'), c


def _randomise(model, std, seed):
  """Overwrite every parameter with N(0, std) (norm weights 1 + N(0, std)) so all paths are exercised."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
      if name.endswith('weight') and ('norm' in name or 'layrnorm' in name):
        p.copy_(1.0 + noise)
      else:
        p.copy_(noise)


def to_llava15hf_key(key):
  """HF 5.x key -> the published llava-1.5-hf key."""
  if key.startswith('lm_head.'):
    return 'language_model.' + key
  if key.startswith('model.language_model.'):
    return 'language_model.model.' + key[len('model.language_model.'):]
  if key.startswith('model.vision_tower.'):
    return 'vision_tower.vision_model.' + key[len('model.vision_tower.'):]
  if key.startswith('model.multi_modal_projector.'):
    return key[len('model.'):]
  raise ValueError(f'unexpected HF key {key!r}')


def make_tiny_hf_llava(tmp_dir, **overrides):
  """Writes a random tiny LLaVA-1.5 checkpoint (config.json + model.safetensors) into tmp_dir; returns it.

  overrides: any key of TINY_DEFAULTS, e.g. kv_heads=2 (GQA), rope_theta=5e5, feature_layer=-3,
  layout='llava15hf' (the published llava-1.5-hf key names), dtype='bfloat16' | 'float16'.
  """
  import torch
  from safetensors.torch import save_file
  from transformers import LlavaForConditionalGeneration
  config, c = hf_config(**overrides)
  if c['layout'] not in LAYOUTS:
    raise ValueError(f"layout {c['layout']!r} unknown: use one of {LAYOUTS}")
  torch.manual_seed(c['seed'])
  model = LlavaForConditionalGeneration(config).eval()
  _randomise(model, c['init_std'], c['seed'])
  tmp_dir = str(tmp_dir)
  os.makedirs(tmp_dir, exist_ok=True)
  dt = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[c['dtype']]
  config.dtype = c['dtype']
  config.save_pretrained(tmp_dir)
  sd = {k: v.detach().to(dt).contiguous() for k, v in model.state_dict().items()}
  if c['layout'] == 'llava15hf':
    sd = {to_llava15hf_key(k): v for k, v in sd.items()}
  save_file(sd, os.path.join(tmp_dir, 'model.safetensors'), metadata={'format': 'pt'})
  return tmp_dir


def load_hf(path):
  """LlavaForConditionalGeneration from a local directory, float32, eval mode."""
  import torch
  from transformers import LlavaForConditionalGeneration
  return LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_logits(path_or_model, input_ids, pixel_values, attention_mask):
  """HF reference logits, numpy (B, T, vocab) float32.

  input_ids / attention_mask (B, T); pixel_values (B, H, W, 3) (our channels-last layout; transposed here).
  position_ids = cumsum(mask) - 1 clipped at 0, the positions our model uses (padding ignored).
  """
  import torch
  model = load_hf(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
  ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
  mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
  pos = torch.clamp(torch.cumsum(mask, -1) - 1, min=0)
  pix = torch.as_tensor(np.asarray(pixel_values, np.float32)).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    out = model(input_ids=ids, pixel_values=pix, attention_mask=mask, position_ids=pos)
  return out.logits.float().numpy()


def sample_batch(overrides=None, batch=2, text_before=3, text_after=5, left_pad=(0, 3), seed=0):
  """Left-padded batch with one image block per sample: ids (B, T), pixels (B, H, W, 3), mask (B, T).

  Sample b: [pad]*left_pad[b] + <s> + text_before tokens + <image>*N + text tokens filling the row.
  """
  c = dict(TINY_DEFAULTS, **(overrides or {}))
  rng = np.random.default_rng(seed)
  n = (c['image_size'] // c['patch_size']) ** 2 + (1 if c['select_strategy'] == 'full' else 0)
  t = 1 + text_before + n + text_after + max(left_pad)
  ids = np.full((batch, t), c['pad_token_id'], np.int32)
  mask = np.zeros((batch, t), np.int32)
  for b in range(batch):
    p = left_pad[b % len(left_pad)]
    after = t - p - 1 - text_before - n
    row = ([c['bos_token_id']] + list(rng.integers(5, c['vocab'], text_before)) +
           [c['image_token_index']] * n + list(rng.integers(5, c['vocab'], after)))
    ids[b, p:] = row
    mask[b, p:] = 1
  pix = rng.standard_normal((batch, c['image_size'], c['image_size'], 3)).astype(np.float32)
  return ids, pix, mask


def read_config_json(path):
  with open(os.path.join(str(path), 'config.json')) as f:
    return json.load(f)


def flat_params(model):
  """{'a.b.c': numpy array} of an NNX model's parameters (host copies)."""
  import jax
  from flax import nnx
  return {'.'.join(map(str, p)): np.asarray(jax.device_get(v.get_value()))
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def rewrite_safetensors(path, fn, config_fn=None):
  """Rewrites path/model.safetensors as fn(dict of numpy arrays) (and config.json via config_fn)."""
  from safetensors.numpy import load_file, save_file
  f = os.path.join(str(path), 'model.safetensors')
  save_file(fn(load_file(f)), f, metadata={'format': 'pt'})
  if config_fn is not None:
    cfg = config_fn(read_config_json(path))
    with open(os.path.join(str(path), 'config.json'), 'w') as fh:
      json.dump(cfg, fh)


def random_llava(config, seed=0, std=0.05):
  """An NNX Llava for `config` with N(0, std) parameters, filled without running the (slow on CPU) init."""
  import jax.numpy as jnp
  from flax import nnx
  from dynllava_jax.model.llava import Llava
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Llava(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  flat = nnx.to_flat_state(state)
  for _, v in flat:
    v.set_value(jnp.asarray((rng.standard_normal(v.shape) * std).astype(np.float32)).astype(v.dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
