"""Defaults of the `train` config section (owned by the training loop) and the start-up checks.

Fields (see docs/training.md):
  steps: optimizer steps in total (dense warm-up included).
  dense_warmup_steps: the first steps train with plain CE and no predictors (a dense stage, so a model
    trained from scratch first learns the task); sparsification (Gumbel decisions, ratio losses) starts
    after them and tau anneals over the remaining steps.
  lr, predictor_lr: peak learning rates of the two AdamW groups (LLM + projector | predictors).
  projector_lr: > 0 gives the projector its own AdamW group at this peak rate (the visual-region recipe:
    2e-5 beside the adapters' 2e-4); 0 = the projector trains at lr.
  warmup_ratio: linear warm-up as a fraction of `steps`, then cosine to `min_lr_ratio`·peak.
  restart_schedule, sparse_lr_scale: with a dense stage, warm-up + cosine restart when the sparse stage
    starts, the peaks scaled by sparse_lr_scale (the released run is a fresh fine-tuning at a lower lr).
  weight_decay, predictor_weight_decay: decoupled AdamW decay per group (matrices only, not biases/norms).
  param_groups: more optimizer-group rules, 'regex=group,...' over '/'-joined param paths, checked before
    the methods' own rules (groups: main | predictor | projector; train/optim.py::group_rules).
  b1, b2, adam_eps: AdamW moments.
  grad_clip: global-norm clipping over all trainable params (0 = off).
  grad_accum: micro-batches per optimizer step (the global batch is split inside the jitted step).
  freeze_vision: the CLIP tower gets no gradients and no optimizer state (the released recipe).
  freeze_projector: also freeze the projector (the paper's text; the released code trains it).
  remat: jax.checkpoint per layer (overrides model.remat when not None).
  head_positions: where the LM head runs in training: 0 = every position; K > 0 = the K positions per
    sample whose next token is labelled (a longer answer is one error); -1 = the batch's labelled count
    rounded up to a power of two (a few shapes, so a few compiles). The loss is the same; the head's
    (T x vocab) matmuls and softmax shrink to the answers' length (train/forward.py::head_index).
  compute_dtype: '' keeps model.dtype, else float32 | bfloat16 (params stay model.param_dtype).
  log_every, eval_every, save_every: in optimizer steps (0 = never; a final save always happens).
  eval_batches: validation batches per evaluation.
  keep_checkpoints: the last K (>= 1) checkpoints are kept.
  save_frozen: 'auto' | 'always' | 'never'. Whether a checkpoint holds the frozen params; without them it
    holds their signature and digest, and a restore rebuilds them (seed init + train.init_from) and checks
    the digest. 'auto' = omit them when the layer plan has frozen or LoRA groups (visual-region / LoRA runs:
    a 7B base is ~13 GB per checkpoint, the trained part MBs), keep them otherwise.
  restart: when the workdir's checkpoints belong to another config or none of them restores, move them to
    checkpoints/old/<time>/ and start over (default: stop with one line; nothing is ever deleted).
    Checkpoints that fit this config are resumed either way, so a relaunch never starts over.
  init_from: orbax dir with model params (`dynllava_jax.convert` layout: the pure dict of
    nnx.state(model, nnx.Param)); params missing there (e.g. predictors) keep their fresh init.
  distributed, coordinator_address, num_processes, process_id: multi-host start-up
    (jax.distributed.initialize; '' / -1 = read from the environment / cluster auto-detection).
  step_sleep_s: sleep after every step (throttles a shared machine; tests use it to preempt mid-run).
  progress: tqdm bar on the console.
"""
import os

import ml_collections

from dynllava_jax.errors import UserError, suggest


def train_defaults(size='tiny'):
  c = ml_collections.ConfigDict()
  tiny = size == 'tiny'
  # tiny = the CPU demo (scripts/demo.py): a from-scratch dense stage, then 400 Dynamic-LLaVA steps whose
  # schedule restarts (restart_schedule) at 0.1x the peaks; other sizes: the released recipe (lr 5e-6 /
  # 2e-4, no dense stage). The runs behind these values: docs/training.md, "The demo".
  c.steps = 2000 if tiny else 10000
  c.dense_warmup_steps = 1600 if tiny else 0
  c.lr = 1e-3 if tiny else 5e-6
  c.predictor_lr = 3e-3 if tiny else 2e-4
  c.projector_lr = 0.0
  c.warmup_ratio = 0.03
  c.restart_schedule = tiny
  c.sparse_lr_scale = 0.1 if tiny else 1.0
  c.min_lr_ratio = 0.0
  c.weight_decay = 0.0
  c.predictor_weight_decay = 0.0
  c.param_groups = ''          # e.g. '^language_model/lm_head/=predictor' (first match wins)
  c.b1, c.b2, c.adam_eps = 0.9, 0.999, 1e-8
  c.grad_clip = 1.0
  c.grad_accum = 1
  # 'token' = the released token-mean CE; 'sample' = mean over samples of each sample's token-mean CE.
  c.ce_weighting = 'token'
  c.freeze_vision = True
  c.freeze_projector = False
  c.frozen = ''                # more frozen params: comma-separated regexes over 'a/b/c' param paths
  c.remat = ml_collections.FieldReference(None, field_type=bool)
  c.compute_dtype = ''
  c.head_positions = -1
  c.log_every = 10 if tiny else 50
  c.eval_every = 0
  c.eval_batches = 4
  c.save_every = 200 if tiny else 1000
  c.keep_checkpoints = 3
  c.save_frozen = 'auto'
  c.restart = False
  c.init_from = ''
  c.distributed = False
  c.coordinator_address = ''
  c.num_processes = -1
  c.process_id = -1
  c.step_sleep_s = 0.0
  c.progress = True
  return c


