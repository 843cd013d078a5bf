"""Multi-turn with the KV cache carried over (`decode/extend.py`, `generate(..., past=caches)`):
dense: extend + decode ≡ a fresh generate on the whole conversation (tokens equal, logits ≤ 1e-5);
Dynamic-LLaVA (one sample's image in turn 1, the other's in turn 2): ≡ the masked full-sequence forward
whose keys after the sparse layer are the kept set (turn 1's kept image and generated tokens, turn 2's
prompt with its image pruned by the extend, turn 2's kept generated tokens), and the image decisions ≡ a
prefill of the whole conversation's. Samples of different lengths, left- and right-padded; the caches
grow in the extend."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynllava_jax.decode.extend import extend
from dynllava_jax.decode.generate import generate
from dynllava_jax.decode.prefill import prefill
from dynllava_jax.model.llava import Llava
from dynllava_jax.sparsity.registry import make_sparsifier
from test_decode_prefill import make_batch, masked_reference, small_config, to_original

M1, M2 = 6, 6
SPECS = [(30, None, 'left'), (26, None, 'right')]   # dense: text only (no vision compile); images: the dynamic test
NEW = (5, 9)              # turn-2 text tokens per sample (besides turn 1's unfed last token)


def quick_model(cfg, seed, std=0.06, pred_std=0.6):
  """A random model filled on the host (the eager / jitted init costs ~12 s of CPU): N(0, std²) weights
  (the predictors' last layers N(0, pred_std²): decisions far from ties), norm scales 1, biases 0."""
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Llava(cfg.model, rngs=nnx.Rngs(0))), nnx.Param, ...)
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = '/'.join(str(getattr(p, 'key', p)) for p in path)
    if '/bias/' in name:
      return jnp.zeros(x.shape, x.dtype)
    if '/weight/' in name and ('norm' in name or 'ln' in name):
      return jnp.ones(x.shape, x.dtype)
    sd = pred_std if ('head_3' in name or 'fc_4' in name) else std
    return jnp.asarray(rng.standard_normal(x.shape) * sd, x.dtype)
  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, params), rest)


IMAGE_ID = 255      # out of the sampled vocabulary (text_vocab_size): a generated token is never a placeholder


def batch(cfg, specs, seed):
  """make_batch's prompts with the placeholders at IMAGE_ID (its text ids lie in 5..vocab − 1)."""
  ids, pix, mask = make_batch(cfg, specs, seed=seed)
  ids = np.where(ids == IMAGE_ID, IMAGE_ID - 1, ids)
  return np.where(ids == 4, IMAGE_ID, ids), pix, mask


@pytest.fixture(scope='module')
def setup():
  cfg = small_config()
  model = quick_model(cfg, seed=1)
  data = batch(cfg, SPECS, seed=2)             # (make_batch puts placeholders at the preset's id, 4)
  with cfg.unlocked():
    cfg.model.image_token_id = IMAGE_ID
    cfg.model.llm.text_vocab_size = IMAGE_ID
  rng = np.random.default_rng(5)
  texts = [rng.integers(5, IMAGE_ID, n).tolist() for n in NEW]
  return cfg, model, data, texts


def prompts(ids, mask):
  return [ids[b][mask[b].astype(bool)].tolist() for b in range(ids.shape[0])]


def pad(rows, pad_id, left):
  t = max(len(r) for r in rows)
  out = np.full((len(rows), t), pad_id, np.int32)
  m = np.zeros((len(rows), t), np.int32)
  for b, r in enumerate(rows):
    sl = slice(t - len(r), t) if left[b] else slice(0, len(r))
    out[b, sl], m[b, sl] = r, 1
  return out, m


_RUNS = {}


def two_turns(cfg, model, method, batch, texts):
  """Turn 1 (prefill + decode), turn 2 (extend + decode) -> (turn1, turn2, chunks); once per method."""
  key = getattr(method, 'name', method)
  if key not in _RUNS:
    _RUNS[key] = _two_turns(cfg, model, method, batch, texts)
  return _RUNS[key]


def _two_turns(cfg, model, method, batch, texts):
  ids, pix, mask = batch
  one = generate(model, cfg, method, ids, pix, mask, max_new_tokens=M1, sampling='greedy', return_logits=True,
                 return_caches=True)
  chunks = [[int(one.tokens[b, one.lengths[b] - 1])] + texts[b] for b in range(len(texts))]
  c_ids, c_mask = pad(chunks, cfg.model.pad_token_id, left=[False, True])
  c_pix = pix if (c_ids == cfg.model.image_token_id).any() else None
  two = generate(model, cfg, method, c_ids, c_pix, c_mask, past=one.caches, max_new_tokens=M2,
                 sampling='greedy', return_logits=True, return_caches=True)
  return one, two, chunks


def test_dense_extend_equals_prefill_of_the_conversation(setup):
  cfg, model, batch, texts = setup
  ids, pix, mask = batch
  one, two, chunks = two_turns(cfg, model, 'dense', batch, texts)
  conv = [p + one.tokens[b, :one.lengths[b] - 1].tolist() + chunks[b] for b, p in enumerate(prompts(ids, mask))]
  v_ids, v_mask = pad(conv, cfg.model.pad_token_id, left=[True, False])
  ref = generate(model, cfg, 'dense', v_ids, pix, v_mask, max_new_tokens=M2, sampling='greedy',
                 return_logits=True)
  np.testing.assert_array_equal(two.tokens, ref.tokens)
  np.testing.assert_array_equal(two.lengths, ref.lengths)
  np.testing.assert_allclose(two.logits, ref.logits, atol=1e-5, rtol=1e-5)
  assert len(two.capacities[0]) == 1 and two.caches[0].capacity > one.caches[0].capacity
  np.testing.assert_array_equal(np.asarray(two.caches[0].length),
                                [len(c) + two.lengths[b] - 1 for b, c in enumerate(conv)])
  assert np.isnan(two.kept_image_ratio).all()


