"""How local the Matryoshka query projector's attention is, for a trained `make demo-more` MQT stage.

    python scripts/mqt_probe.py W/stage5_mqt_instruct [--counts 4,16,64]

The MQT attention is a function of the parameters only (keys come from positions, not from the image:
`model/mqt.py`), so each visual token is a fixed mix of the patch tokens. Per m it prints the mean entropy
of the (head, query) attention rows against the uniform one (log N), the median of their largest
probability, and the median of their largest mass on one cell of the demo's 2x2 grid (0.25 = spread
evenly over the cells; a query that reads one cell gives 1). A near-uniform attention makes every visual
token a global average of the image: the cells cannot be told apart.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('stage_dir')
  ap.add_argument('--counts', default='4,16,64')
  args = ap.parse_args()
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from configs.demo_more import get_config  # pylint: disable=g-import-not-at-top
  from dynllava_jax.demo import stages  # pylint: disable=g-import-not-at-top
  from dynllava_jax.demo.tower import patch_cells  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.mqt import MatryoshkaQueryProjector  # pylint: disable=g-import-not-at-top

  # the stage's exported params (`<stage dir>/params`), whatever optimizer settings trained them
  c = get_config('stage=mqt_instruct')
  proj = MatryoshkaQueryProjector(c.model, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  tree = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(args.stage_dir, 'params')))
  state = nnx.state(proj, nnx.Param)
  nnx.replace_by_pure_dict(state, tree['projector'])
  nnx.update(proj, state)
  step = (stages.read_state(args.stage_dir) or {}).get('result', {}).get('step')
  grid, vc = int(c.data.digits.grid), c.model.vision
  cell = patch_cells(int(c.data.digits.canvas_size), grid, int(vc.image_size), int(vc.patch_size))
  for m in (int(x) for x in args.counts.split(',')):
    p = np.asarray(proj.attention(m))                        # (heads, m, N)
    entropy = -(p * np.log(p + 1e-12)).sum(-1)
    mass = np.stack([p[..., cell == k].sum(-1) for k in range(grid * grid)], -1)
    print(f'step {step} m={m}: attention entropy {entropy.mean():.3f} (uniform {np.log(p.shape[-1]):.3f}), '
          f'largest probability (median) {np.median(p.max(-1)):.3f}, largest cell mass (median) '
          f'{np.median(mass.max(-1)):.3f} (even {1 / grid ** 2:.2f})')


if __name__ == '__main__':
  main()
