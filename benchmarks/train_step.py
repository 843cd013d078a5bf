"""One training step, ours (jax) vs PyTorch + HF transformers, on the SAME random weights and batch.

    python benchmarks/train_step.py --json runs/bench/train_step.json [--size bench] [--batches 4]
        [--text_tokens 64] [--runs 3] [--methods dense,dynamic] [--flops_7b]

Both sides run one full optimizer step in fp32 with the CLIP tower frozen: forward, backward, global-norm
clipping (1.0) and AdamW (lr 2e-5, weight decay 0).
  ours   `dynllava_jax.train.step.make_train_step` jitted with the state donated (what train.py runs):
         `dense` = plain LLaVA CE; `dynamic` = Dynamic-LLaVA's training forward (Gumbel decisions,
         MaskedSoftmax over the kept keys after `sparse_layer`, the ratio losses).
  torch  `transformers.LlavaForConditionalGeneration` loaded from our HF export of the same weights
         (`hf.save_llava`), `loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW.step()`,
         `zero_grad(set_to_none=True)`; the tower's parameters have requires_grad=False. Dense only (the
         released Dynamic-LLaVA training code is not a library one can call here).
Each prompt is `<s> [8 text] <image>×N [text_tokens−9 text]`, the last half of the text being the labelled
answer; N = 576 on `bench`, so batch 4 × 640 tokens is the issue's shape.

Timing: warm-up steps first (compiles), then `--runs` repetitions of every row interleaved (the same
machine load for all), medians. `gflops` = the step's FLOPs / median step time, with the FLOPs from XLA's
cost analysis of our step (scans unrolled, remat off: the model's FLOPs; `eval.flops.xla_flops`), the
same count for the torch row (the same math); `mfu` = gflops / --peak_tflops. `gemm_gflops` = the machine's fp32 GEMM rate measured in the same run (a 2048³ jnp.dot, median).
Memory: `peak_bytes` = peak RSS (VmHWM) of a child process that builds that row's model and runs 2 steps of it
(the same measure for both implementations: weights, gradients, Adam state, activations, runtime);
`xla_peak_bytes` (ours) = XLA's memory analysis of the compiled step (arguments + outputs + temporaries −
aliased). `--flops_7b` adds the 7B step's XLA FLOP count per token (abstract shapes; nothing allocated).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position

LR, CLIP = 2e-5, 1.0


def step_config(size, method, numerics=None):
  """The root config of a benchmark row: the size preset, the tower frozen, AdamW as above; numerics: the
  parsed --dtype / --attention_impl / --remat flags (default fp32, 'auto', no remat)."""
  from configs.dynllava import get_config  # pylint: disable=g-import-not-at-top
  cfg = get_config(f'size={size},dense={method == "dense"}')
  if numerics is not None:
    common.apply_numerics(cfg, numerics)
  t = cfg.train
  t.freeze_vision, t.lr, t.predictor_lr, t.weight_decay, t.predictor_weight_decay = True, LR, LR, 0.0, 0.0
  t.grad_clip, t.warmup_ratio, t.grad_accum, t.dense_warmup_steps = CLIP, 0.0, 1, 0
  t.steps = 1000
  return cfg


def make_batch(mc, batch, text_tokens, seed=0):
  """The step's batch (numpy): the benchmark prompts with the last half of the text as the answer."""
  ids, pix, mask = common.make_prompts(mc, batch, text_tokens, seed=seed)
  t = ids.shape[1]
  ans = max((text_tokens - 9) // 2, 1)
  labels = np.full_like(ids, -100)
  labels[:, t - ans:] = ids[:, t - ans:]
  col = lambda v: np.full((batch,), v, np.int32)
  return {'input_ids': ids, 'attention_mask': mask, 'labels': labels, 'pixel_values': pix,
          'has_image': np.ones((batch,), bool), 'image_start': col(9),
          'instr_start': col(9 + (t - text_tokens)), 'instr_end': col(t - ans),
          'answer_start': col(t - ans), 'answer_end': col(t)}


class Ours:
  """Our jitted train step on a fresh state (seed 0 weights)."""

  def __init__(self, cfg, batch, method):
    import jax  # pylint: disable=g-import-not-at-top
    from dynllava_jax.train import optim  # pylint: disable=g-import-not-at-top
    from dynllava_jax.train import state as S  # pylint: disable=g-import-not-at-top
    from dynllava_jax.train.step import make_train_step  # pylint: disable=g-import-not-at-top
    from dynllava_jax.sharding import make_mesh  # pylint: disable=g-import-not-at-top
    self.jax = jax
    tx = optim.make_optimizer(cfg.train)
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    self.graphdef, self.state, _ = S.create_state(mesh, cfg, tx)
    self.cfg, self.tx, self.sparse = cfg, tx, method != 'dense'
    self.jitted = jax.jit(make_train_step(cfg, self.graphdef, tx, sparse=self.sparse), donate_argnums=0)
    self.batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}

  def model(self):
    """The current weights as a Llava module."""
    from dynllava_jax.train.state import merge_model  # pylint: disable=g-import-not-at-top
    return merge_model(self.graphdef, self.state)

  def step(self):
    self.state, m = self.jitted(self.state, self.batch)
    return float(self.jax.block_until_ready(m['loss']))

  def xla_peak_bytes(self):
    ma = self.jitted.lower(self.state, self.batch).compile().memory_analysis()
    if ma is None:
      return None
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
               - ma.alias_size_in_bytes)

  def flops(self):
    """XLA's count of the step without remat (the model's FLOPs: MFU does not credit recomputation)."""
    from dynllava_jax.eval.flops import xla_flops  # pylint: disable=g-import-not-at-top
    from dynllava_jax.train.step import make_train_step  # pylint: disable=g-import-not-at-top
    cfg = self.cfg.copy_and_resolve_references()
    cfg.model.remat = False
    fn = make_train_step(cfg, nnx_graphdef(cfg), self.tx, sparse=self.sparse)
    shape = lambda t: self.jax.tree.map(lambda x: self.jax.ShapeDtypeStruct(x.shape, x.dtype), t)
    return xla_flops(fn, shape(self.state), shape(self.batch), compile=False)


