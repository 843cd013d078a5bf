"""The training loop: set-up (distributed, checks, mesh, state), resume, steps, telemetry, eval, checkpoints.

    summary = train(config, workdir)      # resumes from <workdir>/checkpoints when there is one

Preemption: SIGTERM (and SIGINT) set a flag; the running step finishes, a checkpoint is saved and
`train` returns with summary['preempted'] = True. All processes agree on the flag before acting on it.
"""
import logging
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from dynllava_jax import sharding as shd
from dynllava_jax.train import checkpoint as ckpt_lib
from dynllava_jax.train.batch import BATCH_AXES, batch_sharding, to_device  # noqa: F401 (re-exported)
from dynllava_jax.train import evaluate
from dynllava_jax.train import metrics as met
from dynllava_jax.train import optim
from dynllava_jax.train import state as st
from dynllava_jax.train import step as step_lib
from dynllava_jax.train.config import apply_overrides, check_config

log = logging.getLogger('dynllava_jax.train')
_DISTRIBUTED = False


def maybe_initialize_distributed(train_cfg):
  """jax.distributed.initialize when train.distributed (args from the config, else the environment)."""
  global _DISTRIBUTED
  if not train_cfg.distributed or _DISTRIBUTED:
    return
  kw = {k: int(train_cfg[k]) for k in ('num_processes', 'process_id') if train_cfg[k] >= 0}
  if train_cfg.coordinator_address:
    kw['coordinator_address'] = train_cfg.coordinator_address
  jax.distributed.initialize(**kw)
  _DISTRIBUTED = True


def setup(config, devices=None):
  """Overrides, distributed start-up and config checks -> mesh. Raises ValueError (one line) on bad configs."""
  apply_overrides(config)
  maybe_initialize_distributed(config.train)
  devices = jax.devices() if devices is None else devices
  check_config(config, len(devices))
  return shd.make_mesh(config.mesh, devices)


class Preemption:
  """SIGTERM / SIGINT -> flag (restores the previous handlers on close)."""

  def __init__(self):
    self.flag = False
    self._old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:   # not the main thread
        pass

  def _handle(self, signum, frame):
    del frame
    self.flag = True
    log.warning('signal %d received: finishing the step, saving, exiting', signum)

  def requested(self):
    if jax.process_count() == 1:
      return self.flag
    return bool(multihost_utils.process_allgather(np.asarray(self.flag)).any())

  def close(self):
    """Restores the previous handlers; once a stop was requested (and the run saved), further SIGTERMs
    are ignored instead: a supervisor repeating its SIGTERM while the process exits must not turn exit 0
    into -15."""
    for sig, h in self._old.items():
      signal.signal(sig, signal.SIG_IGN if self.flag and sig == signal.SIGTERM else h)


class Trainer:
  """Everything `train` needs, built once (tests drive it step by step)."""

  def __init__(self, config, workdir, devices=None):
    self.config = config
    self.workdir = workdir
    self.mesh = setup(config, devices)
    self.tx = optim.make_optimizer(config.train, optim.restart_step(config))
    self.graphdef, self.abstract, self.shardings = st.state_shardings(self.mesh, config, self.tx)
    self.batch_sharding = batch_sharding(self.mesh)
    self.sparse, self._steps, self.n_train_matmul = config.model.sparse.enabled, {}, None
    self.stage_switch = config.train.dense_warmup_steps if self.sparse else config.train.steps

  def init_state(self):
    _, state, _ = st.create_state(self.mesh, self.config, self.tx)
    if self.config.train.init_from:
      state = self._load_init(state)
    return state

  def _load_init(self, state):
    """Overwrites params / frozen params with those `train.init_from` has (the rest keep their init)."""
    out, found = dict(state), 0
    for part in ('params', 'frozen'):
      out[part], n = st.overlay_init_from(self.config, state[part], self.shardings[part])
      found += n
    if not found:   # the whole model, not each part: a tower-only init (the demo's stage 0) is fine
      ckpt_lib.load_params(self.config.train.init_from, st.abstract_with_shardings(
          state['params'], self.shardings['params']))   # raises its one-line UserError
    return out     # AdamW's initial state (zero moments) does not depend on the param values

  def checkpointer(self, workdir, **kw):
    """The run's Checkpointer: frozen params left out per `train.save_frozen`, rebuilt on restore."""
    return ckpt_lib.Checkpointer(
        workdir, save_frozen=not st.omits_frozen(self.config),
        frozen_source=lambda: st.init_frozen(self.mesh, self.config, self.tx, self.shardings), **kw)

  def step_fn(self, step):
    sparse = self.sparse and step >= self.stage_switch
    if sparse not in self._steps:
      self._steps[sparse] = step_lib.jit_train_step(self.config, self.graphdef, self.tx, self.shardings,
                                                    self.batch_sharding, sparse=sparse)
    return self._steps[sparse]

  def eval_fn(self, step, sparse=None):
    """Jitted eval step; sparse None = the stage `step` trains in."""
    sparse = (self.sparse and step >= self.stage_switch) if sparse is None else sparse
    key = ('eval', sparse)
    if key not in self._steps:
      self._steps[key] = step_lib.make_eval_step(self.config, self.graphdef, sparse=key[1])
    return self._steps[key]

  def flops(self, state, batch):
    if self.n_train_matmul is None:
      flat = jax.tree_util.tree_flatten_with_path(state['params'])[0]
      self.n_train_matmul = sum(x.size for p, x in flat
                                if x.ndim >= 2 and 'embed_tokens' not in jax.tree_util.keystr(p))
      self.n_vision = st.count_params(state['frozen'].get('vision_tower', state['params'].get('vision_tower', {})))
    b, t = batch['input_ids'].shape
    return met.flops_per_step(self.config, self.n_train_matmul, self.n_vision, b, t,
                              float(np.sum(batch['attention_mask'])))


