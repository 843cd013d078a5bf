"""train.head_positions: the LM head at the labelled positions only gives the same loss and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynllava_jax.errors import UserError
from dynllava_jax.model.llava import Llava
from dynllava_jax.sparsity.registry import train_hooks
from dynllava_jax.train import forward as F
from dynllava_jax.train import optim
from dynllava_jax.train.config import check_config
from test_train_forward import small_config, synthetic_batch


def test_head_index_picks_the_labelled_positions_in_order():
  labels = np.full((2, 10), F.IGNORE)
  labels[0, [3, 4, 9]] = 7          # targets at 3, 4, 9 -> positions 2, 3, 8 predict them
  labels[1, [1, 2]] = 5
  idx = F.head_index(labels, 4)
  assert idx.shape == (2, 4) and idx.dtype == np.int32
  assert idx[0, :3].tolist() == [2, 3, 8] and idx[1, :2].tolist() == [0, 1]
  assert (labels[0, 1:][idx[0, 3:]] == F.IGNORE).all() and (labels[1, 1:][idx[1, 2:]] == F.IGNORE).all()
  labels[1, 1:] = 5                 # 9 labelled targets > K = 4: one line
  with pytest.raises(UserError, match=r'train.head_positions=4: a sample of this batch has 9 labelled'):
    F.head_index(labels, 4)
  # -1: the largest count rounded up to a power of two, at least 16, at most T - 1
  assert F.head_index(labels, -1).shape == (2, 9)                   # 9 -> 16, capped at T - 1 = 9
  long = np.full((2, 200), F.IGNORE)
  long[0, -40:] = 1
  assert F.head_index(long, -1).shape == (2, 64)
  long[1, -17:] = 1
  assert F.head_index(long[1:], -1).shape == (1, 32)
  assert F.head_index(np.full((1, 50), F.IGNORE), -1).shape == (1, 16)       # nothing labelled


def _loss_and_grads(c, batch):
  model = Llava(c.model, rngs=nnx.Rngs(0))
  graphdef, frozen, params = optim.split_params(model, c.train)
  hooks = train_hooks(c.model)

  def loss(p):
    out = F.train_forward(nnx.merge(graphdef, frozen, p), batch, tau=0.5, rng=jax.random.key(3))
    sums = F.loss_sums(out, batch, hooks)
    n_tok = jnp.sum(batch['labels'][:, 1:] != F.IGNORE).astype(jnp.float32)
    return F.combine(sums, n_tok, 2.0, hooks)[0], (out['logits'], sums)

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize('sparse', [False, True])
def test_loss_and_gradients_equal_the_full_head(sparse):
  c = small_config()
  c.model.sparse.enabled = sparse
  host = synthetic_batch(c)
  full = {k: jnp.asarray(v) for k, v in host.items()}
  gathered = {**full, 'head_index': jnp.asarray(F.head_index(host['labels'], -1))}
  (l0, (lg0, s0)), g0 = _loss_and_grads(c, full)
  (l1, (lg1, s1)), g1 = _loss_and_grads(c, gathered)
  assert lg1.shape[1] == 16 and lg0.shape[1] == 40
  # the gathered logits are the full head's at those positions
  np.testing.assert_allclose(np.asarray(lg1), np.take_along_axis(np.asarray(lg0),
                             np.asarray(gathered['head_index'])[..., None], axis=1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  for k in s0:
    np.testing.assert_allclose(float(s1[k]), float(s0[k]), rtol=1e-5, err_msg=k)
  flat0, flat1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
  assert len(flat0) == len(flat1)
  for a, b in zip(flat0, flat1):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)
  assert max(float(jnp.max(jnp.abs(a))) for a in flat0) > 0


def test_config_check_refuses_a_bad_value():
  c = small_config()
  c.train.head_positions = -2
  with pytest.raises(UserError, match='train.head_positions=-2'):
    check_config(c, 1)
