"""Dynamic-LLaVA training forward: MaskedSoftmax, all-ones ≡ dense, straight-through gradients, the loss."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.dynllava import get_config
from dynllava_jax.model.attention import NEG_INF, masked_softmax
from dynllava_jax.model.llava import Llava
from dynllava_jax.sparsity import dynamic_train as DT
from dynllava_jax.sparsity.registry import train_hooks
from dynllava_jax.train import forward as F
from dynllava_jax.train import optim


def small_config(**sparse):
  c = get_config('size=tiny')
  c.model.vision.image_size = 32          # 16 image tokens
  c.model.vision.depth = 2                # feature layer -2: one ViT layer runs
  c.model.llm.layers = 2
  c.model.sparse.len_ot = 4
  for k, v in sparse.items():
    c.model.sparse[k] = v
  return c


def synthetic_batch(c, b=2, t=40, seed=0):
  """Right-padded batch with the pipeline's keys: sample 0 has an image and a 6-token answer, sample 1
  is text-only with a 3-token answer and 4 padding tokens."""
  rng = np.random.default_rng(seed)
  n = (c.model.vision.image_size // c.model.vision.patch_size) ** 2
  ids = rng.integers(5, c.model.llm.vocab_size, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  labels = np.full((b, t), -100, np.int32)
  ids[:, 0] = 1
  ids[0, 3:3 + n] = 4
  s0, e0 = t - 6, t
  labels[0, s0:e0] = ids[0, s0:e0]
  s1, e1 = t - 7, t - 4
  labels[1, s1:e1] = ids[1, s1:e1]
  mask[1, e1:] = 0
  ids[1, e1:] = 3
  return {
      'input_ids': ids, 'attention_mask': mask, 'labels': labels,
      'pixel_values': rng.normal(size=(b, c.model.vision.image_size, c.model.vision.image_size, 3)
                                 ).astype(np.float32),
      'has_image': np.array([True, False]), 'image_start': np.array([3, 3], np.int32),
      'instr_start': np.array([3 + n, 3], np.int32), 'instr_end': np.array([3 + n + 4, 8], np.int32),
      'answer_start': np.array([s0, s1], np.int32), 'answer_end': np.array([e0, e1], np.int32)}


def reference_masked_softmax(s, allowed, g, eps=1e-6):
  """float64 numpy: G' = G + (1−G)·I, a = exp(s − max s) with disallowed = −inf, p = (aG' + ε/N)/(ΣaG' + ε)."""
  s = np.where(allowed, s.astype(np.float64), -np.inf)
  n = s.shape[-1]
  gp = g[:, None, :].astype(np.float64) + (1 - g[:, None, :].astype(np.float64)) * np.eye(n)[None]
  a = np.exp(s - s.max(-1, keepdims=True))
  ag = a * gp
  return (ag + eps / n) / (ag.sum(-1, keepdims=True) + eps)


def test_masked_softmax_matches_float64_reference():
  rng = np.random.default_rng(0)
  b, n = 2, 6
  s = rng.normal(size=(b, n, n)).astype(np.float32)
  allowed = np.tril(np.ones((n, n), bool))[None].repeat(b, 0)
  g = np.array([[1, 0, 1, 0, 1, 1], [1, 1, 0, 0, 1, 0]], np.float32)
  # Rows whose largest allowed score sits on a dropped key: the ε/N term then dominates the others.
  s[0, 3, 1] = 30.0
  s[1, 5, 3] = 30.0
  ref = reference_masked_softmax(s, allowed, g)
  got = np.asarray(masked_softmax(jnp.asarray(s), jnp.asarray(allowed), jnp.asarray(g)))
  np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-12)
  # In that row the dropped max gives every other key weight ≈ ε/N / (ΣaG' + ε): not negligible.
  assert got[0, 3, 1] > 1e-3 and abs(got[0, 3].sum() - ref[0, 3].sum()) < 1e-6
  # Disallowed (causally masked) keys still get ε/N / (Σ + ε), as in the released code.
  assert got[0, 0, 5] > 0 and np.isclose(got[0, 0, 5], ref[0, 0, 5], rtol=1e-4)
  assert NEG_INF < -1e29


