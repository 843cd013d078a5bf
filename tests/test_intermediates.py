"""Intermediates on request: the dense forward's per-layer hidden states and the prefill's method scores;
off by default and free when off (the same program)."""
import jax
import jax.numpy as jnp
import numpy as np

from dynllava_jax.decode.prefill import prefill
from dynllava_jax.sparsity.base import top_k_mask
from dynllava_jax.sparsity.registry import make_sparsifier
from scripts import record_model_fixture as fixture


def test_dense_forward_hidden_states_per_layer():
  cfg = fixture.config()
  model = fixture.model_of(cfg)
  ids, pix, mask = (jnp.asarray(a) for a in fixture.prompts(cfg))
  logits = model(ids, pix, mask)
  got, aux = model(ids, pix, mask, intermediates=True)
  np.testing.assert_array_equal(got, logits)
  n, (b, t) = cfg.model.llm.layers, ids.shape
  assert aux['hidden_in'].shape == aux['hidden_out'].shape == (n, b, t, cfg.model.llm.hidden)
  np.testing.assert_array_equal(aux['hidden_in'][0], model.embed(ids, pix)[0])
  np.testing.assert_array_equal(aux['hidden_in'][1:], aux['hidden_out'][:-1])
  np.testing.assert_array_equal(model.language_model.head(aux['hidden_out'][-1]), logits)
  # Free when off: the decoder's scans (one per layer-plan group) carry only the hidden state, emit nothing.
  eqns = jax.make_jaxpr(lambda: model(ids, pix, mask))().jaxpr.eqns
  scans = [e for e in eqns if e.primitive.name == 'scan']
  sizes = [g.size for g in model.language_model.plan]
  assert [e.params['length'] for e in scans[-len(sizes):]] == sizes and sum(sizes) == n
  assert all(len(e.outvars) == 1 for e in scans[-len(sizes):])


def test_prefill_scores_on_request():
  cfg = fixture.config()
  model = fixture.model_of(cfg)
  ids, pix, mask = fixture.prompts(cfg)
  method = make_sparsifier('dynamic', cfg)
  plain = prefill(model, cfg, method, ids, pix, mask)
  assert plain.out.aux is None
  po = prefill(model, cfg, method, ids, pix, mask, intermediates=True)
  np.testing.assert_array_equal(po.out.logits_last, plain.out.logits_last)
  (scores,) = po.out.aux['scores']
  seg = po.out.segments[0]
  k = method.keep_counts(model.num_image_tokens)[0]
  chosen = np.asarray(top_k_mask(scores, seg.image, k))
  kept = np.asarray(po.out.kept[1])            # packed prompt slots held by the segment after the drop
  for b in range(ids.shape[0]):
    slots = np.asarray(seg.orig[b])[chosen[b]]
    assert kept[b, slots].all() and chosen[b].sum() == (k if np.asarray(seg.image[b]).any() else 0)
