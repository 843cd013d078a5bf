"""Teacher-forced answer NLL with any Sparsifier's pruning applied (the paper's generation metric: PPL of
the gold answer, teacher-forced through the KV-cache decode semantics).

One forward over the full sequence (prompt + gold answer) with pruning as key-column masks in exact-zero
attention, the same computation as removing the tokens (docs/eval.md, "Perplexity protocol"):
  - image tokens: at each drop point the method scores the present tokens with the last PROMPT token as
    `last_index` (the answer cannot influence the choice); the engine's rule (`top_k_mask`) keeps the k
    best; dropped tokens are no key from there on; `renumber_positions` renumbers the present tokens.
  - generated text: from `method.text_layer` on, an answer token is a key for LATER tokens only if
    `method.text_keep` keeps it (from its hidden state entering that layer); it always attends to itself.
Logits at t score token t + 1; the NLL is summed over the real answer tokens (positions > last_index).
Shapes: input_ids / attention_mask (B, T) right-padded, pixel_values (B, H, W, 3), last_index (B,).
"""
import jax
import jax.numpy as jnp
from flax import nnx

from dynllava_jax.model.llava import dense_allowed, positions_from_mask
from dynllava_jax.model.vocab import mask_padded, text_vocab_size
from dynllava_jax.model.walk import KeyMask, walk
from dynllava_jax.sparsity.base import ScoreContext, TextContext, top_k_mask


def pruned_forward(model, method, input_ids, pixel_values, attention_mask, last_index, rng=None):
  """Logits (B, T, V) of the full sequence with `method`'s pruning, and the final keep state.

  Returns (logits, present) where present (B, T) bool marks the tokens that are keys in the LAST layer
  (image tokens kept by the drops, answer tokens kept by text_keep, all other real tokens).
  """
  mc = model.mc
  valid = attention_mask.astype(bool)
  h, image_mask = model.embed(input_ids, pixel_values, None, method)   # a pre-LLM reducer acts in the slot
  is_answer = valid & (jnp.arange(input_ids.shape[1])[None, :] > last_index[:, None])
  points = tuple(method.drop_points(mc))
  counts = tuple(method.keep_counts(model.num_image_tokens))
  text_layer = method.text_layer(mc)
  keys = KeyMask(model.language_model, positions_from_mask(attention_mask), dense_allowed(attention_mask),
                 mc.attention, 'exact_zero', index_params=True,
                 route=model.route(image_mask & valid, pixel_values))     # MoD layers (model/mod.py)
  st = {'image': image_mask & valid, 'text': jnp.ones_like(valid)}      # image tokens / answers present

  def at(p, h, h_prev):
    if p in points:
      i = points.index(p)
      present = valid & (~image_mask | st['image'])
      ctx = ScoreContext(h=h, h_prev=h_prev, positions=keys.positions, valid=present & ~is_answer,
                         image_mask=st['image'] & ~is_answer, last_index=last_index, layer=p,
                         model=model, rng=None if rng is None else jax.random.fold_in(rng, i))
      st['image'] = top_k_mask(method.score(i, ctx), st['image'] & ~is_answer, counts[i])
      keys.keep = _key_keep(st['image'], image_mask, st['text'], valid)
      if method.renumber_positions:
        present = valid & (~image_mask | st['image'])
        keys.positions = jnp.where(present, jnp.cumsum(present.astype(jnp.int32), axis=1) - 1, 0)
    keep = method.text_keep(TextContext(h_new=h, layer=p, model=model)) if p == text_layer else None
    if keep is not None:
      st['text'] = jnp.where(is_answer, keep.astype(bool), True)
      keys.keep = _key_keep(st['image'], image_mask, st['text'], valid)
    return h

  bounds = sorted(set(points) | ({text_layer} if text_layer is not None else set()))
  h = walk(h, mc.llm.layers, bounds, keys.run, at, prev=points if method.needs_prev_hidden else ())
  return model.language_model.head(h), _key_keep(st['image'], image_mask, st['text'], valid).astype(bool)


def _key_keep(present_image, image_mask, text_keep, valid):
  return (valid & (~image_mask | present_image) & text_keep).astype(jnp.float32)


def answer_nll(model, method, input_ids, pixel_values, attention_mask, last_index, rng=None):
  """Per-sample (Σ NLL over answer tokens, answer-token count), both (B,) float32."""
  logits, _ = pruned_forward(model, method, input_ids, pixel_values, attention_mask, last_index, rng)
  t = input_ids.shape[1]
  logp = jax.nn.log_softmax(mask_padded(logits[:, :-1], text_vocab_size(model.mc)), axis=-1)
  target = input_ids[:, 1:]
  nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  pos = jnp.arange(1, t)[None, :]
  scored = (pos > last_index[:, None]) & attention_mask[:, 1:].astype(bool)
  return jnp.sum(jnp.where(scored, nll, 0.0), axis=1), jnp.sum(scored, axis=1).astype(jnp.float32)


def make_answer_nll(method, graphdef):
  """jit-compiled `fn(state, input_ids, pixel_values, attention_mask, last_index, rng)` -> answer_nll."""

  @jax.jit
  def fn(state, input_ids, pixel_values, attention_mask, last_index, rng):
    model = nnx.merge(graphdef, state)
    return answer_nll(model, method, input_ids, pixel_values, attention_mask, last_index, rng)

  return fn
