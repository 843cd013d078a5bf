"""A drop entering layer 0 (`sparse.sparse_layer = 0`: Dynamic-LLaVA's predictors read the projected
tokens and the token embeddings; random / uniform keep there too): no segment and no cache before it, the
engine's gathered prefill ≡ the masked forward, KV-cache decoding ≡ cache-free decoding, and the output-text
decisions are taken entering layer 0 (the demo's setting, docs/demo.md "Where the tokens drop")."""
import numpy as np
import pytest

from dynllava_jax.decode.generate import generate
from dynllava_jax.sparsity import registry
from test_decode_prefill import check_equivalence, make_batch, make_model, small_config

SPECS = [(30, 3, 'left'), (26, 1, 'right'), (21, None, 'left'), (33, 6, 'left')]


@pytest.fixture(scope='module')
def setup():
  cfg = small_config()
  cfg.model.sparse.sparse_layer = 0
  return cfg, make_model(cfg), make_batch(cfg, SPECS)


def test_gathered_prefill_equals_masked_forward(setup):
  cfg, model, batch = setup
  po, keeps = check_equivalence(model, cfg, registry.make_sparsifier('dynamic', cfg), *batch)
  assert [(s.start, s.stop) for s in po.out.segments] == [(0, cfg.model.llm.layers)]   # one compact segment
  n_img = (batch[0] == cfg.model.image_token_id).sum(-1)
  img_kept = (keeps[0] & (batch[0] == cfg.model.image_token_id)).sum(-1)
  np.testing.assert_array_equal(img_kept, np.where(n_img > 0, 4, 0))


def test_cache_equals_no_cache_and_text_is_pruned(setup):
  cfg, model, batch = setup
  kw = dict(max_new_tokens=4, sampling='greedy', return_logits=True)
  ref = generate(model, cfg, 'dynamic', *batch, **kw)
  nc = generate(model, cfg, 'dynamic', *batch, use_cache=False, **kw)
  np.testing.assert_array_equal(ref.tokens, nc.tokens)
  np.testing.assert_allclose(ref.logits, nc.logits, atol=2e-4, rtol=1e-4)
  fed = ref.lengths - 1
  decided = ref.text_keep[np.arange(4)[None] < fed[:, None]]
  assert decided.any() and not decided.all()        # layer 0's text predictor dropped some, kept some
