"""The decoder's layer plan: a uniform plan is the model recorded before the reshape, bit for bit; a mixed
plan runs one scan per group and equals the uniform model; frozen groups get no gradient and no optimizer
state."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynllava_jax.model import plan as P
from dynllava_jax.model.llama import LAYER_KINDS
from dynllava_jax.model.llava import Llava
from dynllava_jax.train import forward as F
from dynllava_jax.train import optim
from scripts import record_model_fixture as fixture

ASSET = os.path.join(os.path.dirname(__file__), 'assets', 'model_fixture.npz')


@pytest.fixture(scope='module')
def recorded():
  with np.load(ASSET) as f:
    return {k: f[k] for k in f.files}


def test_uniform_plan_equals_the_recorded_model(recorded):
  """A subset (the dense forward, Dynamic-LLaVA's training forward, prefill, teacher forcing and KV-cache
  generation, PyramidDrop's three drop points); `scripts/record_model_fixture.py --check` compares all."""
  got = fixture.compute(methods=('dense', 'dynamic', 'pdrop'), teacher_methods=('dynamic',),
                        generated=('dynamic',), nocache=False)
  assert len(got) >= 10
  # Tokens and keep decisions exact; floats bit-identical on the recording machine and within 1e-5 on
  # others (XLA CPU's kernels depend on the CPU: `fixture.differs`).
  assert fixture.differs(got, {k: recorded[k] for k in got}) == []


def _with_plan(plan, ref):
  """A model with layer plan `plan` holding `ref`'s weights (each group a slice of ref's one stack)."""
  cfg = fixture.config()
  cfg.model.layer_plan = plan
  model = Llava(cfg.model, rngs=nnx.Rngs(1))
  ref_layers = jax.tree.map(lambda *a: jnp.concatenate(a), *[
      nnx.state(stacked) for _, stacked in ref.language_model.groups()])      # every layer, one stack
  for g, stacked in model.language_model.groups():
    nnx.update(stacked, jax.tree.map(lambda a: a[g.start:g.stop], ref_layers))
  nnx.update(model, nnx.state(ref, lambda p, _: p[0] != 'language_model' or not str(p[1]).startswith('layers')))
  return cfg, model


def _decoder_scan_lengths(model, ids, pix, mask):
  """Lengths of the top-level scans of the dense forward but the vision tower's."""
  jaxpr = jax.make_jaxpr(lambda: model(jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask)))()
  n_vit = model.vision_tower.layers_to_run()
  lengths = [e.params['length'] for e in jaxpr.jaxpr.eqns if e.primitive.name == 'scan']
  lengths.remove(n_vit)
  return lengths


def test_mixed_plan_scans_once_per_group_and_equals_the_uniform_model(recorded):
  """The mixed plan against the recorded uniform model (`test_uniform_plan_equals_the_recorded_model`
  ties the recording to today's uniform model), same tolerance."""
  cfg = fixture.config()
  ref = fixture.model_of(cfg)
  mcfg, mixed = _with_plan('dense*2, dense_alt, dense', ref)
  # The fixture is a Dynamic-LLaVA model deciding at layer 1: every plan starts a group there.
  assert [(g.kind, g.start, g.stop) for g in ref.language_model.plan] == [('dense', 0, 1), ('dense', 1, 4)]
  assert [(g.kind, g.start, g.stop) for g in mixed.language_model.plan] == [
      ('dense', 0, 1), ('dense', 1, 2), ('dense_alt', 2, 3), ('dense', 3, 4)]
  assert isinstance(mixed.language_model.layers_2, nnx.Module)
  ids, pix, mask = fixture.prompts(cfg)
  assert _decoder_scan_lengths(ref, ids, pix, mask) == [1, 3]
  assert _decoder_scan_lengths(mixed, ids, pix, mask) == [1, 1, 1, 1]
  got = fixture.compute(mixed, mcfg, methods=('dense', 'dynamic', 'fastv'), teacher_methods=('fastv',),
                        generated=('dynamic',), nocache=False)
  assert {'teacher_logits/fastv', 'tokens/dynamic', 'train_keep/gumbel'} <= set(got)
  assert fixture.differs(got, {k: recorded[k] for k in got}) == []


