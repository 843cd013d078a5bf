"""Model size presets and the config-file argument parser (what `configs/*.py` build their configs from).

    from dynllava_jax import presets
    mc = presets.model_config('7b')                       # vision + projector + LLM + ids + numerics
    arg = presets.parse_arg('size=tiny,dense=1', size='tiny', dense=False)

Model sizes follow the published HF `llava-hf/llava-1.5-{7b,13b}-hf` configs exactly; `tiny` is for tests
and the CPU demo; `bench` has LLaVA-7B's proportions (576 image tokens, 4096/1024 ≈ 4) at a size a CPU can
time.
"""
import ml_collections


def parse_arg(arg, **defaults):
  """Parses `"size=7b,foo=1"` (or a bare `"7b"` for the first key) into a ConfigDict with typed defaults."""
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  keys = list(defaults)
  for i, item in enumerate(arg.split(',')):
    if not item:
      continue
    if '=' in item:
      k, v = item.split('=', 1)
    else:
      k, v = keys[i], item
    if k not in defaults:
      raise ValueError(f'config argument {k!r} is unknown; known: {sorted(defaults)}')
    t = type(defaults[k])
    out[k] = (v.lower() in ('1', 'true', 'yes')) if t is bool else t(v)
  return out


def vision_config(size):
  """CLIP ViT tower. `feature_layer` indexes HF's hidden_states (0 = embeddings); -2 = LLaVA-1.5."""
  c = ml_collections.ConfigDict()
  c.image_size, c.patch_size = {
      'tiny': (64, 8), 'bench': (336, 14), '7b': (336, 14), '13b': (336, 14)}[size]
  c.width, c.depth, c.heads, c.mlp_dim = {
      'tiny': (64, 3, 4, 128),
      'bench': (384, 6, 6, 1536),
      '7b': (1024, 24, 16, 4096),
      '13b': (1024, 24, 16, 4096)}[size]
  c.layer_norm_eps = 1e-5
  c.feature_layer = -2
  c.feature_select = 'default'   # 'default' drops CLS, 'full' keeps it
  # Initial position embeddings: 'normal' (HF CLIP's N(0, 0.02)) | 'sincos2d' (a fixed 2-D sine-cosine
  # table, big_vision style; CLS row 0). Only the init: the checkpoint layout and the forward are the same.
  c.pos_init = 'normal'
  return c


def llm_config(size):
  """LLaMA / Vicuna decoder."""
  c = ml_collections.ConfigDict()
  (c.vocab_size, c.hidden, c.layers, c.heads, c.kv_heads, c.mlp_dim) = {
      'tiny': (256, 128, 4, 4, 2, 352),
      'bench': (32064, 1024, 16, 16, 16, 2816),
      '7b': (32064, 4096, 32, 32, 32, 11008),
      '13b': (32064, 5120, 40, 40, 40, 13824)}[size]
  c.head_dim = c.hidden // c.heads
  # Ids >= text_vocab_size are padding rows (no tokenizer id): masked out of the training CE and of
  # sampling (`dynllava_jax/model/vocab.py`). 0 = every id is a text id.
  c.text_vocab_size = 0
  c.rope_theta = 10000.0
  c.rms_eps = 1e-5
  c.max_position = {'tiny': 1024}.get(size, 4096)
  return c


def model_config(size='tiny'):
  """Full LLaVA-1.5 model config (vision + projector + LLM + token ids + numerics)."""
  c = ml_collections.ConfigDict()
  c.vision = vision_config(size)
  c.llm = llm_config(size)
  c.projector = 'mlp2x_gelu'   # 'mlp2x_gelu' (LLaVA-1.5) | 'mqt' (MQT-LLaVA: settings in c.mqt)
  c.mqt = mqt_config(size)
  # Token ids. HF llava-1.5-hf: <image> = 32000, <pad> = 32001; the digits_vqa tokenizer fixes 0..4.
  if size == 'tiny':
    c.image_token_id, c.pad_token_id, c.bos_token_id, c.eos_token_id = 4, 3, 1, 2
  else:
    c.image_token_id, c.pad_token_id, c.bos_token_id, c.eos_token_id = 32000, 32001, 1, 2
  c.dtype = 'float32'          # compute dtype: float32 | bfloat16
  c.param_dtype = 'float32'
  c.remat = False              # jax.checkpoint per decoder / ViT layer
  c.scan_unroll = 1            # decoder layers per scan iteration (>= llm.layers: no loop; CPU steps faster)
  c.attention = 'masked_softmax_eps'   # 'masked_softmax_eps' (released) | 'exact_zero'
  # 'auto' (reference on CPU, jax.nn.dot_product_attention elsewhere) | 'reference' | 'xla' | 'cudnn':
  # the fused path serves dense attention and 'exact_zero' key masks (dynllava_jax/model/attention.py)
  c.attention_impl = 'auto'
  c.causal_chunk = 256         # inference forwards: causal attention in query chunks of this many rows
                               # (exact; skips keys after each chunk); 0 = one block
  # Decoder layer plan (dynllava_jax/model/plan.py): comma-separated `kind[*count][:full|frozen|lora<r>]`,
  # e.g. 'dense:frozen,dense*3' or 'dense*2,skip,dense'; '' = every layer `dense` and trained. Each run of
  # equal layers is one scan.
  c.layer_plan = ''
  # Visual region (docs/training.md): '' = none; 'auto' = the released spread of ceil(L/4) layers (32 layers:
  # 1,5,9,13,19,23,27,31); or a list '1,5,9'. Those layers train (region_train: 'full' | 'lora<r>'),
  # every other LLM layer and the embeddings / final norm / LM head are frozen.
  c.region = ''
  c.region_train = 'full'
  c.lora = lora_config()
  c.sparse = sparse_config()
  c.mod = mod_config()
  return c


