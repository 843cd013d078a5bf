"""Visual region: the released layer spread, region tuning (full / LoRA) with no gradient and no optimizer
state for frozen layers and a backward that stops at the lowest trainable layer, LoRA zero-init / merge /
adapters / HF export, Block Influence against NumPy, layer pruning ≡ the `skip` plan, and the bad-input
lines."""
import copy
import json
import os

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynllava_jax import convert, hf
from dynllava_jax.errors import UserError
from dynllava_jax.model import lora as LR
from dynllava_jax.tools import adapters as AD
from dynllava_jax.model import plan as P
from dynllava_jax.model.llama import LAYER_KINDS
from dynllava_jax.model.llava import Llava, check_model_config
from dynllava_jax.tools import block_influence as BI
from dynllava_jax.tools import prune
from dynllava_jax.train import checkpoint as ckpt_lib
from dynllava_jax.train import optim
from dynllava_jax.train import step as S
from hf_utils import hf_logits, make_tiny_hf_llava, random_llava, sample_batch
from scripts import record_model_fixture as fixture

fwd = nnx.jit(lambda m, ids, mask: m(ids, None, mask))            # text-only: no vision tower to compile
fwd_aux = nnx.jit(lambda m, ids, mask: m(ids, None, mask, intermediates=True))


@pytest.fixture(scope='module')
def tiny():
  cfg = fixture.config()
  model = random_llava(cfg.model, std=0.1)
  ids, _, mask = (jnp.asarray(a) for a in fixture.prompts(cfg))
  return cfg, model, (ids, mask), fwd_aux(model, ids, mask)


@pytest.fixture(scope='module')
def tiny_hf(tmp_path_factory):
  path = make_tiny_hf_llava(tmp_path_factory.mktemp('hf'), layers=4, kv_heads=2)
  model, mc = hf.load_llava(path)
  return path, model, mc, sample_batch()


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


def _paths(tree):
  return ['/'.join(str(getattr(k, 'key', k)) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_frozen_layers_no_grad_no_state_and_the_backward_stops():
  model, state, batch, fn, cut = _region_step('lora4', freeze_projector=True)
  params = state['params']
  paths = _paths(params)
  assert len(paths) == 14 and all(p.startswith('language_model/layers_3/') and '/lora/' in p for p in paths)
  moments = [p for p in _paths(state['opt_state']) if '.mu/' in p or '.nu/' in p]
  assert len(moments) == 2 * len(paths) and all('/layers_3/' in p for p in moments), 'frozen optimizer state'
  assert optim.grad_floor(model, params) == 3
  # The frozen group [0, 3) is scanned once (forward only): the backward ends at layer 3.
  assert cut['scans'].count(3) == 1
  _, state2, _, _, through = _region_step('lora4', freeze_projector=False)
  assert set(state2['params']) == {'language_model', 'projector'}
  assert optim.grad_floor(model, state2['params']) == 0
  assert through['scans'].count(3) == 2          # the projector trains: activation gradients run down to it
  # ... and only activation gradients: 3 layers × (7 projections dx + 4 attention) + the projector's 3.
  assert through['dots'] - cut['dots'] == 3 * 11 + 3
  # Full region tuning: the region layer's kernels and norms train, nothing else.
  cfg = fixture.config()
  cfg.model.region, cfg.train.freeze_projector = 'auto', True
  _, _, full = optim.split_params(nnx.eval_shape(lambda: Llava(cfg.model, rngs=nnx.Rngs(0))), cfg.train)
  assert sorted(full['language_model']) == ['layers_3'] and len(_paths(full)) == 9 + len(_paths(
      {k: v for k, v in full.items() if k != 'language_model'}))
  assert not {'projector', 'vision_tower'} & set(full)


def _perturb(model, scale, seed=1):
  """Moves every adapter leaf by N(0, scale) noise (drawn on the host: no per-leaf compile)."""
  rng = np.random.default_rng(seed)
  st = nnx.state(model, nnx.LoRAParam)
  nnx.update(model, jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + scale * rng.standard_normal(a.shape)
                                                       .astype(np.float32)), st))


