"""The one table mapping logical axis names to the mesh `(data, fsdp, tensor)`, and mesh helpers.

Parameters name their axes where they are defined (e.g. `("embed", "mlp")`); activations name theirs at the
few places worth constraining (`("act_batch", "act_len", "act_embed")`). Nothing else in the project spells
a mesh axis.
"""
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical name -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_RULES = (
    # parameters
    ('layers', None),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('norm', None),
    ('patch', None),
    ('positions', None),
    ('pred_embed', None),   # keep-predictors are small: replicated
    ('pred_mlp', None),
    # activations
    ('act_batch', ('data', 'fsdp')),
    ('act_len', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
)
_RULES = dict(LOGICAL_RULES)


def logical_to_spec(names: Sequence[str | None] | None) -> P:
  """Logical axis names -> PartitionSpec over MESH_AXES (unknown names are an error)."""
  if names is None:
    return P()
  out = []
  for n in names:
    if n is None:
      out.append(None)
    elif n not in _RULES:
      raise KeyError(f'logical axis {n!r} has no rule in dynllava_jax.sharding.LOGICAL_RULES')
    else:
      out.append(_RULES[n])
  return P(*out)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Builds a `(data, fsdp, tensor)` mesh with Auto axes. `-1` in one axis takes the remaining devices.

  Raises ValueError (one line) when the sizes do not divide / match the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1')
  known = int(np.prod([s for s in sizes if s != -1]))
  if any(s == 0 or s < -1 for s in sizes) or n % known:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} does not divide the {n} available devices')
  sizes = [n // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != n:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} uses {int(np.prod(sizes))} devices '
                     f'but {n} are available; set one axis to -1 or match the count')
  arr = np.asarray(devices).reshape(sizes)
  return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def state_shardings(mesh: Mesh, state):
  """NamedShardings for an nnx.State (abstract or concrete) from each Variable's logical names."""
  from flax import nnx
  specs = nnx.get_partition_spec(state)

  def one(x):
    names = getattr(x, 'value', x)
    if isinstance(names, P):
      names = tuple(names)
    return NamedSharding(mesh, logical_to_spec(names if names else None))

  return jax.tree.map(one, specs, is_leaf=lambda x: isinstance(x, (P, nnx.Variable)))


def constrain(x, names):
  """with_sharding_constraint by logical names; a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names))
