"""MQT-LLaVA's Matryoshka query projector: torch-reference parity, the released `mm_projector` layout
(load + export), the first-m-rows property, image-independent attention, bad m, inference at any m."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from configs.mqt import get_config
from dynllava_jax import hf
from dynllava_jax.errors import UserError
from dynllava_jax.model.llava import Llava
from dynllava_jax.model.mqt import bicubic_matrix, interpolate_grid


def torch_mqt(width, heads, queries, hidden, seed=0):
  """The released projector written from METHODS.md §2 (not copied): M queries, packed MHA with biases,
  LayerNorms eps 1e-6 on q (query + pos), k (pos bicubically interpolated to the patch grid: positions
  only), v (image features), no post-norm, `proj` a bare (w, H) matrix."""
  import torch
  from torch import nn
  import torch.nn.functional as tf

  class Ref(nn.Module):

    def __init__(self):
      super().__init__()
      g = int(round(queries ** 0.5))
      self.g = g
      self.query = nn.Parameter(torch.randn(queries, width) * 0.02)
      # MAE 2-D sin-cos table: [sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω)], ω_i = 10000^(−i/(w/4)), + noise
      # so a transposed table could not pass.
      omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
      y, x = torch.meshgrid(torch.arange(g, dtype=torch.float64), torch.arange(g, dtype=torch.float64),
                            indexing='ij')
      fx, fy = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
      table = torch.cat([fx.sin(), fx.cos(), fy.sin(), fy.cos()], 1)
      self.pos_embed = nn.Parameter((table + 0.1 * torch.randn(table.shape, dtype=torch.float64)).float())
      self.attn = nn.MultiheadAttention(width, heads)
      self.ln_q = nn.LayerNorm(width, eps=1e-6)
      self.ln_k = nn.LayerNorm(width, eps=1e-6)
      self.ln_v = nn.LayerNorm(width, eps=1e-6)
      self.proj = nn.Parameter(hidden ** -0.5 * torch.randn(width, hidden))
      with torch.no_grad():
        for mod in (self.ln_q, self.ln_k, self.ln_v):
          mod.weight.add_(0.1 * torch.randn(width))
          mod.bias.add_(0.1 * torch.randn(width))
        self.attn.in_proj_bias.normal_(0, 0.1)
        self.attn.out_proj.bias.normal_(0, 0.1)

    def forward(self, x, m):
      b, n, w = x.shape
      s = int(round(n ** 0.5))
      grid = self.pos_embed.reshape(1, self.g, self.g, w).permute(0, 3, 1, 2)
      pos_k = tf.interpolate(grid, size=(s, s), mode='bicubic', align_corners=False)
      pos_k = pos_k.permute(0, 2, 3, 1).reshape(n, w)
      q = self.ln_q(self.query[:m] + self.pos_embed[:m])
      k = self.ln_k(pos_k)
      v = self.ln_v(x)
      out = self.attn(q.unsqueeze(1).expand(m, b, w), k.unsqueeze(1).expand(n, b, w), v.transpose(0, 1),
                      need_weights=False)[0]
      return out.transpose(0, 1) @ self.proj

  torch.manual_seed(seed)
  return Ref().eval()


@jax.jit
def _forward6(model, ids, pix, mask):
  """The dense forward at m = 6 (one compile shared by two tests)."""
  return model(ids, pix, mask, visual_tokens=6)


def test_bicubic_matches_torch():
  import torch
  import torch.nn.functional as tf
  for n_in, n_out in [(4, 8), (16, 24), (5, 3), (6, 6)]:
    x = np.random.default_rng(0).normal(size=(n_in * n_in, 7))
    t = torch.from_numpy(x).reshape(1, n_in, n_in, 7).permute(0, 3, 1, 2)      # float64: exact rule
    ref = tf.interpolate(t, size=(n_out, n_out), mode='bicubic', align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(-1, 7).numpy()
    w = bicubic_matrix(n_in, n_out)
    exact = np.einsum('yi,xj,ijc->yxc', w, w, x.reshape(n_in, n_in, 7)).reshape(-1, 7)
    np.testing.assert_allclose(exact, ref, atol=1e-12, err_msg=f'{n_in}->{n_out}')
    ours = np.asarray(interpolate_grid(jnp.asarray(x, jnp.float32), n_in, n_out))      # float32 path
    np.testing.assert_allclose(ours, ref, atol=1e-5, err_msg=f'{n_in}->{n_out}')
  np.testing.assert_array_equal(bicubic_matrix(6, 6), np.eye(6))


def test_released_layout_parity_and_roundtrip(tmp_path, mqt_tiny):
  """A checkpoint in the released layout (our export of the tiny model, its `model.mm_projector.*`
  replaced by the torch reference's state dict) loads; the projector matches torch ≤ 1e-5 at several m;
  exporting again writes the same tensors under the same names."""
  import torch
  config, model = mqt_tiny
  mc = config.model
  out = hf.save_llava(model, mc, str(tmp_path / 'ours'), layout='original')
  tensors = load_file(os.path.join(out, 'model.safetensors'))
  ref = torch_mqt(mc.vision.width, mc.mqt.heads, mc.mqt.queries, mc.llm.hidden)
  sd = {f'model.mm_projector.{k}': v.detach().numpy() for k, v in ref.state_dict().items()}
  ours_keys = {k for k in tensors if k.startswith('model.mm_projector.')}
  assert ours_keys == set(sd)                              # the released names, nothing else
  for k in sd:
    assert tensors[k].shape == sd[k].shape, k
  tensors.update(sd)
  save_file(tensors, os.path.join(out, 'model.safetensors'), metadata={'format': 'pt'})
  loaded, mc2 = hf.load_llava(out)
  assert mc2.projector == 'mqt' and mc2.mqt.queries == mc.mqt.queries and mc2.mqt.heads == mc.mqt.heads
  n = (mc.vision.image_size // mc.vision.patch_size) ** 2
  x = np.random.default_rng(1).normal(size=(2, n, mc.vision.width)).astype(np.float32)
  for m in (1, 6, mc.mqt.queries):
    with torch.no_grad():
      want = ref(torch.from_numpy(x), m).numpy()
    got = np.asarray(loaded.projector(jnp.asarray(x), m))
    assert got.shape == (2, m, mc.llm.hidden)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f'm={m}')
  again = load_file(os.path.join(hf.save_llava(loaded, mc2, str(tmp_path / 'again'), layout='original'),
                                 'model.safetensors'))
  for k, v in sd.items():
    np.testing.assert_array_equal(again[k], v, err_msg=k)


def test_first_m_rows_and_image_independent_attention(mqt_tiny):
  config, model = mqt_tiny
  proj, big_m = model.projector, config.model.mqt.queries
  x = jax.random.normal(jax.random.key(0), (2, 64, config.model.vision.width))
  full = proj(x)
  for m in (1, 7, big_m):
    np.testing.assert_allclose(np.asarray(proj(x, m)), np.asarray(full[:, :m]), atol=1e-6)
  # attention(count) takes no image; the one set of weights explains both (very different) images
  p = proj.attention()
  assert p.shape == (config.model.mqt.heads, big_m, 64) and p.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(p.sum(-1)), 1.0, atol=1e-6)
  for img in (x, 5.0 * x[::-1] + 3.0):
    w = config.model.vision.width
    hd = w // config.model.mqt.heads
    v = proj._in(proj.ln_v(img), 2).reshape(2, 64, config.model.mqt.heads, hd)
    o = jnp.einsum('hmn,bnhd->bmhd', p, v).reshape(2, big_m, w)
    np.testing.assert_allclose(np.asarray(proj.proj(proj.out_proj(o))), np.asarray(proj(img)), atol=1e-5)


def test_bad_counts_are_one_line(mqt_tiny):
  from configs.dynllava import get_config as dyn_config
  from dynllava_jax.model.projector import num_visual_tokens
  config, _ = mqt_tiny
  for bad in (0, 17, 2.5, 'x'):
    with pytest.raises(UserError, match=r'outside 1\.\.16|integer in 1\.\.16'):
      num_visual_tokens(config.model, bad)
  plain = dyn_config('size=tiny,dense=True').model
  with pytest.raises(UserError, match='without the MQT projector'):
    num_visual_tokens(plain, 4)
  from dynllava_jax.eval.token_sweep import parse_counts
  with pytest.raises(UserError, match='needs a model with the MQT projector'):
    parse_counts('2,4', plain)
  with pytest.raises(UserError, match="'x' is not an integer"):
    parse_counts('2,x', config.model)
  assert parse_counts('2, 16', config.model) == [2, 16]
  from dynllava_jax.model.llava import check_model_config
  plain.mqt.sample_m = True
  with pytest.raises(ValueError, match='mqt.sample_m=True needs the MQT projector'):
    check_model_config(plain)


def _prompts(mc, m, batch=2, seed=0):
  """Left-padded prompts with m image placeholders: ids (B, T), pix (B, S, S, 3), mask (B, T)."""
  rng = np.random.default_rng(seed)
  rows = [[1, 9, 10] + [mc.image_token_id] * m + list(rng.integers(5, 200, size=5 + 2 * b)) for b in range(batch)]
  t = max(map(len, rows))
  ids = np.full((batch, t), mc.pad_token_id, np.int32)
  mask = np.zeros((batch, t), np.int32)
  for b, r in enumerate(rows):
    ids[b, t - len(r):], mask[b, t - len(r):] = r, 1
  s = mc.vision.image_size
  return ids, rng.normal(size=(batch, s, s, 3)).astype(np.float32), mask


def test_inference_at_any_m(mqt_tiny):
  """The engine's prefill at m ≡ the dense forward on the same m-placeholder prompt; a wrong m or a
  placeholder count that disagrees with m is one line; MQT options on an MLP model are one line."""
  from configs.dynllava import get_config as dyn_config
  from dynllava_jax.decode.prefill import prefill
  from dynllava_jax.sparsity.dense import Dense
  config, model = mqt_tiny
  mc = config.model
  m = 6
  ids, pix, mask = _prompts(mc, m)
  pre = prefill(model, None, Dense(), ids, pix, mask, visual_tokens=m)
  ref = _forward6(model, jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask))[:, -1]
  np.testing.assert_allclose(np.asarray(pre.logits_last), np.asarray(ref), atol=2e-4)
  assert int(pre.request.n_img[0]) == m
  with pytest.raises(ValueError, match='needs exactly 16'):
    prefill(model, None, Dense(), ids, pix, mask)                       # m placeholders, default M
  with pytest.raises(UserError, match=r'outside 1\.\.16'):
    prefill(model, None, Dense(), ids, pix, mask, visual_tokens=17)
  plain = nnx.eval_shape(lambda: Llava(dyn_config('size=tiny,dense=True').model, rngs=nnx.Rngs(0)))
  with pytest.raises(UserError, match='without the MQT projector'):
    prefill(plain, None, Dense(), ids, pix, mask, visual_tokens=m)


def test_prefill_flops_follow_m():
  """bench proportions (576 patches, w 384, H 1024), 1 ViT + 1 LLM layer: the analytic prefill count at
  m = 64 equals XLA's within 1 %, and the count follows m."""
  from dynllava_jax.eval import flops as F
  from dynllava_jax.eval.run import engine_prefill_flops
  from dynllava_jax.sparsity.dense import Dense
  mc = get_config('size=bench').model
  mc.llm.layers, mc.vision.depth, mc.llm.vocab_size = 1, 1, 1024
  mc.vision.feature_layer = -1
  mc.image_token_id, mc.pad_token_id = 1000, 1001
  xla, analytic = engine_prefill_flops(mc, Dense(), text_tokens=40, batch=1, bucket=16, visual_tokens=64)
  assert analytic == pytest.approx(xla, rel=0.01)
  full = F.prefill_flops(mc, None, 40, visual_tokens=576)
  part = F.prefill_flops(mc, None, 40, visual_tokens=64)
  assert part['vision'] == full['vision'] and part['projector'] < full['projector']
  assert part['llm_layers'] == F.llm_layer_flops(mc.llm, 40 + 64)


def test_stage2_m_sampling_is_masked_m_token_forward(mqt_tiny):
  """Stage 2 draws m from {2, 4, …, M} per forward from the step's key (covering every value; the same key
  — as after a resume, where state rng and step are restored — the same m), and the padded, masked
  training forward equals the inference forward on an m-placeholder prompt."""
  from dynllava_jax.model.mqt import train_count
  from dynllava_jax.train.forward import train_forward
  config, model = mqt_tiny
  mc = config.model
  assert mc.mqt.sample_m                                  # configs/mqt.py stage 2 (the default)
  base = jax.random.key(config.seed)
  draw = jax.jit(jax.vmap(lambda k, s: train_count(mc, jax.random.fold_in(jax.random.fold_in(k, s), 0)),
                          in_axes=(None, 0)))
  steps = jnp.arange(200)
  ms = np.asarray(draw(base, steps))
  assert set(ms.tolist()) == set(range(2, mc.mqt.queries + 1, 2))
  np.testing.assert_array_equal(ms, np.asarray(draw(base, steps)))
  step = int(np.flatnonzero(ms == 6)[0])
  key = jax.random.fold_in(jax.random.fold_in(base, step), 0)
  ids, pix, mask = _prompts(mc, mc.mqt.queries)
  batch = {'input_ids': jnp.asarray(ids), 'attention_mask': jnp.asarray(mask), 'pixel_values': jnp.asarray(pix)}
  out = jax.jit(lambda mdl, bt, k: train_forward(mdl, bt, rng=k))(model, batch, key)
  assert int(out['mqt_m']) == 6
  ids6, _, mask6 = _prompts(mc, 6)
  ref = _forward6(model, jnp.asarray(ids6), batch['pixel_values'], jnp.asarray(mask6))
  np.testing.assert_allclose(np.asarray(out['logits'][:, -5:]), np.asarray(ref[:, -5:]), atol=2e-4)
  assert int(train_count(mc, None)) == mc.mqt.queries             # no key (evaluation): m = M
  late = mc.copy_and_resolve_references()
  late.mqt.sample_from_step = 100                                  # steps < 100 at m = M, then the draw
  got = np.asarray(jax.vmap(lambda s: train_count(late, jax.random.fold_in(jax.random.fold_in(base, s), 0),
                                                  s))(steps))
  assert (got[:100] == mc.mqt.queries).all()
  np.testing.assert_array_equal(got[100:], ms[100:])


def test_stage_configs_train_what_the_release_trains():
  """Stage 1: the projector only (its position table included); stage 2: projector + LLM, table frozen."""
  from dynllava_jax.train import optim
  for stage in (1, 2):
    c = get_config(f'size=tiny,stage={stage}')
    model = nnx.eval_shape(lambda: Llava(c.model, rngs=nnx.Rngs(0)))
    _, frozen, trainable = optim.split_params(model, c.train)
    assert set(trainable) == ({'projector'} if stage == 1 else {'projector', 'language_model'})
    assert ('pos_embed' in trainable['projector']) == (stage == 1)
    assert c.model.mqt.sample_m == (stage == 2)


def test_local_init_attends_around_each_query_position():
  """model.mqt.local_init = 32 (M = 64 queries on the 8x8 patch grid): every query's head-mean attention
  peaks within 2 patches of its own position and keeps most of it in its own 4x4 block; 0 (the release's init)
  starts near even."""
  from dynllava_jax.model.mqt import MatryoshkaQueryProjector  # pylint: disable=g-import-not-at-top
  from configs.demo_more import get_config as demo_more_config  # pylint: disable=g-import-not-at-top
  mc = demo_more_config('stage=mqt_align').model
  mc.mqt.local_order = 'raster'       # query i at patch i (the demo's recipe orders them coarse to fine)

  def attention(beta):
    mc.mqt.local_init = beta
    proj = MatryoshkaQueryProjector(mc, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    p = np.asarray(proj.attention())
    return p, float(-(p * np.log(p + 1e-12)).sum(-1).mean())

  p, ent = attention(32.0)
  assert p.shape == (mc.mqt.heads, 64, 64)
  peak, own = p.mean(0).argmax(-1), np.arange(64)
  assert max(np.abs(peak // 8 - own // 8).max(), np.abs(peak % 8 - own % 8).max()) <= 2
  block = (own // 8 // 4) * 2 + own % 8 // 4
  assert np.median(np.stack([p.mean(0)[i, block == block[i]].sum() for i in own])) > 0.6
  _, ent0 = attention(0.0)
  assert ent < 2.5 < np.log(64) - 0.1 < ent0


def test_coarse_local_order_covers_the_image_at_every_prefix():
  """model.mqt.local_order='coarse': targets are quadrant centres, then their quarters, then patches, each
  level ordered so every prefix is spread (queries 0..3: one per quadrant; 0..15: four per quadrant), and
  ln_q(query_i + pos_i) is the sin-cos embedding of target i, so the first four queries' attention each
  peaks in its own quadrant; a grid with fewer quadtree centres than queries is a one-line error."""
  from dynllava_jax.model.mqt import MatryoshkaQueryProjector, coarse_targets  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.vision import sincos_points  # pylint: disable=g-import-not-at-top
  from configs.demo_more import get_config as demo_more_config  # pylint: disable=g-import-not-at-top
  y, x = coarse_targets(64, 8)
  np.testing.assert_array_equal(y[:4], [1.5, 1.5, 5.5, 5.5])
  np.testing.assert_array_equal(x[:4], [1.5, 5.5, 1.5, 5.5])
  quadrant = (y // 4) * 2 + x // 4
  for m in (4, 8, 16, 20):
    assert np.bincount(quadrant[:m].astype(int), minlength=4).tolist() == [m // 4] * 4
  assert len({(a, b) for a, b in zip(y, x)}) == 64
  with pytest.raises(ValueError, match='fewer than mqt.queries'):
    coarse_targets(100, 8)
  mc = demo_more_config('stage=mqt_align').model
  mc.mqt.local_order = 'coarse'
  proj = MatryoshkaQueryProjector(mc, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  got = proj.query[...] + proj.pos_embed[...]
  np.testing.assert_allclose(got, sincos_points(y, x, mc.vision.width), atol=1e-5)
  cell = np.asarray(proj.attention(4)).mean(0).reshape(4, 2, 4, 2, 4).sum((2, 4)).reshape(4, 4)
  assert cell.argmax(-1).tolist() == [0, 1, 2, 3] and cell.max(-1).min() > 0.5
