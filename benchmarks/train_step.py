"""One training step, ours (jax) vs PyTorch + HF transformers, on the SAME random weights and batch.

    python benchmarks/train_step.py --json runs/bench/train_step.json [--size bench] [--batches 4]
        [--text_tokens 64] [--runs 2] [--rounds 2] [--methods dense,dynamic] [--flops_7b]

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

Processes: every row runs in its own child process (`--child`; the parent only measures the GEMM rate,
spawns and aggregates), so the two implementations never share a memory budget. The seed-0 weights are
written once in the HF layout by an `export` child (`hf.save_llava` of what `create_state` initialises),
ours builds the same init from the seed, and every child makes the same batch from seed 0; the parent
checks that our dense and torch's first losses agree (relative 1e-4) and exits 1 when they do not.
Timing: `--rounds` rounds, each spawning one child per row in turn (ours dense, torch dense, ours
dynamic, ...: the same machine load for all; the later children of a row reuse the first one's
executable from a temporary persistent compilation cache); a child compiles, runs one warm-up step (its loss is the
first loss), then `--runs` timed steps; `step_s` = the median of all timed steps of all the row's children.
`gflops` = the step's FLOPs / `step_s`, with the FLOPs from XLA's cost analysis of our step (scans
unrolled, remat off: the model's FLOPs; `eval.flops.xla_flops`); the torch row gets the count of our step
with the LM head at every position (`step_flops` of that row: the same math as HF's step, whose head runs
at all 640 positions, while ours by default runs it at the labelled ones, `--head_positions`);
`mfu` = gflops / --peak_tflops. `gemm_gflops` = the machine's fp32 GEMM rate measured by the
parent in the same run (a 2048³ jnp.dot on the host CPU, median; the parent never takes an accelerator, whose
memory then stays the children's). `speedup_vs_torch` = torch's step_s / the row's.
Memory: `max_rss_bytes` = the child's peak RSS (VmHWM, polled by the parent too, so a killed child has
one); `xla_peak_bytes` (ours) = XLA's memory analysis of the compiled step (arguments + outputs +
temporaries − aliased); `peak_bytes` = xla_peak_bytes for ours, max_rss_bytes for torch. A child cannot
take the machine down: it is the OOM killer's first pick, torch's address space is bounded by the memory
available when it starts (RLIMIT_AS), and ours does not run a step whose XLA peak exceeds the available
memory. Rows that did not run land in `skipped` with the reason and the RSS reached.
JSON: {"meta", "gemm_gflops", "results": [{"impl", "method", "batch", "tokens", "step_s", "gflops",
"peak_bytes", ...}], "skipped": [...]}. `--flops_7b` adds the 7B step's XLA FLOP count per token
(abstract shapes; nothing allocated).
"""
import argparse
import json
import os
import shutil
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
    if getattr(numerics, 'head_positions', None) is not None:
      cfg.train.head_positions = numerics.head_positions
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
    if cfg.train.head_positions:       # what train.py's loop adds (train/batch.py::to_device)
      from dynllava_jax.train.forward import head_index  # pylint: disable=g-import-not-at-top
      batch = {**batch, 'head_index': head_index(batch['labels'], cfg.train.head_positions)}
    self.batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
    self.compiled = None

  def model(self):
    """The current weights as a Llava module."""
    from dynllava_jax.train.state import merge_model  # pylint: disable=g-import-not-at-top
    return merge_model(self.graphdef, self.state)

  def compile(self):
    """Compiles the step ahead of time (then `step` runs that executable and `xla_peak_bytes` reads it)."""
    self.compiled = self.jitted.lower(self.state, self.batch).compile()

  def step(self):
    self.state, m = (self.compiled or self.jitted)(self.state, self.batch)
    return float(self.jax.block_until_ready(m['loss']))

  def xla_peak_bytes(self):
    if self.compiled is None:
      self.compile()
    ma = self.compiled.memory_analysis()
    if ma is None:
      return None
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
               - ma.alias_size_in_bytes)

  def flops(self, full_head=False):
    """XLA's count of the step without remat (the model's FLOPs: MFU does not credit recomputation).
    full_head: the same step with the LM head at every position (what HF's step computes)."""
    from dynllava_jax.eval.flops import matmul_flops, xla_flops  # pylint: disable=g-import-not-at-top
    from dynllava_jax.train.step import make_train_step  # pylint: disable=g-import-not-at-top
    cfg = self.cfg.copy_and_resolve_references()
    cfg.model.remat = False
    fn = make_train_step(cfg, nnx_graphdef(cfg), self.tx, sparse=self.sparse)
    shape = lambda t: self.jax.tree.map(lambda x: self.jax.ShapeDtypeStruct(x.shape, x.dtype), t)
    batch = {k: v for k, v in self.batch.items() if not (full_head and k == 'head_index')}
    args = (shape(self.state), shape(batch))
    fl = xla_flops(fn, *args, compile=False)
    # no cost analysis before compiling (GPU): the jaxpr's matmuls, forward and backward
    return matmul_flops(fn, *args) if fl is None else fl


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
  """The machine's fp32 GEMM rate: a jitted n³ jnp.dot, median of `runs` -> GFLOP/s."""
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


