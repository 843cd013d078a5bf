"""Multi-host ≡ single host: train.py as two processes on 127.0.0.1 (one CPU device each, gloo collectives,
jax.distributed.initialize from the config) gives the losses of one process with two devices.

Each process reads every second record of the shuffled stream (its half of each global batch) and buckets
its own samples; the processes agree on one padded length before forming the global batch
(`pipeline.agree_length`), so the global batch holds the same samples, padded alike, as the one-process
run, in another row order. The test trains dense steps, where the row order changes only the float
summation order (Gumbel noise is drawn per row, so sparse steps would differ by their noise).
"""
import os
import socket
import subprocess
import sys

import numpy as np

from test_train_resume import ROOT, flags, losses

STEPS = 3


def _env(devices, cache):
  e = dict(os.environ)
  e.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu',
           JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo', JAX_COMPILATION_CACHE_DIR=str(cache),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
           PYTHONPATH=ROOT)
  return e


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process_with_two_devices(tmp_path):
  # Dense steps: the Gumbel noise is drawn per row of the global batch, and the row order differs.
  extra = {'train.steps': STEPS, 'train.save_every': 100, 'train.dense_warmup_steps': STEPS}
  cache = tmp_path / 'xla_cache'
  one = tmp_path / 'one'
  two = tmp_path / 'two'
  port = _free_port()
  # The one-process run and the two processes run side by side (most of each is start-up and compiling).
  procs = [subprocess.Popen([sys.executable, 'train.py', '--workdir', str(one)] + flags(extra), cwd=ROOT,
                            env=_env(2, cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
  for pid in range(2):
    dist = {'train.distributed': True, 'train.coordinator_address': f'127.0.0.1:{port}',
            'train.num_processes': 2, 'train.process_id': pid}
    procs.append(subprocess.Popen(
        [sys.executable, 'train.py', '--workdir', str(two)] + flags({**extra, **dist}), cwd=ROOT,
        env=_env(1, cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [pr.communicate(timeout=600) for pr in procs]
  for pr, (_, err) in zip(procs, outs):
    assert pr.returncode == 0, err[-3000:]

  a, b = losses(one), losses(two)
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), (a, b)
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
  assert os.path.isdir(two / 'checkpoints' / str(STEPS))   # the final bundle, written by both processes