def apply_overrides(config):
  """Copies the train section's numerics overrides (remat, compute dtype) into config.model."""
  t = config.train
  with config.unlocked():
    if t.remat is not None:
      config.model.remat = bool(t.remat)
    if t.compute_dtype:
      config.model.dtype = t.compute_dtype
  return config


def check_config(config, num_devices):
  """Raises UserError (a ValueError) with one actionable line for a config that cannot train on
  `num_devices`."""
  from dynllava_jax.model.llava import check_model_config  # local: keeps this module import-light
  try:
    check_model_config(config.model)
  except ValueError as e:
    raise UserError(f'model.{e}' if not str(e).startswith('model.') else str(e)) from None
  check_data_config(config)
  t, m = config.train, config.mesh
  if t.steps <= 0:
    raise UserError(f'train.steps={t.steps} must be > 0')
  for name in ('lr', 'predictor_lr', 'projector_lr'):
    if not t.get(name, 0.0) >= 0:
      raise UserError(f'train.{name}={t[name]} must be >= 0 (a negative rate trains by gradient ascent)')
  if t.get('save_frozen', 'auto') not in ('auto', 'always', 'never'):
    raise UserError(f"train.save_frozen={t.save_frozen!r}: use 'auto', 'always' or 'never'")
  if t.keep_checkpoints < 1:
    raise UserError(f'train.keep_checkpoints={t.keep_checkpoints} must be >= 1 (0 keeps no checkpoint)')
  for name in ('log_every', 'eval_every', 'save_every', 'eval_batches'):
    if t[name] < 0:
      raise UserError(f'train.{name}={t[name]} must be >= 0')
  from dynllava_jax.train.optim import config_rules  # local: keeps this module import-light
  config_rules(t)
  if t.get('ce_weighting', 'token') not in ('token', 'sample'):
    raise UserError(f"train.ce_weighting={t.ce_weighting!r}: use 'token' or 'sample'")
  if not 0 <= t.dense_warmup_steps <= t.steps:
    raise UserError(f'train.dense_warmup_steps={t.dense_warmup_steps} must be in [0, steps={t.steps}]')
  if not 0.0 <= t.warmup_ratio < 1.0:
    raise UserError(f'train.warmup_ratio={t.warmup_ratio} must be in [0, 1)')
  if t.grad_accum < 1:
    raise UserError(f'train.grad_accum={t.grad_accum} must be >= 1')
  if not t.get('head_positions', 0) >= -1:
    raise UserError(f'train.head_positions={t.head_positions}: use 0 (every position), -1 (per-batch '
                     'buckets) or K > 0 (a fixed width)')
  if t.compute_dtype not in ('', 'float32', 'bfloat16'):
    raise UserError(f"train.compute_dtype={t.compute_dtype!r}: use '', 'float32' or 'bfloat16'")
  sizes = [int(m[a]) for a in ('data', 'fsdp', 'tensor')]
  known = 1
  for s in sizes:
    known *= s if s > 0 else 1
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes) or num_devices % known:
    raise UserError(f'mesh {dict(m)} does not divide the {num_devices} available devices')
  if -1 not in sizes and known != num_devices:
    raise UserError(f'mesh {dict(m)} uses {known} devices but {num_devices} are available; '
                     'set one axis to -1 or match the count')
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  data_par = sizes[0] * sizes[1]
  b = config.data.batch_size
  if b % t.grad_accum or (b // t.grad_accum) % data_par:
    raise UserError(f'data.batch_size={b} must split into train.grad_accum={t.grad_accum} micro-batches '
                     f'each divisible by the data axes data*fsdp={data_par}')


DATASETS = ('digits_vqa', 'digits_video', 'llava_instruct')


def check_data_config(config):
  """The data section's start-up checks (dataset name, batch size, LLaVA folder, max_len) -> UserError."""
  d = config.data
  if d.name not in DATASETS:
    raise UserError(f'data.name={d.name!r} is unknown{suggest(d.name, DATASETS)}: use one of {DATASETS}')
  if d.batch_size < 1:
    raise UserError(f'data.batch_size={d.batch_size} must be >= 1')
  if d.name == 'llava_instruct':
    if not d.manual_dir:
      raise UserError('data.manual_dir is empty: llava_instruct needs the folder with the LLaVA JSON and '
                      'the image folders (docs/data.md)')
    if not os.path.isdir(d.manual_dir):
      raise UserError(f'data.manual_dir={d.manual_dir!r} is not a folder: point it at the folder with '
                      'the LLaVA JSON and the image folders (docs/data.md)')
    json_path = os.path.join(d.manual_dir, d.json_file)
    if not os.path.isfile(json_path):
      raise UserError(f'data.json_file: {json_path} does not exist (data.manual_dir + data.json_file)')
  v = config.model.vision
  n = (v.image_size // v.patch_size) ** 2 + (1 if v.feature_select == 'full' else 0)   # image tokens
  if d.max_len <= n + 1:
    raise UserError(f'data.max_len={d.max_len} leaves no room for text after the {n} image tokens of '
                    f'this model; use data.max_len > {n + 1} (e.g. {n + 128})')
