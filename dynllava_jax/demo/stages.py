"""The demo's stage runner and stage cache.

    info = run_stage(config, stage_dir, upstream)     # upstream: the previous stage's info (None for 0)

Each stage writes into its own directory `<workdir>/stage<k>_<name>/`:
  stage.json   {stage, name, hash, upstream_hash, done, wall_s, cpu_s (process CPU time), result[,
               fingerprint: the floating-point path it trained on]}
  params/      the stage's model params (orbax, `dynllava_jax.convert` layout) for the next stage's
               `train.init_from` (the tower stage: the vision tower only)
  checkpoints/ the training bundle (every stage but the tower's; what `eval.run.load_model` restores)
The stage's hash is sha256 over what it reads of its resolved config (`stage_inputs`: stage 0 its tower
section, the vision config, canvas geometry and seed; the others the whole config with `train.init_from`
blanked, a path inside the workdir, and the sections the model does not read (a disabled `model.sparse`,
`model.mqt` of another projector) left out; as JSON, keys sorted) and the upstream stage's hash, so a change to
any earlier stage's config invalidates every later stage too. A stage whose stage.json has the same hash
and `done` (and whose params/ and checkpoints/ are still there) is skipped; one with another hash is
rerun in a new directory, so no stale checkpoint is ever resumed: a finished one is first moved to
`<workdir>/stale/<stage dir>-<its hash>` (moving it back restores it), an unfinished one (or a directory
without stage.json) is deleted. A stage
interrupted before `done` with the same hash reruns in place (`loop.train` resumes from a
checkpoint it finds there). SIGTERM / SIGINT during training saves a checkpoint and raises
`StageInterrupted` (the stage is not marked done; later stages do not run).
"""
import hashlib
import json
import os
import shutil
import time

STATE = 'stage.json'
STALE = 'stale'       # <workdir>/stale/<stage dir>-<old hash>: finished stages of a changed config


class StageInterrupted(Exception):
  """SIGTERM / SIGINT during a stage's training: its checkpoint is saved, it is not marked done."""


def stage_dir(workdir, config):
  return os.path.join(workdir, f'stage{config.stage.index}_{config.stage.name}')


def is_tower(config):
  """The tower's pretraining (dynllava_jax/demo/tower.py), not a LLaVA training run."""
  return config.stage.name == 'tower'


def stage_inputs(config):
  """The part of the config a stage reads: the tower stage (stage 0's `tower`) only its `tower` section, the vision tower's
  config, the canvas geometry and the seed (a change to the question mix or the LLM does not retrain
  it); the others everything but `train.init_from` (a path inside the workdir),
  `data.digits.one_round_test` (it shapes only the test split, which no stage reads),
  `data.digits.video_style` unless the data is digits_video (no other builder reads it),
  `data.digits.text_only` / `text_grid` while False (the stages before it existed keep their hashes), the rest of
  `model.sparse` while `model.sparse.enabled` is False (a model without predictors never reads it) and
  `model.mqt` unless the projector is MQT's."""
  d = config.to_dict()
  if is_tower(config):
    g = d['data']['digits']
    return {'stage': d['stage'], 'tower': d['tower'], 'vision': d['model']['vision'], 'seed': d['seed'],
            'canvas': {k: g.get(k) for k in ('canvas_size', 'grid', 'tile_fraction')}}
  if 'train' in d:
    d['train']['init_from'] = ''
  digits = d.get('data', {}).get('digits', {})
  digits.pop('one_round_test', None)   # shapes the test split only
  if d.get('data', {}).get('name') != 'digits_video':
    digits.pop('video_style', None)
  for key in ('text_only', 'text_grid'):
    if not digits.get(key, True):
      digits.pop(key)
  model = d.get('model', {})
  if 'sparse' in model and not model['sparse'].get('enabled'):
    model['sparse'] = {'enabled': False}
  if 'mqt' in model and model.get('projector') != 'mqt':
    model.pop('mqt')
  return d


def stage_hash(config, upstream_hash=''):
  """16 hex digits identifying what the stage reads (`stage_inputs`) and everything upstream of it."""
  d = stage_inputs(config)
  text = json.dumps(d, sort_keys=True, default=str)
  return hashlib.sha256(f'{upstream_hash}\n{text}'.encode()).hexdigest()[:16]


def read_state(path):
  try:
    with open(os.path.join(path, STATE)) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _write_state(path, state):
  os.makedirs(path, exist_ok=True)
  tmp = os.path.join(path, f'{STATE}.tmp{os.getpid()}')
  with open(tmp, 'w') as f:
    json.dump(state, f, indent=1, default=str)
  os.replace(tmp, os.path.join(path, STATE))


