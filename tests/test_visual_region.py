"""Visual region: the released layer spread, region tuning (full / LoRA) with no gradient and no optimizer
state for frozen layers and a backward that stops at the lowest trainable layer, LoRA zero-init / merge /
adapters / HF export, Block Influence against NumPy, layer pruning ≡ the `skip` plan, and the bad-input
lines."""
import copy

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynllava_jax import convert, hf
from dynllava_jax.errors import UserError
from dynllava_jax.model import lora as LR
from dynllava_jax.model import plan as P
from dynllava_jax.model.llama import LAYER_KINDS
from dynllava_jax.model.llava import Llava, check_model_config
from dynllava_jax.tools import block_influence as BI
from dynllava_jax.tools import prune
from dynllava_jax.train import optim
from dynllava_jax.train import step as S
from hf_utils import hf_logits, make_tiny_hf_llava, random_llava, sample_batch
from scripts import record_model_fixture as fixture

fwd = nnx.jit(lambda m, ids, pix, mask: m(ids, pix, mask))


@pytest.fixture(scope='module')
def tiny():
  cfg = fixture.config()
  model = random_llava(cfg.model, std=0.1)
  ids, pix, mask = (jnp.asarray(a) for a in fixture.prompts(cfg))
  return cfg, model, (ids, pix, mask), fwd(model, ids, pix, mask)


@pytest.fixture(scope='module')
def tiny_hf(tmp_path_factory):
  path = make_tiny_hf_llava(tmp_path_factory.mktemp('hf'), layers=4, kv_heads=2)
  model, mc = hf.load_llava(path)
  batch = sample_batch()
  return path, model, mc, batch


