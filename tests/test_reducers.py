"""Pre-LLM reducers in the visual-token slot: VisionZip and DivPrune on hand-made inputs with known
answers; the tower's attention intermediates; engine ≡ masked forward; bad budgets are one line."""
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.dynllava import get_config
from dynllava_jax.errors import UserError
from dynllava_jax.model import layers as L
from dynllava_jax.model.projector import MLP2xGelu
from dynllava_jax.sparsity.divprune import DivPrune, divprune_select
from dynllava_jax.sparsity.registry import make_sparsifier
from dynllava_jax.sparsity.visionzip import VisionZip, split_budget, visionzip_tokens


def test_visionzip_hand_made():
  """7 tokens (CLS + 6 patches), 2 heads. CLS attention summed over heads ranks patches 1 > 3 > 0 > ...;
  D = 3 keeps CLS, p1, p3. Remaining p0, p2, p4, p5 (R = 4), C = 2: step 2 -> targets p0, p4. Keys put p2
  nearest p4 and p5 exactly between p0 and p4 (a tie: the lower target, p0)."""
  w = 3
  hidden = np.arange(7 * w, dtype=np.float32).reshape(1, 7, w) ** 1.5
  attn = np.full((1, 2, 7, 7), 1 / 7, np.float32)
  attn[0, 0, 0, 1:] = [0.10, 0.30, 0.02, 0.20, 0.01, 0.05]
  attn[0, 1, 0, 1:] = [0.05, 0.25, 0.03, 0.15, 0.02, 0.02]
  # keys (1, 7, heads=2, hd=2); the mean over heads is what counts
  mean = np.array([[9, 9], [1, 0], [0, 5], [0.2, 1.0], [4, 4], [0, 1], [1, 1]], np.float32)   # CLS, p0..p5
  keys = np.stack([mean + 0.5, mean - 0.5], axis=1)[None]
  tokens, dom, tgt, assign = visionzip_tokens(jnp.asarray(hidden), jnp.asarray(attn), jnp.asarray(keys), 3, 2)
  np.testing.assert_array_equal(np.asarray(dom), [[1, 3]])
  np.testing.assert_array_equal(np.asarray(tgt), [[0, 4]])
  # remaining order p0, p2, p4, p5: p2 (0.2, 1) is nearer p4 (0, 1) than p0 (1, 0); p5 (1, 1) ties -> p0
  np.testing.assert_array_equal(np.asarray(assign), [[-1, 1, -1, 0]])
  h = hidden[0]
  want = np.stack([h[0], h[2], h[4],                # CLS, p1, p3 (patch i is row i + 1)
                   h[1] + h[6],                     # target p0 + mean{p5}
                   h[5] + h[3]])                    # target p4 + mean{p2}
  np.testing.assert_allclose(np.asarray(tokens[0]), want, rtol=1e-6)
  assert split_budget(64) == (54, 10) and split_budget(128) == (108, 20) and split_budget(192) == (162, 30)


def test_divprune_hand_made():
  """Unit vectors at 0°, 10°, 90°, 180°, 95°: nearest-neighbour distances are largest for 180° (first pick),
  then 0° (distance 2), then 90° (1 from both picked; 95° is 0.913 from 180°). K = 3 -> [0, 2, 3]."""
  ang = np.deg2rad([0, 10, 90, 180, 95])
  x = np.stack([np.cos(ang), np.sin(ang)], -1)[None].astype(np.float32) * np.array([1, 2, 3, 4, 5])[None, :, None]
  np.testing.assert_array_equal(np.asarray(divprune_select(jnp.asarray(x), 3)), [[0, 2, 3]])
  np.testing.assert_array_equal(np.asarray(divprune_select(jnp.asarray(x), 1)), [[3]])
  # ties: four orthogonal-pair vectors, all nearest-neighbour distances equal -> the lowest index first
  sq = np.array([[[1, 0], [0, 1], [-1, 0], [0, -1]]], np.float32)
  np.testing.assert_array_equal(np.asarray(divprune_select(jnp.asarray(sq), 2)), [[0, 2]])
  assert DivPrune(ratio=0.098).keep(576) == 56


@pytest.fixture(scope='module')
def tiny(mqt_tiny):
  """The session's tiny MQT model (tests/conftest.py; one model build for both files): DivPrune acts after
  any projector; VisionZip gets a stand-alone `mlp2x_gelu` projector on the same tower."""
  config, model = mqt_tiny
  pix = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  return config, model, pix


def test_tower_attention_intermediates(tiny):
  """The last layer run: same hidden state as without intermediates; attention = softmax(q·kᵀ/√d) of that
  layer on its input; keys = its k projection."""
  _, model, pix = tiny
  heads = model.mc.vision.heads

  @jax.jit
  def run(tower, pix):
    plain = tower(pix)
    hidden, inter = tower(pix, intermediates=True)
    n = tower.layers_to_run()
    x = tower.patch_embed(tower.patchify(pix))
    x = jnp.concatenate([jnp.broadcast_to(tower.class_embed[...], (2, 1, x.shape[-1])), x], 1) + tower.pos_embed[...]
    x = tower.pre_ln(x)
    if n > 1:
      x, _ = L.split_scan(tower.layers, lambda layer, h, _: (layer(h), None), x, stop=n - 1)
    last = nnx.merge(nnx.graphdef(tower.layers), jax.tree.map(lambda a: a[n - 1], nnx.state(tower.layers)))
    y = last.ln1(x)
    q, k = (m(y).reshape(2, 65, heads, -1) for m in (last.q, last.k))
    want = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1]), -1)
    return plain, hidden, inter, want, k

  plain, hidden, inter, want, k = run(model.vision_tower, jnp.asarray(pix))
  np.testing.assert_allclose(np.asarray(hidden), np.asarray(plain), atol=1e-6)
  assert inter['attn'].shape == (2, heads, 65, 65) and inter['keys'].shape == k.shape
  np.testing.assert_allclose(np.asarray(inter['attn']), np.asarray(want), atol=1e-5)
  np.testing.assert_allclose(np.asarray(inter['keys']), np.asarray(k), atol=1e-5)


