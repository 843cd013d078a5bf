"""Visual-region training cost side by side in one process: full tuning vs region (full) vs region (LoRA).

    python benchmarks/region_step.py --json benchmarks/results/region_step.json [--size bench] [--batch 1]
        [--text_tokens 64] [--steps 3] [--rank 128] [--freeze_projector] [--abstract]

Per variant (plain LLaVA, predictors off; vision tower frozen in all three, projector trained in all three
as the release does): trainable params, optimizer-state bytes (AdamW moments + counts, from the abstract
state: exact), the train step's matmul FLOPs counted on its jaxpr (every dot_general, scan bodies times
their length; XLA's CPU cost analysis counts a scan body once, so it cannot compare plans with different
groupings), and the warm median step time over --steps
steps, the three variants' steps interleaved (weights random; a timing, so it moves with the machine's load). Ratios are
against full tuning. With the projector trained the backward runs down to it (activation gradients only
through frozen layers); `--freeze_projector` shows the step when it ends at the lowest region layer.
--abstract: shapes only (no weights, no compile, no timing): params, optimizer bytes and matmul FLOPs.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=wrong-import-position


def variant_config(size, region, train, freeze_projector):
  cfg = common.bench_config(size)
  cfg.model.sparse.enabled = False
  cfg.model.region, cfg.model.region_train = region, train
  cfg.train.freeze_projector = freeze_projector
  cfg.train.warmup_ratio = 0.0
  return cfg


def _random_model(mc, seed=0):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import Llava  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Llava(mc, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  flat = nnx.to_flat_state(state)
  for _, v in flat:
    v.set_value(jnp.asarray((rng.standard_normal(v.shape) * 0.02).astype(np.float32)).astype(v.dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def run_variant(cfg, batch, text_tokens, steps, abstract=False):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train import optim, step as S  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import Llava  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval.flops import matmul_flops  # pylint: disable=g-import-not-at-top
  model = (nnx.eval_shape(lambda: Llava(cfg.model, rngs=nnx.Rngs(0))) if abstract
           else _random_model(cfg.model))
  graphdef, frozen, params = optim.split_params(model, cfg.train)
  tx = optim.make_optimizer(cfg.train)
  opt_abstract = jax.eval_shape(tx.init, params)
  opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_abstract))
  n_train = sum(x.size for x in jax.tree.leaves(params))
  ids, pix, mask = common.make_prompts(cfg.model, batch, text_tokens)
  labels = np.where(np.arange(ids.shape[1])[None] >= ids.shape[1] - 16, ids, -100).astype(np.int32)
  b = {'input_ids': ids, 'attention_mask': mask, 'pixel_values': pix, 'labels': labels,
       'has_image': np.ones((batch,), bool), 'image_start': np.full((batch,), 1 + text_tokens // 2, np.int32),
       'answer_start': np.full((batch,), ids.shape[1] - 16, np.int32),
       'answer_end': np.full((batch,), ids.shape[1], np.int32),
       'instr_start': np.zeros((batch,), np.int32), 'instr_end': np.zeros((batch,), np.int32)}
  b = jax.tree.map(jnp.asarray, b)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'frozen': frozen, 'rng': jax.random.key(0),
           'opt_state': opt_abstract if abstract else tx.init(params)}
  step = S.make_train_step(cfg, graphdef, tx, sparse=False)
  flops = matmul_flops(step, state, b)
  summary = {'trainable_params': int(n_train), 'opt_state_bytes': int(opt_bytes), 'step_matmul_flops': flops,
             'grad_floor': optim.grad_floor(model, params)}
  if abstract:
    return summary
  fn = jax.jit(step, donate_argnums=0)
  t0 = time.perf_counter()
  compiled = fn.lower(state, b).compile()
  summary['compile_s'] = time.perf_counter() - t0
  cell = {'state': state}

  def one_step():
    """One step (the state is donated and replaced); -> its loss."""
    cell['state'], m = compiled(cell['state'], b)
    summary['loss'] = float(jax.block_until_ready(m['loss']))

  return summary, one_step


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size', default='bench')
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--text_tokens', type=int, default=64)
  ap.add_argument('--steps', type=int, default=3)
  ap.add_argument('--rank', type=int, default=128)
  ap.add_argument('--freeze_projector', action='store_true')
  ap.add_argument('--abstract', action='store_true', help='shapes only: no weights, compile or timing')
  ap.add_argument('--json')
  a = ap.parse_args()
  rows, steps = [], {}
  for name, region, train in [('full', '', 'full'), ('region_full', 'auto', 'full'),
                              ('region_lora', 'auto', f'lora{a.rank}')]:
    cfg = variant_config(a.size, region, train, a.freeze_projector)
    got = run_variant(cfg, a.batch, a.text_tokens, a.steps, a.abstract)
    if not a.abstract:
      got, steps[name] = got
    rows.append({'variant': name, **got})
  if not a.abstract:      # the variants' steps interleaved, after one warm-up step each
    times = common.interleaved_times(lambda name: steps[name](), list(steps), a.steps)
    for r in rows:
      r.update(step_s=statistics.median(times[r['variant']]), times_s=times[r['variant']])
  for r in rows:
    print({k: v for k, v in r.items() if k != 'times_s'}, flush=True)
  base = rows[0]
  for r in rows:
    for k in ('opt_state_bytes', 'step_matmul_flops', 'step_s'):
      if k in r:
        r[f'{k}_ratio'] = r[k] / base[k]
  common.print_rows(rows, ['variant', 'trainable_params', 'opt_state_bytes_ratio', 'step_matmul_flops_ratio',
                           'step_s', 'step_s_ratio', 'grad_floor'])
  meta = {'command': ' '.join(sys.argv), 'size': a.size, 'batch': a.batch, 'text_tokens': a.text_tokens,
          'steps': a.steps, 'rank': a.rank, 'freeze_projector': a.freeze_projector, 'abstract': a.abstract,
          **common.environment()}
  common.write_json(a.json, rows, meta)


if __name__ == '__main__':
  main()