def test_groups_start_at_the_training_hooks_layers_and_init_ignores_grouping():
  """A Dynamic-LLaVA model's plan starts a group at its sparse and text layers (no scan of a training step
  runs a sub-range of a stack); the dense model keeps one group; layer i's init is the same either way."""
  from configs.dynllava import get_config  # pylint: disable=g-import-not-at-top
  sparse, dense = get_config('size=tiny'), get_config('size=tiny,dense=True')
  sparse.model.sparse.sparse_layer, sparse.model.sparse.text_layer = 1, 2
  assert [(g.start, g.stop) for g in P.resolve(sparse.model, LAYER_KINDS)] == [(0, 1), (1, 2), (2, 4)]
  assert [(g.start, g.stop) for g in P.resolve(dense.model, LAYER_KINDS)] == [(0, 4)]
  cut = Llava(sparse.model, rngs=nnx.Rngs(3)).language_model
  whole = Llava(dense.model, rngs=nnx.Rngs(3)).language_model
  ref = nnx.state(whole.layers, nnx.Param)
  for g, stacked in cut.groups():
    got = nnx.state(stacked, nnx.Param)
    jax.tree.map(lambda a, b, g=g: np.testing.assert_array_equal(a, b[g.start:g.stop]), got, ref)
  np.testing.assert_array_equal(cut.lm_head.kernel[...], whole.lm_head.kernel[...])


def test_init_from_joins_a_cut_checkpoint_into_one_stack(tmp_path):
  """`init_from` of a Dynamic-LLaVA model's params (groups [0, 1), [1, 4)) into a dense model (one stack):
  the stack is the two groups concatenated."""
  from configs.dynllava import get_config  # pylint: disable=g-import-not-at-top
  from dynllava_jax import convert  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  sparse, dense = get_config('size=tiny'), get_config('size=tiny,dense=True')
  cut = Llava(sparse.model, rngs=nnx.Rngs(5))
  path = convert.save_params(cut, sparse.model, str(tmp_path / 'cut'))
  want = nnx.to_pure_dict(nnx.state(Llava(dense.model, rngs=nnx.Rngs(6)).language_model, nnx.Param))
  spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), {'language_model': want})
  got = ckpt_lib.load_params(path, spec, n_layers=4)['language_model']['layers']
  groups = nnx.to_pure_dict(nnx.state(cut.language_model, nnx.Param))
  jax.tree.map(lambda g, a, b: np.testing.assert_array_equal(g, np.concatenate([a, b])),
               got, groups['layers'], groups['layers_1'])


def test_plan_errors_are_one_line():
  for plan, msg in (('dense*3', 'describes 3 layers'), ('moe*4', 'unknown'), ('dense*4:lora0', 'rank must be > 0'),
                    ('dense*3,skip:lora2', 'no weights'),
                    ('dense+4', 'write kind')):
    with pytest.raises(ValueError, match=msg):
      P.parse_plan(plan, 4, LAYER_KINDS)


def test_frozen_layers_get_no_gradient_and_no_optimizer_state():
  cfg = fixture.config()
  cfg.model.layer_plan = 'dense:frozen, dense*2, dense:frozen'
  cfg.train.freeze_projector = True
  model = Llava(cfg.model, rngs=nnx.Rngs(0))
  assert optim.frozen_rules(cfg.train, model) == [
      '^vision_tower/', '^projector/', '^language_model/layers/', '^language_model/layers_3/']
  graphdef, frozen, params = optim.split_params(model, cfg.train)
  assert set(frozen['language_model']) == {'layers', 'layers_3'}
  assert 'layers_1' in params['language_model'] and 'layers' not in params['language_model']
  assert 'projector' not in params and 'vision_tower' not in params
  tx = optim.make_optimizer(cfg.train)
  opt_state = tx.init(params)
  paths = ['/'.join(str(getattr(k, 'key', k)) for k in p)
           for p, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]]
  assert any('layers_1/' in p for p in paths)
  assert not any('/layers/' in p or 'layers_3/' in p or 'projector/' in p or 'vision_tower/' in p
                 for p in paths), 'a frozen param has optimizer state'
  batch = jax.tree.map(jnp.asarray, fixture.train_batch(cfg))

  def loss(params):
    out = F.train_forward(nnx.merge(graphdef, nnx.State(frozen), nnx.State(params)), batch, tau=0.5)
    return F.ce_sums(out['logits'], batch['labels'])[0]

  grads = jax.jit(jax.grad(loss))(params)     # jitted: one compile instead of eager dispatch per op
  assert set(grads['language_model']) == set(params['language_model'])
  assert float(jnp.abs(grads['language_model']['layers_1']['mlp']['up_proj']['kernel']).max()) > 0
