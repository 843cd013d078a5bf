"""Test set-up: 8 fake CPU devices for sharding tests (must be set before jax is imported)."""
import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The tests' programs are tiny: XLA's optimisation passes cost more than they save (about 40 % of the
# suite's CPU time). Child processes (train.py, eval.py, the demo) inherit it. Set it to 0 to test the
# optimised programs.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # pylint: disable=wrong-import-position


@pytest.fixture(scope='session')
def mqt_tiny():
  """(config, model): the tiny MQT-LLaVA model (`configs/mqt.py`, 2 LLM layers), one build for
  tests/test_mqt.py and tests/test_reducers.py."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from configs.mqt import get_config  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import Llava  # pylint: disable=g-import-not-at-top
  config = get_config('size=tiny')
  config.model.llm.layers = 2
  model = nnx.jit(lambda: Llava(config.model, rngs=nnx.Rngs(0)))()
  return config, model


# The longest tests (one to three minutes each on 2 cores) go first. pytest-xdist hands tests out in
# collection order, so one of them collected last keeps a worker busy after the other has run out.
SLOW_FIRST = ('test_demo.py::test_demo_smoke', 'test_train_resume.py::', 'test_train_multihost.py::',
              'test_train_sharding.py::', 'test_layer_plan.py::test_uniform_plan',
              'test_layer_plan.py::test_mixed_plan', 'test_checkpoint_frozen.py::test_region_lora')


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  def rank(item):
    return next((i for i, s in enumerate(SLOW_FIRST) if s in item.nodeid), len(SLOW_FIRST))
  items.sort(key=rank)   # stable: the rest keep their order
