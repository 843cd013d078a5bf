"""Eval prompts for another visual-token count: an N-placeholder prompt / eval sample -> k placeholders.

    ids_k = with_visual_tokens(ids, image_token_id, k)                  # 1-D ids
    sample_k = resize_sample(sample, image_token_id, k)                  # `pipeline.make_eval_samples` dict

Used for MQT-LLaVA at m (`eval/token_sweep.py`) and the pre-LLM reducers' k (`eval/run.py`).
"""
import numpy as np


def with_visual_tokens(ids, image_token_id, m):
  """1-D ids with the image placeholders past the first m removed (a prompt built for M -> for m)."""
  ids = np.asarray(ids)
  is_img = ids == image_token_id
  drop = is_img & (np.cumsum(is_img) > m)
  return ids[~drop]


def resize_sample(sample, image_token_id, k):
  """An eval sample (`pipeline.make_eval_samples`) built for N placeholders -> for k: its prompt and its
  teacher-forcing sequence lose the placeholders past the first k, and the span indices shift."""
  from dynllava_jax.data.pipeline import SPAN_KEYS  # pylint: disable=g-import-not-at-top
  if not sample['has_image']:
    return sample
  out = dict(sample, prompt_ids=with_visual_tokens(sample['prompt_ids'], image_token_id, k))
  f = dict(sample['full'])
  ids = np.asarray(f['input_ids'])
  is_img = ids == image_token_id
  drop = is_img & (np.cumsum(is_img) > k)
  for key in ('input_ids', 'labels', 'attention_mask'):
    f[key] = np.asarray(f[key])[~drop]
  before = np.concatenate([[0], np.cumsum(drop)])          # dropped slots before index p
  for key in SPAN_KEYS:
    if key in f:
      p = int(f[key])
      f[key] = p - int(before[min(max(p, 0), ids.size)])
  out['full'] = f
  return out
