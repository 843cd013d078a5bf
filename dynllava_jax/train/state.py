"""The train state, created directly in its shardings (never a full unsharded copy).

state = {'step': int32 (), 'params': trainable pure dict, 'frozen': frozen pure dict,
         'opt_state': optax state over params, 'rng': uint32 (2,) base key}
Gumbel noise of step s uses fold_in(rng, s), so the key itself never changes and resume is exact.
"""
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dynllava_jax import sharding as shd
from dynllava_jax.model.llava import Llava
from dynllava_jax.train import optim


def _path_keys(path):
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def abstract_model(config):
  return nnx.eval_shape(lambda: Llava(config.model, rngs=nnx.Rngs(config.seed)))


def param_shardings(mesh, config):
  """(graphdef, frozen shardings, trainable shardings) from the params' logical axis names."""
  model = abstract_model(config)
  graphdef, frozen, trainable = nnx.split(model, optim.frozen_filter(config.train, model), ...)
  to = lambda st: nnx.to_pure_dict(shd.state_shardings(mesh, st))
  return graphdef, to(frozen), to(trainable)


def opt_state_shardings(mesh, abstract_opt, params_abstract, params_shardings):
  """Optimizer-state leaves that mirror a param (same dict-key path suffix and shape) get its sharding;
  counters and the rest are replicated."""
  table = {}
  for path, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]:
    table[_path_keys(path)] = s
  shapes = {_path_keys(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(params_abstract)[0]}
  rep = NamedSharding(mesh, P())

  def one(path, x):
    keys = _path_keys(path)
    for i in range(len(keys)):
      k = keys[i:]
      if k in table and shapes[k] == x.shape:
        return table[k]
    return rep

  return jax.tree_util.tree_map_with_path(one, abstract_opt)


def make_init_fn(config, tx):
  def init():
    model = Llava(config.model, rngs=nnx.Rngs(config.seed))
    _, frozen, params = optim.split_params(model, config.train)
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'frozen': frozen,
            'opt_state': tx.init(params), 'rng': jax.random.PRNGKey(config.seed)}
  return init


def state_shardings(mesh, config, tx):
  """(graphdef, abstract state, shardings of the state)."""
  graphdef, fz_sh, tr_sh = param_shardings(mesh, config)
  abstract = jax.eval_shape(make_init_fn(config, tx))
  rep = NamedSharding(mesh, P())
  sh = {'step': rep, 'params': tr_sh, 'frozen': fz_sh, 'rng': rep,
        'opt_state': opt_state_shardings(mesh, abstract['opt_state'], abstract['params'], tr_sh)}
  return graphdef, abstract, sh


def create_state(mesh, config, tx):
  """Initialises the state straight into its shardings. Returns (graphdef, state, shardings)."""
  graphdef, _, sh = state_shardings(mesh, config, tx)
  with jax.set_mesh(mesh):
    state = jax.jit(make_init_fn(config, tx), out_shardings=sh)()
  return graphdef, state, sh


def init_frozen(mesh, config, tx, shardings):
  """The frozen params alone, as a fresh start makes them: the seed init (`make_init_fn`, the rest of the
  state is never computed) with what `train.init_from` holds on top. -> pure dict in shardings['frozen']."""
  with jax.set_mesh(mesh):
    frozen = jax.jit(lambda: make_init_fn(config, tx)()['frozen'], out_shardings=shardings['frozen'])()
  if config.train.init_from:
    frozen = overlay_init_from(config, frozen, shardings['frozen'])[0]
  return frozen


def overlay_init_from(config, part, shardings):
  """-> (part with the leaves `train.init_from` has replaced, how many it had)."""
  from dynllava_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  target = abstract_with_shardings(part, shardings)
  loaded = ckpt_lib.load_params(config.train.init_from, target, require_any=False,
                                n_layers=config.model.llm.layers)   # plan groups: cut from one stack
  found = len(jax.tree.leaves(loaded))
  return jax.tree.map(lambda new, old: old if new is None else new, loaded, part,
                      is_leaf=lambda x: x is None), found


def omits_frozen(config):
  """Whether checkpoints leave the frozen params out (`train.save_frozen`; 'auto': the layer plan has
  frozen or LoRA groups)."""
  mode = config.train.get('save_frozen', 'auto')
  if mode != 'auto':
    return mode == 'never'
  from dynllava_jax.model import plan as plan_lib  # pylint: disable=g-import-not-at-top
  return any(g.train != 'full' for g in plan_lib.resolve(config.model))


def abstract_with_shardings(abstract, shardings):
  """ShapeDtypeStructs carrying the target shardings (restore targets)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def merge_model(graphdef, state):
  """The Llava module of a state (inside or outside jit)."""
  return nnx.merge(graphdef, state['frozen'], state['params'])


def count_params(tree):
  return int(sum(x.size for x in jax.tree.leaves(tree)))