# ------------------------------------------------------------------ the child processes

def _meminfo(key):
  with open('/proc/meminfo') as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ':'))


def _status(key, pid='self'):
  """VmHWM / VmSize / VmRSS of a process in bytes (None once it is gone)."""
  try:
    with open(f'/proc/{pid}/status') as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ':'))
  except (OSError, StopIteration):
    return None


def _bound_memory(address_space):
  """A child that outgrows the machine is the OOM killer's first pick (oom_score_adj 1000), so a batch
  that does not fit never takes another process with it; with address_space (torch) it fails on its own
  allocation first (RLIMIT_AS: what is mapped now + the memory available now + 2 GB of malloc arenas'
  reservations). Not for ours: XLA's compiler leaves freed memory mapped, and the step's one large
  temporary buffer would then fail on address space that is not memory (ours checks XLA's memory
  analysis against the available memory instead)."""
  import resource  # pylint: disable=g-import-not-at-top
  with open('/proc/self/oom_score_adj', 'w') as f:
    f.write('1000')
  if not address_space:
    return
  limit = _status('VmSize') + _meminfo('MemAvailable') + (2 << 30)
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_child(args):
  """One row in its own process: build, compile, one warm-up step (the first loss), `--runs` timed steps.
  Prints one JSON line: losses, step_s (the timed steps), max_rss_bytes (VmHWM), and for ours
  xla_peak_bytes, compile_s and (with --child_flops) the step's FLOPs."""
  impl, method, batch = args.child.split(':')
  if impl == 'export':
    return save_hf(step_config(args.size, 'dense', args), args.hf_dir)
  if impl == 'torch':
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count())
  else:
    import jax  # pylint: disable=g-import-not-at-top
    if args.cache_dir:       # a later child of the same row reuses the first one's executable
      jax.config.update('jax_compilation_cache_dir', args.cache_dir)
      jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  _bound_memory(address_space=impl == 'torch')
  cfg = step_config(args.size, method, args)
  b = make_batch(cfg.model, int(batch), args.text_tokens)
  out = {'impl': impl, 'method': method, 'batch': int(batch), 'tokens': int(b['input_ids'].size)}
  if impl == 'ours':      # where the row ran (the parent's meta.backend is its own: the host CPU)
    out['device'] = f'{jax.default_backend()}: {jax.devices()[0].device_kind}'
    runner = Ours(cfg, b, method)
    t0 = time.perf_counter()
    runner.compile()
    out['compile_s'] = time.perf_counter() - t0
    out['xla_peak_bytes'] = runner.xla_peak_bytes()
    avail = _meminfo('MemAvailable')
    on_host = jax.default_backend() == 'cpu'      # an accelerator's peak is its own memory, not the host's
    if on_host and out['xla_peak_bytes'] and out['xla_peak_bytes'] - _status('VmRSS') > avail:
      out['error'] = (f"does not fit: XLA's memory analysis needs {out['xla_peak_bytes'] / 1e9:.2f} GB, "
                      f"{avail / 1e9:.2f} GB available beside the {_status('VmRSS') / 1e9:.2f} GB resident")
      out['max_rss_bytes'] = _status('VmHWM')
      print(json.dumps(out), flush=True)
      return
  else:
    import transformers  # pylint: disable=g-import-not-at-top
    out['versions'] = {'torch': torch.__version__, 'transformers': transformers.__version__,
                       'torch_threads': torch.get_num_threads()}
    runner = Torch(args.hf_dir, b)
  losses, times = [runner.step()], []
  for _ in range(args.runs):
    t0 = time.perf_counter()
    losses.append(runner.step())
    times.append(time.perf_counter() - t0)
  # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the forking parent.
  out.update(losses=losses, step_s=times, max_rss_bytes=_status('VmHWM'))
  if impl == 'ours' and args.child_flops:
    out['flops'] = runner.flops()        # after the steps: its tracing is not the step's memory
    out['flops_full_head'] = runner.flops(full_head=True) if 'head_index' in runner.batch else out['flops']
  print(json.dumps(out), flush=True)


