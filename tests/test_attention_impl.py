"""The fused attention path (jax.nn.dot_product_attention, implementation='xla' on CPU) ≡ the reference
path, where the mask allows it: dense causal attention with padding and GQA, 'exact_zero' key masks, and a
whole tiny model's logits in Dynamic-LLaVA's training forward ('exact_zero' mode: dense layers before
sparse_layer, key masks after it); gradients w.r.t. q, k, v."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.dynllava import get_config
from dynllava_jax.model.attention import dot_attention, fused_applies, resolve_impl
from dynllava_jax.model.llava import Llava, dense_allowed
from dynllava_jax.train import forward as F


def _qkv(b=2, t=9, hq=4, hkv=2, d=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, t, hq, d))
  k = jax.random.normal(ks[1], (b, t, hkv, d))
  v = jax.random.normal(ks[2], (b, t, hkv, d))
  mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9], jnp.int32)[:b]    # row 0 left-padded
  return q, k, v, mask


def test_resolve_and_when_it_applies():
  assert resolve_impl('auto', backend='cpu') == 'reference'
  assert resolve_impl('auto', backend='gpu') == 'fused'
  assert resolve_impl('xla') == 'xla'
  with pytest.raises(ValueError, match='attention_impl'):
    resolve_impl('flash')
  assert fused_applies('xla', None, 'masked_softmax_eps', False)
  assert fused_applies('xla', jnp.ones((1, 3)), 'exact_zero', False)
  assert not fused_applies('xla', jnp.ones((1, 3)), 'masked_softmax_eps', False)   # ε/N needs the reference
  assert not fused_applies('xla', None, 'masked_softmax_eps', True)                 # probabilities asked
  assert not fused_applies('reference', None, 'masked_softmax_eps', False)


@pytest.mark.parametrize('keep', [False, True])
def test_fused_equals_reference(keep):
  q, k, v, mask = _qkv()
  allowed = dense_allowed(mask)
  key_keep = jnp.array([[1, 1, 0, 1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1, 0, 1, 1]], jnp.float32) if keep else None
  mode = 'exact_zero' if keep else 'masked_softmax_eps'
  w = jax.random.normal(jax.random.key(3), q.shape) * jnp.asarray(mask, jnp.float32)[:, :, None, None]

  def run(impl):
    f = lambda q, k, v: dot_attention(q, k, v, allowed, key_keep=key_keep, mode=mode, impl=impl)
    return jax.jit(lambda *a: (f(*a),) + jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(*a))(q, k, v)

  ref, fused = run('reference'), run('xla')
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(fused[0])[real], np.asarray(ref[0])[real], atol=1e-5, rtol=1e-5)
  for a, b in zip(ref[1:], fused[1:]):          # gradients w.r.t. q, k, v (padding rows carry no weight)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)


def test_model_sparse_training_forward_equal():
  cfg = get_config('size=tiny')
  cfg.model.attention = 'exact_zero'
  cfg.model.llm.layers, cfg.model.vision.depth = 2, 2      # small: the test is about the wiring
  cfg.model.attention_impl = 'xla'
  model = Llava(cfg.model, rngs=nnx.Rngs(0))      # one init; the impl is a static attribute
  assert model.language_model.attention_impl == 'xla'
  graphdefs = {'xla': nnx.graphdef(model)}
  model.language_model.attention_impl = 'reference'
  graphdefs['reference'], params = nnx.split(model)
  rng = np.random.default_rng(0)
  n = model.num_image_tokens
  t = n + 24
  ids = rng.integers(5, 200, (2, t)).astype(np.int32)
  ids[:, 2:2 + n] = cfg.model.image_token_id
  mask = np.ones_like(ids)
  mask[0, :1] = 0
  ids[0, :1] = cfg.model.pad_token_id
  labels = np.where(np.arange(t) >= t - 8, ids, F.IGNORE)
  batch = {'input_ids': jnp.asarray(ids), 'attention_mask': jnp.asarray(mask), 'labels': jnp.asarray(labels),
           'pixel_values': jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.float32),
           'has_image': jnp.ones((2,), bool), 'image_start': jnp.full((2,), 2), 'instr_start': jnp.full((2,), 2 + n),
           'instr_end': jnp.full((2,), t - 8), 'answer_start': jnp.full((2,), t - 8), 'answer_end': jnp.full((2,), t)}
  outs = {}
  for impl, graphdef in graphdefs.items():

    @jax.jit
    def run(p, batch):
      out = F.train_forward(nnx.merge(graphdef, p), batch, tau=0.5, rng=jax.random.key(1), sparse=True)
      return out['logits'], out['keep']

    outs[impl] = run(params, batch)
  real = mask.astype(bool)
  assert 0 < float(jnp.mean(outs['xla'][1])) < 1          # some keys really dropped after sparse_layer
  for a, b in zip(outs['reference'], outs['xla']):
    np.testing.assert_allclose(np.asarray(b)[real], np.asarray(a)[real], atol=2e-5, rtol=1e-5)
