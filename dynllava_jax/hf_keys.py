"""Key-name tables between HF / released LLaVA checkpoints and our NNX parameter paths.

Three file layouts ('hf5', 'llava15hf', 'original'; prefixes per layout: `_PREFIXES`, the table in
docs/checkpoints.md, "Supported layouts"), one canonical name space in between. A separate CLIP directory
(`clip_dir`) uses `vision_model.*`. MQT-LLaVA's released `Resampler` keeps its names under the projector
prefix; its `proj` (w, H) is a bare matrix used as x @ proj: stored as our kernel, no transpose.

Canonical names are the HF 5.x names under short roots: `lm.`, `lm_head.`, `vt.`, `proj.`, `pred_image.`,
`pred_text.`, `pred_instruct.`. `PARAMS` maps a canonical name (with `{i}` for a stacked layer) to our
parameter path and the transform applied when reading (`linear`: torch (out, in) -> kernel (in, out);
`patch`: CLIP conv (D, 3, p, p) -> kernel (p·p·3, D) in (row, col, channel) order; `copy`).
"""
import re

import numpy as np

LAYOUTS = ('hf5', 'llava15hf', 'original')

# (canonical prefix, file prefix) per layout, most specific first. Read-only aliases follow '|' lists.
_PREFIXES = {
    'hf5': [
        ('lm.', 'model.language_model.'), ('lm_head.', 'lm_head.'), ('vt.', 'model.vision_tower.'),
        ('proj.', 'model.multi_modal_projector.'), ('pred_image.', 'model.image_score_predictor.'),
        ('pred_text.', 'model.output_text_score_predictor.'),
        ('pred_instruct.', 'model.instruct_score_predictor.')],
    'llava15hf': [
        ('lm.', 'language_model.model.'), ('lm_head.', 'language_model.lm_head.'),
        ('vt.', 'vision_tower.vision_model.'), ('proj.', 'multi_modal_projector.'),
        ('pred_image.', 'image_score_predictor.'), ('pred_text.', 'output_text_score_predictor.'),
        ('pred_instruct.', 'instruct_score_predictor.')],
    'original': [
        ('proj.linear_1.', 'model.mm_projector.0.'), ('proj.linear_2.', 'model.mm_projector.2.'),
        ('proj.', 'model.mm_projector.'),      # MQT-LLaVA's Resampler: model.mm_projector.{query, ...}
        ('vt.', 'model.vision_tower.vision_tower.vision_model.'),
        ('pred_image.', 'model.image_score_predictor.'),
        ('pred_text.', 'model.output_text_score_predictor.'),
        ('pred_instruct.', 'model.instruct_score_predictor.'),
        ('lm_head.', 'lm_head.'), ('lm.', 'model.')],
    'clip': [('vt.', 'vision_model.')],
}
# Extra file prefixes accepted on read (transformers 5.x writes CLIP without `vision_model.`, older
# versions and llava-1.5-hf with it; a bare CLIPVisionModel 5.x dir has no prefix at all).
_READ_ALIASES = {
    'hf5': [('vt.', 'model.vision_tower.vision_model.')],
    'llava15hf': [('vt.', 'vision_tower.')],
    'original': [],
    'clip': [('vt.', 'vision_tower.vision_model.'), ('vt.', '')],
}

# Buffers some writers store that are not parameters: skipped on read.
IGNORED_SUFFIXES = ('.position_ids', 'rotary_emb.inv_freq')
# A full CLIPModel directory also holds the text tower: skipped when reading `clip_dir`.
CLIP_IGNORED_PREFIXES = ('text_model.', 'text_projection.', 'visual_projection.', 'logit_scale')

_VT_LAYER = 'vt.encoder.layers.{i}.'
_LM_LAYER = 'lm.layers.{i}.'
_PRED_BLOCK = 'pred_image.transformer.{i}.'

