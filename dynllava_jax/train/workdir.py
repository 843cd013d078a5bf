"""One writer per workdir: an advisory lock on `<workdir>/.lock` holding the owner's pid and host.

    lock = WorkdirLock(workdir)     # raises UserError at once if another live process holds it
    ...
    lock.release()

The lock is an `fcntl.flock` on the file, so the kernel drops it when its holder dies (kill -9 included):
a lock file left by a dead process is taken over (said in one line). A read-only or missing-permission
workdir is a UserError naming it.
"""
import fcntl
import os
import socket

from dynllava_jax.errors import UserError

LOCK_NAME = '.lock'


class WorkdirLock:
  """Exclusive lock of a workdir for this process (see the module docstring)."""

  def __init__(self, workdir, report=print):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    self._fd = None
    try:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise UserError(f'workdir {os.path.dirname(self.path)} is not writable ({e.strerror}); '
                      'choose a writable --workdir') from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = _read(fd)
      os.close(fd)
      raise UserError(f'workdir {os.path.dirname(self.path)} is in use by process {holder or "?"} '
                      f'(lock {self.path}); wait for it to finish, stop it, or use another --workdir'
                      ) from None
    old = _read(fd)
    if old and old.split('@')[0] != str(os.getpid()):
      report(f'taking over the stale lock of process {old} ({self.path}; that process has ended)')
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{os.getpid()}@{socket.gethostname()}\n'.encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def release(self):
    if self._fd is not None:
      try:
        os.ftruncate(self._fd, 0)
      except OSError:
        pass
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  close = release

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def _read(fd):
  try:
    return os.pread(fd, 256, 0).decode(errors='replace').strip()
  except OSError:
    return ''