def test_region_rule_reproduces_the_release_and_spreads_any_depth():
  assert P.region_layers(32) == (1, 5, 9, 13, 19, 23, 27, 31)
  for n in range(1, 81):
    r = P.region_layers(n)
    assert len(r) == -(-n // 4) and list(r) == sorted(set(r)) and r[-1] == n - 1, n
    assert all(0 <= i < n for i in r) and (n < 5 or r[0] == 1), n
    k = len(r)      # evenly spread: one layer in each of k equal chunks of [0, n)
    assert [sum((i * n) // k <= x < ((i + 1) * n) // k for x in r) for i in range(k)] == [1] * k, (n, r)
  assert P.region_layers(40) == (1, 5, 9, 13, 17, 23, 27, 31, 35, 39)


def test_bad_region_prune_and_rank_are_one_line(tiny):
  cfg, _, _, _ = tiny
  cases = [(dict(region='1,4'), 'layer 4 is outside 0..3'), (dict(region='1,x'), 'layer numbers'),
           (dict(region='2', region_train='lora0'), 'rank must be > 0'),
           (dict(layer_plan='dense*4:lora0'), 'rank must be > 0'),
           (dict(layer_plan='dense:frozen,dense*3', region='auto'), 'let the region decide')]
  for fields, msg in cases:
    mc = copy.deepcopy(cfg.model)
    mc.update(fields)
    with pytest.raises(ValueError, match=msg) as e:
      check_model_config(mc)
    assert '\n' not in str(e.value)
  for spec, msg in (('1,-1', 'outside 0..3'), ('0,0', 'twice'), ('3', 'visual region')):
    with pytest.raises(UserError, match=msg):
      prune.check_remove(spec, cfg.model)
  assert prune.check_remove('3', cfg.model, force=True) == (3,)


def _count(jaxpr, acc, mult=1):
  """dot_general count (each scan body times its length) and the scan lengths met."""
  for e in jaxpr.eqns:
    if e.primitive.name == 'dot_general':
      acc['dots'] += mult
    inner = mult * e.params['length'] if e.primitive.name == 'scan' else mult
    if e.primitive.name == 'scan':
      acc['scans'].append(e.params['length'])
    for p in e.params.values():
      for j in (p if isinstance(p, (list, tuple)) else [p]):
        if isinstance(j, jex.core.ClosedJaxpr):
          _count(j.jaxpr, acc, inner)
        elif isinstance(j, jex.core.Jaxpr):
          _count(j, acc, inner)
  return acc


def _region_step(train, freeze_projector):
  cfg = fixture.config()
  cfg.model.sparse.enabled = False
  cfg.model.region, cfg.model.region_train = '3', train
  cfg.train.freeze_projector = freeze_projector
  model = random_llava(cfg.model)
  graphdef, frozen, params = optim.split_params(model, cfg.train)
  tx = optim.make_optimizer(cfg.train)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'frozen': frozen, 'rng': jax.random.key(0),
           'opt_state': tx.init(params)}
  batch = jax.tree.map(jnp.asarray, fixture.train_batch(cfg))
  fn = S.make_train_step(cfg, graphdef, tx, sparse=False)
  return model, state, batch, fn, _count(jax.make_jaxpr(fn)(state, batch).jaxpr, {'dots': 0, 'scans': []})


@pytest.mark.parametrize('train', ['full', 'lora4'])
def test_frozen_layers_no_grad_no_state_and_the_backward_stops(train):
  model, state, batch, fn, cut = _region_step(train, freeze_projector=True)
  params = state['params']
  assert set(params) == {'language_model'} and set(params['language_model']) == {'layers_3'}
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = ['/'.join(str(getattr(k, 'key', k)) for k in p) for p, _ in leaves]
  assert len(paths) == (14 if train == 'lora4' else 9)        # 7 × (A, B) | 7 kernels + 2 norms
  assert all(('/lora/' in p) == train.startswith('lora') for p in paths)
  opt_paths = ['/'.join(str(getattr(k, 'key', k)) for k in p)
               for p, _ in jax.tree_util.tree_flatten_with_path(state['opt_state'])[0]]
  moments = [p for p in opt_paths if '.mu/' in p or '.nu/' in p]
  assert len(moments) == 2 * len(paths) and all('/layers_3/' in p for p in moments), 'frozen optimizer state'
  assert optim.grad_floor(model, params) == 3
  # The frozen group [0, 3) is scanned once (forward only): no backward below layer 3.
  assert cut['scans'].count(3) == 1
  _, _, _, _, through = _region_step(train, freeze_projector=False)
  assert through['scans'].count(3) == 2          # the projector trains: activation gradients run down to it
  # ... and only activation gradients: 3 layers × (7 projections dx + 4 attention) + the projector's 3.
  assert through['dots'] - cut['dots'] == 3 * 11 + 3


def test_lora_zero_init_merge_and_adapters(tiny, tmp_path):
  cfg, ref, (ids, pix, mask), want = tiny
  mc = copy.deepcopy(cfg.model)
  mc.region, mc.region_train = '1,3', 'lora4'
  model = LR.rebuild(ref, mc)
  np.testing.assert_array_equal(fwd(model, ids, pix, mask), want)          # B = 0: unchanged
  st = nnx.state(model, nnx.LoRAParam)
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(st))))
  nnx.update(model, jax.tree.map(lambda a: a + 0.05 * jax.random.normal(next(keys), a.shape), st))
  unmerged = fwd(model, ids, pix, mask)
  assert float(jnp.abs(unmerged - want).max()) > 1e-2
  merged, mc2 = LR.merge(model, mc)
  assert [g.train for g in merged.language_model.plan] == ['full'] and not nnx.state(merged, nnx.LoRAParam)
  np.testing.assert_allclose(fwd(merged, ids, pix, mask), unmerged, atol=2e-4, rtol=1e-4)
  base = convert.save_params(ref, cfg.model, str(tmp_path / 'base'))
  LR.save_adapters(str(tmp_path / 'ad'), model, mc, base)
  back, _ = LR.load_adapters(str(tmp_path / 'ad'))
  np.testing.assert_array_equal(fwd(back, ids, pix, mask), unmerged)


def test_merged_lora_export_loads_in_transformers(tiny_hf, tmp_path):
  path, model, mc, (ids, pix, mask) = tiny_hf
  mc = copy.deepcopy(mc)
  mc.region, mc.region_train = 'auto', 'lora2'
  lm = LR.rebuild(model, mc)
  st = nnx.state(lm, nnx.LoRAParam)
  nnx.update(lm, jax.tree.map(lambda a: a + 0.1, st))
  ours = np.asarray(lm(jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask)))
  out = hf.save_llava(lm, mc, str(tmp_path / 'merged'))
  ref = hf_logits(out, ids, pix, mask)
  m = mask.astype(bool)
  assert np.abs(ours[m] - ref[m]).max() / np.abs(ref[m]).max() <= 1e-4