# canonical name -> (our path with '{i}' for the stacked layer index, transform)
PARAMS = {
    'vt.embeddings.class_embedding': ('vision_tower.class_embed', 'copy'),
    'vt.embeddings.patch_embedding.weight': ('vision_tower.patch_embed.kernel', 'patch'),
    'vt.embeddings.position_embedding.weight': ('vision_tower.pos_embed', 'copy'),
    'vt.pre_layrnorm.weight': ('vision_tower.pre_ln.weight', 'copy'),
    'vt.pre_layrnorm.bias': ('vision_tower.pre_ln.bias', 'copy'),
    'vt.post_layernorm.weight': ('vision_tower.post_ln.weight', 'copy'),
    'vt.post_layernorm.bias': ('vision_tower.post_ln.bias', 'copy'),
    'proj.linear_1.weight': ('projector.linear_1.kernel', 'linear'),
    'proj.linear_1.bias': ('projector.linear_1.bias', 'copy'),
    'proj.linear_2.weight': ('projector.linear_2.kernel', 'linear'),
    'proj.linear_2.bias': ('projector.linear_2.bias', 'copy'),
    'lm.embed_tokens.weight': ('language_model.embed_tokens.embedding', 'copy'),
    'lm.norm.weight': ('language_model.norm.weight', 'copy'),
    'lm_head.weight': ('language_model.lm_head.kernel', 'linear'),
}
for _hf, _ours in [('self_attn.q_proj', 'q'), ('self_attn.k_proj', 'k'), ('self_attn.v_proj', 'v'),
                   ('self_attn.out_proj', 'o'), ('mlp.fc1', 'fc1'), ('mlp.fc2', 'fc2')]:
  PARAMS[_VT_LAYER + _hf + '.weight'] = (f'vision_tower.layers.{{i}}.{_ours}.kernel', 'linear')
  PARAMS[_VT_LAYER + _hf + '.bias'] = (f'vision_tower.layers.{{i}}.{_ours}.bias', 'copy')
for _hf, _ours in [('layer_norm1', 'ln1'), ('layer_norm2', 'ln2')]:
  for _w in ('weight', 'bias'):
    PARAMS[f'{_VT_LAYER}{_hf}.{_w}'] = (f'vision_tower.layers.{{i}}.{_ours}.{_w}', 'copy')
for _p in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
  PARAMS[f'{_LM_LAYER}self_attn.{_p}.weight'] = (f'language_model.layers.{{i}}.attn.{_p}.kernel', 'linear')
for _p in ('gate_proj', 'up_proj', 'down_proj'):
  PARAMS[f'{_LM_LAYER}mlp.{_p}.weight'] = (f'language_model.layers.{{i}}.mlp.{_p}.kernel', 'linear')
PARAMS[_LM_LAYER + 'input_layernorm.weight'] = ('language_model.layers.{i}.input_norm.weight', 'copy')
PARAMS[_LM_LAYER + 'post_attention_layernorm.weight'] = ('language_model.layers.{i}.post_norm.weight', 'copy')


def _linear(canon, ours):
  PARAMS[canon + '.weight'] = (ours + '.kernel', 'linear')
  PARAMS[canon + '.bias'] = (ours + '.bias', 'copy')


def _norm(canon, ours):
  PARAMS[canon + '.weight'] = (ours + '.weight', 'copy')
  PARAMS[canon + '.bias'] = (ours + '.bias', 'copy')


# MQT-LLaVA Resampler (dynllava_jax/model/mqt.py).
PARAMS['proj.query'] = ('projector.query', 'copy')
PARAMS['proj.pos_embed'] = ('projector.pos_embed', 'copy')
PARAMS['proj.attn.in_proj_weight'] = ('projector.in_proj.kernel', 'linear')
PARAMS['proj.attn.in_proj_bias'] = ('projector.in_proj.bias', 'copy')
_linear('proj.attn.out_proj', 'projector.out_proj')
for _n in ('ln_q', 'ln_k', 'ln_v'):
  _norm(f'proj.{_n}', f'projector.{_n}')
PARAMS['proj.proj'] = ('projector.proj.kernel', 'copy')

# Released VisionPredictor: down_mlp = [LayerNorm, Linear, GELU]; transformer.{i} = timm block;
# output_mlp = [Linear, GELU, Linear, GELU, Linear].
_norm('pred_image.down_mlp.0', 'image_score_predictor.down_ln')
_linear('pred_image.down_mlp.1', 'image_score_predictor.down')
_norm(_PRED_BLOCK + 'norm1', 'image_score_predictor.blocks.{i}.norm1')
PARAMS[_PRED_BLOCK + 'attn.qkv.weight'] = ('image_score_predictor.blocks.{i}.qkv.kernel', 'linear')
_linear(_PRED_BLOCK + 'attn.proj', 'image_score_predictor.blocks.{i}.proj')
_norm(_PRED_BLOCK + 'norm2', 'image_score_predictor.blocks.{i}.norm2')
_linear(_PRED_BLOCK + 'mlp.fc1', 'image_score_predictor.blocks.{i}.fc1')
_linear(_PRED_BLOCK + 'mlp.fc2', 'image_score_predictor.blocks.{i}.fc2')
for _j, _k in [(0, 1), (2, 2), (4, 3)]:
  _linear(f'pred_image.output_mlp.{_j}', f'image_score_predictor.head_{_k}')