def mod_config():
  """VideoLLM-MoD layers (`mod` in the layer plan, dynllava_jax/model/mod.py, docs/mod.md)."""
  c = ml_collections.ConfigDict()
  c.r = 0.2                    # routed share of each frame's vision tokens, k = ceil(r·N)
  c.layers = ''                # '' = the plan's `mod` entries; 'interleave' = layers 1, 3, 5, …; or '1,3'
  c.router = 'tanh'            # p-MoD's router: update weight 1 + alpha·tanh(s)
  c.alpha = 0.2
  c.routing = 'learned'        # 'learned' | 'random' | 'uniform' (the equal-capacity baselines)
  c.seed = 0                   # the 'random' routing's fixed pattern
  c.train_gather = True        # training runs MoD layers on their routed tokens (exact masked fallback)
  return c


def mqt_config(size='tiny'):
  """MQT-LLaVA's Matryoshka query projector (`model.projector='mqt'`, dynllava_jax/model/mqt.py):
  M = `queries` learned queries (a square; the release: 256 on a 16×16 grid for 576 patches), `heads`
  attention heads over the vision width, LayerNorm eps 1e-6. Training (`train/forward.py`): with
  `sample_m` every forward draws m uniformly from {2, 4, …, M} (stage 2); without it m = M (stage 1)."""
  c = ml_collections.ConfigDict()
  c.queries, c.heads = {'tiny': (16, 4), 'bench': (576, 6), '7b': (256, 16), '13b': (256, 16)}[size]
  c.ln_eps = 1e-6
  c.sample_m = False
  # With sample_m: steps before this one train at m = M (0 = draw from the first step, the release, whose
  # LLM already reads the M tokens after stage 1; a toy LLM trained from scratch learns to read them first).
  c.sample_from_step = 0
  # > 0: a local start for training from scratch (MatryoshkaQueryProjector._local_init): the q / k
  # in-projections tied so each query attends around its grid position with logit scale local_init.
  # 0 = the release's init (near-uniform attention at the start).
  c.local_init = 0.0
  # With local_init: which grid point query i starts at. 'raster': patch i (the top rows come first);
  # 'coarse': the quadrants' centres, then their quarters', ... (mqt.coarse_targets), so every first-m
  # prefix covers the whole image.
  c.local_order = 'raster'
  return c


def lora_config():
  """LoRA adapters of `lora<r>` layers (rank from the plan / region_train): the released alpha / dropout."""
  c = ml_collections.ConfigDict()
  c.alpha = 256.0              # scale alpha / r (released: r 128, alpha 256)
  c.dropout = 0.05             # on the adapter's input, training only
  return c


def sparse_config():
  """Dynamic-LLaVA predictor and rate settings (docs/methods.md, released defaults)."""
  c = ml_collections.ConfigDict()
  c.enabled = False            # predictors exist / are used
  c.sparse_layer = 2
  # The output-text decisions' layer: -1 = sparse_layer (the released code: both predictors there). A
  # later layer keeps generated tokens in the layers before it, as the released layers < sparse_layer do
  # (the demo drops image tokens entering layer 0 and decides on text entering layer 1).
  c.text_layer = -1
  c.d_model, c.nhead, c.dim_feedforward, c.num_layers = 512, 8, 2048, 2
  c.image_keep_ratio = 0.2     # r_I
  c.text_keep_ratio = 0.5      # r_OT
  c.instruct_keep_ratio = 0.7
  c.len_ot = 50
  c.instruct_min_len = 25
  c.use_image = True
  c.use_output_text = True
  c.use_instruct = False
  c.lambda_ratio = 100.0
  c.tau0, c.tau1 = 1.0, 0.1
  # From this optimizer step on, training keeps the image tokens as inference does (per-sample top-k, no
  # Gumbel noise; the image predictor gets no gradient, it is trained before), so the LLM's last steps see
  # the image masks it meets at inference. A straight-through gradient through the top k moved the ranking
  # under the LLM and its loss rose 3x; output text stays sampled (argmax decisions flip a whole answer
  # together and the ratio loss diverged): docs/demo.md. -1 = never (the released code).
  c.hard_from_step = -1
  c.topk = True                # prefill: top-k (TopkArgmax) vs plain argmax
  return c


def num_image_tokens(model_cfg):
  """Image tokens per image: asks the projector (dynllava_jax/model/projector.py, the one place)."""
  from dynllava_jax.model.projector import num_visual_tokens  # pylint: disable=g-import-not-at-top
  return num_visual_tokens(model_cfg)
