"""Bad configs fail at start-up with one clear line; train.py exits non-zero with it on stderr."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs.dynllava import get_config
from dynllava_jax.train import loop
from dynllava_jax.train import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD = [
    ({'model.sparse.image_keep_ratio': 0.0}, 'image_keep_ratio=0.0 must be in (0, 1]'),
    ({'model.sparse.text_keep_ratio': 1.5}, 'text_keep_ratio=1.5 must be in (0, 1]'),
    ({'model.sparse.sparse_layer': 4}, 'sparse_layer=4 must be in [0, llm.layers=4)'),
    ({'mesh.data': 3}, 'does not divide the 8 available devices'),
    ({'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 1}, 'uses 4 devices but 8 are available'),
    ({'data.batch_size': 12}, 'data.batch_size=12 must split'),
    ({'data.batch_size': 16, 'train.grad_accum': 4}, 'each divisible by the data axes data*fsdp=8'),
]


def _set(c, key, value):
  *path, last = key.split('.')
  node = c
  for p in path:
    node = node[p]
  node[last] = value


@pytest.mark.parametrize('overrides,message', BAD)
def test_bad_config_is_one_line(overrides, message):
  c = get_config('size=tiny')
  for k, v in overrides.items():
    _set(c, k, v)
  with pytest.raises(ValueError) as e:
    loop.setup(c, jax.devices())
  assert message in str(e.value) and '\n' not in str(e.value)


def test_train_py_exits_nonzero_with_the_line_on_stderr(tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu',
             PYTHONPATH=ROOT)
  p = subprocess.run([sys.executable, 'train.py', '--workdir', str(tmp_path), '--config',
                      'configs/dynllava.py:size=tiny', '--config.model.sparse.sparse_layer=9'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2
  lines = [l for l in p.stderr.splitlines() if l.startswith('train.py:')]
  assert lines == ['train.py: model.sparse.sparse_layer=9 must be in [0, llm.layers=4)'], p.stderr[-2000:]
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_param_groups_and_frozen_tower():
  c = get_config('size=tiny')
  assert optim.param_group(('image_score_predictor', 'down', 'kernel')) == 'predictor'
  assert optim.param_group(('language_model', 'lm_head', 'kernel')) == 'main'
  sch = optim.schedules(c.train)
  warm = int(round(c.train.warmup_ratio * c.train.steps))
  assert float(sch['main'](0)) == 0.0
  assert abs(float(sch['main'](warm)) - c.train.lr) < 1e-9
  assert abs(float(sch['predictor'](warm)) - c.train.predictor_lr) < 1e-9
  assert float(sch['main'](c.train.steps)) < 1e-9
  # the frozen CLIP tower has no optimizer state (and no gradients: it is not in `params`)
  from dynllava_jax.train import state as st  # pylint: disable=g-import-not-at-top
  c.mesh.fsdp = 1
  mesh = loop.setup(c, jax.devices()[:1])
  tx = optim.make_optimizer(c.train)
  _, abstract, _ = st.state_shardings(mesh, c, tx)
  opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract['opt_state'])[0]]
  assert opt_paths and not any('vision_tower' in p for p in opt_paths)
  assert any('image_score_predictor' in p for p in opt_paths)
  assert 'vision_tower' in abstract['frozen'] and 'vision_tower' not in abstract['params']


def test_init_from_a_converted_dense_checkpoint(tmp_path):
  """A plain LLaVA params dir (dynllava_jax.convert layout) initialises the LLM, projector and tower;
  the predictors it lacks keep their fresh init."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dynllava_jax import convert  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import Llava  # pylint: disable=g-import-not-at-top
  from test_train_forward import small_config  # pylint: disable=g-import-not-at-top
  dense = small_config()
  dense.model.sparse.enabled = False
  ref = Llava(dense.model, rngs=nnx.Rngs(7))
  convert.save_params(ref, dense.model, tmp_path / 'llava')
  c = small_config()
  c.train.init_from = str(tmp_path / 'llava')
  c.mesh.fsdp = 1
  tr = loop.Trainer(c, str(tmp_path / 'work'), jax.devices()[:1])
  state = jax.device_get(tr.init_state())
  want = nnx.to_pure_dict(nnx.state(ref, nnx.Param))
  lm = dict(state['params']['language_model'])
  # The sparse model's plan starts a group at its decision layer: its stacks, joined, are ref's one stack.
  groups = sorted((k for k in lm if k.startswith('layers')), key=lambda k: int(k[7:] or 0))
  lm['layers'] = jax.tree.map(lambda *a: np.concatenate(a), *[lm.pop(k) for k in groups])
  jax.tree.map(np.testing.assert_array_equal, lm, jax.device_get(want['language_model']))
  for part, name in (('params', 'projector'), ('frozen', 'vision_tower')):
    jax.tree.map(np.testing.assert_array_equal, state[part][name], jax.device_get(want[name]))
  assert 'image_score_predictor' in state['params']
  assert float(np.abs(state['params']['image_score_predictor']['down']['kernel']).sum()) > 0


def test_nan_loss_stops_with_one_line(tmp_path):
  from dynllava_jax.train import metrics  # pylint: disable=g-import-not-at-top
  tel = metrics.Telemetry(str(tmp_path), 10, enabled=True, progress=False)
  tel.check_finite(1, {'loss': 1.0, 'grad_norm': 2.0})
  with pytest.raises(metrics.NonFiniteLoss) as e:
    tel.check_finite(7, {'loss': float('nan'), 'grad_norm': 1.0, 'ce': float('nan')})
  tel.close()
  assert str(e.value).startswith('loss is nan at step 7') and '\n' not in str(e.value)


def test_schedule_restarts_with_the_sparse_stage():
  """With train.restart_schedule (tiny's default) a sparse run with a dense stage restarts warm-up + cosine
  at dense_warmup_steps, peaks scaled by sparse_lr_scale; otherwise, or for a dense model, one schedule."""
  c = get_config('size=tiny')
  t = c.train
  t.steps, t.dense_warmup_steps = 1000, 600
  t.restart_schedule, t.sparse_lr_scale = False, 1.0
  assert optim.restart_step(c) == 0
  t.restart_schedule = True
  r = optim.restart_step(c)
  assert r == 600
  sch = optim.schedules(t, r)['main']
  w2 = int(round(t.warmup_ratio * 400))
  assert float(sch(599)) < 0.01 * t.lr                       # the dense stage's cosine has run out
  assert float(sch(600)) == 0.0                              # the sparse stage warms up again
  assert abs(float(sch(600 + w2)) - t.lr) < 1e-9
  assert float(sch(1000)) < 1e-9
  t.sparse_lr_scale = 0.1
  sch = optim.schedules(t, r)
  assert abs(float(sch['main'](600 + w2)) - 0.1 * t.lr) < 1e-9
  assert abs(float(sch['predictor'](600 + w2)) - 0.1 * t.predictor_lr) < 1e-9
  assert abs(float(sch['main'](int(round(t.warmup_ratio * 600)))) - t.lr) < 1e-9   # dense stage unscaled
  dense = get_config('size=tiny,dense=True')
  dense.train.restart_schedule = True
  assert optim.restart_step(dense) == 0
