"""HF / released LLaVA checkpoint <-> orbax params checkpoint (a thin wrapper of `dynllava_jax.hf`).

    python -m dynllava_jax.convert --hf_dir llava-1.5-7b-hf --out ckpt/llava7b --dtype bfloat16
    python -m dynllava_jax.convert --hf_dir dynamic-llava-7b --clip_dir clip-vit-large-patch14-336 --out ckpt/dyn7b
    python -m dynllava_jax.convert --export --ckpt ckpt/dyn7b --out hf_out --layout original
    python -m dynllava_jax.convert --export --workdir runs/x [--step N] --out export/x [--layout hf|released]

A workdir export writes beside the weights the run's `run_config.json` and `tokenizer.json`, so
`--model DIR` on it behaves as the workdir (docs/serving.md). `hf` = `hf5`, `released` = `original`; the
orbax directory layout (params dict + `model_config.json`): docs/checkpoints.md, "The command".
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from dynllava_jax import errors
from dynllava_jax import hf
from dynllava_jax.hf_keys import LAYOUTS
from dynllava_jax.params_dir import CONFIG_NAME, load_params, read_model_config, save_params  # noqa: F401

LAYOUT_ALIASES = {'hf': 'hf5', 'released': 'original'}


def export_workdir(workdir, out, *, step=None, layout='hf5', dtype=None, max_shard_bytes=int(5e9),
                   report=print):
  """Writes a training workdir's checkpoint (newest, or `step`) as an HF / released checkpoint in `out`
  (which must not exist), with the run's config (run_config.json) and tokenizer.json beside it."""
  import shutil  # pylint: disable=g-import-not-at-top
  from dynllava_jax import source  # pylint: disable=g-import-not-at-top
  if os.path.exists(out):
    raise FileExistsError(f'{out} exists: choose a new --out directory')
  src = source.load_source(workdir=workdir, step=step, report=report)
  hf.save_llava(src.model, src.config.model, out, layout=layout, dtype=dtype, max_shard_bytes=max_shard_bytes)
  source.write_atomic(os.path.join(out, source.EXPORTED_RUN_CONFIG), source.config_to_json(src.config))
  if src.tokenizer is not None:
    if src.tokenizer.path:
      shutil.copyfile(src.tokenizer.path, os.path.join(out, source.TOKENIZER))
    else:
      src.tokenizer.tok.save(os.path.join(out, source.TOKENIZER))
  report(f'wrote {layout} checkpoint {out} from {src.describe()}')
  return 0


def main(argv=None):
  """Exit status 0, or 2 with one line on stderr for bad input (errors.guard); bugs keep their traceback."""
  try:
    return errors.guard('python -m dynllava_jax.convert',
                        lambda: _main(argv), extra=(ValueError, FileNotFoundError, FileExistsError))
  except SystemExit as e:
    return e.code


def _main(argv):
  ap = argparse.ArgumentParser(prog='python -m dynllava_jax.convert', description=__doc__.split('\n')[0])
  ap.add_argument('--hf_dir', help='HF / released checkpoint directory to import')
  ap.add_argument('--clip_dir', help='local HF CLIP directory (original checkpoints: tower sizes from its config.json, '
                  'and its weights when the checkpoint has no tower)')
  ap.add_argument('--out', required=True, help='output: orbax dir (import) or HF dir (--export)')
  ap.add_argument('--dtype', default=None, help='float32 | bfloat16 | float16 (import: param dtype, '
                  'default float32; export: stored dtype, default the params\')')
  ap.add_argument('--export', action='store_true', help='orbax --ckpt or training --workdir -> HF --out')
  ap.add_argument('--ckpt', help='orbax dir written by an import (with --export)')
  ap.add_argument('--workdir', help='training workdir to export (with --export; its config.json is read)')
  ap.add_argument('--step', type=int, default=None, help='checkpoint step of --workdir (default: newest)')
  ap.add_argument('--layout', default='hf5', choices=LAYOUTS + tuple(LAYOUT_ALIASES),
                  help='export key layout (hf = hf5, released = original)')
  ap.add_argument('--max_shard_gb', type=float, default=5.0)
  a = ap.parse_args(argv)
  dtype = jnp.dtype(a.dtype) if a.dtype else None
  layout = LAYOUT_ALIASES.get(a.layout, a.layout)
  if a.export:
    if bool(a.ckpt) == bool(a.workdir):
      ap.error('--export needs one of --ckpt (an orbax dir from an import) or --workdir (a training run)')
    if a.step is not None and not a.workdir:
      ap.error('--step applies to --workdir')
    if a.workdir:
      return export_workdir(a.workdir, a.out, step=a.step, layout=layout, dtype=dtype,
                            max_shard_bytes=int(a.max_shard_gb * 1e9))
    model, config = load_params(a.ckpt)
    out = hf.save_llava(model, config, a.out, layout=layout, dtype=dtype,
                        max_shard_bytes=int(a.max_shard_gb * 1e9))
    print(f'wrote {layout} checkpoint {out}')
    return 0
  if not a.hf_dir:
    ap.error('give --hf_dir (import) or --export --ckpt')
  model, config = hf.load_llava(a.hf_dir, dtype=dtype or jnp.float32, clip_dir=a.clip_dir)
  out = save_params(model, config, a.out)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(f'wrote {out} ({n:,} params, {config.param_dtype}, sparse={config.sparse.enabled})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