def train(config, workdir, devices=None):
  """Trains config.train.steps steps into `workdir` (resuming when it has checkpoints).

  Returns a dict: step, preempted (bool), state (the final train state), trainer, last (last logged
  metrics), eval (last evaluation or {}).
  """
  from dynllava_jax.train.workdir import WorkdirLock  # pylint: disable=g-import-not-at-top
  pre = Preemption()     # from the start, so a SIGTERM during set-up or the final save still exits cleanly
  lock = ckpt = it = tel = None
  try:
    trainer = Trainer(config, workdir, devices)   # distributed start-up, config checks: nothing written yet
    main = jax.process_index() == 0
    say = lambda m: print(m, flush=True) if main else None
    lock = WorkdirLock(workdir, report=say) if main else None     # one writer per workdir
    t = config.train
    ckpt = trainer.checkpointer(workdir, keep=t.keep_checkpoints, cleanup=True)
    target = st.abstract_with_shardings(trainer.abstract, trainer.shardings)
    restored = ckpt.restore_latest(target, report=say, start_over=bool(t.get('restart', False)))
    from dynllava_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (tfds: after the checks)
    it = pipeline.make_iterator(config, 'train')
    if restored is None:
      state, step = trainer.init_state(), 0
    else:
      step, state, data_state = restored
      it.set_state(data_state)
      if main:
        print(f'resumed from {ckpt.directory}/{step}', flush=True)
    tel = met.Telemetry(workdir, t.steps, step, enabled=main, progress=t.progress)
    last, last_eval, saved_at, preempted = {}, {}, step if restored else -1, False
    timer = met.StepTimer()
    tokens, flops, n_since = 0.0, 0.0, 0
    with jax.set_mesh(trainer.mesh):
      while step < t.steps:
        batch = next(it)
        fn = trainer.step_fn(step)
        state, m = fn(state, to_device(batch, trainer.batch_sharding, config.model.pad_token_id,
                                       head_positions=t.get('head_positions', 0)))
        step += 1
        n_since += 1
        tokens += float(np.sum(batch['attention_mask']))
        flops += trainer.flops(state, batch)
        if t.step_sleep_s:
          time.sleep(t.step_sleep_s)
        tel.advance()
        if (t.log_every and step % t.log_every == 0) or step == t.steps:
          m = jax.device_get(m)
          tel.check_finite(step, m)
          dt = timer.lap()
          m = {**m, 'step_time_s': dt / n_since, 'tokens_per_s': tokens / dt,
               'tflops_per_s': flops / dt / 1e12}
          tokens, flops, n_since = 0.0, 0.0, 0
          tel.write(step, m)
          last = m
        if t.eval_every and step % t.eval_every == 0:
          last_eval = evaluate.validation_metrics(trainer, state, step, max_batches=t.eval_batches)
          tel.write(step, last_eval, prefix='eval')
          tel.message(f'step {step} eval: ' + ', '.join(f'{k}={v:.4g}' for k, v in last_eval.items()))
          timer.lap()
        preempted = pre.requested()
        if (t.save_every and step % t.save_every == 0) or preempted:
          tel.check_finite(step, jax.device_get({'loss': m['loss'], 'grad_norm': m['grad_norm']}))
          ckpt.save(step, state, it.get_state())
          saved_at = step
        if preempted:
          tel.message(f'preempted: saved step {step} to {ckpt.directory}')
          break
    if saved_at != step:
      ckpt.save(step, state, it.get_state())
    ckpt.wait()
  finally:
    for part in (ckpt, it, tel, lock):
      if part is not None:
        part.close()
    pre.close()
  return {'step': step, 'preempted': preempted, 'state': state, 'trainer': trainer, 'last': last,
          'eval': last_eval}