def spawn(args, spec, flops=False):
  """Runs `--child spec` in a fresh process -> its JSON line as a dict, plus the parent's view of its peak
  RSS (polled VmHWM: known even when the child is killed) and, when it failed, `error`."""
  cmd = [sys.executable, os.path.abspath(__file__), '--child', spec, '--size', args.size,
         '--text_tokens', str(args.text_tokens), '--hf_dir', str(args.hf_dir), '--dtype', args.dtype,
         '--attention_impl', args.attention_impl, '--runs', str(args.runs), '--cache_dir', args.cache_dir]
  cmd += ['--remat'] * bool(args.remat) + ['--child_flops'] * flops
  cmd += ['--head_positions', str(args.head_positions), '--scan_unroll', str(args.scan_unroll)]
  if args.param_dtype:
    cmd += ['--param_dtype', args.param_dtype]
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
    env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
    if args.child_platforms:
      env['JAX_PLATFORMS'] = args.child_platforms
    p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
    hwm = 0
    while p.poll() is None:
      hwm = max(hwm, _status('VmHWM', p.pid) or 0)
      time.sleep(0.2)
    out.seek(0)
    err.seek(0)
    lines = [line for line in out.read().splitlines() if line.startswith('{')]
    res = json.loads(lines[-1]) if lines else {}
    res['rss_polled_bytes'] = hwm
    if p.returncode:
      tail = [line for line in err.read().splitlines() if line.strip()][-3:]
      res['error'] = f'child exited with {p.returncode} at {hwm / 1e9:.2f} GB resident: ' + ' / '.join(tail)
  return res


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


def _rows(args, b, results, flops, gemm):
  """The parent's rows of batch b from its children's results {(impl, method): [child dict, ...]}."""
  rows, skipped = [], []
  for (impl, method), runs in results.items():
    ok = [r for r in runs if 'error' not in r]
    base = {'impl': impl, 'method': method, 'batch': b}
    if not runs:
      continue
    if not ok:
      bad = runs[-1] if runs else {}
      skipped.append({**base, 'error': bad.get('error', 'not run'),
                      'max_rss_bytes': max(bad.get('max_rss_bytes') or 0, bad.get('rss_polled_bytes', 0)),
                      'xla_peak_bytes': bad.get('xla_peak_bytes')})
      continue
    ts = [t for r in ok for t in r['step_s']]
    med = statistics.median(ts)
    fl = flops.get(method + ':full' if impl == 'torch' else method)   # torch's head runs at every position
    rss = max(max(r.get('max_rss_bytes') or 0, r.get('rss_polled_bytes', 0)) for r in ok)
    row = {**base, 'tokens': ok[0]['tokens'], 'step_s': med, 'step_s_runs': ts,
           'step_s_per_child': [r['step_s'] for r in ok], 'children': len(ok),
           'first_loss': ok[0]['losses'][0], 'losses': ok[0]['losses'], 'max_rss_bytes': rss}
    if fl:
      row.update(gflops=fl / med / 1e9, step_flops=fl, gemm_fraction=fl / med / 1e9 / gemm)
      if args.peak_tflops:
        row['mfu'] = fl / med / 1e12 / args.peak_tflops
    if impl == 'ours':
      row['xla_peak_bytes'] = ok[0]['xla_peak_bytes']
      row['compile_s'] = statistics.median(r['compile_s'] for r in ok)
      row['device'] = ok[0].get('device')
    row['peak_bytes'] = row['xla_peak_bytes'] if impl == 'ours' and row['xla_peak_bytes'] else rss
    rows.append(row)
  by = {(r['impl'], r['method']): r for r in rows}
  for r in rows:
    if ('ours', 'dense') in by:
      r['vs_ours_dense'] = r['step_s'] / by[('ours', 'dense')]['step_s']
    if ('torch', 'dense') in by:
      r['speedup_vs_torch'] = by[('torch', 'dense')]['step_s'] / r['step_s']
  return rows, skipped


def _write(path, meta, gemm, rows, skipped):
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
      json.dump({'meta': meta, 'gemm_gflops': gemm, 'results': rows, 'skipped': skipped}, f, indent=1)