def _np_bi(h_in, h_out, mask, image=None):
  out = np.zeros(h_in.shape[0])
  for l in range(h_in.shape[0]):
    per = []
    for b in range(h_in.shape[1]):
      def mean_cos(sel):
        c = [np.dot(h_in[l, b, t], h_out[l, b, t]) / (np.linalg.norm(h_in[l, b, t]) * np.linalg.norm(h_out[l, b, t]))
             for t in np.flatnonzero(sel)]
        return np.mean(c) if c else None
      if image is None:
        per.append(1 - mean_cos(mask[b]))
      else:
        parts = [x for x in (mean_cos(mask[b] & image[b]), mean_cos(mask[b] & ~image[b])) if x is not None]
        per.append(1 - np.mean(parts))
    out[l] = np.mean(per)
  return out


def test_block_influence_equals_numpy_and_identity_layer_is_zero(tiny):
  cfg, ref, (ids, pix, mask), _ = tiny
  _, aux = ref(ids, pix, mask, intermediates=True)
  h_in = np.asarray(aux['hidden_in'], np.float64)
  h_out = np.asarray(aux['hidden_out'], np.float64)
  h_out[-1] = np.asarray(ref.language_model.norm(aux['hidden_out'][-1]))
  m, img = np.asarray(mask).astype(bool), np.asarray(ids) == cfg.model.image_token_id
  for variant, image in (('all', None), ('image_text', img)):
    got, n = BI.block_influence(ref, [(ids, pix, mask)], variant)
    assert n == ids.shape[0]
    np.testing.assert_allclose(got, _np_bi(h_in, h_out, m, image), atol=1e-5)
  ident = copy.deepcopy(ref)       # layer 1 as the identity: its two output projections zero
  layers = ident.language_model.layers
  for proj in (layers.attn.o_proj, layers.mlp.down_proj):
    proj.kernel[...] = proj.kernel[...].at[1].set(0.0)
  got, _ = BI.block_influence(ident, [(ids, pix, mask)])
  assert abs(got[1]) < 1e-6 and got[0] > 1e-3 and got[2] > 1e-3
  assert BI.ranking(got)[0] == 1
  assert prune.choose(got, 2, cfg.model) == tuple(sorted(BI.ranking(got)[:2])) or 3 in BI.ranking(got)[:2]


def test_pruned_model_equals_the_skip_plan_and_exports_smaller(tiny, tiny_hf, tmp_path):
  cfg, ref, (ids, pix, mask), _ = tiny
  skip_mc = prune.skip_config(cfg.model, (0, 2))
  assert [g.kind for g in P.resolve(skip_mc, LAYER_KINDS)] == ['skip', 'dense', 'skip', 'dense']
  skipped = LR.rebuild(ref, skip_mc)
  _, aux = skipped(ids, pix, mask, intermediates=True)
  np.testing.assert_array_equal(aux['hidden_in'][0], aux['hidden_out'][0])
  pruned, mc2 = prune.prune_model(ref, cfg.model, (0, 2))
  assert mc2.llm.layers == 2 and len(pruned.language_model.plan) == 1
  np.testing.assert_allclose(pruned(ids, pix, mask), skipped(ids, pix, mask), atol=1e-6, rtol=1e-6)
  with pytest.raises(ValueError, match='no K/V'):
    skipped.language_model.run_layers(jnp.zeros((1, 2, 64)), jnp.zeros((1, 2), jnp.int32),
                                      jnp.ones((1, 2, 2), bool), return_kv=True)
  # HF: a pruned export is a smaller checkpoint transformers runs the same; the full one loads as a skip plan.
  path, model, mc, (hids, hpix, hmask) = tiny_hf
  small, smc = prune.prune_model(model, mc, (1,))
  out = hf.save_llava(small, smc, str(tmp_path / 'pruned'))
  assert hf.read_config(out)[0].llm.layers == 3 if isinstance(hf.read_config(out), tuple) else True
  ours = np.asarray(small(jnp.asarray(hids), jnp.asarray(hpix), jnp.asarray(hmask)))
  ref_logits = hf_logits(out, hids, hpix, hmask)
  m = hmask.astype(bool)
  assert np.abs(ours[m] - ref_logits[m]).max() / np.abs(ref_logits[m]).max() <= 1e-4
  as_skip, _ = hf.load_llava(path, layer_plan='dense,skip,dense*2')
  np.testing.assert_allclose(as_skip(jnp.asarray(hids), jnp.asarray(hpix), jnp.asarray(hmask)), ours,
                             atol=1e-5, rtol=1e-5)
