"""Dense inference: no token is dropped (the `Sparsifier` base class already behaves so)."""
from dynllava_jax.sparsity.base import Sparsifier


class Dense(Sparsifier):
  """Keeps every token; one segment, one full KV cache."""
  name = 'dense'