def save_model_params(model, path):
  """The model's params as the pure dict of nnx.state(model, nnx.Param) (what `train.init_from` reads)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(path), nnx.to_pure_dict(nnx.state(model, nnx.Param)), force=True)
  ckptr.wait_until_finished()


def _train_llava_stage(config, path, report):
  """Every stage but the tower's: build the data, `loop.train` into `path`, export the params."""
  from dynllava_jax.data import builders  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import loop  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import state as st  # pylint: disable=g-import-not-at-top
  builders.build(config)
  out = loop.train(config, path)
  if out['preempted']:
    raise StageInterrupted(f'stage {config.stage.index} interrupted at step {out["step"]} (saved in {path}); '
                           'run the same command again to resume it')
  model = st.merge_model(out['trainer'].graphdef, out['state'])
  save_model_params(model, os.path.join(path, 'params'))
  last = {k: float(v) for k, v in out['last'].items() if hasattr(v, '__float__')}
  return {'step': int(out['step']), 'last': last}


def run_stage(config, path, upstream=None, report=print, fingerprint=None):
  """Runs (or skips, when cached) the stage `config.stage.index` into `path`.

  upstream: the previous stage's info dict (its 'dir' holds params/); its hash enters this stage's hash.
  fingerprint: the floating-point path's hash (`demo/fingerprint.py`) the stage trains on, kept in its
  state (not in its hash: a stage trained on another path is still that stage, with other last bits).
  Returns the info dict {stage, name, hash, upstream_hash, done, wall_s, result, dir, skipped[,
  fingerprint]}."""
  up_hash = upstream['hash'] if upstream else ''
  h = stage_hash(config, up_hash)
  name = f'stage {config.stage.index} ({config.stage.name})'
  old = read_state(path)
  outputs = ['params'] + ([] if is_tower(config) else ['checkpoints'])
  complete = all(os.path.isdir(os.path.join(path, o)) for o in outputs)
  if old and old.get('hash') == h and old.get('done') and complete:
    report(f'{name}: cached in {path} (hash {h}), skipped')
    return {**old, 'dir': path, 'skipped': True}
  if os.path.isdir(path) and (old is None or old.get('hash') != h or (old.get('done') and not complete)):
    kept = ''
    if os.path.islink(path):   # a stage linked in from another workdir: drop the link, keep its target
      os.unlink(path)
    elif old and old.get('done') and complete:
      # (its hash differs, else it was skipped above) a finished stage of another config is moved aside,
      # not deleted: a change to a config (or a new config field) must not cost the stages it trained
      kept = os.path.join(os.path.dirname(path), STALE, f'{os.path.basename(path)}-{old["hash"]}')
      if os.path.exists(kept):
        shutil.rmtree(kept)    # the same hash: the same stage, moved aside before
      os.makedirs(os.path.dirname(kept), exist_ok=True)
      os.rename(path, kept)
    else:                      # unfinished, or its outputs gone: nothing to keep
      shutil.rmtree(path)
    report(f'{name}: config changed (hash {old.get("hash") if old else None} -> {h}); rerunning from scratch' +
           (f' (the finished stage of the old config moved to {kept})' if kept else ''))
  state = {'stage': int(config.stage.index), 'name': str(config.stage.name), 'hash': h,
           'upstream_hash': up_hash, 'done': False}
  if fingerprint:
    state['fingerprint'] = fingerprint
  _write_state(path, state)
  t0, c0 = time.time(), time.process_time()
  if is_tower(config):
    from dynllava_jax.demo.tower import pretrain_tower  # pylint: disable=g-import-not-at-top
    result = pretrain_tower(config, path, report=report)
  else:
    if upstream is None:
      raise ValueError(f'{name} needs the previous stage (its params are train.init_from)')
    with config.unlocked():
      config.train.init_from = os.path.abspath(os.path.join(upstream['dir'], 'params'))
    report(f'{name}: {config.train.steps} steps from {config.train.init_from}')
    result = _train_llava_stage(config, path, report)
  state.update(done=True, wall_s=time.time() - t0, cpu_s=time.process_time() - c0, result=result)
  _write_state(path, state)
  report(f'{name}: done in {state["wall_s"]:.0f} s ({state["cpu_s"]:.0f} s CPU)')
  return {**state, 'dir': path, 'skipped': False}
