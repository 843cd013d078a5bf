"""Nothing lost (docs/reliability.md): checkpoints of another config, broken / damaged / half-written steps,
keep_checkpoints, one writer per workdir, stale tmp dirs, metrics.jsonl on resume, disk errors.

Most cases drive `Checkpointer` on small states in-process; train.py runs in a subprocess only where its
exit status is the point (each of those stops before compiling anything)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynllava_jax import errors
from dynllava_jax.train import checkpoint as ckpt_lib
from dynllava_jax.train import metrics as met
from dynllava_jax.train.workdir import WorkdirLock
import train_utils as tu


def small_state(seed=0, n=64):
  k = jax.random.PRNGKey(seed)
  return {'params': {'w': jax.random.normal(k, (n, n)), 'b': jnp.arange(n, dtype=jnp.bfloat16)},
          'step': jnp.int32(seed), 'rng': jax.random.PRNGKey(seed)}


def target(state):
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), state)


def saved(workdir, steps, keep=3, n=64):
  ck = ckpt_lib.Checkpointer(str(workdir), keep=keep, async_save=False)
  for s in steps:
    ck.save(s, small_state(s, n), {'pos': s})
  ck.wait()
  return ck


def files_of(path):
  return {os.path.relpath(os.path.join(d, f), path): os.path.getsize(os.path.join(d, f))
          for d, _, fs in os.walk(path) for f in fs}


def guard_exit(fn, capsys, prog='train.py'):
  """(exit status, the single stderr line) of fn run under the entry points' handler."""
  with pytest.raises(SystemExit) as e:
    errors.guard(prog, fn)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return e.value.code, err[0]


def test_changed_config_stops_and_never_deletes_the_old_run(tmp_path):
  """Case 1: a workdir with a 2-layer run, train.py with 3 layers: one line, exit 2, checkpoint intact."""
  from dynllava_jax.train import optim  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import state as st  # pylint: disable=g-import-not-at-top
  from dynllava_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  c = tu.config()
  mesh = shd.make_mesh(c.mesh, jax.devices()[:1])
  tx = optim.make_optimizer(c.train, optim.restart_step(c))
  _, abstract, sh = st.state_shardings(mesh, c, tx)
  state = jax.tree.map(lambda x, s: jax.device_put(jnp.zeros(x.shape, x.dtype), s), abstract, sh)
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ck.save(3, state, {})
  ck.close()
  before = files_of(tmp_path / 'checkpoints')
  p = tu.run_train(tmp_path, {'model.llm.layers': 3, 'train.steps': 8, 'train.save_every': 2})
  line = tu.user_line(p)
  assert 'checkpoints/3 was written by another config' in line and 'train.restart=True' in line, line
  assert "['params']['language_model']" in line
  assert files_of(tmp_path / 'checkpoints') == before          # nothing deleted, nothing added

  # train.restart: the foreign steps move to checkpoints/old/<time>/ (kept), then a fresh start.
  c3 = tu.config({'model.llm.layers': 3})
  _, abstract3, sh3 = st.state_shardings(mesh, c3, tx)
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  said = []
  assert ck.restore_latest(st.abstract_with_shardings(abstract3, sh3), report=said.append,
                           start_over=True) is None
  assert ck.steps() == [] and len(said) == 1 and 'moved steps [3]' in said[0]
  old = tmp_path / 'checkpoints' / 'old'
  (stamp,) = os.listdir(old)
  assert files_of(old / stamp / '3') == {k[2:]: v for k, v in before.items() if k.startswith('3/')}
  # ... and the moved run restores into its own config again.
  os.rename(old / stamp / '3', tmp_path / 'checkpoints' / '3')
  ck.mgr.reload()
  assert ck.restore_latest(st.abstract_with_shardings(abstract, sh))[0] == 3
  ck.close()


def test_keep_checkpoints_must_be_positive(capsys):
  """Case 2: keep_checkpoints=0 would keep nothing: refused at start-up (config check and Checkpointer)."""
  from dynllava_jax.train import loop  # pylint: disable=g-import-not-at-top
  c = tu.config({'train.keep_checkpoints': 0})
  code, line = guard_exit(lambda: loop.setup(c, jax.devices()[:1]), capsys)
  assert code == 2 and 'train.keep_checkpoints=0 must be >= 1' in line
  with pytest.raises(errors.UserError, match='keep_checkpoints=0'):
    ckpt_lib.Checkpointer('/nonexistent-never-created', keep=0)


