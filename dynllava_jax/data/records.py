"""The record layout both tfds builders write, and its decoding into plain Python values.

Each array_record record (tfds FeaturesDict, no TensorFlow needed to write or read it):
  index: int64, position of the record in its source (JSON list / generation order); the batch `id`.
  id: str, the source's id (LLaVA JSON `id`; digits_vqa `<split>-<n>`).
  image: bytes, the encoded image file (PNG / JPEG ...), b'' for text-only samples. Decoded with PIL
    only in the reader.
  has_image: bool.
  conversations: sequence of {from: 'human'|'gpt', value: str} (the LLaVA JSON layout; the first
    human turn holds `<image>` when has_image).
  question_type: str ('' for llava_instruct).
  answer: str, gold answer of the last turn (digits_vqa: the short answer; llava_instruct: the last
    gpt value).
"""
import numpy as np
import tensorflow_datasets as tfds


def features():
  return tfds.features.FeaturesDict({
      'index': np.int64,
      'id': tfds.features.Text(),
      'image': tfds.features.Scalar(dtype=np.object_),
      'has_image': np.bool_,
      'conversations': tfds.features.Sequence({
          'from': tfds.features.Text(), 'value': tfds.features.Text()}),
      'question_type': tfds.features.Text(),
      'answer': tfds.features.Text(),
  })


def _str(x):
  return x.decode('utf-8') if isinstance(x, (bytes, np.bytes_)) else str(x)


def decode(raw):
  """A record as read from the tfds data source → dict of Python values (str, bytes, bool, int)."""
  conv = raw['conversations']
  return {
      'index': int(raw['index']),
      'id': _str(raw['id']),
      'image': bytes(raw['image']) if raw['image'] is not None else b'',
      'has_image': bool(raw['has_image']),
      'conversations': [{'from': _str(f), 'value': _str(v)}
                        for f, v in zip(conv['from'], conv['value'])],
      'question_type': _str(raw['question_type']),
      'answer': _str(raw['answer']),
  }
