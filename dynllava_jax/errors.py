"""User errors and the one top-level handler every entry point uses (docs/reliability.md).

    raise UserError(f'{path}: expected a JSON list of records')      # at a validation site

    def main(argv):
      errors.guard('train.py', lambda: run(argv))                        # in an entry point

A `UserError` is bad input the user can fix: its message is one line that names the file / field and
what to do. `guard` prints `<prog>: <message>` on stderr and exits with status 2. Disk-level failures
(full disk, read-only or forbidden paths, file too large) are reported the same way. Every other
exception keeps its traceback (a bug, not bad input).
"""
import difflib
import errno
import os
import re
import sys

USER_EXIT = 2
# OSError numbers that are the user's environment, not a bug: one line, exit 2.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


class UserError(ValueError):
  """Bad input (config, data, checkpoint, flags): one actionable line. A ValueError for old callers."""

  def __init__(self, message):
    super().__init__(' '.join(str(message).split('\n')).strip())


def one_line(e, limit=300):
  """The first line of an exception's text, clipped (for messages that embed a library's error)."""
  lines = str(e).strip().splitlines()
  text = lines[0] if lines else ''
  return f'{type(e).__name__}: {text[:limit]}'


def disk_error(e):
  """An OSError caused by the disk / permissions (ENOSPC, EROFS, EACCES, ...), searched along the cause
  chain (orbax wraps the writer's error); tensorstore's `... [os_error_code='28']` ValueErrors count too
  (returned as an OSError). None otherwise."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
      return e
    m = re.search(r"os_error_code='?(\d+)", str(e))
    if m and int(m.group(1)) in DISK_ERRNOS:
      path = re.search(r'Failed (?:writing|to write)[^"]*"([^"]+)"', str(e))
      code = int(m.group(1))
      return OSError(code, os.strerror(code), path.group(1) if path else None)
    e = e.__cause__ or e.__context__
  return None


def user_message(e):
  """The one line for an exception the handler owns, or None when it should keep its traceback."""
  if isinstance(e, UserError):
    return str(e)
  d = disk_error(e)
  if d is not None:
    where = f' ({d.filename})' if d.filename else ''
    return (f'cannot write{where}: {d.strerror or d}; free disk space or choose a writable directory '
            '(a half-written checkpoint is never restored)')
  return None


def guard(prog, fn, extra=()):
  """Runs fn(); a user error (UserError, disk errors, or `extra` exception types) becomes one line on
  stderr and SystemExit(2). Returns fn's result."""
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except
    msg = user_message(e)
    if msg is None and extra and isinstance(e, tuple(extra)):
      msg = ' '.join(str(e).split())
    if msg is None:
      raise
    print(f'{prog}: {msg}', file=sys.stderr, flush=True)
    sys.exit(USER_EXIT)


def flags_parser(prog):
  """An absl `flags_parser` for app.run: a bad flag or config file (unknown field, typo, bad value,
  unknown config argument) is one line with a suggestion and exit 2, not a traceback."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
      print(f'{prog}: {_flag_message(e)}', file=sys.stderr, flush=True)
      sys.exit(USER_EXIT)
  return parse


def define_config_flag(prog, default, help_text):
  """config_flags.DEFINE_config_file('config', ...) (locked). Without --config on the command line the
  default file and its overrides are parsed right here, at import time: a bad override is one line and
  exit 2 as in `flags_parser`."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  try:
    return config_flags.DEFINE_config_file('config', default, help_text, lock_config=True)
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    print(f'{prog}: {_flag_message(e)}', file=sys.stderr, flush=True)
    sys.exit(USER_EXIT)


def _flag_message(e):
  """One line for a flag-parsing error (absl / ml_collections wrap the real error in its traceback)."""
  text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  text = ' '.join(str(text).replace('\\n', ' ').replace("\\'", "'").split())
  typo = re.search(r"'(\w+)'?\s*Did you mean \"(\w+)\"", text)
  if typo:
    return f'bad flag: the config has no field {typo.group(1)!r} (did you mean {typo.group(2)!r}?)'
  bare = re.fullmatch(r"""["']*(\w+)["']*""", text)
  if bare:
    return f'bad flag: the config has no field {bare.group(1)!r}'
  if 'Traceback' in text:    # an error raised inside the config file: keep its last line
    last = re.findall(r'\b(\w+(?:Error|Exception)): (.*?)(?= File "|$)', text)
    if last:
      return f'bad --config: {last[-1][0]}: {last[-1][1].strip()}'
  return f'bad flag: {text}'


def suggest(name, known):
  """' (did you mean X?)' for a near miss of `name` among `known`, else ''."""
  close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
  return f' (did you mean {close[0]!r}?)' if close else ''
