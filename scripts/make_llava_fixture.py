"""Makes tests/assets/llava_json: a tiny LLaVA-format dataset with every bad-input kind.

    .venv/bin/python scripts/make_llava_fixture.py [--out tests/assets/llava_json]

Writes:
  llava_fixture.json        14 records: 5 good-at-build-time (1 of them over_long at read time with
                            max_len 256 and 64 image tokens) and one of each build-time bad kind.
  llava_fixture_clean.json  the 5 records that pass the build-time checks (for strict read tests).
  images/*.png|jpg          small images (non-square, to exercise the pad-to-square), one corrupt.
  tokenizer.json            a LLaMA-style sentencepiece BPE (normalizer Prepend("▁") + Replace(" ",
                            "▁"), no pre-tokenizer, Metaspace-like decoder — the layout of
                            llava-1.5-hf's tokenizer.json) trained on these texts; ids 0..4 =
                            <unk> <s> </s> <pad> <image>, 256 tokens in all.
Deterministic: running it again gives the same files.
"""
import argparse
import json
import os
import sys

import numpy as np
from PIL import Image
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dynllava_jax.data import templates  # pylint: disable=g-import-not-at-top

SPECIALS = ['<unk>', '<s>', '</s>', '<pad>', '<image>']
LONG_Q = ' '.join(['please look very carefully at every part of the picture'] * 30)


def h(v):
  return {'from': 'human', 'value': v}


def g(v):
  return {'from': 'gpt', 'value': v}


def records():
  """(records, expected build-time reason or None per record)."""
  long_rounds = []
  for i in range(4):
    q = (f'<image>\n' if i == 0 else '') + f'Describe part {i + 1} of the picture in detail.'
    long_rounds += [h(q), g(' '.join(['The square is red and the background is blue.'] * 4))]
  recs = [
      ({'id': 'good-single', 'image': 'images/red_square.png',
        'conversations': [h('What color is the square?\n<image>'), g('It is red.')]}, None),
      ({'id': 'good-multi', 'image': 'images/blue_bars.jpg',
        'conversations': [h('<image>\nWhat do you see?'), g('Blue bars on a white background.'),
                          h('How many bars are there?'), g('There are three bars.')]}, None),
      ({'id': 'good-text', 'conversations': [h('What is two plus two?'), g('Two plus two is four.')]},
       None),
      ({'id': 'bad-missing-image', 'image': 'images/does_not_exist.png',
        'conversations': [h('<image>\nWhat is this?'), g('A picture.')]}, 'missing_image'),
      ({'id': 'bad-corrupt-image', 'image': 'images/corrupt.jpg',
        'conversations': [h('<image>\nWhat is this?'), g('A picture.')]}, 'corrupt_image'),
      ({'id': 'bad-no-conversations', 'image': 'images/red_square.png'}, 'malformed'),
      ({'id': 'bad-value-type', 'conversations': [h('How old is it?'), g(42)]}, 'malformed'),
      ({'id': 'bad-gpt-first', 'conversations': [g('Hello.'), h('Hi there.')]}, 'bad_roles'),
      ({'id': 'bad-two-humans', 'conversations': [h('Hello.'), h('Are you there?'), g('Yes.')]},
       'bad_roles'),
      ({'id': 'bad-tag-without-image',
        'conversations': [h('<image>\nWhat color is the square?'), g('It is red.')]},
       'tag_without_image'),
      ({'id': 'bad-image-without-tag', 'image': 'images/red_square.png',
        'conversations': [h('What color is the square?'), g('It is red.')]}, 'image_without_tag'),
      ({'id': 'bad-two-tags', 'image': 'images/red_square.png',
        'conversations': [h('<image>\n<image>\nWhat color?'), g('Red.')]}, 'multiple_image_tags'),
      ({'id': 'read-over-long', 'image': 'images/red_square.png',
        'conversations': [h('<image>\n' + LONG_Q), g('It is red.')]}, None),
      ({'id': 'good-long-multi', 'image': 'images/blue_bars.jpg', 'conversations': long_rounds},
       None),
  ]
  return recs


def make_images(folder):
  os.makedirs(folder, exist_ok=True)
  a = np.zeros((16, 24, 3), np.uint8)
  a[:] = (255, 255, 255)
  a[4:12, 8:16] = (220, 20, 30)
  Image.fromarray(a).save(os.path.join(folder, 'red_square.png'))
  b = np.full((30, 20, 3), 250, np.uint8)
  for x in (2, 8, 14):
    b[3:27, x:x + 4] = (20, 40, 200)
  Image.fromarray(b).save(os.path.join(folder, 'blue_bars.jpg'), quality=90)
  with open(os.path.join(folder, 'corrupt.jpg'), 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0 this is not really a jpeg file' + bytes(range(64)))


def make_tokenizer(texts, path, vocab_size=256):
  """Trains a tiny BPE and saves it in the LLaMA (llava-1.5-hf) tokenizer.json layout."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token='<unk>', fuse_unk=True))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='always')
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=1,
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  tok.normalizer = normalizers.Sequence([normalizers.Prepend('▁'), normalizers.Replace(' ', '▁')])
  tok.pre_tokenizer = None
  tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(' ', 1, 0)])
  tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in SPECIALS])
  for i, s in enumerate(SPECIALS):
    assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
  tok.save(path)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--out', default=os.path.join('tests', 'assets', 'llava_json'))
  out = ap.parse_args().out
  make_images(os.path.join(out, 'images'))
  recs = records()
  data = [r for r, _ in recs]
  with open(os.path.join(out, 'llava_fixture.json'), 'w') as f:
    json.dump(data, f, indent=1)
  with open(os.path.join(out, 'llava_fixture_clean.json'), 'w') as f:
    json.dump([r for r, bad in recs if bad is None], f, indent=1)
  texts = [templates.SYSTEM, 'USER: ASSISTANT:']
  for r in data:
    for t in r.get('conversations', []):
      if isinstance(t.get('value'), str):
        texts.append(t['value'].replace('<image>', ''))
  make_tokenizer(texts, os.path.join(out, 'tokenizer.json'))
  print(f'wrote {len(data)} records to {out}')


if __name__ == '__main__':
  main()