def _prompt(mc, n, text=(9, 10, 11, 12, 13)):
  ids = np.array([[1, 5, 6] + [mc.image_token_id] * n + list(text)] * 2, np.int32)
  return ids, np.ones_like(ids)


def test_engine_equals_masked_forward(tiny):
  """DivPrune: the engine on a K-placeholder prompt ≡ the dense forward on the full N-placeholder prompt with
  the unpicked image tokens out of the attention mask (no key, positions renumbered). VisionZip (merged
  tokens: no mask form): its slot output is the projector of its selection on the tower's intermediates,
  and the engine asks for its k placeholders."""
  from dynllava_jax.decode.prefill import prefill
  config, model, pix = tiny
  mc = config.model
  n = model.num_image_tokens
  dp = make_sparsifier('divprune', config, tokens=5)
  ids_k, mask_k = _prompt(mc, 5)
  got = prefill(model, config, dp, ids_k, pix, mask_k).logits_last
  ids_n, mask_n = _prompt(mc, n)

  @jax.jit
  def masked(model, ids, pix, mask):
    kept = divprune_select(model.image_features(pix), 5)                          # (B, 5)
    picked = jnp.zeros((2, n), bool).at[jnp.arange(2)[:, None], kept].set(True)
    mask = mask.at[:, 3:3 + n].set(picked.astype(mask.dtype))                    # unpicked: out of the mask
    return model(ids, pix, mask)[:, -1], kept

  ref, kept = masked(model, jnp.asarray(ids_n), jnp.asarray(pix), jnp.asarray(mask_n))
  assert len(set(np.asarray(kept[0]).tolist())) == 5
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-4)

  with pytest.raises(ValueError, match='needs exactly 5'):
    prefill(model, config, dp, ids_n, pix, mask_n)

  vz = make_sparsifier('visionzip', config, dominant=6, contextual=3)
  plain = get_config('size=tiny,dense=True').model
  mlp = MLP2xGelu(plain, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1))

  @jax.jit
  def slot(tower, mlp, pix):
    hidden, inter = tower(pix, intermediates=True)
    want = mlp(visionzip_tokens(hidden, inter['attn'], inter['keys'], 6, 3)[0])
    return vz.reduce_visual(types.SimpleNamespace(vision_tower=tower, projector=mlp, mc=plain), pix), want

  got, want = slot(model.vision_tower, mlp, jnp.asarray(pix))
  assert got.shape == (2, 9, mc.llm.hidden) and vz.visual_tokens(plain, 64) == 9
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  with pytest.raises(UserError, match='per-token projector'):
    prefill(model, config, vz, ids_n, pix, mask_n)                    # the MQT projector reads the grid


def test_bad_budgets_are_one_line():
  mc = get_config('size=tiny,dense=True').model
  with pytest.raises(UserError, match='exceeds the 64 patches'):
    VisionZip(dominant=60, contextual=10).validate(mc, 70)
  with pytest.raises(UserError, match='not both'):
    VisionZip(tokens=64, dominant=54)
  with pytest.raises(UserError, match='exceeds the 64 image tokens'):
    DivPrune(tokens=65).validate(mc, 65)
  with pytest.raises(UserError, match=r'ratio=0 must be in \(0, 1\]'):
    DivPrune(ratio=0)
  with pytest.raises(UserError, match=r'visionzip: ratio=1.5 must be in \(0, 1\]'):
    make_sparsifier('visionzip', mc, ratio=1.5)


def test_keep_ratio_knobs_of_the_reducers():
  """`eval.py --keep_ratios` reaches the reducers: r -> round(r·64) of the tiny tower's 64 patches."""
  from dynllava_jax.eval.budgets import sweep_points
  mc = get_config('size=tiny,dense=True').model
  points = sweep_points(['visionzip', 'divprune'], keep_ratios=[0.2, 0.5])
  got = [(m, make_sparsifier(m, mc, **o).visual_tokens(mc, 64)) for m, o in points]
  assert got == [('visionzip', 13), ('visionzip', 32), ('divprune', 13), ('divprune', 32)]
  vz = make_sparsifier('visionzip', mc, ratio=0.2)
  assert (vz.dominant, vz.contextual) == split_budget(13)


def test_eval_samples_resized_to_k_slots():
  """An N-placeholder eval sample -> k: prompt and teacher-forcing ids lose the extra placeholders, spans
  after the image shift, spans before it stay."""
  from dynllava_jax.eval.visual_prompts import resize_sample
  ids = np.array([1, 5, 4, 4, 4, 4, 7, 8, 9], np.int32)
  full = {'input_ids': ids, 'labels': np.where(np.arange(9) >= 7, ids, -100), 'attention_mask': np.ones(9),
          'image_start': 2, 'instr_start': 6, 'instr_end': 7, 'answer_start': 7, 'answer_end': 9}
  s = resize_sample({'has_image': True, 'prompt_ids': ids[:7], 'full': full}, 4, 2)
  np.testing.assert_array_equal(s['prompt_ids'], [1, 5, 4, 4, 7])
  f = s['full']
  np.testing.assert_array_equal(f['input_ids'], [1, 5, 4, 4, 7, 8, 9])
  np.testing.assert_array_equal(f['labels'], [-100] * 5 + [8, 9])
  assert (f['image_start'], f['instr_start'], f['instr_end'], f['answer_start'], f['answer_end']) == (2, 4, 5, 5, 7)
