"""Records tests/assets/model_fixture.npz: outputs of a fixed tiny model through every public path.

    .venv/bin/python scripts/record_model_fixture.py [--out tests/assets/model_fixture.npz]

Recorded at commit 79b2b6f (before the decoder was reshaped into one layer body + a layer plan) so
`tests/test_layer_plan.py` can check that the reshaped code (with a uniform plan) gives the same logits
and tokens: bit-identical on the recording machine, tokens exact and floats within 1e-5 elsewhere
(`differs`). The model: 4 decoder layers, 16 image tokens, random weights scaled so greedy outputs
vary; a batch of 3 prompts (left / right padding, one text-only).

Keys: dense_logits (B, T, V); train_logits / train_keep (the Dynamic-LLaVA masked training forward, zero
and Gumbel noise); prefill_last/<method> (B, V) and prefill_logits/<method> (B, T_last, V) (every position
of the last segment); prefill_lastq/<method> (the last-query shortcut) and teacher_logits/<method> (the
teacher-forced pruned forward) for TEACHER; tokens/<method> (B, M) greedy KV-cache
generation and tokens_nocache/dynamic.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = ('dense', 'dynamic', 'dynamic_image', 'dynamic_text', 'fastv', 'pdrop', 'random', 'uniform')
GENERATE = ('dense', 'dynamic', 'fastv')
TEACHER = ('dense', 'dynamic', 'fastv', 'pdrop')
M = 8


def config():
  from configs.dynllava import get_config  # pylint: disable=g-import-not-at-top
  cfg = get_config('size=tiny')
  mc = cfg.model
  mc.vision.image_size, mc.vision.depth = 32, 2
  mc.llm.layers, mc.llm.hidden, mc.llm.heads, mc.llm.kv_heads, mc.llm.mlp_dim = 4, 64, 4, 2, 128
  mc.llm.head_dim = 16
  s = mc.sparse
  s.d_model, s.nhead, s.dim_feedforward, s.num_layers, s.sparse_layer = 32, 4, 64, 1, 1
  s.image_keep_ratio, s.len_ot = 0.25, 4
  cfg.eval.prefill_bucket, cfg.eval.cache_bucket = 8, 4
  return cfg


def model_of(cfg, seed=0):
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import Llava  # pylint: disable=g-import-not-at-top
  model = Llava(cfg.model, rngs=nnx.Rngs(seed))

  def f(path, x):
    name = '/'.join(str(p) for p in path)
    if 'norm' in name or '_ln' in name or name.endswith('ln/weight') or 'bias' in name:
      return x
    return x * (30.0 if ('head_3' in name or 'fc_4' in name) else 3.0)

  nnx.update(model, jax.tree_util.tree_map_with_path(f, nnx.state(model, nnx.Param)))
  return model


def prompts(cfg, seed=0):
  """3 prompts: image after 3 text tokens (left-padded), image first (right-padded), text-only."""
  mc = cfg.model
  n = (mc.vision.image_size // mc.vision.patch_size) ** 2
  rng = np.random.default_rng(seed)
  specs = [(30, 3, 'left'), (26, 1, 'right'), (21, None, 'left')]
  t = max(s[0] for s in specs) + 3
  ids = np.full((3, t), mc.pad_token_id, np.int32)
  mask = np.zeros((3, t), np.int32)
  for b, (length, before, side) in enumerate(specs):
    text = list(rng.integers(5, mc.llm.vocab_size, length))
    row = [mc.bos_token_id] + (text[:length - 1] if before is None else
                               text[:before] + [mc.image_token_id] * n + text[before:length - 1 - n])
    sl = slice(t - len(row), t) if side == 'left' else slice(0, len(row))
    ids[b, sl], mask[b, sl] = row, 1
  pix = rng.standard_normal((3, mc.vision.image_size, mc.vision.image_size, 3)).astype(np.float32)
  return ids, pix, mask


def train_batch(cfg, seed=0):
  """Right-padded training batch (sample 0 with an image and a 6-token answer, sample 1 text-only)."""
  mc = cfg.model
  rng = np.random.default_rng(seed)
  b, t = 2, 40
  n = (mc.vision.image_size // mc.vision.patch_size) ** 2
  ids = rng.integers(5, mc.llm.vocab_size, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  labels = np.full((b, t), -100, np.int32)
  ids[:, 0] = 1
  ids[0, 3:3 + n] = mc.image_token_id
  labels[0, t - 6:] = ids[0, t - 6:]
  labels[1, t - 7:t - 4] = ids[1, t - 7:t - 4]
  mask[1, t - 4:] = 0
  ids[1, t - 4:] = mc.pad_token_id
  return {'input_ids': ids, 'attention_mask': mask, 'labels': labels,
          'pixel_values': rng.normal(size=(b, mc.vision.image_size, mc.vision.image_size, 3)).astype(np.float32),
          'has_image': np.array([True, False]), 'image_start': np.array([3, 3], np.int32),
          'instr_start': np.array([3 + n, 3], np.int32), 'instr_end': np.array([3 + n + 4, 8], np.int32),
          'answer_start': np.array([t - 6, t - 7], np.int32), 'answer_end': np.array([t, t - 4], np.int32)}


def compute(model=None, cfg=None, methods=METHODS, teacher_methods=TEACHER, generated=GENERATE, nocache=True):
  """The recorded outputs as {name: numpy array} (model / cfg default to `model_of(config())`); the
  method lists pick a subset (the test checks one that compiles in about a minute)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dynllava_jax.decode.generate import generate  # pylint: disable=g-import-not-at-top
  from dynllava_jax.decode.prefill import prefill  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval import teacher  # pylint: disable=g-import-not-at-top
  from dynllava_jax.sparsity.registry import make_sparsifier  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train.forward import train_forward  # pylint: disable=g-import-not-at-top
  cfg = config() if cfg is None else cfg
  model = model_of(cfg) if model is None else model
  ids, pix, mask = prompts(cfg)
  out = {'dense_logits': model(jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask))}
  batch = jax.tree.map(jnp.asarray, train_batch(cfg))
  for name, rng in (('zero', None), ('gumbel', jax.random.key(3))):
    tr = train_forward(model, batch, tau=0.5, rng=rng)
    out[f'train_logits/{name}'], out[f'train_keep/{name}'] = tr['logits'], tr['keep']
  last = mask.sum(-1) - 1 - 4        # the last 4 real tokens play the answer in teacher forcing
  right = np.zeros_like(ids)         # teacher forcing wants right padding
  right_mask = np.zeros_like(mask)
  for b in range(ids.shape[0]):
    row = ids[b][mask[b].astype(bool)]
    right[b, :len(row)], right_mask[b, :len(row)] = row, 1
  for name in methods:
    method = make_sparsifier(name, cfg)
    po = prefill(model, cfg, method, ids, pix, mask, rng=jax.random.key(5), return_logits=True)
    out[f'prefill_last/{name}'], out[f'prefill_logits/{name}'] = po.out.logits_last, po.out.logits
    if name in teacher_methods:
      po = prefill(model, cfg, method, ids, pix, mask, rng=jax.random.key(5))   # the last-query shortcut
      out[f'prefill_lastq/{name}'] = po.out.logits_last
      fwd = jax.jit(lambda *a, method=method: teacher.pruned_forward(model, method, *a)[0])
      out[f'teacher_logits/{name}'] = fwd(jnp.asarray(right), jnp.asarray(pix), jnp.asarray(right_mask),
                                          jnp.asarray(last), jax.random.key(5))
  for name in generated:
    g = generate(model, cfg, name, ids, pix, mask, max_new_tokens=M, sampling='greedy')
    out[f'tokens/{name}'] = g.tokens
  if nocache:
    g = generate(model, cfg, 'dynamic', ids, pix, mask, max_new_tokens=M, sampling='greedy', use_cache=False)
    out['tokens_nocache/dynamic'] = g.tokens
  return {k: np.asarray(v) for k, v in out.items()}


