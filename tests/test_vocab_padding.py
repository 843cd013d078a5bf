"""Padded vocabulary (`model.llm.text_vocab_size`, `dynllava_jax/model/vocab.py`): ids beyond the tokenizer
take no part in the training CE or in sampling. A model padded with mean rows (as `hf.load_llava` pads an
original-layout checkpoint) trains exactly like the unpadded one and never emits a padded id."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynllava_jax.decode.generate import generate
from dynllava_jax.decode.sampling import Sampling, as_sampling
from dynllava_jax.model.llava import Llava, check_model_config
from dynllava_jax.model.vocab import mask_padded, text_vocab_size
from dynllava_jax.sparsity.registry import train_hooks
from dynllava_jax.train import forward as F
import test_decode_prefill as P
import test_train_forward as T

PADDED = 320
EMBED = ('language_model', 'embed_tokens', 'embedding')
HEAD = ('language_model', 'lm_head', 'kernel')


def padded_model(model, vocab, text_vocab, head='mean'):
  """A copy of `model` with `vocab` rows: the new embedding rows are the mean row; the new LM-head columns
  the mean column (head='mean', as hf.py pads) or 20× copies of real columns (head='big': they win any
  unmasked argmax)."""
  mc = copy.deepcopy(model.mc)
  v = mc.llm.vocab_size
  mc.llm.vocab_size, mc.llm.text_vocab_size = vocab, text_vocab
  check_model_config(mc)
  new = Llava(mc, rngs=nnx.Rngs(0))
  src = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  emb = np.asarray(src['language_model']['embed_tokens']['embedding'])
  kern = np.asarray(src['language_model']['lm_head']['kernel'])
  extra = vocab - v
  emb = np.concatenate([emb, np.repeat(emb.mean(0, keepdims=True), extra, 0)], 0)
  if head == 'mean':
    add = np.repeat(kern.mean(1, keepdims=True), extra, 1)
  else:
    add = 20.0 * kern[:, np.arange(extra) % v]
  src['language_model']['embed_tokens']['embedding'] = jnp.asarray(emb)
  src['language_model']['lm_head']['kernel'] = jnp.asarray(np.concatenate([kern, add], 1))
  state = nnx.state(new, nnx.Param)
  nnx.replace_by_pure_dict(state, src)
  nnx.update(new, state)
  return new


def loss_and_grads(model, batch):
  """Dense training loss, its CE term and the gradients (flat {path: array})."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  n_tok = jnp.sum(batch['labels'][:, 1:] != F.IGNORE).astype(jnp.float32)
  bsz = jnp.float32(batch['labels'].shape[0])

  @jax.jit
  def run(params, batch):
    def loss(params):
      m = nnx.merge(graphdef, params, rest)
      out = F.train_forward(m, batch, sparse=False)
      sums = F.loss_sums(out, batch, train_hooks(m.mc))
      total, terms = F.combine(sums, n_tok, bsz, train_hooks(m.mc))
      return total, terms['ce']
    return jax.value_and_grad(loss, has_aux=True)(params)

  (total, ce), grads = run(params, batch)
  return float(total), float(ce), dict(nnx.to_flat_state(grads))


def test_padded_model_trains_like_the_unpadded_one():
  c = T.small_config()
  model = Llava(c.model, rngs=nnx.Rngs(0))
  v = c.model.llm.vocab_size
  batch = {k: jnp.asarray(x) for k, x in T.synthetic_batch(c).items()}
  padded = padded_model(model, PADDED, v)
  assert text_vocab_size(padded.mc) == v
  total_u, ce_u, g_u = loss_and_grads(model, batch)
  total_p, ce_p, g_p = loss_and_grads(padded, batch)
  # (without the mask the mean rows take ~0.2 nats of mass here: ce_p - ce_u ≈ 0.22)
  np.testing.assert_allclose(ce_p, ce_u, rtol=1e-6)
  np.testing.assert_allclose(total_p, total_u, rtol=1e-6)
  assert sorted(g_u) == sorted(g_p)
  for path, gu in g_u.items():
    gu, gp = np.asarray(gu.get_value()), np.asarray(g_p[path].get_value())
    if path == EMBED:
      assert np.all(gp[v:] == 0)
      gp = gp[:v]
    elif path == HEAD:
      assert np.all(gp[:, v:] == 0)
      gp = gp[:, :v]
    np.testing.assert_allclose(gp, gu, rtol=1e-4, atol=1e-6 * max(np.abs(gu).max(), 1e-12), err_msg=str(path))


def test_sampling_never_picks_a_padded_id():
  rng = np.random.default_rng(0)
  v, b = 256, 4
  logits = rng.normal(size=(b, PADDED)).astype(np.float32)
  logits[:, v:] += 3.0                     # the padded ids hold most of the mass
  logits = jnp.asarray(logits)
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  for s in (Sampling(1.0, text_vocab_size=v), Sampling(0.7, 0.9, text_vocab_size=v)):
    toks = np.asarray(jax.vmap(lambda k: s.sample(logits, k))(keys))
    assert toks.max() < v and len(np.unique(toks)) > 50
  g = np.asarray(Sampling(text_vocab_size=v).sample(logits, keys[0]))
  np.testing.assert_array_equal(g, np.argmax(np.asarray(logits)[:, :v], -1))
  # Without the limit the same draws mostly land on padded ids.
  toks = np.asarray(jax.vmap(lambda k: Sampling(1.0).sample(logits, k))(keys))
  assert (toks >= v).mean() > 0.5
  assert as_sampling('greedy', None, v).text_vocab_size == v
  assert as_sampling(Sampling(1.0), None, 0) == Sampling(1.0)
  np.testing.assert_array_equal(mask_padded(logits, 0), logits)


def test_generate_never_emits_a_padded_id():
  """KV-cache generation at temperature 1 over a model whose padded LM-head columns win every raw argmax
  (the no-cache loop samples with the same `Sampling`)."""
  cfg = P.small_config()
  v = cfg.model.llm.vocab_size
  ids, pix, mask = P.make_batch(cfg, [(30, 3, 'left'), (26, None, 'right')], seed=1)
  model = padded_model(P.make_model(cfg, seed=1), PADDED, v, head='big')
  out = generate(model, cfg, 'dynamic', ids, pix, mask, max_new_tokens=6, sampling=dict(temperature=1.0),
                 rng=jax.random.PRNGKey(3), return_logits=True)
  assert out.tokens.max() < v, out.tokens
  fed = np.arange(out.tokens.shape[1])[None] < out.lengths[:, None]
  assert (np.argmax(out.logits, -1)[fed] >= v).all()     # unmasked, every step would pick a padded id