def test_truncated_latest_is_moved_aside_and_saving_goes_on(tmp_path):
  """Case 3: the broken newest step goes to checkpoints/broken/<step> in one line; re-saving that step
  later works (it used to raise StepAlreadyExistsError on every re-run)."""
  ck = saved(tmp_path, [2, 4])
  state_dir = tmp_path / 'checkpoints' / '4' / 'state'
  big = max((os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs), key=os.path.getsize)
  with open(big, 'r+b') as f:
    f.truncate(os.path.getsize(big) // 2)
  said = []
  step, state, data = ck.restore_latest(target(small_state()), report=said.append)
  assert step == 2 and data == {'pos': 2} and int(state['step']) == 2
  assert len(said) == 2 and 'checkpoints/4 failed to restore' in said[0] and '\n' not in said[0]
  assert said[1].startswith('moved the broken checkpoint') and said[1].endswith('checkpoints/broken/4')
  assert (tmp_path / 'checkpoints' / 'broken' / '4' / 'state').is_dir() and ck.steps() == [2]
  ck.save(4, small_state(4), {'pos': 4})        # training reaches step 4 again
  ck.save(6, small_state(6), {'pos': 6})
  ck.wait()
  assert ck.steps() == [2, 4, 6]
  assert ck.restore_latest(target(small_state()))[0] == 6
  ck.close()


def test_one_writer_per_workdir(tmp_path):
  """Case 4: a second train.py on a locked workdir refuses at once naming the holder's pid."""
  with WorkdirLock(str(tmp_path)):
    p = tu.run_train(tmp_path, timeout=120)
  line = tu.user_line(p)
  assert f'is in use by process {os.getpid()}@' in line and 'another --workdir' in line, line
  assert not (tmp_path / 'checkpoints').exists() and not (tmp_path / 'metrics.jsonl').exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
  with open(tmp_path / '.lock', 'w') as f:
    f.write('999999999@elsewhere\n')
  said = []
  lock = WorkdirLock(str(tmp_path), report=said.append)
  assert len(said) == 1 and 'stale lock of process 999999999@elsewhere' in said[0]
  assert open(tmp_path / '.lock').read().startswith(f'{os.getpid()}@')
  with pytest.raises(errors.UserError, match=f'in use by process {os.getpid()}@'):
    WorkdirLock(str(tmp_path))                  # a second lock, even from this process, is refused
  lock.release()
  WorkdirLock(str(tmp_path)).release()


def test_read_only_workdir_is_one_line(tmp_path, monkeypatch, capsys):
  def denied(*a, **k):
    raise PermissionError(13, 'Permission denied', a[0])
  monkeypatch.setattr(os, 'open', denied)
  code, line = guard_exit(lambda: WorkdirLock(str(tmp_path / 'w')), capsys)
  assert code == 2 and 'is not writable (Permission denied)' in line and 'w' in line


@pytest.mark.parametrize('damage', ['flip_bytes', 'digest', 'nan'])
def test_damaged_step_is_not_restored(tmp_path, damage):
  """Case 5: flipped bytes (same size), a digest that does not match, NaN values: each step is refused
  in one line and the previous step is restored."""
  ck = saved(tmp_path, [2, 4])
  step4 = tmp_path / 'checkpoints' / '4'
  if damage == 'flip_bytes':
    for d, _, fs in os.walk(step4 / 'state'):
      for f in fs:
        if os.sep + 'd' + os.sep in os.path.join(d, f) or os.path.basename(d) == 'd':
          path = os.path.join(d, f)
          size = os.path.getsize(path)
          with open(path, 'r+b') as fh:
            fh.seek(size // 2)
            chunk = bytearray(fh.read(16))
            fh.seek(size // 2)
            fh.write(bytes(b ^ 0x5A for b in chunk))
          assert os.path.getsize(path) == size
  elif damage == 'digest':
    meta_file = step4 / 'meta' / 'metadata'
    meta = json.loads(meta_file.read_text())
    meta['digest'][0][0] = (meta['digest'][0][0] + 1) % 2**32
    meta_file.write_text(json.dumps(meta))
  else:
    ck.save(6, {**small_state(6), 'params': {'w': jnp.full((64, 64), jnp.nan), 'b': jnp.zeros(64, jnp.bfloat16)}},
            {})
    ck.wait()
  said = []
  step, state, _ = ck.restore_latest(target(small_state()), report=said.append)
  want = 4 if damage == 'nan' else 2
  assert step == want and int(state['step']) == want, said
  assert 'failed to restore' in said[0] and '\n' not in said[0]
  if damage == 'digest':
    assert 'does not match its stored digest' in said[0]
  if damage == 'nan':
    assert 'non-finite' in said[0]
  np.testing.assert_array_equal(np.asarray(state['params']['w']), np.asarray(small_state(want)['params']['w']))
  ck.close()


def test_no_step_restores_stops_unless_restart(tmp_path):
  ck = saved(tmp_path, [2])
  meta_file = tmp_path / 'checkpoints' / '2' / 'meta' / 'metadata'
  meta = json.loads(meta_file.read_text())
  meta['digest'][1][1] ^= 1
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(errors.UserError, match='no checkpoint in .* restores .*nothing was deleted') as e:
    ck.restore_latest(target(small_state()), report=lambda m: None)
  assert '\n' not in str(e.value) and ck.steps() == [2]
  assert ck.restore_latest(target(small_state()), report=lambda m: None, start_over=True) is None
  assert ck.steps() == [] and len(os.listdir(tmp_path / 'checkpoints' / 'old')) == 1
  ck.close()


def test_stale_tmp_dirs_are_removed_and_half_written_steps_never_count(tmp_path):
  """Case 9 (kill -9 during an async save): `N.orbax-checkpoint-tmp*` dirs are removed at start-up and
  never taken for a step."""
  saved(tmp_path, [2]).close()
  for name in ('4.orbax-checkpoint-tmp', '6.orbax-checkpoint-tmp-1733000000'):
    os.makedirs(tmp_path / 'checkpoints' / name / 'state')
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)          # a reader (eval) leaves them
  assert ck.steps() == [2] and len(os.listdir(tmp_path / 'checkpoints')) == 3
  ck.close()
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False, cleanup=True)   # the writer removes them
  assert ck.steps() == [2]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']
  ck.close()


def test_full_disk_mid_save_is_one_line_and_nothing_half_written_restores(tmp_path):
  """A save that hits a full disk (simulated: RLIMIT_FSIZE, EFBIG) exits 2 with one line; the next start
  removes the half-written tmp dir and restores the last complete step."""
  script = (
      'import resource, signal, sys, jax.numpy as jnp\n'
      'from dynllava_jax import errors\n'
      'from dynllava_jax.train import checkpoint as C\n'
      'ck = C.Checkpointer(sys.argv[1], async_save=True)\n'
      "ck.save(1, {'w': jnp.ones((8,))}, {}); ck.wait()\n"
      'signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n'
      'resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))\n'
      "errors.guard('train.py', lambda: (ck.save(2, {'w': jnp.arange(500_000.0)}, {}), ck.wait()))\n")
  p = tu.run(['-c', script, str(tmp_path)], timeout=300)
  line = tu.user_line(p)
  assert 'cannot write' in line and 'File too large' in line and 'free disk space' in line, line
  assert any('orbax-checkpoint-tmp' in n for n in os.listdir(tmp_path / 'checkpoints'))
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False, cleanup=True)
  assert ck.steps() == [1] and os.listdir(tmp_path / 'checkpoints') == ['1']
  step, state, _ = ck.restore_latest(target({'w': jnp.ones((8,))}))
  assert step == 1 and float(state['w'].sum()) == 8.0
  ck.close()