class Torch:
  """HF transformers' LLaVA on the HF export of `model`, one AdamW step per call."""

  def __init__(self, hf_dir, batch):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.model = transformers.LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    self.model.train()
    tower = getattr(self.model, 'vision_tower', None) or self.model.model.vision_tower
    for p in tower.parameters():
      p.requires_grad_(False)
    self.params = [p for p in self.model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(self.params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    self.inputs = {'input_ids': torch.from_numpy(batch['input_ids'].astype(np.int64)),
                   'attention_mask': torch.from_numpy(batch['attention_mask'].astype(np.int64)),
                   'pixel_values': torch.from_numpy(np.ascontiguousarray(
                       batch['pixel_values'].transpose(0, 3, 1, 2))),
                   'labels': torch.from_numpy(batch['labels'].astype(np.int64))}

  def loss(self):
    """The forward's loss only (no step): the parity test's number."""
    with self.torch.no_grad():
      return float(self.model(**self.inputs).loss)

  def step(self):
    loss = self.model(**self.inputs).loss
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.params, CLIP)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def save_hf(cfg, out_dir):
  """Writes the seed-0 model of `cfg` (what `create_state` initialises) in the HF layout."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dynllava_jax import hf  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import Llava  # pylint: disable=g-import-not-at-top
  hf.save_llava(nnx.jit(lambda: Llava(cfg.model, rngs=nnx.Rngs(cfg.seed)))(), cfg.model, out_dir)


def gemm_gflops(n=2048, runs=5):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  ts = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a))
    ts.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(ts) / 1e9


def child_peak(args, impl, method, batch):
  """Max RSS (bytes) of a child process that builds one row and runs 2 steps of it."""
  cmd = [sys.executable, os.path.abspath(__file__), '--child', f'{impl}:{method}:{batch}', '--size', args.size,
         '--text_tokens', str(args.text_tokens), '--hf_dir', str(args.hf_dir), '--dtype', args.dtype,
         '--attention_impl', args.attention_impl] + ['--remat'] * bool(args.remat)
  if args.param_dtype:
    cmd += ['--param_dtype', args.param_dtype]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True)
  return int(json.loads(out.stdout.strip().splitlines()[-1])['max_rss_bytes'])


def run_child(args):
  impl, method, batch = args.child.split(':')
  cfg = step_config(args.size, method, args)
  b = make_batch(cfg.model, int(batch), args.text_tokens)
  runner = Ours(cfg, b, method) if impl == 'ours' else Torch(args.hf_dir, b)
  for _ in range(2):
    runner.step()
  # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the forking parent.
  with open('/proc/self/status') as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
  print(json.dumps({'max_rss_bytes': hwm * 1024}))


def flops_7b(text_tokens):
  """XLA FLOPs of one 7B training step per token (dense and dynamic; abstract shapes)."""
  import jax  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval.flops import xla_flops  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import optim  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import state as S  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train.step import make_train_step  # pylint: disable=g-import-not-at-top
  out = {}
  for method in ('dense', 'dynamic'):
    cfg = step_config('7b', method)
    tx = optim.make_optimizer(cfg.train)
    graphdef = nnx_graphdef(cfg)
    abstract = jax.eval_shape(S.make_init_fn(cfg, tx))
    b = make_batch(cfg.model, 1, text_tokens)
    ab = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in b.items()}
    fl = xla_flops(make_train_step(cfg, graphdef, tx, sparse=method != 'dense'), abstract, ab, compile=False)
    out[method] = {'tokens': int(b['input_ids'].shape[1]), 'flops': fl,
                   'flops_per_token': fl / b['input_ids'].shape[1]}
  return out


def nnx_graphdef(cfg):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import optim  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import Llava  # pylint: disable=g-import-not-at-top
  abstract = nnx.eval_shape(lambda: Llava(cfg.model, rngs=nnx.Rngs(cfg.seed)))
  return optim.split_params(abstract, cfg.train)[0]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--json', default=None)
  ap.add_argument('--size', default='bench')
  ap.add_argument('--batches', default='4')
  ap.add_argument('--text_tokens', type=int, default=64)
  ap.add_argument('--runs', type=int, default=3)
  ap.add_argument('--methods', default='dense,dynamic')
  ap.add_argument('--no_torch', action='store_true')
  ap.add_argument('--no_memory', action='store_true', help='skip the child processes measuring max RSS')
  ap.add_argument('--flops_7b', action='store_true')
  ap.add_argument('--peak_tflops', type=float, default=None,
                  help="the accelerator's peak dense TFLOP/s at --dtype: adds MFU to every row")
  common.add_numerics_flags(ap)
  ap.add_argument('--child', default=None, help=argparse.SUPPRESS)
  ap.add_argument('--hf_dir', default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    return run_child(args)

  threads = os.cpu_count()
  meta = {**common.environment(), 'args': vars(args)}
  methods = args.methods.split(',')
  if not args.no_torch:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
    meta.update(torch=torch.__version__, transformers=transformers.__version__, torch_threads=threads)
    args.hf_dir = tempfile.mkdtemp(prefix='train_step_hf_')
    save_hf(step_config(args.size, 'dense', args), args.hf_dir)
  gemm = gemm_gflops()
  print(f'fp32 GEMM: {gemm:.1f} GFLOP/s', flush=True)

  rows = []
  for b in [int(x) for x in args.batches.split(',')]:
    runners = {}
    for method in methods:
      cfg = step_config(args.size, method, args)
      batch = make_batch(cfg.model, b, args.text_tokens)
      runners[('ours', method)] = Ours(cfg, batch, method)
    if not args.no_torch and 'dense' in methods:
      runners[('torch', 'dense')] = Torch(args.hf_dir, batch)      # the same prompts for every method
    flops = {m: runners[('ours', m)].flops() for m in methods}
    xla_peak = {m: runners[('ours', m)].xla_peak_bytes() for m in methods}
    losses = {key: [r.step()] for key, r in runners.items()}      # warm-up (compiles)
    times = {key: [] for key in runners}
    for _ in range(args.runs):
      for key, r in runners.items():
        t0 = time.perf_counter()
        losses[key].append(r.step())
        times[key].append(time.perf_counter() - t0)
    tokens = int(b * batch['input_ids'].shape[1])
    for (impl, method), ts in times.items():
      med = statistics.median(ts)
      row = {'impl': impl, 'method': method, 'batch': b, 'tokens': tokens, 'step_s': med,
             'gflops': flops[method] / med / 1e9, 'step_flops': flops[method],
             'gemm_fraction': flops[method] / med / 1e9 / gemm, 'step_s_runs': ts,
             'first_loss': losses[(impl, method)][0]}
      if args.peak_tflops:
        row['mfu'] = flops[method] / med / 1e12 / args.peak_tflops
      if impl == 'ours':
        row['xla_peak_bytes'] = xla_peak[method]
      row['peak_bytes'] = None if args.no_memory else child_peak(args, impl, method, b)
      rows.append(row)
    dense_s = statistics.median(times[('ours', 'dense')]) if ('ours', 'dense') in times else None
    for row in rows:
      if row['batch'] == b and dense_s:
        row['vs_ours_dense'] = row['step_s'] / dense_s
    print(json.dumps([r for r in rows if r['batch'] == b], indent=None), flush=True)
  common.print_rows(rows, ['impl', 'method', 'batch', 'tokens', 'step_s', 'gflops', 'gemm_fraction',
                           'vs_ours_dense', 'mfu', 'peak_bytes', 'xla_peak_bytes', 'first_loss'])
  if args.flops_7b:
    meta['flops_7b'] = flops_7b(args.text_tokens)
    print('7B step FLOPs:', json.dumps(meta['flops_7b']))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump({'meta': meta, 'gemm_gflops': gemm, 'results': rows}, f, indent=1)


if __name__ == '__main__':
  main()
