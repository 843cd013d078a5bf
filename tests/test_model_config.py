"""Published parameter counts from abstract models (no weights allocated) and config validation errors."""
import jax
import numpy as np
import pytest
from flax import nnx

from configs.common import model_config
from dynllava_jax import hf
from dynllava_jax.model.llava import check_model_config

# config.json of llava-hf/llava-1.5-{7b,13b}-hf as published (transformers 4.36 writes only non-defaults).
LLAVA_7B_HF = {
    'architectures': ['LlavaForConditionalGeneration'], 'ignore_index': -100, 'image_token_index': 32000,
    'model_type': 'llava', 'pad_token_id': 32001, 'projector_hidden_act': 'gelu',
    'text_config': {'_name_or_path': 'lmsys/vicuna-7b-v1.5', 'architectures': ['LlamaForCausalLM'],
                    'max_position_embeddings': 4096, 'model_type': 'llama', 'rms_norm_eps': 1e-05,
                    'torch_dtype': 'float16', 'vocab_size': 32064},
    'tie_word_embeddings': False, 'torch_dtype': 'float16',
    'vision_config': {'hidden_size': 1024, 'image_size': 336, 'intermediate_size': 4096,
                      'model_type': 'clip_vision_model', 'num_attention_heads': 16, 'num_hidden_layers': 24,
                      'patch_size': 14, 'projection_dim': 768, 'vocab_size': 32000},
    'vision_feature_layer': -2, 'vision_feature_select_strategy': 'default', 'vocab_size': 32064}
LLAVA_13B_TEXT = {'hidden_size': 5120, 'intermediate_size': 13824, 'num_attention_heads': 40,
                  'num_hidden_layers': 40, 'num_key_value_heads': 40}
# liuhaotian/llava-v1.5-7b (original layout, 32000-token vocabulary, CLIP named by hub id).
LLAVA_7B_ORIGINAL = {
    'architectures': ['LlavaLlamaForCausalLM'], 'bos_token_id': 1, 'eos_token_id': 2, 'hidden_act': 'silu',
    'hidden_size': 4096, 'image_aspect_ratio': 'pad', 'intermediate_size': 11008, 'max_position_embeddings': 4096,
    'mm_hidden_size': 1024, 'mm_projector_type': 'mlp2x_gelu', 'mm_use_im_patch_token': False,
    'mm_use_im_start_end': False, 'mm_vision_select_feature': 'patch', 'mm_vision_select_layer': -2,
    'mm_vision_tower': 'openai/clip-vit-large-patch14-336', 'model_type': 'llava', 'num_attention_heads': 32,
    'num_hidden_layers': 32, 'num_key_value_heads': 32, 'pad_token_id': 0, 'rms_norm_eps': 1e-05,
    'rope_scaling': None, 'tie_word_embeddings': False, 'vocab_size': 32000}

PUBLISHED = {'7b': 7_063_427_072, '13b': 13_351_494_656}


def count(config):
  abstract = hf.abstract_llava(config)
  leaves = jax.tree.leaves(nnx.state(abstract))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)    # nothing allocated
  return sum(int(np.prod(x.shape)) for x in leaves)


def test_published_parameter_counts():
  c7, family = hf.config_from_hf(LLAVA_7B_HF)
  assert family == 'hf'
  assert (c7.image_token_id, c7.pad_token_id, c7.llm.rms_eps, c7.llm.kv_heads) == (32000, 32001, 1e-5, 32)
  assert count(c7) == PUBLISHED['7b']
  preset = model_config('7b')
  assert c7.llm.to_dict() == preset.llm.to_dict() and c7.vision.to_dict() == preset.vision.to_dict()
  cfg13 = dict(LLAVA_7B_HF, text_config=dict(LLAVA_7B_HF['text_config'], **LLAVA_13B_TEXT))
  c13, _ = hf.config_from_hf(cfg13)
  assert count(c13) == PUBLISHED['13b']
  co, family = hf.config_from_hf(LLAVA_7B_ORIGINAL)
  assert family == 'original' and co.source_vocab_size == 32000 and co.llm.vocab_size == 32064
  assert (co.image_token_id, co.pad_token_id) == (32000, 32001)
  assert count(co) == PUBLISHED['7b']
  for size in ('7b', '13b'):
    assert count(model_config(size)) == PUBLISHED[size]


def broken(path, value):
  c = model_config('tiny')
  c.sparse.enabled = True
  node = c
  *parents, leaf = path.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  return c


@pytest.mark.parametrize('path,value,needle', [
    ('llm.heads', 5, 'heads=5'),
    ('llm.kv_heads', 3, 'kv_heads=3'),
    ('vision.heads', 5, 'heads=5'),
    ('sparse.sparse_layer', 4, 'sparse_layer=4'),
    ('sparse.image_keep_ratio', 0.0, 'image_keep_ratio=0.0'),
    ('sparse.text_keep_ratio', 1.5, 'text_keep_ratio=1.5'),
    ('image_token_id', 999, 'image_token_id=999'),
])
def test_config_validation(path, value, needle):
  with pytest.raises(ValueError) as e:
    check_model_config(broken(path, value))
  assert needle in str(e.value) and '\n' not in str(e.value)
  with pytest.raises(ValueError, match=needle.split('=')[0]):
    hf.abstract_llava(broken(path, value))


def test_hf_config_rejections():
  bad = dict(LLAVA_7B_ORIGINAL, mm_projector_type='linear')
  with pytest.raises(ValueError, match="mm_projector_type='linear'"):
    hf.config_from_hf(bad)
  bad = dict(LLAVA_7B_HF, vision_feature_layer=[-2, -5])
  with pytest.raises(ValueError, match='vision_feature_layer'):
    hf.config_from_hf(bad)
  bad = dict(LLAVA_7B_HF, text_config=dict(LLAVA_7B_HF['text_config'], hidden_act='gelu'))
  with pytest.raises(ValueError, match="hidden_act='gelu'"):
    hf.config_from_hf(bad)


def test_sincos2d_position_init():
  """vision.pos_init='sincos2d' only changes the initial position table: a fixed 2-D sine-cosine table
  (row-major patches, CLS row 0); 'normal' stays HF CLIP's N(0, 0.02)."""
  from dynllava_jax.model.vision import VisionTower, sincos2d
  vc = model_config('tiny').vision
  side, w = vc.image_size // vc.patch_size, vc.width
  table = np.asarray(sincos2d(side, w))
  q = w // 4
  assert table.shape == (side * side, w)
  np.testing.assert_allclose(table[0], np.r_[np.zeros(q), np.ones(q), np.zeros(q), np.ones(q)], atol=1e-7)
  # patch (y=1, x=2): x-terms at 2·ω, y-terms at 1·ω
  omega = 1.0 / 10000 ** (np.arange(q) / q)
  np.testing.assert_allclose(table[side + 2], np.r_[np.sin(2 * omega), np.cos(2 * omega),
                                                    np.sin(omega), np.cos(omega)], atol=1e-6)
  vc.pos_init = 'sincos2d'
  pos = np.asarray(VisionTower(vc, rngs=nnx.Rngs(0)).pos_embed[...])
  np.testing.assert_array_equal(pos[0], 0)
  np.testing.assert_allclose(pos[1:], table, atol=1e-7)
  vc.pos_init = 'normal'
  pos = np.asarray(VisionTower(vc, rngs=nnx.Rngs(0)).pos_embed[...])
  assert 0.01 < pos.std() < 0.03
