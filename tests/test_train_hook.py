"""The training-method seam (sparsity/base.py::TrainHook) and optimizer groups by config rules.

The generic forward hands a hook the hidden state entering its layer and applies its keep mask from there
on; its loss terms are added to the CE by `combine`; the hooks come from the model config (MQT's m draw,
then Dynamic-LLaVA). Optimizer groups come from the rules table (config rules first, then the methods')."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynllava_jax.errors import UserError
from dynllava_jax.model.llava import Llava
from dynllava_jax.sparsity.base import TrainHook
from dynllava_jax.sparsity.dynamic_train import DynamicTrain
from dynllava_jax.sparsity.registry import train_hooks
from dynllava_jax.train import forward as F
from dynllava_jax.train import optim
from scripts import record_model_fixture as fixture


class Probe(TrainHook):
  """Reads the residual stream entering layer 2, keeps every key (all-ones G ≡ the dense model) and adds
  a loss term 0.5 · Σ h[..., 0] / B."""
  name, masks_keys = 'probe', True

  def layers(self, model_cfg):
    return (2,)

  def decide(self, ctx, h, out, layer):
    out['h2'] = h
    return jnp.ones(h.shape[:2], jnp.float32)

  def sums(self, out, batch):
    return {'probe': jnp.sum(out['h2'][..., 0])} if 'h2' in out else {'probe': jnp.zeros(())}

  def terms(self, sums, batch_size):
    return {'probe': 0.5 * sums['probe'] / batch_size}


def _jitted(model, fn):
  """fn(model) under one jit (eager dispatch of every op is far slower)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda st: fn(nnx.merge(graphdef, st)))(state)


def _jit_forward(model, batch, **kw):
  return _jitted(model, lambda m: F.train_forward(m, batch, **kw))


@pytest.fixture(scope='module')
def setup():
  cfg = fixture.config()
  return cfg, Llava(cfg.model, rngs=nnx.Rngs(0)), jax.tree.map(jnp.asarray, fixture.train_batch(cfg))


def test_hooks_from_the_config_and_a_hook_sees_its_layer(setup):
  cfg, model, batch = setup
  assert [h.name for h in train_hooks(cfg.model)] == ['dynamic']
  other = fixture.config()
  other.model.projector = 'mqt'
  assert [h.name for h in train_hooks(other.model)] == ['mqt', 'dynamic']
  other.model.sparse.enabled = False
  assert [h.name for h in train_hooks(other.model)] == ['mqt']
  hook = Probe()
  out = _jit_forward(model, batch, hooks=(hook,))
  _, aux = _jitted(model, lambda m: m(batch['input_ids'], batch['pixel_values'], batch['attention_mask'],
                                      intermediates=True))
  real = np.asarray(batch['attention_mask'], bool)
  np.testing.assert_allclose(np.asarray(out['h2'])[real], np.asarray(aux['hidden_in'][2])[real], atol=1e-5)
  dense_out = _jit_forward(model, batch, sparse=False)             # the dense stage: Dynamic-LLaVA skipped
  assert 'keep' not in dense_out and 'm_img' not in dense_out
  np.testing.assert_allclose(np.asarray(out['logits'])[real], np.asarray(dense_out['logits'])[real], atol=2e-5)
  sums = F.loss_sums(out, batch, (hook,))
  loss, terms = F.combine(sums, sums['n_tokens'], 2.0, (hook,))
  assert set(terms) == {'ce', 'probe'}
  np.testing.assert_allclose(float(loss), float(terms['ce']) + 0.25 * float(jnp.sum(out['h2'][..., 0])),
                             rtol=1e-6)
  # a dense step (sparse=False) skips a sparse_stage hook; its sums stay reported (zeros)
  Probe.sparse_stage = True
  try:
    skipped = jax.eval_shape(lambda: F.train_forward(model, batch, sparse=False, hooks=(hook,)))
  finally:
    Probe.sparse_stage = False
  assert set(skipped) == {'logits'} and float(hook.sums(skipped, batch)['probe']) == 0.0


def _labels(cfg, params):
  return {'/'.join(str(getattr(k, 'key', k)) for k in p): g for p, g in
          jax.tree_util.tree_flatten_with_path(optim._labels(cfg.train)(params))[0]}


def test_optimizer_groups_by_rules(setup):
  cfg, model, _ = setup
  cfg = fixture.config()
  _, _, params = optim.split_params(model, cfg.train)
  labels = _labels(cfg, params)
  assert {g for p, g in labels.items() if p.startswith('image_score_predictor/')} == {'predictor'}
  assert {g for p, g in labels.items() if p.startswith('output_text_score_predictor/')} == {'predictor'}
  assert {g for p, g in labels.items() if 'predictor' not in p} == {'main'}
  # a config rule comes first: the LM head joins the predictor group; the projector gets its own rate
  cfg.train.param_groups = '^language_model/lm_head/=predictor'
  cfg.train.projector_lr = 1e-4
  labels = _labels(cfg, params)
  assert {g for p, g in labels.items() if p.startswith('language_model/lm_head/')} == {'predictor'}
  assert {g for p, g in labels.items() if p.startswith('projector/')} == {'projector'}
  assert labels['language_model/embed_tokens/embedding'] == 'main'
  state = optim.make_optimizer(cfg.train).init(params)
  moments = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]}
  assert any("'projector'" in p and 'linear_1' in p for p in moments)
  assert not any('vision_tower' in p for p in moments)            # frozen: no state
  # one line for an unknown group and for a rule that matches nothing trainable (the frozen tower)
  cfg.train.param_groups = '^language_model/=fast'
  with pytest.raises(UserError, match=r"train.param_groups: '\^language_model/=fast' must be regex=group"):
    optim.make_optimizer(cfg.train)
  cfg.train.param_groups = '^vision_tower/=main'
  with pytest.raises(UserError, match='matches no trainable parameter'):
    optim.make_optimizer(cfg.train).init(params)


