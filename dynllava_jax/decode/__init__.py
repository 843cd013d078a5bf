"""Sparsified inference engine: prefill, KV-cache and cache-free decoding (see docs/inference.md)."""
from dynllava_jax.decode.generate import GenerateOutput, generate
from dynllava_jax.decode.prefill import PrefillOutput, prefill, sparse_forward
from dynllava_jax.decode.sampling import Sampling

__all__ = ['GenerateOutput', 'PrefillOutput', 'Sampling', 'generate', 'prefill', 'sparse_forward']
