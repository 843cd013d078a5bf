"""How an image-token method's kept tokens fall on the grid's cells, and what the model then says of each cell.

    python scripts/demo_kept_cells.py <workdir> [--method dynamic] [--budget 0.2] [--types count,describe]
    python scripts/demo_kept_cells.py <workdir> --method dense --budget 1.0 --sums   # row sums' misses only

For the test questions that name every cell in their answer (the counts, "a1 digit a2 empty ...", and the
descriptions, "row a : a1 9 , a2 empty ..."), reads the run's answers from `<workdir>/results.json` (the
`<method>@<budget>` row's predictions), recomputes which image tokens the method keeps (the same prefill
as the evaluation, `demo.results.spec_keep_grids`) and prints, for the cells with no kept token and for the
others, how often the model calls an empty cell / a cell with a digit empty or a digit. A cell is the
(canvas / grid)-pixel block of patches (`data.digits.grid`; the demo's 2x2 grid: 4x4 patches a cell). Only
for methods that keep each sample's image tokens on a grid of the model's N (dynamic, random, uniform,
fastv, pdrop): the pre-LLM reducers hand the LLM other tokens.

`--sums` (any row, no model run): splits the row sums answered wrong into misreads (the sum is the sum of
the values the answer echoed, `a1 3 a2 7 sum 10`, so a cell was read wrong) and wrong sums.
"""
import argparse
import collections
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CELL_VALUE = re.compile(r'\b([a-z]\d)\s+([a-z0-9]+)')


def cell_presence(answer):
  """{'a1': True, 'a2': False, ...}: the cells an answer names, True where it says a digit is there."""
  return {cell: value != 'empty' for cell, value in CELL_VALUE.findall(answer)
          if value == 'empty' or value == 'digit' or value.isdigit()}


def kept_per_cell(keep, grid):
  """keep (N,) bool on the sqrt(N) x sqrt(N) patch grid -> {'a1': kept tokens in that cell, ...} (rows a, b,
  ...; columns 1, 2, ...)."""
  n = int(round(np.sqrt(keep.size)))
  side = n // grid
  g = np.asarray(keep).reshape(n, n)
  return {f'{chr(ord("a") + r)}{c + 1}': int(g[r * side:(r + 1) * side, c * side:(c + 1) * side].sum())
          for r in range(grid) for c in range(grid)}


def tally(records):
  """records: (kept tokens, gold digit?, said digit?) per cell -> the printed table's rows."""
  out = collections.Counter()
  for kept, gold, said in records:
    seen = 'no kept token' if kept == 0 else '>= 1 kept token'
    out[(seen, 'digit' if gold else 'empty', 'digit' if said else 'empty')] += 1
  return out


def sum_misses(predictions):
  """(misread, wrong sum): the row-sum predictions answered wrong whose sum does / does not equal the sum of
  the values they echo (`empty` counts 0)."""
  misread = wrong_sum = 0
  for p in predictions:
    if p['question_type'] != 'row_sum' or p['correct']:
      continue
    values = [0 if v == 'empty' else int(v) for _, v in CELL_VALUE.findall(p['prediction'])
              if v == 'empty' or v.isdigit()]
    tail = p['prediction'].split('sum')[-1].strip()
    if tail.isdigit() and sum(values) == int(tail):
      misread += 1
    else:
      wrong_sum += 1
  return misread, wrong_sum


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('workdir')
  ap.add_argument('--method', default='dynamic')
  ap.add_argument('--budget', default='0.2')
  ap.add_argument('--types', default='count,describe')
  ap.add_argument('--sums', action='store_true', help="only the row sums' misses: misread cells or wrong sums")
  args = ap.parse_args()
  from configs.demo import get_config  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval.run import _load_samples, _prompt_batch, load_model  # pylint: disable=g-import-not-at-top
  from dynllava_jax.demo import results as res  # pylint: disable=g-import-not-at-top
  from dynllava_jax.demo import stages as stg  # pylint: disable=g-import-not-at-top

  key = f'{args.method}@{args.budget}'
  with open(os.path.join(args.workdir, 'results.json')) as f:
    rows = json.load(f)['rows']
  if key not in rows:
    raise SystemExit(f'{args.workdir}/results.json has no row {key}; it has {sorted(rows)}')
  said = {p['id']: p['prediction'] for p in rows[key]['predictions']}
  if args.sums:
    misread, wrong_sum = sum_misses(rows[key]['predictions'])
    print(f'{key}: {misread + wrong_sum} row sums wrong: {misread} misread a cell (the sum of the echoed values), '
          f'{wrong_sum} wrong sums')
    return
  spec = [sp for sp in res.method_specs(get_config('stage=2').model, (float(args.budget),), [args.method])
          if sp['key'] == key]
  if not spec or spec[0]['ratio'] is None:
    raise SystemExit(f'{key}: not a per-sample image-token budget on the model grid')
  sp = spec[0]
  config = get_config(f"stage={sp['stage']}")
  model = load_model(config, stg.stage_dir(args.workdir, config), report_fn=lambda m: None)[0]
  samples, _ = _load_samples(config, 'test', len(said))
  types = set(args.types.split(','))
  samples = [s for s in samples if s['question_type'] in types and s['id'] in said]
  ids, mask, pix = _prompt_batch(config, samples)
  keeps = res.spec_keep_grids(model, config, sp, ids, mask, pix)
  records, wrong = [], 0
  for s, keep in zip(samples, keeps):
    gold, got = cell_presence(s['answer']), cell_presence(said[s['id']])
    kept = kept_per_cell(keep, int(config.data.digits.grid))
    records += [(kept[c], gold[c], got.get(c, not gold[c])) for c in gold]   # a cell not named: counted wrong
    wrong += any(got.get(c) != gold[c] for c in gold)
  counts = tally(records)
  print(f'{key}: {len(samples)} test questions ({args.types}), {wrong} with a cell called wrong; '
        f'{len(records)} cells')
  print('| cells | truth | said empty | said digit |\n|---|---|---|---|')
  for seen in ('no kept token', '>= 1 kept token'):
    for truth in ('empty', 'digit'):
      print(f'| {seen} | {truth} | {counts[(seen, truth, "empty")]} | {counts[(seen, truth, "digit")]} |')


if __name__ == '__main__':
  main()
