"""Where a trained demo model attends when it answers a cell look-up (docs/demo.md, "Why echo").

    python scripts/demo_attention.py <training workdir> [--style named|echo] [--samples 48]
    python scripts/demo_attention.py --copy_check

For validation look-ups, at the position that predicts the answer's digit, per layer and head: the share of
the image attention on the asked cell's image tokens (1 / grid² = uniform over the cells) and the
attention on the cell-name token of the question (named) or of the echoed answer (echo).
--copy_check: the demo's tiny LLM alone, trained to predict the token three positions back with every
position supervised (random token sequences): its accuracy every 50 steps (attention and RoPE can learn a
positional copy).
"""
import argparse
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def copy_check(steps=200, offset=3):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from configs.demo import get_config  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import Llava, dense_allowed, positions_from_mask  # pylint: disable=g-import-not-at-top
  c = get_config('stage=2')
  gd, params = nnx.split(Llava(c.model, rngs=nnx.Rngs(0)).language_model, nnx.Param)
  tx = optax.adam(1e-3)
  opt = tx.init(params)

  def loss_fn(params, ids):
    m = nnx.merge(gd, params)
    mask = jnp.ones_like(ids)
    h = m.run_layers(m.embed_tokens(ids), positions_from_mask(mask), dense_allowed(mask), mode=c.model.attention)
    logits, target = m.head(h)[:, offset - 1:-1], ids[:, :ids.shape[1] - offset]   # position t -> ids[t - offset + 1]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), target[..., None], -1)
    return nll.mean(), jnp.mean(jnp.argmax(logits, -1) == target)

  @jax.jit
  def step(params, opt, ids):
    (_, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(params, ids)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, acc

  rng = np.random.default_rng(0)
  for i in range(1, steps + 1):
    params, opt, acc = step(params, opt, jnp.asarray(rng.integers(10, 200, (16, 64))))
    if i % 50 == 0:
      print(f'step {i}: copy-{offset}-back accuracy {float(acc):.3f}', flush=True)


def attention(workdir, style, n):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from configs.demo import get_config  # pylint: disable=g-import-not-at-top
  from dynllava_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval.run import _load_samples, load_model  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import positions_from_mask  # pylint: disable=g-import-not-at-top
  c = get_config('stage=2')
  with c.unlocked():
    c.data.digits.type_probs = (1.0, 0.0, 0.0, 0.0, 0.0)
    c.data.digits.describe_style = style
  model = load_model(c, workdir, report_fn=lambda m: None)[0]
  samples = [s for s in pipeline.make_eval_samples(c, 'validation', limit=4 * n)
             if s['question_type'] == 'digit_at'][:n]
  tok = _load_samples(c, 'validation', 1)[1]
  batch = pipeline.pad_batch([s['full'] for s in samples], pipeline.buckets(c), c.model.pad_token_id)
  ids, am = jnp.asarray(batch['input_ids']), jnp.asarray(batch['attention_mask'])
  _, aux = model(ids, jnp.asarray(batch['pixel_values']), am, intermediates=True)
  pos = positions_from_mask(am)
  layers = []
  for g, mod in model.language_model.groups():
    gd, state = nnx.split(mod)
    layers += [nnx.merge(gd, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(g.size)]
  g = int(c.data.digits.grid)
  side = c.model.vision.image_size // c.model.vision.patch_size
  per = side // g
  labels, img = np.asarray(batch['labels']), np.asarray(ids) == c.model.image_token_id
  on_cell = np.zeros((len(layers), c.model.llm.heads))
  on_name = np.zeros_like(on_cell)
  for b in range(len(samples)):
    at = int(np.flatnonzero(labels[b] != -100)[-2]) - 1      # the position predicting the answer's digit
    words = [tok.decode([int(t)]).strip() for t in np.asarray(ids[b, :at + 1])]
    name_at = max(i for i, w in enumerate(words) if re.fullmatch(r'[a-c][1-3]', w))
    r, col = 'abc'.index(words[name_at][0]), int(words[name_at][1]) - 1
    start = int(np.argmax(img[b]))
    grid = np.arange(side * side).reshape(side, side)
    cell = grid[per * r:per * (r + 1), per * col:per * (col + 1)].reshape(-1) + start
    for li, layer in enumerate(layers):
      x = layer.input_norm(aux['hidden_in'][li][b:b + 1])
      rope = layer.attn.rope(pos[b:b + 1])
      k, _ = layer.attn.kv(x, pos[b:b + 1], rope)
      q = layer.attn.q(x, pos[b:b + 1], rope)[0, at]
      k = jnp.repeat(k[0], q.shape[0] // k.shape[2], axis=1)
      s = jnp.einsum('hd,thd->ht', q, k) / np.sqrt(q.shape[-1])
      p = np.asarray(jax.nn.softmax(jnp.where(jnp.arange(s.shape[1]) <= at, s, -1e9), -1))
      on_cell[li] += p[:, cell].sum(-1) / np.maximum(p[:, start:start + side * side].sum(-1), 1e-9)
      on_name[li] += p[:, name_at]
  print(f'{len(samples)} validation look-ups; layer x head')
  print(f'share of the image attention on the asked cell ({1 / g ** 2:.2f} = uniform):')
  print(np.round(on_cell / len(samples), 3))
  print('attention on the cell-name token:')
  print(np.round(on_name / len(samples), 3))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('workdir', nargs='?')
  ap.add_argument('--style', default='named', choices=('named', 'echo'))
  ap.add_argument('--samples', type=int, default=48)
  ap.add_argument('--copy_check', action='store_true')
  a = ap.parse_args()
  if a.copy_check:
    return copy_check()
  if not a.workdir:
    ap.error('a training workdir (or --copy_check)')
  return attention(a.workdir, a.style, a.samples)


if __name__ == '__main__':
  main()
