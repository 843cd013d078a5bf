"""Teacher-forced NLL (`eval.teacher`) ≡ the engine's KV-cache decoding fed the gold tokens, for
Dynamic-LLaVA with both image and output-text pruning active (the paper's PPL protocol)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.dynllava import get_config
from dynllava_jax.decode import cache as C
from dynllava_jax.decode.prefill import prefill
from dynllava_jax.decode.step import decode_step
from dynllava_jax.eval import teacher
from dynllava_jax.model.llava import Llava
from dynllava_jax.sparsity.registry import make_sparsifier


def test_teacher_forcing_equals_kv_cache_decode():
  cfg = get_config('size=tiny')
  mc = cfg.model
  model = nnx.jit(lambda: Llava(mc, rngs=nnx.Rngs(5)))()
  # Bias the output-text predictor so that its keep decisions are mixed (random init keeps ~all).
  h_probe = jax.random.normal(jax.random.key(0), (1, 64, mc.llm.hidden))
  lg = model.output_text_score_predictor(h_probe)
  margin = np.median(np.asarray(lg[..., 0] - lg[..., 1]))
  b = model.output_text_score_predictor.fc_4.bias
  b[...] = b[...] + jnp.array([-margin, 0.0])
  method = make_sparsifier('dynamic', cfg)
  n = model.num_image_tokens
  rng = np.random.default_rng(0)
  prompts = [np.concatenate([[1, 7], [mc.image_token_id] * n, rng.integers(5, 200, k)]).astype(np.int32)
             for k in (9, 3)]
  ans_len = 8
  answers = rng.integers(5, 200, (2, ans_len)).astype(np.int32)
  pix = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)

  # Engine: sparsified prefill on left-padded prompts, then decode_step fed the gold tokens.
  t = max(map(len, prompts))
  ids = np.full((2, t), mc.pad_token_id, np.int32)
  mask = np.zeros((2, t), np.int32)
  for i, p in enumerate(prompts):
    ids[i, t - len(p):], mask[i, t - len(p):] = p, 1
  out = prefill(model, cfg, method, ids, pix, mask).out
  caps = [int(np.asarray(s.count).max()) + ans_len for s in out.segments]
  step = jax.jit(lambda m, c, tok: decode_step(m, method, c, tok, jnp.ones((2,), bool)))
  caches = tuple(C.from_segment(s, cap) for s, cap in zip(out.segments, caps))
  logits, keeps = [out.logits_last], []
  for j in range(ans_len - 1):
    lj, caches, keep = step(model, caches, jnp.asarray(answers[:, j]))
    logits.append(lj)
    keeps.append(np.asarray(keep))
  logp = jax.nn.log_softmax(jnp.stack(logits, 1), -1)
  engine_nll = -np.asarray(jnp.take_along_axis(logp, jnp.asarray(answers)[..., None], -1)[..., 0]).sum(1)
  kept = np.stack(keeps, 1)
  assert 0 < kept.sum() < kept.size, 'the text predictor must keep some generated tokens and drop others'

  # Teacher forcing: one pruned forward over right-padded prompt + answer.
  full = [np.concatenate([p, a]) for p, a in zip(prompts, answers)]
  tt = max(map(len, full)) + 3
  fid = np.full((2, tt), mc.pad_token_id, np.int32)
  fmask = np.zeros((2, tt), np.int32)
  for i, f in enumerate(full):
    fid[i, :len(f)], fmask[i, :len(f)] = f, 1
  last = np.array([len(p) - 1 for p in prompts], np.int32)
  fn = teacher.make_answer_nll(method, nnx.graphdef(model))
  nll, cnt = fn(nnx.state(model), jnp.asarray(fid), jnp.asarray(pix), jnp.asarray(fmask), jnp.asarray(last),
                None)
  np.testing.assert_array_equal(np.asarray(cnt), [ans_len, ans_len])
  np.testing.assert_allclose(np.asarray(nll), engine_nll, rtol=2e-4)
