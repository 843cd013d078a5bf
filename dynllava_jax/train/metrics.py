"""Telemetry: a tqdm progress bar with ETA, TensorBoard scalars (tensorboardX), a JSONL log, NaN stop.

On resume, lines of metrics.jsonl after the restored step move to metrics.dropped.jsonl (each step once).

Scalars per logged step: the loss and its terms, the hooks' kept ratios, tau, the groups' lr, grad /
param / update norms, step_time_s, tokens_per_s, tflops_per_s (docs/training.md, "Checkpoints,
preemption, telemetry").
"""
import json
import math
import os
import time

import numpy as np


class NonFiniteLoss(FloatingPointError):
  pass


def flops_per_step(config, n_train_matmul, n_vision, batch_size, seq_len, real_tokens):
  """The analytic TFLOP/s numerator, not a measurement: 6·P_train·T_real (trainable matmul params, the
  embedding table excluded, the LM head included; fwd + bwd) + 12·L·H·T_pad²·B (QKᵀ and PV, fwd + bwd) +
  2·P_vision·B·(N + 1) (the frozen tower, forward only)."""
  lc = config.model.llm
  n_img = (config.model.vision.image_size // config.model.vision.patch_size) ** 2
  dense = 6.0 * n_train_matmul * real_tokens
  attn = 12.0 * lc.layers * lc.hidden * seq_len * seq_len * batch_size
  vision = 2.0 * n_vision * batch_size * (n_img + 1)
  return dense + attn + vision


class Telemetry:
  """Console progress + TensorBoard + `<workdir>/metrics.jsonl` (main process only)."""

  def __init__(self, workdir, total_steps, start_step=0, *, enabled=True, progress=True):
    self.enabled = enabled
    self.total = total_steps
    self.writer = None
    self.bar = None
    self.jsonl = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.writer = SummaryWriter(os.path.join(workdir, 'tb'))
    path = os.path.join(workdir, 'metrics.jsonl')
    _drop_after(path, start_step)
    self.jsonl = open(path, 'a')
    if progress:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=total_steps, initial=start_step, desc='train', dynamic_ncols=True,
                      mininterval=1.0)

  def check_finite(self, step, metrics):
    """Raises NonFiniteLoss (one line) when the loss or the gradient norm is NaN/Inf."""
    for k in ('loss', 'grad_norm'):
      v = float(metrics.get(k, 0.0))
      if not math.isfinite(v):
        terms = ', '.join(f'{n}={float(metrics[n]):.4g}' for n in ('ce', 'reg_image', 'reg_answer')
                          if n in metrics)
        raise NonFiniteLoss(f'{k} is {v} at step {step} ({terms}); stopping. Lower train.lr, enable '
                            'train.grad_clip or check the data')

  def write(self, step, scalars, prefix='train'):
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items() if np.ndim(v) == 0}
    for k, v in scalars.items():
      self.writer.add_scalar(f'{prefix}/{k}', v, step)
    self.jsonl.write(json.dumps({'step': int(step), 'split': prefix, **scalars}) + '\n')
    self.jsonl.flush()
    if self.bar is not None and prefix == 'train':
      self.bar.set_postfix(loss=f'{scalars.get("loss", float("nan")):.4f}',
                           img=f'{scalars.get("kept_image", 1.0):.2f}',
                           ot=f'{scalars.get("kept_answer", 1.0):.2f}', refresh=False)

  def advance(self, n=1):
    if self.bar is not None:
      self.bar.update(n)

  def message(self, text):
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(text)
    else:
      print(text, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()
    if self.writer is not None:
      self.writer.close()
    if self.jsonl is not None:
      self.jsonl.close()


def _drop_after(path, step):
  """Resume: lines of `path` logged after `step` (by a run that stopped before saving them) move to
  `metrics.dropped.jsonl` beside it, so every step appears once in metrics.jsonl."""
  if not os.path.exists(path):
    return
  keep, drop = [], []
  with open(path) as f:
    for line in f:
      try:
        late = int(json.loads(line)['step']) > step
      except (ValueError, KeyError, TypeError):
        late = False        # a torn last line from a kill -9: kept as is, never parsed again
        if not line.endswith('\n'):
          line, late = line + '\n', True
      (drop if late else keep).append(line)
  if not drop:
    return
  with open(os.path.join(os.path.dirname(path), 'metrics.dropped.jsonl'), 'a') as f:
    f.writelines(drop)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.writelines(keep)
  os.replace(tmp, path)


class StepTimer:
  """Wall time between consecutive `lap()` calls."""

  def __init__(self):
    self.t = time.perf_counter()

  def lap(self):
    now = time.perf_counter()
    dt, self.t = now - self.t, now
    return dt
