"""FLOPs: the paper's Eq. 13 numbers, and the analytic whole-prefill count against XLA's cost analysis."""
import jax
import jax.numpy as jnp
import pytest

from configs.common import model_config
from configs.dynllava import get_config
from dynllava_jax.eval import flops as F
from dynllava_jax.sparsity.fastv import FastV
from dynllava_jax.sparsity.random_keep import RandomKeep


def _dynamic_budget(size):
  # Dynamic-LLaVA's prefill budget (sparse_layer 2, k = ⌊576·0.2⌋ = 115) — RandomKeep shares it.
  return RandomKeep(sparse_layer=2, keep_ratio=0.2)


@pytest.mark.parametrize('size,dense,sparse', [('7b', 10.07, 2.49), ('13b', 19.6, 4.66)])
def test_eq13_reproduces_paper(size, dense, sparse):
  mc = model_config(size)
  assert F.tflops(F.eq13_flops(mc)) == pytest.approx(dense, abs=0.005)
  assert F.tflops(F.eq13_flops(mc, _dynamic_budget(size))) == pytest.approx(sparse, abs=0.005)


def test_eq13_fastv_7b():
  mc = model_config('7b')
  assert F.image_token_schedule(mc, FastV(3, 0.75))[:4] == [576, 576, 576, 144]
  assert F.tflops(F.eq13_flops(mc, FastV(3, 0.75))) == pytest.approx(3.2, abs=0.005)


def test_prefill_flops_rejects_bad_input():
  mc = model_config('7b')
  with pytest.raises(ValueError, match='lm_head'):
    F.prefill_flops(mc, None, lm_head='first')
  with pytest.raises(ValueError, match='seq_lens'):
    F.prefill_flops(mc, None, seq_lens=[1, 2])


@pytest.fixture(scope='module')
def tiny_engine_flops():
  from dynllava_jax.eval.run import engine_prefill_flops
  from dynllava_jax.sparsity.registry import make_sparsifier
  cfg = get_config('size=tiny')
  return lambda name: engine_prefill_flops(cfg.model, make_sparsifier(name, cfg), text_tokens=40, batch=2,
                                           bucket=16)


def test_analytic_engine_prefill_matches_xla_tiny(tiny_engine_flops):
  """Dense and sparse (one drop with a learned scorer; three drops with renumbered positions)."""
  dense_xla, dense_ana = tiny_engine_flops('dense')
  assert dense_ana == pytest.approx(dense_xla, rel=0.05)
  for name in ('dynamic', 'pdrop'):
    xla, analytic = tiny_engine_flops(name)
    assert analytic == pytest.approx(xla, rel=0.05), name
    assert xla < 0.9 * dense_xla, name


def test_analytic_counts_the_query_chunked_attention():
  """model.causal_chunk: the analytic count follows the chunks and still matches XLA's cost analysis (batch 2:
  the chunked attention scans over the samples)."""
  from dynllava_jax.eval.run import engine_prefill_flops
  from dynllava_jax.sparsity.registry import make_sparsifier
  assert F.attention_pairs(5, 2) == 2 * 2 + 2 * 4 + 1 * 5 and F.attention_pairs(5, 0) == F.attention_pairs(5, 8) == 25
  rows = {}
  for chunk in (0, 16):
    cfg = get_config('size=tiny,dense=True')
    cfg.model.causal_chunk = chunk
    rows[chunk] = engine_prefill_flops(cfg.model, make_sparsifier('dense', cfg), text_tokens=40, batch=2, bucket=16)
  xla, analytic = rows[16]
  assert analytic == pytest.approx(xla, rel=0.05)
  assert xla < rows[0][0] and analytic < rows[0][1]
  # The sample loop is seen once per sample: batch 2 costs twice batch 1.
  from dynllava_jax.model.attention import causal_allowed, dot_attention

  def attention_flops(b, t=40, h=4, d=8):
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
    return F.xla_flops(lambda q, k, v: dot_attention(q, k, v, causal_allowed(idx, idx, idx >= 0),
                                                     causal_chunk=16), q, q, q)
  assert 1.9 < attention_flops(2) / attention_flops(1) < 2.2     # a loop body counted once would give ~1