def test_output_text_decided_at_its_own_layer(setup):
  """sparse.text_layer = 2 (sparse_layer 1): the image decisions read h entering layer 1, the output-text
  predictor h entering layer 2 (after layer 1 ran with the image keys masked); -1 is sparse_layer."""
  cfg, model, batch = setup
  base = _jit_forward(model, batch)                            # text_layer -1: both at sparse_layer 1
  same = cfg.model.copy_and_resolve_references()
  same.sparse.text_layer = 1
  np.testing.assert_array_equal(np.asarray(_jit_forward(model, batch, hooks=(DynamicTrain(same),))['logits']),
                                np.asarray(base['logits']))
  mc = cfg.model.copy_and_resolve_references()
  mc.sparse.text_layer = 2
  probe = Probe()
  out = _jit_forward(model, batch, hooks=(probe, DynamicTrain(mc)))
  np.testing.assert_allclose(np.asarray(out['image_logits']), np.asarray(base['image_logits']), atol=1e-6)
  ot = np.asarray(model.output_text_score_predictor(out['h2']))
  np.testing.assert_allclose(np.asarray(out['ot_logits']), ot, rtol=1e-4, atol=1e-10)
  assert not np.allclose(ot, np.asarray(base['ot_logits']), rtol=1e-2, atol=0)   # another hidden state
  span = np.asarray(out['ot_span']) & np.asarray(out['ot_qual'])[:, None]
  assert span.any()
  np.testing.assert_array_equal(np.asarray(out['keep'])[span], np.asarray(out['m_ot'])[span])


def test_hard_phase_takes_the_inference_image_decisions(setup):
  """sparse.hard_from_step = 3: at steps < 3 a Gumbel sample (rng) keeps the image tokens (the released
  rule) and the image predictor gets a gradient; from step 3 on the forward keeps the evaluation's
  per-sample top-k whatever the rng and the image predictor gets none; the output text stays sampled."""
  from dynllava_jax.sparsity.base import TrainContext, keep_budget
  from dynllava_jax.sparsity.dynamic_train import gumbel_keep, topk_keep
  cfg, model, batch = setup
  mc = cfg.model.copy_and_resolve_references()
  mc.sparse.hard_from_step = 3
  hook = DynamicTrain(mc)
  key = jax.random.key(7)
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda st, step: F.train_forward(nnx.merge(graphdef, st), batch, hooks=(hook,), rng=key,
                                                 step=step, tau=0.5))
  sampled, hard = fwd(state, jnp.int32(2)), fwd(state, jnp.int32(3))
  np.testing.assert_array_equal(np.asarray(hard['image_logits']), np.asarray(sampled['image_logits']))
  b, n = np.asarray(sampled['m_img']).shape
  noise = jax.random.gumbel(jax.random.fold_in(key, 0), (b, n, 2), jnp.float32)      # the 'image' stream
  has = np.asarray(batch['has_image'], bool)[:, None]
  want = np.where(has, np.asarray(gumbel_keep(sampled['image_logits'], 0.5, noise)), 1.0)
  np.testing.assert_array_equal(np.asarray(sampled['m_img']), want)
  topk = np.where(has, np.asarray(topk_keep(hard['image_logits'], keep_budget(n, mc.sparse.image_keep_ratio))), 1.0)
  assert has.any() and not np.array_equal(np.asarray(sampled['m_img']), topk)
  np.testing.assert_array_equal(np.asarray(hard['m_img']), topk)                  # as evaluation keeps them
  np.testing.assert_array_equal(np.asarray(hard['m_ot']), np.asarray(sampled['m_ot']))   # text: sampled

  h = jax.random.normal(jax.random.key(1), (b, batch['input_ids'].shape[1], cfg.model.llm.hidden))
  weights = jax.random.normal(jax.random.key(2), (b, n))

  def kept(st, step):      # a loss on the image decisions alone, through the hook
    out = {}
    hook.decide(TrainContext(nnx.merge(graphdef, st), batch, 0.5, key, step=step), h, out,
                int(mc.sparse.sparse_layer))
    return jnp.sum(out['m_img'] * weights)

  grad = jax.jit(jax.grad(kept))
  norm = lambda g: sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(g['image_score_predictor']))
  assert norm(grad(state, jnp.int32(2))) > 0 and norm(grad(state, jnp.int32(3))) == 0
