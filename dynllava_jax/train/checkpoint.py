"""One checkpoint bundle per step in `<workdir>/checkpoints/<step>/`, via an orbax CheckpointManager:

  state: params + frozen params + optimizer state + step + RNG key (orbax StandardSave, sharded arrays);
         with `save_frozen=False` (train.save_frozen) without the frozen params
  data:  the grain iterator state (`DataIterator.get_state()`, JSON)
  meta:  the state's signature (path, shape, dtype of every leaf) and digest (per leaf: two modular sums of
         its bit patterns and its count of non-finite values), JSON; when the frozen params were left out,
         their signature and digest under 'frozen': a restore rebuilds them (`frozen_source`, e.g. the seed
         init + train.init_from) and accepts them only when they match

Promises (docs/reliability.md): atomic saves (orbax tmp dir + rename; leftover tmp dirs removed at
start-up); a restore must match its stored digest (sums over uint32 words: independent of sharding) and be
finite; another run's checkpoints are never restored into or deleted (one UserError line, or with
`start_over` moved to `checkpoints/old/<time>/`); a broken step is moved to `checkpoints/broken/<step>`
and the previous one restored.

The last `keep` (>= 1) checkpoints are kept. `load_params` reads model params written by
`dynllava_jax.convert` for `train.init_from`.
"""
import logging
import os
import re
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dynllava_jax.errors import UserError, one_line

log = logging.getLogger('dynllava_jax.train')
BROKEN, OLD = 'broken', 'old'


def signature(tree):
  """[[path, shape, dtype], ...] of a state (arrays or ShapeDtypeStructs), in tree-flatten order."""
  return [[jax.tree_util.keystr(p), list(x.shape), str(np.dtype(x.dtype))]
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _words(x):
  """The bit patterns of x as uint32 words (exact, any dtype)."""
  dt = np.dtype(x.dtype)
  if dt == np.bool_:
    return x.astype(jnp.uint32)
  if dt.itemsize >= 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  small = jnp.uint16 if dt.itemsize == 2 else jnp.uint8
  return jax.lax.bitcast_convert_type(x, small).astype(jnp.uint32)


@jax.jit
def _digest_leaf(x):
  """(3,) uint32 for one array; jitted per shape / dtype / sharding (small programs: one per distinct
  leaf type compiles much faster than one program over the whole state)."""
  w = _words(x)
  bad = (jnp.sum(~jnp.isfinite(x)).astype(jnp.uint32) if jnp.issubdtype(x.dtype, jnp.inexact)
         else jnp.zeros((), jnp.uint32))
  h = (w ^ (w >> 16)) * jnp.uint32(0x45D9F3B)       # a word mix, so low-bit flips reach the sum
  h = (h ^ (h >> 16)) * jnp.uint32(0x45D9F3B)
  h = h ^ (h >> 16)
  return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(h, dtype=jnp.uint32), bad])


def _np_words(a):
  a = np.asarray(a)
  if a.dtype == np.bool_:
    return a.astype(np.uint32).reshape(-1)
  if a.dtype.itemsize >= 4:
    return np.ascontiguousarray(a).view(np.uint32).reshape(-1)
  small = np.uint16 if a.dtype.itemsize == 2 else np.uint8
  return np.ascontiguousarray(a).view(small).reshape(-1).astype(np.uint32)


def _np_digest(a):
  """_digest_leaf in numpy (bit-identical), for arrays in host memory."""
  w = _np_words(a)
  with np.errstate(over='ignore'):
    h = (w ^ (w >> 16)) * np.uint32(0x45D9F3B)
    h = (h ^ (h >> 16)) * np.uint32(0x45D9F3B)
    h = h ^ (h >> 16)
  bad = int((~np.isfinite(np.asarray(a, np.float32))).sum()) if np.issubdtype(np.asarray(a).dtype, np.inexact) \
      or str(np.asarray(a).dtype) == 'bfloat16' else 0
  return np.asarray([w.sum(dtype=np.uint64) % 2**32, h.sum(dtype=np.uint64) % 2**32, bad], np.uint64)