@functools.lru_cache(maxsize=None)
def _setup(len_ot=4, image_keep_ratio=0.2):
  """(config, model, jitted forward(params, batch, noise, tau)); one compile shared by the tests."""
  c = small_config(len_ot=len_ot, image_keep_ratio=image_keep_ratio)
  model = Llava(c.model, rngs=nnx.Rngs(0))
  graphdef, frozen, params = optim.split_params(model, c.train)

  @jax.jit
  def fwd(params, batch, noise, tau):
    return F.train_forward(nnx.merge(graphdef, frozen, params), batch, tau=tau, noise=noise)

  return c, model, (graphdef, frozen, params), fwd


def _noise(c, b, t, key=None, keep_all=False):
  n = (c.model.vision.image_size // c.model.vision.patch_size) ** 2
  shapes = {'image': (b, n, 2), 'answer': (b, t, 2), 'instruct': (b, t, 2)}
  if keep_all:
    return {k: jnp.zeros(v).at[..., 0].set(1e4) for k, v in shapes.items()}
  return {k: jax.random.gumbel(jax.random.fold_in(key, i), v) for i, (k, v) in enumerate(shapes.items())}


def _batch(c):
  return {k: jnp.asarray(v) for k, v in synthetic_batch(c).items()}


def test_all_ones_mask_equals_dense_model():
  c, model, (_, _, params), fwd = _setup()
  batch = _batch(c)
  out = fwd(params, batch, _noise(c, 2, 40, keep_all=True), 1.0)
  assert float(jnp.min(out['keep'])) == 1.0
  dense = nnx.jit(lambda m, b: m(b['input_ids'], b['pixel_values'], b['attention_mask']))(model, batch)
  real = np.asarray(batch['attention_mask'], bool)
  np.testing.assert_allclose(np.asarray(out['logits'])[real], np.asarray(dense)[real], atol=2e-5, rtol=1e-5)


def test_text_only_and_short_answers_keep_everything_without_nan():
  c, _, (_, _, params), fwd = _setup()
  batch = _batch(c)
  batch['answer_start'] = batch['answer_start'].at[1].set(batch['answer_end'][1])   # empty answer span
  out = fwd(params, batch, _noise(c, 2, 40, jax.random.PRNGKey(0)), 1.0)
  keep = np.asarray(out['keep'])
  assert keep[1].min() == 1.0                      # text-only: every key kept
  assert np.asarray(out['ot_qual']).tolist() == [True, False]
  s = F.loss_sums(out, batch, train_hooks(c.model))
  assert all(np.isfinite(float(v)) for v in s.values())
  assert float(s['n_image']) == 1.0 and float(s['n_answer']) == 1.0


def test_gradients_reach_predictors_and_not_the_frozen_tower():
  c, _, (graphdef, frozen, params), _ = _setup()
  assert 'vision_tower' in frozen and 'vision_tower' not in params
  # a single sample with an image and a qualifying answer, so both predictors are used
  batch = jax.tree.map(lambda x: x[:1], _batch(c))
  noise = _noise(c, 1, 40, jax.random.PRNGKey(3))
  sc = c.model.sparse

  @jax.jit
  def grads(p):
    def loss(p, ce_only):
      out = F.train_forward(nnx.merge(graphdef, frozen, p), batch, tau=0.5, noise=noise)
      s = F.loss_sums(out, batch, train_hooks(c.model))
      total = F.combine(s, s['n_tokens'], 1.0, train_hooks(c.model))[0]
      return (s['ce_sum'] if ce_only else total), out['m_img']
    (_, m_img), g = jax.value_and_grad(lambda p: loss(p, False), has_aux=True)(p)
    g_ce = jax.grad(lambda p: loss(p, True)[0])(p)['image_score_predictor']
    return m_img, g, g_ce

  m_img, g, g_ce = grads(params)
  assert 0 < float(jnp.sum(m_img)) < m_img.size      # some kept, some dropped
  for name in ('image_score_predictor', 'output_text_score_predictor', 'projector', 'language_model'):
    leaves = jax.tree.leaves(g[name])
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves), name
    assert sum(float(jnp.sum(jnp.abs(x))) for x in leaves) > 0, name
  # CE alone also reaches the image predictor: only through the straight-through keep mask in attention.
  assert sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(g_ce)) > 0