def test_lora_zero_init_merge_and_adapters(tiny, tmp_path):
  cfg, ref, (ids, mask), (want, _) = tiny
  mc = copy.deepcopy(cfg.model)
  mc.region, mc.region_train = '1,3', 'lora4'
  model = LR.rebuild(ref, mc)
  np.testing.assert_array_equal(fwd(model, ids, mask), want)          # B = 0: unchanged
  _perturb(model, 0.05)
  unmerged = fwd(model, ids, mask)
  assert float(jnp.abs(unmerged - want).max()) > 1e-2
  merged, _ = LR.merge(model, mc)      # merged ≡ unmerged: through transformers in the export test below
  assert {g.train for g in merged.language_model.plan} == {'full'} and not nnx.state(merged, nnx.LoRAParam)
  w = merged.language_model.layer_at(1).mlp.down_proj.kernel[...]
  layer1 = model.language_model.layers_1.mlp.down_proj
  ab = layer1.lora.lora_a[...][0] @ layer1.lora.lora_b[...][0]
  np.testing.assert_allclose(w, layer1.kernel[...][0] + (mc.lora.alpha / 4) * ab, rtol=1e-5, atol=1e-6)
  # Adapters saved apart (small) with the base reference; loading gives the same model back.
  base = convert.save_params(ref, cfg.model, str(tmp_path / 'base'))
  AD.save_adapters(str(tmp_path / 'ad'), model, mc, base)
  back, _ = AD.load_adapters(str(tmp_path / 'ad'))
  flat = lambda m: {k: np.asarray(v) for k, v in zip(_paths(nnx.to_pure_dict(nnx.state(m, nnx.Param))),
                                                     jax.tree.leaves(nnx.to_pure_dict(nnx.state(m, nnx.Param))))}
  got, exp = flat(back), flat(model)
  assert sorted(got) == sorted(exp)
  for k in exp:
    np.testing.assert_array_equal(got[k], exp[k], err_msg=k)
  assert (tmp_path / 'ad' / 'adapters.npz').stat().st_size < 0.2 * sum(a.nbytes for a in exp.values())
  # train.init_from: the region plan's groups are cut from the uniform stack of a convert output.
  _, frozen, params = optim.split_params(model, cfg.train)
  spec = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)
  got = ckpt_lib.load_params(base, spec(frozen), n_layers=4)
  assert sorted(got['language_model']) == ['embed_tokens', 'layers', 'layers_1', 'layers_2', 'layers_3',
                                           'lm_head', 'norm']
  jax.tree.map(np.testing.assert_array_equal, got, frozen)
  got = ckpt_lib.load_params(base, spec(params), require_any=False, n_layers=4)
  assert got['projector'] is not None and not jax.tree.leaves(got['language_model'])   # fresh adapters: init


def _np_bi(h_in, h_out, mask, image=None):
  out = np.zeros(h_in.shape[0])
  for l in range(h_in.shape[0]):
    per = []
    for b in range(h_in.shape[1]):
      def mean_cos(sel):
        c = [np.dot(h_in[l, b, t], h_out[l, b, t]) / (np.linalg.norm(h_in[l, b, t]) * np.linalg.norm(h_out[l, b, t]))
             for t in np.flatnonzero(sel)]
        return np.mean(c) if c else None
      parts = [mean_cos(mask[b])] if image is None else [
          x for x in (mean_cos(mask[b] & image[b]), mean_cos(mask[b] & ~image[b])) if x is not None]
      per.append(1 - np.mean(parts))
    out[l] = np.mean(per)
  return out


def test_block_influence_equals_numpy(tiny):
  cfg, ref, (ids, mask), (_, aux) = tiny
  h_in = np.asarray(aux['hidden_in'], np.float64)
  h_out = np.asarray(aux['hidden_out'], np.float64)
  h_out[-1] = np.asarray(ref.language_model.norm(aux['hidden_out'][-1]))      # the last layer: normed
  m, img = np.asarray(mask).astype(bool), np.asarray(ids) == cfg.model.image_token_id
  got, n = BI.block_influence(ref, [(ids, None, mask)])
  assert n == ids.shape[0] and got.shape == (cfg.model.llm.layers,)
  np.testing.assert_allclose(got, _np_bi(h_in, h_out, m), atol=1e-5)
  bi, has = jax.jit(BI.per_sample_bi, static_argnums=4)(
      aux['hidden_in'], jnp.asarray(h_out, jnp.float32), jnp.asarray(m), jnp.asarray(img), 'image_text')
  np.testing.assert_allclose(np.mean(np.asarray(bi), 1), _np_bi(h_in, h_out, m, img), atol=1e-5)
  assert np.asarray(has).all()
  with pytest.raises(UserError, match='variant'):
    BI.per_sample_bi(aux['hidden_in'], aux['hidden_out'], jnp.asarray(m), variant='image')


