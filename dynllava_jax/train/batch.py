"""Host batches -> global device arrays for the train / eval steps, sharded over (data, fsdp).

    sharding = batch_sharding(mesh)
    batch = to_device(host_batch, sharding, pad_id)     # the keys the steps read, as global jax.Arrays
    batch = to_device(host_batch, sharding, pad_id, head_positions=-1)   # + head_index (train/forward.py)
"""
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')
STEP_KEYS = ('input_ids', 'attention_mask', 'labels', 'pixel_values', 'has_image', 'image_start',
             'instr_start', 'instr_end', 'answer_start', 'answer_end')


def batch_sharding(mesh):
  return NamedSharding(mesh, P(BATCH_AXES))


def to_device(batch, sharding, pad_id=0, head_positions=0):
  """head_positions != 0 adds 'head_index' (B, K) for the training loss (`train/forward.py::head_index`;
  every process picks the same K)."""
  import jax  # pylint: disable=g-import-not-at-top
  from dynllava_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from dynllava_jax.train.forward import IGNORE, head_index  # pylint: disable=g-import-not-at-top
  batch = pipeline.agree_length({k: batch[k] for k in STEP_KEYS}, pad_id)
  if head_positions:
    n = None                           # one process: head_index counts this batch's labelled targets
    if jax.process_count() > 1:        # several: the largest count over every process's part
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      n = int((np.asarray(batch['labels'])[:, 1:] != IGNORE).sum(axis=1).max(initial=0))
      n = int(np.max(multihost_utils.process_allgather(np.int32(n))))
    batch['head_index'] = head_index(batch['labels'], head_positions, n_max=n)
  return pipeline.to_global(batch, sharding, pad_id)
