"""Decode-time intermediates on request: generate(..., intermediates=True) records, per generated token,
its RoPE position and the method's text-rule logits (Dynamic-LLaVA's output-text predictor) behind its
keep decision; off, nothing is recorded and the decode loop is the same program."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np

from dynllava_jax.decode.step import decode_step
from dynllava_jax.sparsity.registry import make_sparsifier
from scripts import record_model_fixture as fixture

G = importlib.import_module('dynllava_jax.decode.generate')


def test_generate_records_text_logits_and_positions_only_when_asked():
  cfg = fixture.config()
  model = fixture.model_of(cfg)
  ids, pix, mask = fixture.prompts(cfg)
  m = 6
  method = make_sparsifier('dynamic', cfg)
  plain = G.generate(model, cfg, method, ids, pix, mask, max_new_tokens=m, return_caches=True)
  compiled = G._run_chunk._cache_size()
  rec = G.generate(model, cfg, 'dynamic', ids, pix, mask, max_new_tokens=m, intermediates=True)
  assert plain.intermediates is None
  np.testing.assert_array_equal(rec.tokens, plain.tokens)
  np.testing.assert_array_equal(rec.text_keep, plain.text_keep)
  aux = rec.intermediates
  assert aux['text_logits'].shape == (3, m, 2) and aux['positions'].shape == (3, m)
  assert aux['prefill']['scores'][0].shape[0] == 3            # the prefill's image scores come along
  fed = np.arange(m)[None, :] < (rec.lengths - 1)[:, None]    # generated tokens fed back to the model
  # token j was fed at RoPE position (real prompt tokens) + j; never-fed tokens keep -1
  want = np.asarray(mask).sum(1)[:, None] + np.arange(m)[None, :]
  np.testing.assert_array_equal(aux['positions'], np.where(fed, want, -1))
  # the recorded logits are the ones the keep decisions came from: keep iff logit0 > logit1
  lg = aux['text_logits']
  np.testing.assert_array_equal((lg[..., 0] > lg[..., 1])[fed], rec.text_keep[fed])
  assert not rec.text_keep[fed].all() and rec.text_keep[fed].any()   # both decisions occur
  assert (lg[~fed] == 0).all()
  # off: the loop state has no intermediates field, so plain calls reuse the one compiled loop
  assert G._run_chunk._cache_size() > compiled
  after = G._run_chunk._cache_size()
  again = G.generate(model, cfg, 'dynamic', ids, pix, mask, max_new_tokens=m)
  np.testing.assert_array_equal(again.tokens, plain.tokens)
  assert G._run_chunk._cache_size() == after

  # the step itself: off it returns (logits, caches, keep) as before; on, one more dict
  tok, on = jnp.asarray(plain.tokens[:, 0]), jnp.ones((3,), bool)
  off = jax.eval_shape(lambda c: decode_step(model, method, c, tok, on), plain.caches)
  with_aux = jax.eval_shape(lambda c: decode_step(model, method, c, tok, on, intermediates=True), plain.caches)
  assert len(off) == 3 and len(with_aux) == 4 and set(with_aux[3]) == {'positions', 'text_logits'}