def first_loss_diff(rows):
  """|ours − torch| / |torch| of the dense rows' first losses (None without both rows)."""
  by = {(r['impl'], r['method']): r['first_loss'] for r in rows}
  if ('ours', 'dense') not in by or ('torch', 'dense') not in by:
    return None
  return abs(by[('ours', 'dense')] - by[('torch', 'dense')]) / abs(by[('torch', 'dense')])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--json', default=None)
  ap.add_argument('--size', default='bench')
  ap.add_argument('--batches', default='4')
  ap.add_argument('--text_tokens', type=int, default=64)
  ap.add_argument('--runs', type=int, default=2, help='timed steps per child (after one warm-up step)')
  ap.add_argument('--rounds', type=int, default=2, help='children per row, the rows alternated')
  ap.add_argument('--methods', default='dense,dynamic')
  ap.add_argument('--no_torch', action='store_true')
  ap.add_argument('--no_memory', action='store_true', help='(accepted; memory now comes with every child)')
  ap.add_argument('--flops_7b', action='store_true')
  ap.add_argument('--peak_tflops', type=float, default=None,
                  help="the accelerator's peak dense TFLOP/s at --dtype: adds MFU to every row")
  common.add_numerics_flags(ap)
  ap.add_argument('--child', default=None, help=argparse.SUPPRESS)
  ap.add_argument('--child_flops', action='store_true', help=argparse.SUPPRESS)
  ap.add_argument('--hf_dir', default=None, help=argparse.SUPPRESS)
  ap.add_argument('--cache_dir', default='', help=argparse.SUPPRESS)
  ap.add_argument('--head_positions', type=int, default=-1,
                  help="ours: train.head_positions (-1 = the LM head at the labelled positions' bucket, "
                       '0 = at every position as HF computes it)')
  ap.add_argument('--torch_batches', default=None, help='the batches with a torch row (default: --batches)')
  args = ap.parse_args()
  if args.child:
    return run_child(args)

  args.child_platforms = os.environ.get('JAX_PLATFORMS')   # what the children run on
  meta = {'args': vars(args).copy(), 'loadavg_1_5_15min_at_start': list(os.getloadavg()),
          'mem_available_bytes_at_start': _meminfo('MemAvailable')}
  methods = args.methods.split(',')
  keys = [('ours', m) for m in methods]
  args.cache_dir = tempfile.mkdtemp(prefix='train_step_xla_cache_')
  if not args.no_torch and 'dense' in methods:
    keys.insert(1, ('torch', 'dense'))             # ours dense, torch, ours dynamic, ... per round
    args.hf_dir = tempfile.mkdtemp(prefix='train_step_hf_')
    res = spawn(args, 'export:dense:1')
    if 'error' in res:
      raise SystemExit(f'writing the HF export failed: {res["error"]}')
  os.environ['JAX_PLATFORMS'] = 'cpu'      # the parent's GEMM probe: never the children's accelerator
  gemm = gemm_gflops()
  print(f'fp32 GEMM: {gemm:.1f} GFLOP/s', flush=True)

  rows, skipped, agree = [], [], True
  try:
    for b in [int(x) for x in args.batches.split(',')]:
      results, flops = {k: [] for k in keys}, {}
      for rnd in range(args.rounds):
        for impl, method in keys:
          if impl == 'torch' and args.torch_batches and str(b) not in args.torch_batches.split(','):
            continue
          if results[(impl, method)] and 'error' in results[(impl, method)][-1]:
            continue                              # a batch that did not fit is not retried
          want_flops = impl == 'ours' and method not in flops
          res = spawn(args, f'{impl}:{method}:{b}', flops=want_flops)
          results[(impl, method)].append(res)
          if 'flops' in res:
            flops[method], flops[method + ':full'] = res['flops'], res['flops_full_head']
          meta.update(res.get('versions', {}))
          print(f'batch {b} round {rnd} {impl} {method}:',
                res.get('error') or [round(t, 3) for t in res['step_s']], flush=True)
      new, bad = _rows(args, b, results, flops, gemm)
      diff = first_loss_diff(new)
      if diff is not None:
        meta.setdefault('first_loss_rel_diff', {})[str(b)] = diff
        agree = agree and diff <= 1e-4
      rows += new
      skipped += bad
      print(json.dumps(new), flush=True)
      _write(args.json, meta, gemm, rows, skipped)            # each batch kept as soon as it is measured
  finally:
    for d in (args.hf_dir, args.cache_dir):    # our own temporary export and XLA cache, not a run's output
      if d and d.startswith(tempfile.gettempdir()):
        shutil.rmtree(d, ignore_errors=True)
  common.print_rows(rows, ['impl', 'method', 'batch', 'tokens', 'step_s', 'gflops', 'gemm_fraction',
                           'vs_ours_dense', 'speedup_vs_torch', 'mfu', 'peak_bytes', 'max_rss_bytes',
                           'first_loss'])
  for s in skipped:
    print(f"not measured: {s['impl']} {s['method']} batch {s['batch']}: {s['error']}")
  meta.update(common.environment())
  meta['first_losses_agree'] = agree
  if args.flops_7b:
    meta['flops_7b'] = flops_7b(args.text_tokens)
    print('7B step FLOPs:', json.dumps(meta['flops_7b']))
  _write(args.json, meta, gemm, rows, skipped)
  if not agree:
    raise SystemExit(f"the two implementations' first losses differ: {meta['first_loss_rel_diff']}")


if __name__ == '__main__':
  main()
