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


def test_text_decided_one_layer_later(setup):
  """sparse.text_layer = 1 (the demo's): image tokens drop entering layer 0, generated tokens are decided
  entering layer 1 and stay in layer 0's cache; gathered ≡ masked, cache ≡ no cache, and the decisions
  differ from those taken entering layer 0."""
  cfg0, model0, batch = setup
  cfg = cfg0.copy_and_resolve_references()
  cfg.model.sparse.text_layer = 1
  model = make_model(cfg)             # the same weights (the layer is no parameter), read from model.mc
  method = registry.make_sparsifier('dynamic', cfg)
  assert method.text_layer(cfg.model) == 1 and method.drop_points(cfg.model) == (0,)
  po, _ = check_equivalence(model, cfg, method, *batch)
  assert [(s.start, s.stop) for s in po.out.segments] == [(0, 1), (1, cfg.model.llm.layers)]
  kw = dict(max_new_tokens=4, sampling='greedy', return_logits=True)
  ref = generate(model, cfg, 'dynamic', *batch, **kw)
  nc = generate(model, cfg, 'dynamic', *batch, use_cache=False, **kw)
  np.testing.assert_array_equal(ref.tokens, nc.tokens)
  np.testing.assert_allclose(ref.logits, nc.logits, atol=2e-4, rtol=1e-4)
  at0 = generate(model0, cfg0, 'dynamic', *batch, **kw)
  fed = ref.lengths - 1
  n = np.arange(4)[None] < fed[:, None]
  assert ref.text_keep[n].any() and not np.array_equal(ref.text_keep[n], at0.text_keep[n])
