"""Resume ≡ uninterrupted (train.py in subprocesses, SIGTERM mid-run), and the fallback from a truncated
latest checkpoint. The three runs share a persistent XLA compilation cache, so only the first compiles."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from configs.dynllava import get_config
from dynllava_jax.train import checkpoint as ckpt_lib
from dynllava_jax.train import loop
from dynllava_jax.train import state as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {
    'model.llm.layers': 2, 'model.vision.depth': 2, 'data.batch_size': 4, 'data.max_len': 128,
    'train.steps': 6, 'train.dense_warmup_steps': 0, 'train.log_every': 1, 'train.save_every': 2,
    'train.keep_checkpoints': 3, 'train.progress': False, 'train.warmup_ratio': 0.0,
}


def flags(extra=None):
  out = ['--config', 'configs/dynllava.py:size=tiny']
  for k, v in {**OVERRIDES, **(extra or {})}.items():
    out.append(f'--config.{k}={v}')
  return out


def env(cache):
  e = dict(os.environ)
  e.update(XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu',
           JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', PYTHONPATH=ROOT)
  return e


def run(workdir, cache, extra=None):
  p = subprocess.run([sys.executable, 'train.py', '--workdir', str(workdir)] + flags(extra), cwd=ROOT,
                     env=env(cache), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return p.stdout


def losses(workdir):
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      d = json.loads(line)
      if d['split'] == 'train':
        out[d['step']] = d['loss']
  return out


def test_resume_after_sigterm_equals_uninterrupted(tmp_path):
  cache = tmp_path / 'xla_cache'
  a, b = tmp_path / 'straight', tmp_path / 'killed'
  run(a, cache)
  # The interrupted run sleeps after each step so SIGTERM lands mid-run; it saves where it stops.
  p = subprocess.Popen([sys.executable, 'train.py', '--workdir', str(b)]
                       + flags({'train.step_sleep_s': 1.0, 'train.save_every': 0}),
                       cwd=ROOT, env=env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
      if os.path.exists(b / 'metrics.jsonl') and len(losses(b)) >= 3:
        break
      time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    for _ in range(50):         # a supervisor that keeps sending SIGTERM: still a clean save and exit 0
      try:
        out, err = p.communicate(timeout=0.1)
        break
      except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)
    else:
      out, err = p.communicate(timeout=300)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 0, err[-3000:]
  assert 'preempted' in out
  stopped = max(losses(b))
  assert 3 <= stopped < 6
  probe = ckpt_lib.Checkpointer(str(b), async_save=False)
  assert probe.steps() == [stopped]
  probe.close()
  out = run(b, cache)
  assert 'resumed from' in out
  la, lb = losses(a), losses(b)
  assert sorted(la) == sorted(lb) == [1, 2, 3, 4, 5, 6]
  with open(os.path.join(b, 'metrics.jsonl')) as f:     # each step logged once, also across the resume
    logged = [json.loads(l)['step'] for l in f if json.loads(l)['split'] == 'train']
  assert logged == [1, 2, 3, 4, 5, 6]
  np.testing.assert_array_equal([la[i] for i in range(1, 7)], [lb[i] for i in range(1, 7)])

  # Final params identical; then a truncated latest checkpoint falls back to the previous one.
  c = get_config('size=tiny')
  for k, v in OVERRIDES.items():
    sec, *rest = k.split('.')
    node = c[sec]
    for r in rest[:-1]:
      node = node[r]
    node[rest[-1]] = v
  c.mesh.fsdp = 1
  tr = loop.Trainer(c, str(a), jax.devices()[:1])
  target = st.abstract_with_shardings(tr.abstract, tr.shardings)
  ca, cb = ckpt_lib.Checkpointer(str(a), async_save=False), ckpt_lib.Checkpointer(str(b), async_save=False)
  assert ca.steps() == [2, 4, 6]
  sa, _ = ca.restore(6, target)
  sb, data_b = cb.restore(6, target)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(sa), jax.device_get(sb))
  assert 'grain' in data_b
  cb.close()
  state_dir = a / 'checkpoints' / '6' / 'state'
  files = [os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs]
  big = max(files, key=os.path.getsize)
  with open(big, 'r+b') as f:
    f.truncate(os.path.getsize(big) // 2)
  reports = []
  step, state, _ = ca.restore_latest(target, report=reports.append)
  ca.close()
  assert step == 4 and len(reports) == 2 and 'checkpoints/6 failed to restore' in reports[0]
  assert reports[1].endswith('checkpoints/broken/6') and '\n' not in reports[0]
  assert int(state['step']) == 4