# Released TextPredictor: output_mlp = [LayerNorm, Linear, GELU, Linear, GELU, Linear, GELU, Linear].
for _root, _ours in [('pred_text', 'output_text_score_predictor'), ('pred_instruct', 'instruct_score_predictor')]:
  _norm(f'{_root}.output_mlp.0', f'{_ours}.ln')
  for _j, _k in [(1, 1), (3, 2), (5, 3), (7, 4)]:
    _linear(f'{_root}.output_mlp.{_j}', f'{_ours}.fc_{_k}')


def _compile():
  out = []
  for canon, (ours, kind) in PARAMS.items():
    pat = '^' + re.escape(canon).replace(re.escape('{i}'), r'(\d+)') + '$'
    out.append((re.compile(pat), canon, ours, kind))
  return out


_PATTERNS = _compile()


def canonical_from_file(key, layout):
  """File key -> canonical name, or None when no prefix of `layout` matches."""
  for canon, file in _PREFIXES[layout] + _READ_ALIASES[layout]:
    if key.startswith(file):
      return canon + key[len(file):]
  return None


def file_from_canonical(canon, layout):
  """Canonical name -> the file key `layout` writes."""
  for c, file in _PREFIXES[layout]:
    if canon.startswith(c):
      return file + canon[len(c):]
  raise KeyError(f'canonical key {canon!r} has no prefix in layout {layout!r}')


def param_of(canon):
  """Canonical name -> (our path tuple, layer index or None, transform), or None if unknown."""
  for pat, _, ours, kind in _PATTERNS:
    m = pat.match(canon)
    if m:
      i = int(m.group(1)) if m.groups() else None
      path = ours.split('.')
      if i is not None:
        path.remove('{i}')
      return tuple(path), i, kind
  return None


_GROUP = re.compile(r'^layers_(\d+)$')


def canonical_names(flat_paths):
  """All canonical names our model needs: [(canon, path, layer index | None, transform)].

  flat_paths: {path tuple: shape} of the model's parameters (stacked leaves have the layer axis first).
  Decoder layers may be split over layer-plan groups (`model/plan.py`): the group starting at layer s
  holds its layers under `language_model.layers_<s>` (s = 0: `language_model.layers`); canonical layer
  numbers are global.
  """
  out = []
  for canon, (ours, kind) in PARAMS.items():
    parts = ours.split('.')
    stacked = '{i}' in parts
    path = tuple(p for p in parts if p != '{i}')
    homes = [(path, 0)]
    if path[:2] == ('language_model', 'layers'):
      homes += [(p, int(_GROUP.match(p[1]).group(1))) for p in flat_paths
                if p[0] == 'language_model' and isinstance(p[1], str) and _GROUP.match(p[1]) and p[2:] == path[2:]]
    for home, offset in homes:
      if home not in flat_paths:
        continue
      if stacked:
        for i in range(flat_paths[home][0]):
          out.append((canon.replace('{i}', str(offset + i)), home, i, kind))
      else:
        out.append((canon, home, None, kind))
  return out


def skipped_layer_names(mc, canonical):
  """The canonical names among `canonical` that belong to decoder layers the layer plan skips (pruned
  layers: their weights are in the file, the model has no place for them)."""
  from dynllava_jax.model import plan as P  # pylint: disable=g-import-not-at-top
  skipped = set(P.skipped_layers(P.resolve(mc)))
  if not skipped:
    return set()
  out = set()
  for c in canonical:
    m = re.match(r'^lm\.layers\.(\d+)\.', c)
    if m and int(m.group(1)) in skipped:
      out.add(c)
  return out


def to_ours(x, kind):
  """Stored tensor (numpy) -> our layout for one slice."""
  if kind == 'linear':
    if x.ndim != 2:
      raise ValueError(f'expected a 2-D Linear weight, got shape {x.shape}')
    return x.T
  if kind == 'patch':
    if x.ndim != 4:
      raise ValueError(f'expected a 4-D conv weight (D, 3, p, p), got shape {x.shape}')
    d = x.shape[0]
    return x.transpose(2, 3, 1, 0).reshape(-1, d)
  return x


def from_ours(x, kind, patch_size=None):
  """Our slice (numpy) -> the stored tensor layout."""
  if kind == 'linear':
    return np.ascontiguousarray(x.T)
  if kind == 'patch':
    d = x.shape[-1]
    p = patch_size
    return np.ascontiguousarray(x.reshape(p, p, 3, d).transpose(3, 2, 0, 1))
  return np.ascontiguousarray(x)


def expected_stored_shape(shape, kind, patch_size=None):
  """Our slice shape -> the stored tensor shape (for error messages)."""
  if kind == 'linear':
    return tuple(shape[::-1])
  if kind == 'patch':
    return (shape[1], 3, patch_size, patch_size)
  return tuple(shape)