def test_dynamic_extend_equals_masked_reference_of_the_kept_set(setup):
  """Sample 0: the image in turn 1 (pruned by the prefill), a text turn 2; sample 1: a text turn 1, the
  image in turn 2 (pruned by the extend)."""
  cfg, model, _, _ = setup
  method = make_sparsifier('dynamic', cfg.model)
  n = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
  with cfg.unlocked():
    cfg.model.image_token_id = 4
    ids, pix, mask = batch(cfg, [(30, 3, 'left'), (22, None, 'right')], seed=3)
    cfg.model.image_token_id = IMAGE_ID
  rng = np.random.default_rng(7)
  word = lambda k: rng.integers(5, IMAGE_ID, k).tolist()
  texts = [word(5), word(3) + [cfg.model.image_token_id] * n + word(4)]
  one, two, chunks = two_turns(cfg, model, method, (ids, pix, mask), texts)
  p_rng = jax.random.split(jax.random.PRNGKey(0))[0]          # generate's prefill / extend key
  pre = prefill(model, cfg, method, ids, pix, mask, rng=p_rng, max_new_tokens=M1)    # turn 1's decisions
  kept_prompt = to_original(np.asarray(pre.out.kept[1]), mask)
  c_ids, c_mask = pad(chunks, cfg.model.pad_token_id, left=[False, True])
  ext = extend(model, cfg, method, one.caches, c_ids, c_mask, pix, max_new_tokens=M2, rng=p_rng)  # turn 2's
  kept_chunk = to_original(ext.kept[1], c_mask)
  rows, keeps, spans = [], [], []
  for b, p in enumerate(prompts(ids, mask)):
    fed1, fed2 = one.lengths[b] - 1, two.lengths[b] - 1
    rows.append(p + one.tokens[b, :fed1].tolist() + chunks[b] + two.tokens[b, :fed2].tolist())
    keeps.append(kept_prompt[b][mask[b].astype(bool)].tolist() + one.text_keep[b, :fed1].tolist()
                 + kept_chunk[b][c_mask[b].astype(bool)].tolist() + two.text_keep[b, :fed2].tolist())
    start = len(p) + fed1 + len(chunks[b]) - 1           # the chunk's last token: turn 2's first logits
    spans.append((start, fed2))
  v_ids, v_mask = pad(rows, cfg.model.pad_token_id, left=[False, False])
  g = np.zeros(v_ids.shape, bool)
  for b, k in enumerate(keeps):
    g[b, :len(k)] = k
  ref = np.asarray(masked_reference(model, v_ids, pix, v_mask, (cfg.model.sparse.sparse_layer,), (g,)))
  for b, (start, fed2) in enumerate(spans):
    np.testing.assert_allclose(two.logits[b, :fed2 + 1], ref[b, start:start + fed2 + 1], atol=1e-5, rtol=1e-5)
  # the image decisions (either turn's) are the ones a prefill of the whole conversation makes: the image
  # tokens' hidden states at the sparse layer see only earlier tokens, all present before it
  img = v_ids == cfg.model.image_token_id
  conv_mask = (np.arange(v_ids.shape[1])[None] <= np.array([s for s, _ in spans])[:, None]).astype(np.int32)
  whole = prefill(model, cfg, method, v_ids, pix, conv_mask, rng=p_rng, max_new_tokens=M2)
  np.testing.assert_array_equal(to_original(np.asarray(whole.out.kept[1]), conv_mask)[img], g[img])
  # the test means something: each image was pruned to its budget, the text rule dropped tokens
  assert [int(g[b][img[b]].sum()) for b in range(2)] == [4, 4] and img.sum(-1).tolist() == [n, n]
  fed = [o.text_keep[b, :o.lengths[b] - 1] for o in (one, two) for b in range(2)]
  assert not np.concatenate(fed).all()
  np.testing.assert_allclose(two.kept_image_ratio, [np.nan, 4 / n])
  # the compact segment holds turn 1's kept tokens + the chunk's kept tokens + turn 2's kept generated ones
  kept2 = [int(two.text_keep[b, :two.lengths[b] - 1].sum()) for b in range(2)]
  np.testing.assert_array_equal(np.asarray(two.caches[1].length),
                                np.asarray(one.caches[1].length) + kept_chunk.sum(-1) + kept2)


def test_extend_refuses_what_it_cannot_append(setup):
  cfg, model, batch, texts = setup
  ids, pix, mask = batch
  one, _, _ = two_turns(cfg, model, 'dense', batch, texts)
  dense = make_sparsifier('dense', cfg.model)
  with pytest.raises(ValueError, match='image placeholders'):            # not the model's count
    extend(model, cfg, dense, one.caches, np.array([[5, cfg.model.image_token_id]] * 2), pixel_values=pix)
  with pytest.raises(ValueError, match='segments'):
    extend(model, cfg, make_sparsifier('dynamic', cfg.model), one.caches, np.array([[5, 6]] * 2))
  with pytest.raises(ValueError, match='max_position'):
    extend(model, cfg, dense, one.caches, np.array([[5, 6]] * 2), max_new_tokens=cfg.model.llm.max_position)
  with pytest.raises(ValueError, match='use_cache=True'):
    generate(model, cfg, 'dense', np.array([[5, 6]] * 2), None, past=one.caches, use_cache=False)