def _host_digest(x):
  """Digest of a CPU array from its addressable shards (each element once: replica 0 only)."""
  if not isinstance(x, jax.Array):
    return _np_digest(x)
  out = np.zeros(3, np.uint64)
  for shard in x.addressable_shards:
    if shard.replica_id == 0:
      out = (out + _np_digest(np.asarray(shard.data))) % 2**32
  return out


def digest(tree):
  """Per leaf [sum of its uint32 words, sum of the mixed words, non-finite count], mod 2**32 (python ints).

  Arrays on CPU are digested in numpy shard by shard (no compilation); on accelerators by a small jitted
  program per leaf type. Both give the same numbers. Multi-process: the per-process sums are added up."""
  leaves = jax.tree.leaves(tree)
  on_cpu = [not isinstance(x, jax.Array) or next(iter(x.devices())).platform == 'cpu' for x in leaves]
  dev = jax.device_get([None if c else _digest_leaf(x) for x, c in zip(leaves, on_cpu)])
  parts = np.stack([_host_digest(x) if c else np.zeros(3, np.uint64) for x, c in zip(leaves, on_cpu)]) \
      if leaves else np.zeros((0, 3), np.uint64)
  if jax.process_count() > 1 and any(on_cpu):
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    parts = np.asarray(multihost_utils.process_allgather(parts.astype(np.int64))).astype(np.uint64)
    parts = parts.reshape(-1, len(leaves), 3).sum(0) % 2**32
  return [[int(v) for v in (np.asarray(d) if d is not None else p)] for d, p in zip(dev, parts)]


def describe_difference(want, got):
  """One phrase naming the first difference between two signatures."""
  w, g = {p: (s, d) for p, s, d in want}, {p: (s, d) for p, s, d in got}
  for p in sorted(w, key=lambda p: 'opt_state' in p):      # model params first, their moments after
    if p not in g:
      return f'{p} is missing there'
    if tuple(w[p][0]) != tuple(g[p][0]) or w[p][1] != g[p][1]:
      return f'{p} is {tuple(g[p][0])} {g[p][1]} there, {tuple(w[p][0])} {w[p][1]} here'
  extra = [p for p in g if p not in w]
  return f'it has {extra[0]}, which this config does not' if extra else 'the leaf order differs'


class _NoThreadTraceback(logging.Filter):
  """orbax logs the traceback of a failed (background) save, then re-raises the error in the caller
  (which reports it: one line for a full disk, a traceback for a bug); keep only orbax's log line."""

  def filter(self, record):
    if record.exc_info and 'orbax' in (record.pathname or ''):
      record.exc_info, record.exc_text = None, None
    return True


logging.getLogger('absl').addFilter(_NoThreadTraceback())


