"""One checkpoint bundle per step in `<workdir>/checkpoints/<step>/`, via an orbax CheckpointManager:

  state: params + frozen params + optimizer state + step + RNG key (orbax StandardSave, sharded arrays)
  data:  the grain iterator state (`DataIterator.get_state()`, JSON)

The last `keep` checkpoints are kept. `restore_latest` walks the steps newest first; a checkpoint that
fails to restore (truncated, corrupt) is reported in one line and the previous one is tried.
`load_params` reads model params written by `dynllava_jax.convert` for `train.init_from`.
"""
import logging
import os

import jax
import orbax.checkpoint as ocp

log = logging.getLogger('dynllava_jax.train')


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager with the bundle layout above."""

  def __init__(self, workdir, keep=3, async_save=True):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                        enable_async_checkpointing=async_save)
    self.mgr = ocp.CheckpointManager(self.directory, options=opts, item_names=('state', 'data'))

  def save(self, step, state, data_state, force=True):
    """Saves the bundle for `step` (async; call wait() before relying on it)."""
    self.mgr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})), force=force)

  def wait(self):
    self.mgr.wait_until_finished()

  def steps(self):
    return sorted(self.mgr.all_steps())

  def restore(self, step, abstract_state):
    """Restores one step into `abstract_state` (ShapeDtypeStructs with shardings) -> (state, data)."""
    out = self.mgr.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out['state'], out['data']

  def restore_latest(self, abstract_state, report=print):
    """-> (step, state, data) of the newest checkpoint that restores, or None when there is none.

    Each failing checkpoint is reported in one line through `report`.
    """
    for step in reversed(self.steps()):
      try:
        state, data = self.restore(step, abstract_state)
        return step, state, data
      except Exception as e:  # pylint: disable=broad-except
        msg = str(e).strip().splitlines()
        report(f'checkpoint {self.directory}/{step} failed to restore ({type(e).__name__}: '
               f'{msg[0][:200] if msg else ""}); trying the previous one')
    return None

  def close(self):
    self.mgr.wait_until_finished()
    self.mgr.close()


def load_params(path, abstract_params):
  """Model params from an orbax dir (the pure dict of nnx.state(model, nnx.Param)).

  abstract_params: pure dict of ShapeDtypeStructs with shardings for the params wanted (trainable and/or
  frozen, any subset of the model). Returns a dict with the same structure, holding the checkpoint's
  arrays where it has them and None where it does not (e.g. predictors from a plain LLaVA checkpoint).
  A shape mismatch is a ValueError naming the param.
  """
  path = os.path.abspath(path)
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(path)
  tree = getattr(meta, 'item_metadata', meta)
  tree = getattr(tree, 'tree', tree)
  flat_meta = {tuple(str(getattr(k, 'key', k)) for k in p): m
               for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}

  def target(p, x):
    key = tuple(str(getattr(k, 'key', k)) for k in p)
    m = flat_meta.get(key)
    if m is None:
      return None
    if tuple(m.shape) != tuple(x.shape):
      raise ValueError(f'init_from {path}: param {"/".join(key)} has shape {tuple(m.shape)}, '
                       f'the model expects {tuple(x.shape)}')
    return x

  wanted = jax.tree_util.tree_map_with_path(target, abstract_params)
  restore_tree = _nest({k: None for k in flat_meta})
  flat_wanted = {tuple(str(getattr(k, 'key', k)) for k in p): x
                 for p, x in jax.tree_util.tree_flatten_with_path(wanted)[0]}
  for k in flat_meta:
    _set(restore_tree, k, flat_wanted.get(k) or jax.ShapeDtypeStruct(flat_meta[k].shape,
                                                                   flat_meta[k].dtype))
  restored = ckptr.restore(path, restore_tree)
  flat_restored = {tuple(str(getattr(k, 'key', k)) for k in p): v
                   for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}
  return jax.tree_util.tree_map_with_path(
      lambda p, x: flat_restored.get(tuple(str(getattr(k, 'key', k)) for k in p)) if x is not None else None,
      wanted, is_leaf=lambda x: x is None)


def _nest(flat):
  out = {}
  for k in flat:
    _set(out, k, None)
  return out


def _set(tree, key, value):
  for k in key[:-1]:
    tree = tree.setdefault(k, {})
  tree[key[-1]] = value