def test_loss_terms_equal_hand_computed_example():
  """Two samples, 4 image tokens, fixed logits and Gumbel noise; every number below is by hand."""
  logits = jnp.array([[[2., 0.], [0., 2.], [0., 0.], [1., 0.]],
                      [[0., 1.], [0., 1.], [0., 1.], [0., 1.]]])
  noise = jnp.array([[[0., 0.], [0., 0.], [0., 1.], [0., 0.]],
                     [[3., 0.], [0., 0.], [0., 0.], [0., 0.]]])
  # argmax of log_softmax + noise: sample 0 -> keep, drop, drop (tie broken by noise), keep;
  # sample 1 -> keep (noise 3 > 1), drop, drop, drop.
  m_img = DT.gumbel_keep(logits, 0.5, noise)
  np.testing.assert_array_equal(np.asarray(m_img), [[1, 0, 0, 1], [1, 0, 0, 0]])
  # evaluation's top-k (k = 2): keep log-probs of sample 0 rank tokens 0 > 3 > 2 > 1
  np.testing.assert_array_equal(np.asarray(DT.topk_keep(logits[:1], 2)), [[1, 0, 0, 1]])
  # output-text: sample 0 qualifies with a 4-token span, 1 kept; sample 1 does not qualify (own mean).
  t = 6
  m_ot = jnp.array([[1., 1., 0., 0., 0., 1.], [1., 1., 1., 1., 1., 1.]])
  out = {'m_img': m_img, 'm_ot': m_ot,
         'ot_span': DT.span_mask(jnp.array([2, 1]), jnp.array([6, 3]), t),
         'ot_qual': jnp.array([True, False])}
  batch = {'has_image': jnp.array([True, False])}

  class SC:
    image_keep_ratio, text_keep_ratio, instruct_keep_ratio, lambda_ratio = 0.2, 0.5, 0.7, 100.0

  s = DT.ratio_sums(out, batch, SC)
  # image: only sample 0 has an image: (0.2 − 2/4)² = 0.09; sample 1 contributes 0 but counts in B = 2.
  # answer: sample 0: span [2, 6) holds 0, 0, 0, 1 -> mean 0.25, (0.5 − 0.25)² = 0.0625; sample 1: 0.
  np.testing.assert_allclose(float(s['reg_image']), 0.09, rtol=1e-6)
  np.testing.assert_allclose(float(s['reg_answer']), 0.0625, rtol=1e-6)
  np.testing.assert_allclose(float(s['kept_image']) / float(s['n_image']), 0.5)
  # CE: vocab 2, labels on position 1 only -> target of logits[0, 0] is token 1: −log softmax([0, ln 3])_1.
  lg = jnp.array([[[0., np.log(3.)], [5., 5.]]])
  labels = jnp.array([[-100, 1]])
  ce, n, _, _ = F.ce_sums(lg, labels)
  np.testing.assert_allclose(float(ce), -np.log(0.75), rtol=1e-6)
  sums = {**s, 'ce_sum': ce, 'n_tokens': n.astype(jnp.float32)}
  class MC:
    sparse = SC

  loss, terms = F.combine(sums, n.astype(jnp.float32), 2.0, (DT.DynamicTrain(MC),))
  np.testing.assert_allclose(float(terms['reg_image']), 100 * 0.09 / 2, rtol=1e-6)
  np.testing.assert_allclose(float(terms['reg_answer']), 100 * 0.0625 / 2, rtol=1e-6)
  np.testing.assert_allclose(float(loss), -np.log(0.75) + 4.5 + 3.125, rtol=1e-6)
  # the non-qualifying sample's target is stop_grad(own mean): no gradient from its term.
  g = jax.grad(lambda m: DT.ratio_sums({**out, 'm_ot': m}, batch, SC)['reg_answer'])(m_ot)
  assert float(jnp.abs(g[1]).sum()) == 0.0 and float(jnp.abs(g[0]).sum()) > 0


def test_tau_schedule():
  np.testing.assert_allclose(float(DT.tau_at(0, 100)), 1.0)
  np.testing.assert_allclose(float(DT.tau_at(50, 100)), 0.1 ** 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(DT.tau_at(100, 100)), 0.1, rtol=1e-6)