def remove_tmp_dirs(directory):
  """Removes `<step>.orbax-checkpoint-tmp*` dirs (saves cut short by kill -9 or a full disk; never valid
  checkpoints). Process 0 only; orbax's own clean-up misses the older `-<timestamp>` names."""
  if jax.process_index() != 0 or not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if re.match(r'^\d+\.orbax-checkpoint-tmp', name):
      log.warning('removing the half-written checkpoint %s', os.path.join(directory, name))
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager with the bundle layout and promises above."""

  def __init__(self, workdir, keep=3, async_save=True, cleanup=False, save_frozen=True, frozen_source=None):
    """cleanup: remove half-written `<step>.orbax-checkpoint-tmp*` dirs first. Only for the workdir's one
    writer (training, holding the workdir lock): a reader (eval) must not delete a save in progress.
    save_frozen: False leaves the state's 'frozen' part out of the saved bundle (its digest in meta).
    frozen_source: () -> the frozen params rebuilt (same tree and shardings as the state's 'frozen'),
    called at most once, when a step without them is restored."""
    if keep < 1:
      raise UserError(f'train.keep_checkpoints={keep} must be >= 1 (0 would keep no checkpoint at all)')
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    if cleanup:
      remove_tmp_dirs(self.directory)
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=cleanup,
                                        enable_async_checkpointing=async_save)
    self.mgr = ocp.CheckpointManager(self.directory, options=opts, item_names=('state', 'data', 'meta'))
    self.save_frozen = bool(save_frozen)
    self._frozen_source, self._frozen = frozen_source, None

  def save(self, step, state, data_state, force=True):
    """Saves the bundle for `step` (async; call wait() before relying on it)."""
    meta = {'version': 1}
    if not self.save_frozen and 'frozen' in state:
      state = dict(state)
      frozen = state.pop('frozen')
      meta['frozen'] = {'signature': signature(frozen), 'digest': digest(frozen)}
    meta.update(signature=signature(state), digest=digest(state))
    self.mgr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}),
        meta=ocp.args.JsonSave(meta)), force=force)

  def _rebuilt_frozen(self, want):
    """The frozen params of a step saved without them, rebuilt and checked against `want` (the step's
    meta['frozen']); ValueError (one line) when there is no source or they differ."""
    if self._frozen_source is None:
      raise ValueError('it holds no frozen params (train.save_frozen) and this reader cannot rebuild them')
    if self._frozen is None:
      self._frozen = self._frozen_source()
    sig = signature(self._frozen)
    if sig != want['signature']:
      raise ValueError('the frozen params rebuilt from the config differ in structure from those it was '
                       f'trained with ({describe_difference(want["signature"], sig)})')
    for (path, _, _), w, h in zip(sig, want['digest'], digest(self._frozen)):
      if list(w) != list(h):
        raise ValueError(f'the frozen param {path} rebuilt from the config (seed, train.init_from) differs '
                         'from the one it was trained with: the base weights changed')
    return self._frozen

  def wait(self):
    self.mgr.wait_until_finished()

  def steps(self):
    return sorted(self.mgr.all_steps())

  def meta(self, step):
    """The stored signature / digest of `step`, or None (a checkpoint from before they were written)."""
    if not os.path.isdir(os.path.join(self.directory, str(int(step)), 'meta')):
      return None
    try:
      return self.mgr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception:  # pylint: disable=broad-except
      return {}          # unreadable meta: the step counts as broken when restored

  def restore(self, step, abstract_state):
    """Restores and verifies one step into `abstract_state` (ShapeDtypeStructs with shardings)
    -> (state, data). Raises ValueError when the restored values do not match the stored digest."""
    meta = self.meta(step)
    if meta == {}:
      raise ValueError('its meta item does not read')
    omitted = bool(meta) and 'frozen' in meta
    target = _without_frozen(abstract_state) if omitted else abstract_state
    out = self.mgr.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    state = out['state']
    if meta is not None:
      self._verify(state, meta)
    if omitted:
      state = {**state, 'frozen': self._rebuilt_frozen(meta['frozen'])}
    return state, out['data']

  @staticmethod
  def _verify(state, meta):
    sig, got = signature(state), digest(state)
    if sig != meta['signature']:
      raise ValueError(f'restored leaves differ from the stored ones: {describe_difference(meta["signature"], sig)}')
    for (path, _, _), want, have in zip(sig, meta['digest'], got):
      if want[2] or have[2]:
        raise ValueError(f'{path} holds {max(want[2], have[2])} non-finite values')
      if list(want) != list(have):
        raise ValueError(f'{path} does not match its stored digest (the files were changed or damaged)')

  def restore_latest(self, abstract_state, report=print, *, strict=True, start_over=False):
    """-> (step, state, data) of the newest checkpoint that restores and verifies, or None.

    strict (training): steps written for another state signature (another model / optimizer config)
    raise UserError; a broken step newer than the restored one is moved to `checkpoints/broken/<step>`;
    when steps exist but none restores, UserError. With `start_over` those two stops instead move every
    step to `checkpoints/old/<time>/` and return None (a fresh start). Not strict (evaluation): foreign
    or unrestorable steps just give None. Each failing step is reported in one line through `report`.
    """
    steps = self.steps()
    want = signature(abstract_state)
    for step in steps:
      meta = self.meta(step)
      if meta and 'frozen' in meta:     # saved without the frozen params: both parts must fit this config
        mine = signature(_without_frozen(abstract_state))
        stored = meta.get('signature')
        if stored == mine:
          mine = signature(abstract_state.get('frozen', {}))
          stored = meta['frozen'].get('signature')
      else:
        mine, stored = want, (meta or {}).get('signature', want)
      if meta and stored != mine:
        why = describe_difference(mine, stored)
        if not strict:
          report(f'checkpoint {self.directory}/{step} was written for another config ({why})')
          return None
        return self._stop_or_start_over(
            steps, start_over, report, f'{self.directory}/{step} belongs to another config ({why})',
            f'checkpoint {self.directory}/{step} was written by another config ({why}); '
            'train with the config it was written with, use a new --workdir, or pass '
            f'--config.train.restart=True to move the old checkpoints to {self.directory}/{OLD}/ '
            'and start over')
    broken, errors = [], []
    for step in reversed(steps):
      try:
        state, data = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        msg = one_line(e, 200)
        report(f'checkpoint {self.directory}/{step} failed to restore ({msg}); trying the previous one')
        broken.append(step)
        errors.append(msg)
        continue
      if strict:
        for b in broken:
          dest = self._move(b, BROKEN)
          report(f'moved the broken checkpoint {self.directory}/{b} to {dest}')
      return step, state, data
    if steps and strict:
      return self._stop_or_start_over(
          steps, start_over, report, f'no checkpoint in {self.directory} restores',
          f'no checkpoint in {self.directory} restores (steps {steps}; newest: {errors[0]}); '
          'nothing was deleted. Train with the config they were written with, use a new '
          f'--workdir, or pass --config.train.restart=True to move them to {self.directory}/{OLD}/ '
          'and start over')
    return None

  def _stop_or_start_over(self, steps, start_over, report, reason, message):
    """Checkpoints that cannot be resumed: moved aside (`start_over`, returns None) or a UserError."""
    if start_over:
      self._start_over(steps, report, reason)
      return None
    raise UserError(message)

  def _move(self, step, kind, sub=''):
    """Moves step dir `step` to checkpoints/<kind>/[<sub>/]<step>[-n] (process 0); returns the new path."""
    src = os.path.join(self.directory, str(int(step)))
    dest_dir = os.path.join(self.directory, kind, sub) if sub else os.path.join(self.directory, kind)
    dest = os.path.join(dest_dir, str(int(step)))
    n = 1
    while os.path.exists(dest):
      dest = os.path.join(dest_dir, f'{int(step)}-{n}')
      n += 1
    if jax.process_index() == 0:
      os.makedirs(dest_dir, exist_ok=True)
      os.rename(src, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'checkpoint move {kind} {step}')
    self.mgr.reload()
    return dest

  def _start_over(self, steps, report, why):
    sub = time.strftime('%Y%m%d-%H%M%S')
    for s in steps:
      self._move(s, OLD, sub)
    report(f'{why}: train.restart=True, so moved steps {steps} to {self.directory}/{OLD}/{sub}/ and '
           'starting over')

  def close(self):
    self.mgr.wait_until_finished()
    self.mgr.close()


def _without_frozen(state):
  return {k: v for k, v in state.items() if k != 'frozen'}


def load_params(path, abstract_params, require_any=True, n_layers=None):
  """Model params from an orbax dir (the pure dict of nnx.state(model, nnx.Param)).

  abstract_params: pure dict of ShapeDtypeStructs with shardings for the params wanted (trainable and/or
  frozen, any subset of the model). Returns a dict with the same structure, holding the checkpoint's
  arrays where it has them and None where it does not (e.g. predictors from a plain LLaVA checkpoint).
  A shape mismatch is a ValueError naming the param; with `require_any`, so is a checkpoint that holds
  none of the wanted params (a caller loading several subsets checks their union itself).
  n_layers: the model's decoder depth; when given, layer-plan groups (`language_model/layers_<start>`) are
  assembled from a checkpoint of the same depth grouped otherwise (`_layer_pieces`: e.g. a region plan's
  groups cut from a convert output's single stack, or a single stack joined from a Dynamic-LLaVA model's).
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise UserError(f'train.init_from={path} is not a directory (a `python -m dynllava_jax.convert` output)')
  ckptr = ocp.StandardCheckpointer()
  try:
    meta = ckptr.metadata(path)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'train.init_from={path} is not an orbax params checkpoint ({one_line(e, 120)}); '
                    'write one with python -m dynllava_jax.convert') from None
  tree = getattr(meta, 'item_metadata', meta)
  tree = getattr(tree, 'tree', tree)
  flat_meta = _flat(tree)

  sliced = {}   # wanted key -> [(checkpoint key, lo, hi)]: a layer-plan group from the checkpoint's groups

  def target(p, x):
    key = _path_key(p)
    m = flat_meta.get(key)
    pieces = (_layer_pieces(key, x, flat_meta, n_layers)
              if n_layers and (m is None or tuple(m.shape) != tuple(x.shape)) else None)
    if pieces is not None:
      sliced[key] = pieces
      return x
    if m is None:
      return None
    if tuple(getattr(m, 'shape', ()) or ()) != tuple(x.shape):
      raise UserError(f'init_from {path}: param {"/".join(key)} has shape {tuple(m.shape)}, '
                      f'the model expects {tuple(x.shape)} (a checkpoint of another model size?)')
    return x

  wanted = jax.tree_util.tree_map_with_path(target, abstract_params)
  if require_any and jax.tree.leaves(abstract_params) and not jax.tree.leaves(wanted):
    raise UserError(f'init_from {path} holds none of the params of this model (its top level: '
                    f'{sorted({k[0] for k in flat_meta})[:6]}); give a python -m dynllava_jax.convert output')
  restore_tree, flat_wanted = {}, _flat(wanted)
  for k in flat_meta:
    _set(restore_tree, k, flat_wanted.get(k) or jax.ShapeDtypeStruct(flat_meta[k].shape,
                                                                   flat_meta[k].dtype))
  for k, pieces in sliced.items():     # whole checkpoint stacks, sharded as the group's leaf (layers replicated)
    sh = getattr(flat_wanted[k], 'sharding', None)
    for src, _, _ in pieces:
      _set(restore_tree, src, jax.ShapeDtypeStruct(flat_meta[src].shape, flat_wanted[k].dtype, sharding=sh))
  restored = ckptr.restore(path, restore_tree)
  flat_restored = _flat(restored)
  stacks = {src: flat_restored[src] for pieces in sliced.values() for src, _, _ in pieces}
  for k, pieces in sliced.items():
    parts = [stacks[src][lo:hi] for src, lo, hi in pieces]
    flat_restored[k] = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: flat_restored.get(_path_key(p)) if x is not None else None,
      wanted, is_leaf=lambda x: x is None)


