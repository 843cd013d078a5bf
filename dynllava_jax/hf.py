"""Import / export of LLaVA-1.5 and Dynamic-LLaVA checkpoints (HF transformers and released layouts).

    from dynllava_jax import hf
    model, config = hf.load_llava('path/to/hf_dir', dtype=jnp.float32)   # NNX Llava + its model config
    logits = model(input_ids, pixel_values, attention_mask)               # (B, T, vocab) float32
    hf.save_llava(model, config, 'out_dir', layout='hf5')                 # 'hf5' | 'llava15hf' | 'original'

Reads `config.json` plus (sharded) safetensors, or failing those `pytorch_model.bin[.index.json]`, any stored
dtype; layouts and key names: `hf_keys`. Loading streams tensor by tensor into abstractly built leaves,
each placed on its device(s) (only its shard with `shardings=` / `mesh=`) before the next is read.
Original-layout vocabularies (V, no `<image>`) are padded with mean rows; `config.source_vocab_size` = V
(a bit-exact 'original' export) and `config.llm.text_vocab_size` = V (padded ids take no part in the loss
or sampling). How loading works and the vocabulary: docs/checkpoints.md.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynllava_jax.presets import model_config
from dynllava_jax import hf_keys as K
from dynllava_jax.errors import UserError, one_line
from dynllava_jax.model.llava import Llava, check_model_config

SAFE_SINGLE, SAFE_INDEX = 'model.safetensors', 'model.safetensors.index.json'
BIN_SINGLE, BIN_INDEX = 'pytorch_model.bin', 'pytorch_model.bin.index.json'
DEFAULT_SHARD_BYTES = 5 * 10**9

# transformers' defaults for fields a config.json may omit (older writers only store non-defaults).
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=None, rms_norm_eps=1e-6,
                      rope_theta=10000.0, max_position_embeddings=2048, hidden_act='silu',
                      bos_token_id=1, eos_token_id=2, pad_token_id=None, attention_bias=False,
                      mlp_bias=False, head_dim=None, tie_word_embeddings=False)
CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     image_size=224, patch_size=32, layer_norm_eps=1e-5, hidden_act='quick_gelu',
                     num_channels=3)
LLAVA_DEFAULTS = dict(image_token_index=32000, vision_feature_layer=-2,
                      vision_feature_select_strategy='default', projector_hidden_act='gelu',
                      multimodal_projector_bias=True)
# Vision towers the original LLaVA config names only by hub id (`mm_vision_tower`).
KNOWN_CLIP = {
    'openai/clip-vit-large-patch14-336': dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=336, patch_size=14),
    'openai/clip-vit-large-patch14': dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, image_size=224, patch_size=14),
}
# Released `sparse_config` field -> our `model.sparse` field.
SPARSE_FIELDS = {'sparse_layer': 'sparse_layer', 'd_model': 'd_model', 'nhead': 'nhead',
                 'dim_feedforward': 'dim_feedforward', 'num_layers': 'num_layers',
                 'vision_keep_rate': 'image_keep_ratio', 'output_text_keep_rate': 'text_keep_ratio',
                 'instruct_keep_rate': 'instruct_keep_ratio', 'output_text_len_for_training': 'len_ot',
                 'instruct_len_for_training': 'instruct_min_len', 'mask_loss_weight': 'lambda_ratio',
                 'text_layer': 'text_layer'}   # ours (-1 = sparse_layer); the released code has no such field


# ----------------------------------------------------------------------------------------------- reading


class Checkpoint:
  """Lazy tensor reader over a checkpoint directory: `keys()`, `get(key) -> np.ndarray` (stored dtype)."""

  def __init__(self, path):
    self.path = str(path)
    if not os.path.isdir(self.path):
      raise FileNotFoundError(f'checkpoint directory {self.path} does not exist')
    self._handles, self.files = {}, {}
    names = set(os.listdir(self.path))
    if SAFE_INDEX in names or SAFE_SINGLE in names:
      self.kind = 'safetensors'
      self.files = self._index(SAFE_INDEX, SAFE_SINGLE, names)
    elif BIN_INDEX in names or BIN_SINGLE in names:
      self.kind = 'bin'
      self.files = self._index(BIN_INDEX, BIN_SINGLE, names)
    else:
      raise FileNotFoundError(
          f'{self.path} has no {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}: '
          'point at a HF / LLaVA checkpoint directory')

  def _index(self, index_name, single_name, names):
    if index_name in names:
      with open(os.path.join(self.path, index_name)) as f:
        return dict(json.load(f)['weight_map'])
    return {k: single_name for k in self._open(single_name).keys()}

  def _open(self, name):
    if name not in self._handles:
      full = os.path.join(self.path, name)
      if not os.path.exists(full):
        raise FileNotFoundError(f'{full} is listed in the checkpoint index but missing')
      if self.kind == 'safetensors':
        from safetensors import safe_open
        try:
          self._handles[name] = safe_open(full, framework='numpy')
        except Exception as e:  # SafetensorError is not an OSError / ValueError
          raise UserError(f'{full} is truncated or not a safetensors file ({one_line(e, 120)}); '
                          'copy or download it again') from None
      else:
        try:
          import torch  # pylint: disable=g-import-not-at-top
        except ImportError:
          raise UserError(f'{full}: a PyTorch .bin checkpoint needs torch to read it (requirements-test.txt '
                          'pins the CPU build), or its safetensors form') from None
        try:
          self._handles[name] = torch.load(full, map_location='cpu', mmap=True, weights_only=True)
        except Exception as e:  # UnpicklingError (a pickle payload) / RuntimeError (not a torch file)
          raise UserError(f'{full}: not a plain tensor file (torch refuses it with weights_only: '
                          f'{type(e).__name__}); convert it to safetensors') from None
    return self._handles[name]

  def _read(self, fn, key):
    try:
      return fn()
    except UserError:
      raise
    except Exception as e:  # a tensor whose bytes lie past the end of a truncated file
      raise UserError(f'{os.path.join(self.path, self.files[key])}: tensor {key} does not read '
                      f'({one_line(e, 120)}); the file is truncated or damaged, copy it again') from None

  def keys(self):
    return list(self.files)

  def get(self, key):
    h = self._open(self.files[key])
    if self.kind == 'safetensors':
      return self._read(lambda: h.get_tensor(key), key)
    t = h[key]
    import torch
    if t.dtype == torch.bfloat16:
      import ml_dtypes
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()

  def get_shape(self, key):
    h = self._open(self.files[key])
    if self.kind == 'safetensors':
      return tuple(h.get_slice(key).get_shape())
    return tuple(h[key].shape)


def _read_json(path):
  full = os.path.join(str(path), 'config.json')
  if not os.path.exists(full):
    raise FileNotFoundError(f'{full} not found: a checkpoint directory needs its config.json')
  with open(full) as f:
    return json.load(f)


# ------------------------------------------------------------------------------------------------ config


def detect_family(cfg):
  """'hf' (LlavaForConditionalGeneration) or 'original' (LlavaLlamaForCausalLM / Dynamic-LLaVA)."""
  archs = cfg.get('architectures') or []
  if 'mm_vision_tower' in cfg or 'mm_hidden_size' in cfg or any('LlavaLlama' in a for a in archs):
    return 'original'
  if cfg.get('model_type') == 'llava' and ('text_config' in cfg or 'vision_config' in cfg) or \
      'LlavaForConditionalGeneration' in archs:
    return 'hf'
  raise ValueError(
      f"config.json describes architecture {archs or None} (model_type {cfg.get('model_type')!r}); "
      'expected LlavaForConditionalGeneration (HF llava) or LlavaLlamaForCausalLM (original LLaVA-1.5)')


def _with_defaults(d, defaults):
  out = dict(defaults)
  out.update({k: v for k, v in (d or {}).items() if v is not None or k not in defaults})
  return out


def _rope_theta(tc):
  rp = tc.get('rope_parameters') or {}
  rs = tc.get('rope_scaling') or {}
  kind = rp.get('rope_type', rs.get('rope_type', rs.get('type', 'default')))
  if kind not in ('default', None):
    raise ValueError(f'text config uses rope_type {kind!r}; only plain RoPE (default) is supported')
  return float(rp.get('rope_theta', tc.get('rope_theta', 10000.0)))


def _fill_llm(c, tc):
  tc = _with_defaults(tc, LLAMA_DEFAULTS)
  for name, want in [('hidden_act', 'silu'), ('attention_bias', False), ('mlp_bias', False),
                     ('tie_word_embeddings', False)]:
    if tc[name] != want:
      raise ValueError(f'text config has {name}={tc[name]!r}; LLaVA-1.5 (LLaMA) needs {want!r}')
  lc = c.llm
  lc.vocab_size, lc.hidden = int(tc['vocab_size']), int(tc['hidden_size'])
  lc.layers, lc.heads = int(tc['num_hidden_layers']), int(tc['num_attention_heads'])
  lc.kv_heads = int(tc['num_key_value_heads'] or lc.heads)
  lc.mlp_dim = int(tc['intermediate_size'])
  lc.head_dim = int(tc['head_dim'] or lc.hidden // max(lc.heads, 1))
  lc.rope_theta = _rope_theta(tc)
  lc.rms_eps = float(tc['rms_norm_eps'])
  lc.max_position = int(tc['max_position_embeddings'])
  c.bos_token_id, c.eos_token_id = int(tc['bos_token_id']), int(_first(tc['eos_token_id']))
  return tc


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x


def _fill_vision(c, vc):
  vc = _with_defaults(vc, CLIP_DEFAULTS)
  if vc['hidden_act'] != 'quick_gelu':
    raise ValueError(f"vision config has hidden_act={vc['hidden_act']!r}; CLIP needs 'quick_gelu'")
  if int(vc['num_channels']) != 3:
    raise ValueError(f"vision config has num_channels={vc['num_channels']}; only RGB (3) is supported")
  v = c.vision
  v.image_size, v.patch_size = int(vc['image_size']), int(vc['patch_size'])
  v.width, v.depth = int(vc['hidden_size']), int(vc['num_hidden_layers'])
  v.heads, v.mlp_dim = int(vc['num_attention_heads']), int(vc['intermediate_size'])
  v.layer_norm_eps = float(vc['layer_norm_eps'])


def _feature_layer(x):
  if isinstance(x, (list, tuple)):
    raise ValueError(f'vision_feature_layer={list(x)}: multi-layer feature concatenation is not supported')
  return int(x)


def _clip_vision_dict(clip_cfg):
  return clip_cfg.get('vision_config', clip_cfg) if clip_cfg else None


def config_from_hf(cfg, keys=(), clip_cfg=None, shapes=None):
  """config.json dict (+ checkpoint keys for predictors) -> (model ConfigDict, family).

  shapes: callable key -> stored shape, used to infer predictor widths absent from config.json.
  """
  family = detect_family(cfg)
  c = model_config('tiny')
  c.source_vocab_size = 0
  if family == 'hf':
    cfg = _with_defaults(cfg, LLAVA_DEFAULTS)
    if cfg['projector_hidden_act'] != 'gelu' or not cfg['multimodal_projector_bias']:
      raise ValueError('LLaVA-1.5 needs projector_hidden_act=gelu with bias; config.json has '
                       f"{cfg['projector_hidden_act']!r} bias={cfg['multimodal_projector_bias']}")
    tc = _fill_llm(c, cfg.get('text_config'))
    _fill_vision(c, _clip_vision_dict(clip_cfg) or cfg.get('vision_config'))
    c.vision.feature_layer = _feature_layer(cfg['vision_feature_layer'])
    c.vision.feature_select = cfg['vision_feature_select_strategy']
    c.image_token_id = int(cfg.get('image_token_id', cfg['image_token_index']))
    pad = tc['pad_token_id'] if tc['pad_token_id'] is not None else cfg.get('pad_token_id')
    c.pad_token_id = int(pad) if pad is not None else c.image_token_id + 1
    c.llm.text_vocab_size = int(cfg.get('text_vocab_size') or 0)     # written by our export
  else:
    tc = _fill_llm(c, cfg)
    ptype = cfg.get('mm_projector_type', 'linear')
    if ptype != 'mlp2x_gelu' and 'proj.query' not in keys:     # MQT is recognised by its tensors
      raise ValueError(f"mm_projector_type={ptype!r}: only LLaVA-1.5's 'mlp2x_gelu' is supported")
    if cfg.get('mm_use_im_start_end') or cfg.get('mm_use_im_patch_token'):
      raise ValueError('mm_use_im_start_end / mm_use_im_patch_token add image marker tokens; LLaVA-1.5 uses neither')
    if 'anyres' in str(cfg.get('image_aspect_ratio', '')):
      raise ValueError('image_aspect_ratio=anyres (LLaVA-NeXT) is not supported; LLaVA-1.5 uses pad')
    vdict = _clip_vision_dict(clip_cfg) or cfg.get('vision_config') or KNOWN_CLIP.get(cfg.get('mm_vision_tower'))
    if vdict is None:
      raise ValueError(f"vision tower {cfg.get('mm_vision_tower')!r} is unknown: pass clip_dir= (its HF dir)")
    _fill_vision(c, vdict)
    if 'mm_hidden_size' in cfg and int(cfg['mm_hidden_size']) != c.vision.width:
      raise ValueError(f"mm_hidden_size={cfg['mm_hidden_size']} differs from the vision width {c.vision.width}")
    c.vision.feature_layer = _feature_layer(cfg.get('mm_vision_select_layer', -2))
    sel = cfg.get('mm_vision_select_feature', 'patch')
    if sel not in ('patch', 'cls_patch'):
      raise ValueError(f"mm_vision_select_feature={sel!r}: use 'patch' or 'cls_patch'")
    c.vision.feature_select = 'default' if sel == 'patch' else 'full'
    if 'image_token_index' in cfg:     # written by our export
      c.image_token_id = int(cfg['image_token_index'])
      c.pad_token_id = int(cfg['pad_token_id'] if cfg.get('pad_token_id') is not None else c.image_token_id + 1)
      c.llm.text_vocab_size = int(cfg.get('text_vocab_size') or 0)
    else:                              # a released checkpoint: append <image>, <pad>
      v = c.llm.vocab_size
      c.source_vocab_size = v
      c.llm.vocab_size = -(-(v + 2) // 64) * 64
      c.llm.text_vocab_size = v        # the padded ids are not text: masked in the loss and sampling
      c.image_token_id, c.pad_token_id = v, v + 1
  _fill_sparse(c, cfg.get('sparse_config'), keys, shapes)
  _fill_mqt(c, cfg, keys, shapes)
  check_model_config(c)
  return c, family


def _fill_mqt(c, cfg, keys, shapes):
  """MQT-LLaVA (a `query` tensor under the projector): M from its shape; heads from our export's
  `mqt_heads`, else the release's nn.MultiheadAttention(w, 16) at w = 1024 (w / 64 in general)."""
  if 'proj.query' not in keys:
    return
  c.projector = 'mqt'
  c.mqt.queries = int(shapes('proj.query')[0])
  c.mqt.heads = int(cfg.get('mqt_heads') or max(1, c.vision.width // 64))


def _fill_sparse(c, sparse_cfg, keys, shapes):
  canon = [k for k in keys if k.startswith('pred_')]
  sc = c.sparse
  sc.enabled = any(k.startswith('pred_image.') for k in canon)
  sc.use_instruct = any(k.startswith('pred_instruct.') for k in canon)
  if not sc.enabled:
    return
  if sparse_cfg:
    for theirs, ours in SPARSE_FIELDS.items():
      if theirs in sparse_cfg:
        sc[ours] = type(sc[ours])(sparse_cfg[theirs])
  else:   # infer widths from the tensors (nhead cannot be seen: the released default 8 is kept)
    sc.sparse_layer = 2
    sc.d_model = int(shapes('pred_image.down_mlp.1.weight')[0])
    blocks = {int(k.split('.')[2]) for k in canon if k.startswith('pred_image.transformer.')}
    sc.num_layers = len(blocks)
    if blocks:
      sc.dim_feedforward = int(shapes('pred_image.transformer.0.mlp.fc1.weight')[0])


def _has_weights(path):
  return any(os.path.exists(os.path.join(path, n)) for n in (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX))


def _clip_dir(cfg, path, clip_dir):
  """The CLIP directory to read: clip_dir, else an original config's `mm_vision_tower` when it names a local
  directory with a config.json (relative to the checkpoint directory, or as given), else None."""
  if clip_dir:
    if not os.path.isdir(str(clip_dir)):
      raise FileNotFoundError(f'clip_dir {clip_dir} does not exist')
    return str(clip_dir)
  tower = cfg.get('mm_vision_tower')
  if detect_family(cfg) != 'original' or not isinstance(tower, str) or not tower:
    return None
  for d in (os.path.join(str(path), tower), tower):
    if os.path.isfile(os.path.join(d, 'config.json')):
      return d
  return None


def read_config(path, clip_dir=None):
  """Model ConfigDict of a checkpoint directory without reading any tensor."""
  ckpt = Checkpoint(path)
  cfg = _read_json(path)
  clip_dir = _clip_dir(cfg, path, clip_dir)
  layout = _layout(cfg, ckpt.keys())
  canon = {K.canonical_from_file(k, layout): k for k in ckpt.keys()}
  canon.pop(None, None)
  clip_cfg = _read_json(clip_dir) if clip_dir else None
  mc, _ = config_from_hf(cfg, list(canon), clip_cfg, shapes=lambda ck: ckpt.get_shape(canon[ck]))
  return mc


def _layout(cfg, keys):
  if detect_family(cfg) == 'original':
    return 'original'
  if any(k.startswith('language_model.') for k in keys):
    return 'llava15hf'
  return 'hf5'


def abstract_llava(config):
  """Abstract (no memory) Llava for a model config: shapes, dtypes and logical sharding names."""
  return nnx.eval_shape(lambda: Llava(config, rngs=nnx.Rngs(0)))


# ------------------------------------------------------------------------------------------------ loading


def _skip(key):
  return key.endswith(K.IGNORED_SUFFIXES)


def _sources(ckpt, layout, clip):
  """canonical name -> (Checkpoint, file key); unknown file keys listed separately."""
  out, unknown = {}, []
  for src, lay in [(ckpt, layout)] + ([(clip, 'clip')] if clip is not None else []):
    for key in src.keys():
      if _skip(key) or (lay == 'clip' and key.startswith(K.CLIP_IGNORED_PREFIXES)):
        continue
      canon = K.canonical_from_file(key, lay)
      if canon is None or K.param_of(canon) is None:
        unknown.append(key)
      elif lay == 'clip' and canon in out:
        continue     # weights inside the checkpoint win over clip_dir
      else:
        out[canon] = (src, key)
  return out, unknown


def _names(keys, n=6):
  keys = sorted(keys)
  more = f' (+{len(keys) - n} more)' if len(keys) > n else ''
  return ', '.join(keys[:n]) + more


def _np_dtype(dtype):
  return np.dtype(jnp.dtype(dtype))


def load_llava(path, dtype=jnp.float32, *, clip_dir=None, compute_dtype=None, shardings=None, mesh=None,
               layer_plan=''):
  """Loads a LLaVA-1.5 / Dynamic-LLaVA checkpoint directory -> (nnx Llava, model ConfigDict); the arguments:
  docs/checkpoints.md, "API". clip_dir: a local HF CLIP(Vision)Model directory (its config.json gives the
  vision sizes when the checkpoint's has none; its weights the tower when the checkpoint has none);
  default: an original config's `mm_vision_tower` when that names a local directory. layer_plan:
  `model.layer_plan` of the model built (the file layout does not depend on it). Raises ValueError /
  FileNotFoundError with one line naming the problem.
  """
  ckpt = Checkpoint(path)
  cfg = _read_json(path)
  layout = _layout(cfg, ckpt.keys())
  clip_dir = _clip_dir(cfg, path, clip_dir)
  clip = Checkpoint(clip_dir) if clip_dir and _has_weights(clip_dir) else None   # config.json only: sizes
  sources, unknown = _sources(ckpt, layout, clip)
  if unknown:
    raise ValueError(f'{path}: unknown keys for layout {layout!r}: {_names(unknown)}')
  clip_cfg = _read_json(clip_dir) if clip_dir else None
  mc, _ = config_from_hf(cfg, list(sources), clip_cfg,
                         shapes=lambda ck: sources[ck][0].get_shape(sources[ck][1]))
  for name, d in [('dtype', dtype), ('compute_dtype', compute_dtype or dtype)]:
    if jnp.dtype(d).name not in ('float32', 'bfloat16', 'float16'):
      raise ValueError(f'{name}={jnp.dtype(d).name}: use float32, bfloat16 or float16')
  mc.param_dtype = jnp.dtype(dtype).name
  mc.dtype = jnp.dtype(compute_dtype or dtype).name
  mc.layer_plan = layer_plan
  graphdef, state = nnx.split(abstract_llava(mc))
  flat = nnx.to_flat_state(state)
  shapes = {p: v.shape for p, v in flat}
  if mesh is not None and shardings is None:
    from dynllava_jax.sharding import state_shardings
    shardings = state_shardings(mesh, state)
  flat_sh = _flat_shardings(shardings)
  needed = K.canonical_names(shapes)
  skipped = K.skipped_layer_names(mc, sources)   # a plan with `skip` layers: their weights are not read
  sources = {c: v for c, v in sources.items() if c not in skipped}
  _check_keys(needed, sources, mc, layout, clip_dir if clip is not None else None)
  by_path = {}
  for canon, p, i, kind in needed:
    by_path.setdefault(p, []).append((canon, i, kind))
  npdt = _np_dtype(mc.param_dtype)
  for p, var in flat:
    # A 0-block image predictor keeps one unused placeholder block: it stays zero.
    buf = np.zeros(var.shape, npdt)
    for canon, i, kind in by_path.get(p, []):
      src, key = sources[canon]
      _fill_slice(buf, i, src.get(key), p, key, kind, mc)
    sh = flat_sh.get(p)
    # make_array_from_callback hands each (local) device only its own slice: multi-host safe.
    var.set_value(jax.make_array_from_callback(buf.shape, sh, lambda idx: buf[idx])
                  if sh is not None else jnp.asarray(buf))
    del buf
  model = nnx.merge(graphdef, nnx.from_flat_state(flat))
  return model, mc


def _check_keys(needed, sources, mc, layout, clip_dir):
  want = {c for c, *_ in needed}
  missing = sorted(want - set(sources))
  if mc.sparse.enabled and mc.sparse.num_layers == 0:
    missing = [m for m in missing if not m.startswith('pred_image.transformer.')]
  extra = sorted(set(sources) - want)
  if extra:
    raise ValueError(f'unknown keys (no such parameter in a model with this config.json): '
                     f'{_names(sources[c][1] for c in extra)}')
  if missing:
    if not any(c.startswith('vt.') for c in sources) and not clip_dir:
      raise ValueError(f'checkpoint has no vision tower weights (e.g. {K.file_from_canonical(missing[0], layout)}): '
                       'pass clip_dir= a local HF CLIP directory with weights')
    raise ValueError(f'missing keys for layout {layout!r}: {_names(K.file_from_canonical(m, layout) for m in missing)}')


def _flat_shardings(shardings):
  """nnx.State or nested (pure) dict of NamedSharding -> {path tuple: NamedSharding}."""
  if shardings is None:
    return {}
  if isinstance(shardings, nnx.State):
    return {p: getattr(v, 'value', v) for p, v in nnx.to_flat_state(shardings)}
  out = {}

  def walk(prefix, node):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(prefix + (k,), v)
    else:
      out[prefix] = getattr(node, 'value', node)
  walk((), shardings)
  return out


_VOCAB_PATHS = {('language_model', 'embed_tokens', 'embedding'): 0, ('language_model', 'lm_head', 'kernel'): 1}


def _fill_slice(buf, i, raw, path, key, kind, mc):
  """Checks the stored tensor's shape against config.json, transforms it and writes it into buf[i].

  For original checkpoints (`source_vocab_size`), the rows beyond the stored vocabulary get the mean row.
  """
  target = buf if i is None else buf[i]
  axis = _VOCAB_PATHS.get(path) if mc.source_vocab_size else None
  want = list(target.shape)
  if axis is not None:
    want[axis] = mc.source_vocab_size
  stored = K.expected_stored_shape(tuple(want), kind, mc.vision.patch_size)
  if tuple(raw.shape) != stored:
    raise ValueError(f'tensor {key} has shape {tuple(raw.shape)} but config.json implies {stored}')
  x = K.to_ours(raw, kind)
  if axis is None:
    target[...] = x.astype(target.dtype)
    return
  v = mc.source_vocab_size
  idx = [slice(None)] * target.ndim
  idx[axis] = slice(0, v)
  target[tuple(idx)] = x.astype(target.dtype)
  idx[axis] = slice(v, None)
  target[tuple(idx)] = x.astype(np.float32).mean(axis=axis, keepdims=True).astype(target.dtype)


# ------------------------------------------------------------------------------------------------ saving


def hf_config_dict(mc, layout, dtype_name):
  """config.json for `layout` (HF LlavaConfig for 'hf5'/'llava15hf', LlavaLlamaForCausalLM for 'original')."""
  lc, vc = mc.llm, mc.vision
  vocab = mc.source_vocab_size if (layout == 'original' and mc.get('source_vocab_size')) else lc.vocab_size
  text = dict(model_type='llama', architectures=['LlamaForCausalLM'], vocab_size=vocab, hidden_size=lc.hidden,
              intermediate_size=lc.mlp_dim, num_hidden_layers=lc.layers, num_attention_heads=lc.heads,
              num_key_value_heads=lc.kv_heads, head_dim=lc.head_dim, rms_norm_eps=lc.rms_eps,
              rope_theta=lc.rope_theta, max_position_embeddings=lc.max_position, hidden_act='silu',
              attention_bias=False, mlp_bias=False, bos_token_id=mc.bos_token_id,
              eos_token_id=mc.eos_token_id, pad_token_id=mc.pad_token_id, tie_word_embeddings=False)
  vision = dict(model_type='clip_vision_model', hidden_size=vc.width, intermediate_size=vc.mlp_dim,
                num_hidden_layers=vc.depth, num_attention_heads=vc.heads, image_size=vc.image_size,
                patch_size=vc.patch_size, layer_norm_eps=vc.layer_norm_eps, hidden_act='quick_gelu',
                num_channels=3)
  sparse = _released_sparse(mc.sparse) if mc.sparse.enabled else None
  if layout == 'original':
    out = dict(text, architectures=['DynamicLlavaLlamaForCausalLM' if sparse else 'LlavaLlamaForCausalLM'],
               model_type='dynamic_llava_llama' if sparse else 'llava_llama', torch_dtype=dtype_name,
               mm_hidden_size=vc.width, mm_projector_type='mlp2x_gelu', use_mm_proj=True,
               mm_vision_select_layer=vc.feature_layer,
               mm_vision_select_feature='patch' if vc.feature_select == 'default' else 'cls_patch',
               mm_vision_tower=_clip_name(vc), mm_patch_merge_type='flat', image_aspect_ratio='pad',
               vision_config=vision)
    if not mc.get('source_vocab_size'):
      out['image_token_index'] = mc.image_token_id
      if lc.get('text_vocab_size'):
        out['text_vocab_size'] = int(lc.text_vocab_size)
  else:
    out = dict(model_type='llava', architectures=['LlavaForConditionalGeneration'], text_config=text,
               vision_config=vision, image_token_index=mc.image_token_id,
               image_seq_length=(vc.image_size // vc.patch_size) ** 2, vision_feature_layer=vc.feature_layer,
               vision_feature_select_strategy=vc.feature_select, projector_hidden_act='gelu',
               multimodal_projector_bias=True, tie_word_embeddings=False, dtype=dtype_name)
    if lc.get('text_vocab_size'):
      out['text_vocab_size'] = int(lc.text_vocab_size)
  if sparse:
    out['sparse_config'] = sparse
  if mc.get('projector', 'mlp2x_gelu') == 'mqt':
    out.update(mm_projector_type='mqt', mqt_heads=int(mc.mqt.heads), mqt_queries=int(mc.mqt.queries))
    if layout != 'original':
      out['image_seq_length'] = int(mc.mqt.queries)
  return out


def _clip_name(vc):
  for name, d in KNOWN_CLIP.items():
    if (d['hidden_size'], d['num_hidden_layers'], d['image_size'], d['patch_size']) == \
        (vc.width, vc.depth, vc.image_size, vc.patch_size):
      return name
  return 'local-clip'


def _released_sparse(sc):
  out = {theirs: sc[ours] for theirs, ours in SPARSE_FIELDS.items()}
  out.update(use_vision_predictor=True, use_text_predictor=True, use_output_text_predictor=True,
             use_instruct_predictor=bool(sc.use_instruct))
  return out


def _plan(needed, shapes, layout, npdt, mc, max_shard_bytes):
  """[(file key, path, index, kind, nbytes)] and shard assignment."""
  rows, shard, size, total = [], 0, 0, 0
  for canon, p, i, kind in needed:
    shape = shapes[p][1:] if i is not None else shapes[p]
    n = int(np.prod(shape)) * npdt.itemsize
    if size and size + n > max_shard_bytes:
      shard, size = shard + 1, 0
    size += n
    total += n
    rows.append((K.file_from_canonical(canon, layout), p, i, kind, shard))
  return rows, shard + 1, total


def save_llava(model, config, out_dir, layout='hf5', *, dtype=None, max_shard_bytes=DEFAULT_SHARD_BYTES):
  """Writes `model` as a HF-loadable checkpoint (docs/checkpoints.md): config.json + model.safetensors (or
  shards + index) in `layout` ('hf5' | 'llava15hf' | 'original'), stored in `dtype` (default: the parameter
  dtype). LoRA layers are saved merged; `skip` layers (pruned) left out (num_hidden_layers = the layers
  kept). Returns out_dir.
  """
  if layout not in K.LAYOUTS:
    raise ValueError(f'layout {layout!r} unknown: use one of {K.LAYOUTS}')
  from safetensors.numpy import save_file
  from dynllava_jax.model import lora  # pylint: disable=g-import-not-at-top
  model, config = lora.for_export(model, config)   # LoRA folded in; `skip` layers removed (fewer layers)
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  shapes = {p: v.shape for p, v in flat.items()}
  npdt = _np_dtype(dtype or config.param_dtype)
  needed = K.canonical_names(shapes)
  if config.sparse.enabled and config.sparse.num_layers == 0:
    needed = [n for n in needed if not n[0].startswith('pred_image.transformer.')]
  rows, nshards, total = _plan(needed, shapes, layout, npdt, config, max_shard_bytes)
  os.makedirs(out_dir, exist_ok=True)
  names = [SAFE_SINGLE] if nshards == 1 else [f'model-{s + 1:05d}-of-{nshards:05d}.safetensors'
                                               for s in range(nshards)]
  src_vocab = config.get('source_vocab_size') if layout == 'original' else 0
  cache = {}
  for s in range(nshards):
    tensors = {}
    for key, p, i, kind, shard in rows:
      if shard != s:
        continue
      if p not in cache:
        cache.clear()
        cache[p] = np.asarray(jax.device_get(flat[p].get_value()))
      x = cache[p] if i is None else cache[p][i]
      if src_vocab and p == ('language_model', 'embed_tokens', 'embedding'):
        x = x[:src_vocab]
      elif src_vocab and p == ('language_model', 'lm_head', 'kernel'):
        x = x[:, :src_vocab]
      tensors[key] = K.from_ours(x, kind, config.vision.patch_size).astype(npdt)
    save_file(tensors, os.path.join(out_dir, names[s]), metadata={'format': 'pt'})
  cache.clear()
  if nshards > 1:
    index = dict(metadata=dict(total_size=total), weight_map={key: names[sh] for key, *_, sh in rows})
    with open(os.path.join(out_dir, SAFE_INDEX), 'w') as f:
      json.dump(index, f, indent=2)
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(hf_config_dict(config, layout, npdt.name), f, indent=2)
  return out_dir