def test_pruned_model_equals_the_skip_plan_and_skip_has_bi_zero(tiny):
  cfg, ref, (ids, mask), _ = tiny
  skip_mc = prune.skip_config(cfg.model, (0, 2))
  assert [g.kind for g in P.resolve(skip_mc, LAYER_KINDS)] == ['skip', 'dense', 'skip', 'dense']
  skipped = LR.rebuild(ref, skip_mc)
  logits, aux = fwd_aux(skipped, ids, mask)
  bi, _ = jax.jit(BI.per_sample_bi)(aux['hidden_in'], aux['hidden_out'], mask.astype(bool))
  bi = np.asarray(bi).mean(1)
  assert np.abs(bi[[0, 2]]).max() < 1e-6 and bi[1] > 1e-3      # an identity layer has BI 0
  pruned, mc2 = prune.prune_model(ref, cfg.model, (0, 2))
  assert mc2.llm.layers == 2 and {g.kind for g in pruned.language_model.plan} == {'dense'}
  np.testing.assert_allclose(fwd(pruned, ids, mask), logits, atol=1e-6, rtol=1e-6)
  assert prune.choose(list(bi), 2, cfg.model) == (0, 2)
  with pytest.raises(UserError, match='outside the visual region'):
    prune.choose(list(bi), 4, cfg.model)
  with pytest.raises(ValueError, match='no K/V'):
    skipped.language_model.run_layers(jnp.zeros((1, 2, 64)), jnp.zeros((1, 2), jnp.int32),
                                      jnp.ones((1, 2, 2), bool), return_kv=True)


def test_lora_and_pruned_export_loads_in_transformers(tiny_hf, tmp_path):
  """A LoRA region model with layer 1 skipped exports merged and compacted (3 layers); transformers'
  logits equal ours from the unmerged skip-plan model (merge ≡ unmerged, pruned ≡ skip plan)."""
  path, model, mc, (ids, pix, mask) = tiny_hf
  mc = copy.deepcopy(mc)
  mc.region, mc.region_train = 'auto', 'lora2'
  mc = prune.skip_config(mc, (1,))
  lm = LR.rebuild(model, mc)
  _perturb(lm, 0.1)
  ours = np.asarray(nnx.jit(lambda m, a, b, c: m(a, b, c))(lm, jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask)))
  out = hf.save_llava(lm, mc, str(tmp_path / 'exported'))
  with open(f'{out}/config.json') as f:
    assert json.load(f)['text_config']['num_hidden_layers'] == 3
  ref = hf_logits(out, ids, pix, mask)
  m = mask.astype(bool)
  assert np.abs(ours[m] - ref[m]).max() / np.abs(ref[m]).max() <= 1e-4
  as_skip, _ = hf.load_llava(path, layer_plan='dense,skip,dense*2')       # the full file, layer 1 not read
  assert [g.kind for g in as_skip.language_model.plan] == ['dense', 'skip', 'dense']


def test_block_influence_chart_and_prune_command(tmp_path, capsys):
  """The chart; the prune command checks the layer choice (one line, exit 2) before reading weights."""
  from configs.dynllava import get_config
  cfg = get_config('size=tiny,dense=True')
  png = BI.plot([0.3, 0.1, 0.2, 0.4], BI.region_of(cfg.model), str(tmp_path / 'bi.png'))
  assert BI.region_of(cfg.model) == (3,) and os.path.getsize(png) > 0
  ckpt = tmp_path / 'ckpt'
  ckpt.mkdir()
  (ckpt / convert.CONFIG_NAME).write_text(cfg.model.to_json_best_effort())
  (tmp_path / 'bi.json').write_text(json.dumps({'bi': [0.3, 0.1, 0.2, 0.4]}))
  for args, msg in ((['--remove', '1,9'], 'outside 0..3'), (['--remove', '3'], 'visual region'),
                    (['--bi', str(tmp_path / 'bi.json'), '--k', '4'], 'outside the visual region'),
                    (['--remove', '1', '--bi', str(tmp_path / 'bi.json')], 'exactly one')):
    assert prune.main(['--ckpt', str(ckpt), '--out', str(tmp_path / 'o')] + args) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and '\n' not in err, err