def test_metrics_jsonl_has_each_step_once_after_resume(tmp_path):
  """Case 9: steps logged after the restored checkpoint (by a run killed before saving them) move to
  metrics.dropped.jsonl; a torn last line too."""
  path = tmp_path / 'metrics.jsonl'
  lines = [json.dumps({'step': s, 'split': 'train', 'loss': float(s)}) for s in range(1, 6)]
  path.write_text('\n'.join(lines) + '\n{"step": 6, "spl')
  tel = met.Telemetry(str(tmp_path), 10, start_step=3, enabled=True, progress=False)
  tel.write(4, {'loss': 40.0})
  tel.close()
  steps = [json.loads(l)['step'] for l in path.read_text().splitlines()]
  assert steps == [1, 2, 3, 4]
  dropped = (tmp_path / 'metrics.dropped.jsonl').read_text().splitlines()
  assert len(dropped) == 3 and dropped[-1] == '{"step": 6, "spl'     # nothing lost


def test_digest_is_the_same_on_host_and_device_and_over_shardings():
  """The numpy digest (CPU arrays, per shard) and the jitted one (accelerators) agree bit for bit, for
  every dtype a state holds, and do not depend on how an array is sharded or replicated."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  leaves = [jax.random.normal(jax.random.PRNGKey(1), (33, 7)), jnp.arange(5, dtype=jnp.bfloat16) * 1.5,
            jnp.asarray([1, 2**31, 2**32 - 1], jnp.uint32), jnp.int32(-3), jnp.asarray([1.0, np.nan, np.inf])]
  host = ckpt_lib.digest(leaves)
  device = [[int(v) for v in np.asarray(ckpt_lib._digest_leaf(x))] for x in leaves]  # pylint: disable=protected-access
  assert host == device and host[4][2] == 2 and host[0][2] == 0
  mesh = Mesh(np.array(jax.devices()), ('x',))
  x = jnp.arange(64.0).reshape(8, 8)
  placed = [jax.device_put(x, NamedSharding(mesh, spec)) for spec in (P('x'), P(None, 'x'), P())]
  assert ckpt_lib.digest(placed) == ckpt_lib.digest([x]) * 3
  assert ckpt_lib.digest([x.at[3, 4].set(jnp.nextafter(x[3, 4], 99.0))]) != ckpt_lib.digest([x])   # last bit