FLOAT_TOL = 1e-5


def differs(got, recorded):
  """Keys whose outputs differ: discrete arrays (tokens, keep decisions as ints / bools) must be equal;
  float arrays must agree within FLOAT_TOL (absolute + relative). On the machine that recorded the
  fixture the floats are bit-identical; XLA CPU's kernels depend on the CPU (instruction set, cache
  sizes -> blocking), which moves the last bits on another machine (seen: 9.5e-7 on dense logits)."""
  bad = []
  for k, want in recorded.items():
    have = got.get(k)
    if have is None or have.shape != want.shape:
      bad.append(k)
    elif np.issubdtype(want.dtype, np.floating):
      if not np.allclose(have, want, rtol=FLOAT_TOL, atol=FLOAT_TOL):
        bad.append(k)
    elif not np.array_equal(have, want):
      bad.append(k)
  return bad


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--check', action='store_true', help='compare every output with --out instead of writing')
  ap.add_argument('--out', default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                'tests', 'assets', 'model_fixture.npz'))
  args = ap.parse_args()
  out = compute()
  if args.check:
    with np.load(args.out) as f:
      recorded = {k: f[k] for k in f.files}
    bad = differs(out, recorded)
    exact = sum(np.array_equal(out[k], recorded[k]) for k in recorded if k in out)
    print(f'{len(out)} arrays, {exact} bit-identical, {len(bad)} differ from {args.out} '
          f'(beyond {FLOAT_TOL} for floats): {bad}')
    sys.exit(1 if bad else 0)
  np.savez_compressed(args.out, **out)
  print(f'wrote {args.out}: {len(out)} arrays')


if __name__ == '__main__':
  main()
