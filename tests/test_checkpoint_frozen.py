"""Checkpoints of a visual-region / LoRA run hold only what trains (`train.save_frozen`): the frozen base is
rebuilt on restore (seed init + `train.init_from`) and accepted only when it matches the stored digest."""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs.dynllava import get_config
from dynllava_jax import errors
from dynllava_jax.eval import run as eval_run
from dynllava_jax.model.llava import Llava
from dynllava_jax.train import loop
from dynllava_jax.train import state as st


def _config(init_from=''):
  c = get_config('size=tiny,dense=True')
  c.model.llm.layers = 2
  c.model.region = '1'
  c.model.region_train = 'lora4'
  c.train.init_from = init_from
  return c


def _write_base(path, seed):
  """A base model's params (the convert layout `train.init_from` reads): random values from `seed`."""
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Llava(_config().model, rngs=nnx.Rngs(0))),
                                        nnx.Param))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: (0.02 * rng.standard_normal(x.shape)).astype(x.dtype), abstract)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(path), params, force=True)
  ckptr.wait_until_finished()


def _equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_region_lora_checkpoint_leaves_the_base_out_and_restores_it(tmp_path):
  base, workdir = tmp_path / 'base', tmp_path / 'run'
  _write_base(base, seed=7)
  trainer = loop.Trainer(_config(str(base)), str(workdir))
  state = trainer.init_state()
  assert st.omits_frozen(trainer.config) and jax.tree.leaves(state['frozen'])
  ck = trainer.checkpointer(str(workdir), async_save=False)
  ck.save(3, state, {'pos': 3})
  ck.wait()
  raw = ck.mgr.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  assert 'frozen' not in raw and 'params' in raw                      # the base is not in the bundle
  assert ck.meta(3)['frozen']['digest']
  ck.close()

  # Eval / export (and a relaunch, the same Checkpointer.restore) rebuild the base from init_from: equal.
  model, step = eval_run.load_model(_config(str(base)), str(workdir))
  assert step == 3 and _equal(nnx.state(model, nnx.Param), nnx.state(st.merge_model(trainer.graphdef, state),
                                                                     nnx.Param))

  # The base changed under the run: nothing restores, one line, the checkpoint stays.
  _write_base(base, seed=8)
  ck = trainer.checkpointer(str(workdir), async_save=False)
  with pytest.raises(errors.UserError, match='the base weights changed'):
    ck.restore_latest(st.abstract_with_shardings(trainer.abstract, trainer.shardings), report=lambda m: None)
  assert ck.steps() == [3]
  ck.close()


def test_save_frozen_rule():
  c = _config()
  assert st.omits_frozen(c)
  c.train.save_frozen = 'always'
  assert not st.omits_frozen(c)
  d = get_config('size=tiny,dense=True')
  assert not st.omits_frozen(d)                           # a uniform fully trained plan keeps them
  d.train.save_frozen = 'sometimes'
  with pytest.raises(errors.UserError, match="train.save_frozen='sometimes'"):
    loop.setup(d)
