"""Layer pruning: remove the least influential decoder layers outside the visual region.

    python -m dynllava_jax.tools.prune --ckpt ckpt/llava7b --out pruned7b --bi runs/x/block_influence/block_influence.json --k 8
    python -m dynllava_jax.tools.prune --ckpt ckpt/llava7b --out pruned7b --remove 2,3,29 [--force] [--hf --layout hf5]

A pruned model is the layer plan with those layers `skip` (`skip_config`); `prune_model` builds the
smaller model without them (llm.layers = L − k), written as a `dynllava_jax.convert` orbax dir or, with
`--hf`, an HF checkpoint. Layers come from a Block Influence JSON (`choose`: the k lowest-BI layers
outside the region) or `--remove`; a region layer is refused unless --force. docs/training.md, "Pruning".
"""
import argparse
import copy
import json
import sys

from dynllava_jax.errors import UserError
from dynllava_jax.model import lora as LR
from dynllava_jax.model import plan as P


def region_of(mc):
  """The layers pruning must not remove: model.region, else the released spread."""
  return P.parse_region(mc.get('region', ''), mc.llm.layers) or P.region_layers(mc.llm.layers)


def check_remove(spec, mc, *, force=False):
  """'2,3,29' (or ints) -> sorted layer tuple; one-line UserError for a layer outside 0..L−1, a repeat,
  or (unless force) a region layer; at least one layer must stay."""
  n = mc.llm.layers
  try:
    layers = P.parse_layers(spec, n, 'prune list')
  except ValueError as e:
    raise UserError(str(e)) from None
  inside = sorted(set(layers) & set(region_of(mc)))
  if inside and not force:
    raise UserError(f'prune list removes layer {inside[0]}, which is in the visual region '
                    f'{list(region_of(mc))}: choose others or pass --force')
  if len(layers) >= n:
    raise UserError(f'prune list removes all {n} layers: keep at least one')
  return layers


def choose(bi, k, mc):
  """The k layers with the lowest BI outside the region (ties: the lower layer), sorted."""
  n = mc.llm.layers
  if len(bi) != n:
    raise UserError(f'the Block Influence list has {len(bi)} layers; the model has {n}')
  region = set(region_of(mc))
  free = [i for i in sorted(range(n), key=lambda i: (bi[i], i)) if i not in region]
  if not 0 <= k <= len(free):
    raise UserError(f'cannot remove k={k} layers: {len(free)} lie outside the visual region')
  return tuple(sorted(free[:k]))


def skip_config(mc, remove):
  """mc with the layers in `remove` of kind `skip` (the plan form of the pruned model)."""
  groups = P.resolve(mc)
  region = P.parse_region(mc.get('region', ''), mc.llm.layers)
  per_layer = [(g.kind, g.train) for g in groups for _ in range(g.size)]
  entries = [(P.SKIP if i in set(remove) else k, t) for i, (k, t) in enumerate(per_layer)]
  mc2 = copy.deepcopy(mc)
  with mc2.unlocked():
    if region and not set(region) & set(remove):
      mc2.layer_plan = ','.join(k for k, _ in entries)
    else:   # the region (forced removal) or no region: write the train flags out
      mc2.layer_plan = ','.join(f'{k}:{t}' for k, t in entries)
      mc2.region = ''
  return mc2


def prune_model(model, mc, remove):
  """-> (the smaller model without the layers in `remove`, its config). Its outputs equal `model` run
  with `skip_config(mc, remove)` (tests/test_visual_region.py)."""
  mc_skip = skip_config(mc, remove)
  skipped = LR.rebuild(model, mc_skip)
  return LR.compact(skipped, mc_skip)


def main(argv=None):
  """Exit status 0, or 2 with one line on stderr for bad input (errors.guard)."""
  from dynllava_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    return errors.guard('python -m dynllava_jax.tools.prune', lambda: _main(argv),
                        extra=(ValueError, FileNotFoundError, FileExistsError))
  except SystemExit as e:
    return e.code


def _main(argv):
  from dynllava_jax import convert, hf  # pylint: disable=g-import-not-at-top
  ap = argparse.ArgumentParser(prog='python -m dynllava_jax.tools.prune', description=__doc__.split('\n')[0])
  ap.add_argument('--ckpt', required=True, help='orbax params dir (a dynllava_jax.convert output)')
  ap.add_argument('--out', required=True, help='output dir (orbax, or HF with --hf)')
  ap.add_argument('--remove', help='layers to remove, e.g. 2,3,29')
  ap.add_argument('--bi', help='block_influence.json: remove the --k least influential layers outside the region')
  ap.add_argument('--k', type=int, help='how many layers to remove with --bi')
  ap.add_argument('--force', action='store_true', help='allow removing visual-region layers')
  ap.add_argument('--hf', action='store_true', help='write a HF checkpoint instead of an orbax dir')
  ap.add_argument('--layout', default='hf5', help='HF key layout with --hf')
  a = ap.parse_args(argv)
  if bool(a.remove) == bool(a.bi):
    raise UserError('give exactly one of --remove (a layer list) or --bi with --k')
  mc = convert.read_model_config(a.ckpt)          # the layer choice is checked before any weight is read
  if a.bi:
    if a.k is None:
      raise UserError('--bi needs --k (how many layers to remove)')
    with open(a.bi) as f:
      bi = json.load(f).get('bi')
    if not isinstance(bi, list):
      raise UserError(f'{a.bi} has no "bi" list (write it with python -m dynllava_jax.tools.block_influence)')
    remove = choose(bi, a.k, mc)
  else:
    remove = check_remove(a.remove, mc, force=a.force)
  model, mc = convert.load_params(a.ckpt)
  pruned, mc2 = prune_model(model, mc, remove)
  if a.hf:
    hf.save_llava(pruned, mc2, a.out, layout=a.layout)
  else:
    convert.save_params(pruned, mc2, a.out)
  print(f'removed layers {list(remove)}: {mc.llm.layers} -> {mc2.llm.layers} layers, wrote {a.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