_GROUP = re.compile(r'^layers(?:_(\d+))?$')


def _layer_pieces(key, x, flat_meta, n_layers):
  """A decoder layer-plan group's leaf (`language_model/layers_<start>/...`, model/plan.py) read from a
  checkpoint that groups the same n_layers layers otherwise (`language_model/layers[_<s>]/...` stacks, e.g.
  a convert output's single stack read by a visual-region plan): -> [(checkpoint key, lo, hi)], the
  checkpoint stacks' row ranges that, concatenated, are layers [start, start + size) — or None (layers
  missing, or stacks of another depth or layer shape: that stays a shape error)."""
  if len(key) < 3 or key[0] != 'language_model':
    return None
  m = _GROUP.match(key[1])
  if m is None:
    return None
  start, size = int(m.group(1) or 0), x.shape[0]
  stacks = {}     # first layer -> (checkpoint key, layers): the checkpoint's groups holding this leaf
  for k, meta in flat_meta.items():
    g = _GROUP.match(k[1]) if len(k) == len(key) and k[0] == key[0] and k[2:] == key[2:] else None
    shape = tuple(getattr(meta, 'shape', ()) or ())
    if g is not None and len(shape) == len(x.shape) and shape[1:] == tuple(x.shape[1:]):
      stacks[int(g.group(1) or 0)] = (k, shape[0])
  if sum(n for _, n in stacks.values()) != n_layers:
    return None
  pieces, at = [], start
  for s in sorted(stacks):
    k, n = stacks[s]
    lo, hi = max(at, s), min(start + size, s + n)
    if lo < hi:
      if lo != at:
        return None
      pieces.append((k, lo - s, hi - s))
      at = hi
  return pieces if at == start + size and pieces else None


def _path_key(p):
  return tuple(str(getattr(k, 'key', k)) for k in p)


def _flat(tree):
  """{path tuple of str: leaf} (None leaves are dropped, as tree_flatten drops them)."""
  return {_path_key(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _set(tree, key, value):
  for k in key[:-1]:
    tree = tree.setdefault(k, {})
  tree[key[-1]] = value
