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
  ref_layers = nnx.state(ref.language_model.layers)
  for g, stacked in model.language_model.groups():
    nnx.update(stacked, jax.tree.map(lambda a: a[g.start:g.stop], ref_layers))
  nnx.update(model, nnx.state(ref, lambda p, _: 'layers' not in p or p[0] != 'language_model'))
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
  assert [(g.kind, g.start, g.stop) for g in mixed.language_model.plan] == [
      ('dense', 0, 2), ('dense_alt', 2, 3), ('dense', 3, 4)]
  assert isinstance(mixed.language_model.layers_2, nnx.Module)
  ids, pix, mask = fixture.prompts(cfg)
  assert _decoder_scan_lengths(ref, ids, pix, mask) == [4]
  assert _decoder_scan_lengths(mixed, ids, pix, mask) == [2, 1, 1]
  got = fixture.compute(mixed, mcfg, methods=('dense', 'dynamic', 'fastv'), teacher_methods=('fastv',),
                        generated=('dynamic',), nocache=False)
  assert {'teacher_logits/fastv', 'tokens/dynamic', 'train_keep/gumbel'} <= set(got)
  assert fixture.differs(got, {k: recorded[k] for k in got}) == []


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
