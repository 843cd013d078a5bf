"""How well the demo's test questions can be answered by a reader of the raw digits (docs/demo.md, "What
the test digits allow").

    python scripts/digits_ceiling.py [--samples 300]

The source digits are split by index (`digits_vqa.SOURCE_SPLITS`: train 0..1257, validation 1258..1526,
test 1527..1796). Classifiers fit on the train block's raw 8×8 digits (scikit-learn: 3-nearest
neighbours, an RBF SVM, logistic regression) are scored on the validation and the test block, and then used
as the reader of the demo's test split (`configs/demo.py`, one question per sample, drawn as the builder
draws it): a cell look-up counts as read right when its cell is empty or its digit is classified right, a
row sum when both cells of the row are, a description when all four are. Those shares bound what a model
that reads digits as well as that classifier can answer; no model of ours is run.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--samples', type=int, default=300)
  args = ap.parse_args()
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.neighbors import KNeighborsClassifier  # pylint: disable=g-import-not-at-top
  from sklearn.svm import SVC  # pylint: disable=g-import-not-at-top

  from configs.demo import get_config  # pylint: disable=g-import-not-at-top
  from dynllava_jax.data import digits_vqa as D  # pylint: disable=g-import-not-at-top

  d = load_digits()
  x, y = d.data / 16.0, d.target
  blocks = {k: slice(lo, hi) for k, (lo, hi) in D.SOURCE_SPLITS.items()}
  c = get_config('stage=2').data.digits
  split = list(D.SOURCE_SPLITS).index('test')
  questions = []     # (question type, the cells it reads: [(row, col)], grid, src)
  for i in range(args.samples):
    rng = np.random.default_rng([int(c.seed), split, i])
    empty, src, grid = D.draw_grid(rng, y, 'test', int(c.grid))
    qtype, q, _ = D._random_question(rng, grid, style=c.describe_style, type_probs=tuple(c.type_probs),  # pylint: disable=protected-access
                                     add_echo=bool(c.add_echo))
    g = int(c.grid)
    if qtype == 'digit_at':
      name = q.split('cell ')[1].split()[0]
      cells = [('abc'.index(name[0]), int(name[1]) - 1)]
    elif qtype == 'row_sum':
      r = 'abc'.index(q.split('row ')[1].split()[0])
      cells = [(r, j) for j in range(g)]
    elif qtype in ('describe', 'count'):
      cells = [(r, j) for r in range(g) for j in range(g)]
    else:
      continue
    questions.append((qtype, cells, empty, src))

  rows = ['| reader (fit on the train block) | validation block | test block | test split: `digit_at` | '
          '`row_sum` | `describe` (all 4 cells) |', '|---|---|---|---|---|---|']
  for name, clf in (('3-nearest neighbours', KNeighborsClassifier(3)), ('RBF SVM (C 10)', SVC(C=10)),
                    ('logistic regression', LogisticRegression(max_iter=2000))):
    clf.fit(x[blocks['train']], y[blocks['train']])
    right = clf.predict(x) == y
    share = {t: [] for t in ('digit_at', 'row_sum', 'describe')}
    for qtype, cells, empty, src in questions:
      if qtype in share:
        share[qtype].append(all(empty[r, j] or right[src[r, j]] for r, j in cells))
    rows.append(f'| {name} | {right[blocks["validation"]].mean():.3f} | {right[blocks["test"]].mean():.3f} | '
                + ' | '.join(f'{np.mean(share[t]):.3f} ({len(share[t])})' for t in share) + ' |')
  print('\n'.join(rows))


if __name__ == '__main__':
  main()
