"""model.scan_unroll: the decoder's layers unrolled give the same loss and gradients as the scan."""
import jax
import numpy as np
import pytest
from flax import nnx

from dynllava_jax.model.llava import Llava, check_model_config
from dynllava_jax.train import forward as F
from dynllava_jax.train import optim
from test_train_forward import small_config, synthetic_batch


def _grads(unroll):
  c = small_config()
  c.model.llm.layers = 3
  c.model.scan_unroll = unroll
  batch = {k: jax.numpy.asarray(v) for k, v in synthetic_batch(c).items()}
  graphdef, frozen, params = optim.split_params(Llava(c.model, rngs=nnx.Rngs(0)), c.train)

  def loss(p):
    out = F.train_forward(nnx.merge(graphdef, frozen, p), batch, tau=0.5, rng=jax.random.key(2))
    return F.ce_sums(out['logits'], batch['labels'])[0]

  fn = jax.jit(jax.value_and_grad(loss))
  return fn(params), fn.lower(params).as_text()


def test_unrolled_layers_equal_the_scan():
  (l1, g1), hlo1 = _grads(1)
  (l3, g3), hlo3 = _grads(3)
  # the decoder's loops (forward and backward, one per scanned span) are gone; the ViT's and others stay
  assert hlo3.count('stablehlo.while') < hlo1.count('stablehlo.while')
  np.testing.assert_allclose(float(l3), float(l1), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g3)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)


def test_bad_unroll_is_one_line():
  c = small_config()
  c.model.scan_unroll = 0
  with pytest.raises(ValueError, match='scan_unroll=0 must be >= 1'):
    check_model_config(c.model)
