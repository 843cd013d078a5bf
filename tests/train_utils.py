"""Shared helpers of the reliability tests: the tiny 2-layer config (in-process and as train.py flags),
train.py / python -m entry points in a subprocess, and the one-line check of their stderr."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {
    'model.llm.layers': 2, 'model.vision.depth': 2, 'data.batch_size': 4, 'data.max_len': 128,
    'train.steps': 6, 'train.dense_warmup_steps': 0, 'train.log_every': 1, 'train.save_every': 2,
    'train.keep_checkpoints': 3, 'train.progress': False, 'train.warmup_ratio': 0.0,
}


def config(extra=None):
  """The tiny config with OVERRIDES (+ extra) applied, on one device."""
  from configs.dynllava import get_config  # pylint: disable=g-import-not-at-top
  c = get_config('size=tiny')
  for k, v in {**OVERRIDES, **(extra or {})}.items():
    *path, last = k.split('.')
    node = c
    for p in path:
      node = node[p]
    node[last] = v
  c.mesh.fsdp = 1
  return c


def flags(extra=None, size='tiny'):
  out = ['--config', f'configs/dynllava.py:size={size}']
  for k, v in {**OVERRIDES, **(extra or {})}.items():
    out.append(f'--config.{k}={v}')
  return out


def env(cache=None):
  e = dict(os.environ)
  e.update(XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
           TF_CPP_MIN_LOG_LEVEL='3')
  if cache:
    e.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return e


def run(args, cache=None, timeout=600, **kw):
  """Runs `python <args>` in the repo root; returns the CompletedProcess (text)."""
  return subprocess.run([sys.executable] + list(args), cwd=ROOT, env=env(cache), capture_output=True,
                        text=True, timeout=timeout, **kw)


def run_train(workdir, extra=None, cache=None, raw_flags=(), size='tiny', timeout=600):
  """train.py --workdir workdir with the tiny flags (+ extra overrides, + raw flags)."""
  return run(['train.py', '--workdir', str(workdir)] + flags(extra, size) + list(raw_flags), cache, timeout)


def user_line(p, prog='train.py'):
  """Asserts exit status 2 and exactly one `<prog>: ...` line on stderr, no traceback; returns the line."""
  assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
  lines = [l for l in p.stderr.splitlines() if l.startswith(f'{prog}:')]
  assert len(lines) == 1, p.stderr[-3000:]
  assert 'Traceback' not in p.stderr, p.stderr[-3000:]
  return lines[0]
