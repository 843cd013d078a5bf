"""MaskedSoftmax gradients against a float64 torch autograd reference of METHODS.md §1's formula.

G' = G + (1−G)·I; a = exp(s − max_k s) (disallowed keys −inf first); p = (a·G' + ε/N) / (Σ_k a·G' + ε).
Its gradient w.r.t. G is 1 off the diagonal and 0 on it, also where G ties with I (G = 1 on the diagonal,
G = 0 off it): a `maximum(G, I)` form has the same values but splits those gradients in halves.
"""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from dynllava_jax.model.attention import masked_softmax

EPS = 1e-6


def torch_reference(s, allowed, g, w):
  """float64: (p, dL/ds, dL/dG) for L = Σ w·p. s (B, H, T, T), allowed (B, 1, T, T), g (B, T)."""
  s = torch.tensor(s, dtype=torch.float64, requires_grad=True)
  g = torch.tensor(g, dtype=torch.float64, requires_grad=True)
  n = s.shape[-1]
  eye = torch.eye(n, dtype=torch.float64)
  gp = g[:, None, None, :] + (1 - g[:, None, None, :]) * eye
  sm = torch.where(torch.tensor(allowed), s, torch.tensor(-torch.inf, dtype=torch.float64))
  a = torch.exp(sm - torch.amax(sm, dim=-1, keepdim=True))
  p = (a * gp + EPS / n) / ((a * gp).sum(-1, keepdim=True) + EPS)
  (p * torch.tensor(w, dtype=torch.float64)).sum().backward()
  return p.detach().numpy(), s.grad.numpy(), g.grad.numpy()


def ours(s, allowed, g, w):
  def loss(s, g):
    p = masked_softmax(s, allowed, g)
    return jnp.sum(p * w), p
  (_, p), (ds, dg) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(jnp.asarray(s), jnp.asarray(g))
  return np.asarray(p), np.asarray(ds), np.asarray(dg)


def _case(seed=0, b=2, h=3, n=7):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(b, h, n, n)).astype(np.float32)
  allowed = np.tril(np.ones((n, n), bool))[None, None].repeat(b, 0)
  # Kept keys (ties with I on the diagonal) and dropped keys (ties with I off it) in every sample.
  g = np.array([[1, 0, 1, 0, 1, 1, 0], [1, 1, 0, 0, 1, 0, 1]], np.float32)[:b, :n]
  s[0, 1, 4, 1] = 12.0           # a row whose largest allowed score sits on a dropped key
  w = rng.normal(size=(b, h, n, n)).astype(np.float32)
  return s, allowed, g, w


def test_masked_softmax_gradients_match_float64_formula():
  s, allowed, g, w = _case()
  p_ref, ds_ref, dg_ref = torch_reference(s, allowed, g, w)
  p, ds, dg = ours(s, allowed, g, w)
  np.testing.assert_allclose(p, p_ref, rtol=2e-5, atol=1e-9)
  np.testing.assert_allclose(ds, ds_ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(dg, dg_ref, rtol=1e-5, atol=1e-7)
  # Every key column but the last (seen only by its own query, on the diagonal) has a gradient far from 0.
  assert np.abs(dg_ref[:, :-1]).min() > 1e-2 and np.all(dg_ref[:, -1] == 0)


def test_diagonal_of_g_prime_carries_no_gradient():
  """Row i's probabilities do not depend on G[i] (G'[i, i] = 1 whatever G[i]): dL_i/dG[i] is exactly 0,
  for kept (G = 1, a tie with I) and dropped (G = 0) tokens alike."""
  s, allowed, g, w = _case(seed=1)
  n = s.shape[-1]
  for i in range(n):
    wi = np.zeros_like(w)
    wi[:, :, i, :] = w[:, :, i, :]
    _, _, dg_ref = torch_reference(s, allowed, g, wi)
    _, _, dg = ours(s, allowed, g, wi)
    assert np.all(dg[:, i] == 0.0), (i, dg[:, i])
    assert np.all(dg_ref[:, i] == 0.0)
    others = np.arange(n) != i
    np.testing.assert_allclose(dg[:, others], dg_ref[:, others], rtol=1e-5, atol=1e-7)
