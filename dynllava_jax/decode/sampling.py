"""Next-token choice: greedy, or temperature / top-p (nucleus) sampling with an explicit PRNG key.

    s = Sampling(temperature=0.7, top_p=0.9);  tok = s.sample(logits, key)     # logits (B, V) -> (B,)

`text_vocab_size` > 0: ids >= it (vocabulary padding, `model/vocab.py`) are never chosen, greedy or sampled;
`generate` sets it from `model.llm.text_vocab_size`.
"""
import dataclasses

import jax
import jax.numpy as jnp

from dynllava_jax.model.vocab import mask_padded


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 = greedy (argmax, the key is unused); top_p in (0, 1] (1 = full distribution);
  text_vocab_size: ids >= it are never chosen (0 = none masked)."""
  temperature: float = 0.0
  top_p: float = 1.0
  text_vocab_size: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f'temperature={self.temperature} must be >= 0 (0 = greedy)')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'top_p={self.top_p} must be in (0, 1]')

  @property
  def greedy(self):
    return self.temperature == 0.0

  def sample(self, logits, key):
    """logits (B, V) fp32 -> tokens (B,) int32."""
    logits = mask_padded(logits, self.text_vocab_size)
    if self.greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits.astype(jnp.float32) / self.temperature
    if self.top_p < 1.0:
      order = jnp.argsort(-x, axis=-1)
      xs = jnp.take_along_axis(x, order, axis=-1)
      probs = jax.nn.softmax(xs, axis=-1)
      before = jnp.cumsum(probs, axis=-1) - probs       # mass of strictly better tokens
      xs = jnp.where(before < self.top_p, xs, -jnp.inf)  # the best token always survives
      x = jnp.full_like(x, -jnp.inf).at[jnp.arange(x.shape[0])[:, None], order].set(xs)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


def as_sampling(spec, eval_cfg=None, text_vocab_size=0):
  """Sampling from None (eval config or greedy), 'greedy', a dict, or a Sampling; text_vocab_size > 0
  (the model's, `model.vocab.text_vocab_size`) replaces the spec's."""
  s = _as_sampling(spec, eval_cfg)
  return dataclasses.replace(s, text_vocab_size=int(text_vocab_size)) if text_vocab_size else s


def _as_sampling(spec, eval_cfg):
  if isinstance(spec, Sampling):
    return spec
  if spec is None:
    if eval_cfg is None:
      return Sampling()
    return Sampling(float(eval_cfg.get('temperature', 0.0)), float(eval_cfg.get('top_p', 1.0)))
  if spec == 'greedy':
    return Sampling()
  if isinstance(spec, dict):
    return Sampling(**spec)
  raise ValueError(f"sampling must be None, 'greedy', a dict(temperature=, top_p=) or a Sampling; got {spec!r}")
