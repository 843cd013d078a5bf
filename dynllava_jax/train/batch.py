"""Host batches -> global device arrays for the train / eval steps, sharded over (data, fsdp).

    sharding = batch_sharding(mesh)
    batch = to_device(host_batch, sharding, pad_id)     # the keys the steps read, as global jax.Arrays
"""
from jax.sharding import NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')
STEP_KEYS = ('input_ids', 'attention_mask', 'labels', 'pixel_values', 'has_image', 'image_start',
             'instr_start', 'instr_end', 'answer_start', 'answer_end')


def batch_sharding(mesh):
  return NamedSharding(mesh, P(BATCH_AXES))


def to_device(batch, sharding, pad_id=0):
  from dynllava_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.to_global({k: batch[k] for k in STEP_KEYS}, sharding, pad_id)
