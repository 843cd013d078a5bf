"""vicuna_v1 template: exact ids, labels and spans; truncation; prompts; image preprocessing."""
import os

import numpy as np
from PIL import Image
import pytest

from dynllava_jax.data import digits_vqa
from dynllava_jax.data import images
from dynllava_jax.data import policy
from dynllava_jax.data import templates
from dynllava_jax.data import tokenizer as tokenizer_lib

FIXTURE = os.path.join(os.path.dirname(__file__), 'assets', 'llava_json')
SYSTEM_WORDS = ('A chat between a curious user and an artificial intelligence assistant . The '
                "assistant gives helpful , detailed , and polite answers to the user ' s questions .")
CONV = [{'from': 'human', 'value': 'how many digits are there ?\n<image>'},
        {'from': 'gpt', 'value': '5'},
        {'from': 'human', 'value': 'what is the sum of row 2 ?'},
        {'from': 'gpt', 'value': 'column 1 is empty .'}]
KW = dict(num_image_tokens=3, image_token_id=4, bos_id=1, max_len=256)


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp('tok') / 'tokenizer.json'
  digits_vqa.build_tokenizer(str(path))
  return tokenizer_lib.load_tokenizer(str(path))


def test_special_ids_and_vocab(tok):
  assert [tok.token_to_id(s) for s in ('<unk>', '<s>', '</s>', '<pad>', '<image>')] == [0, 1, 2, 3, 4]
  assert tok.vocab_size <= 256
  for w in SYSTEM_WORDS.split() + ['USER', 'ASSISTANT', ':']:
    assert tok.token_to_id(w) not in (None, 0), w


def test_two_turn_exact_ids_labels_spans(tok):
  enc = templates.encode_conversation(tok, CONV, True, **KW)
  words = (['<s>'] + SYSTEM_WORDS.split() + ['USER', ':'] + ['<image>'] * 3
           + 'how many digits are there ? ASSISTANT :'.split() + ['5', '</s>']
           + 'USER : what is the sum of row 2 ? ASSISTANT :'.split()
           + 'column 1 is empty .'.split() + ['</s>'])
  expected = np.array([tok.token_to_id(w) for w in words], np.int32)
  np.testing.assert_array_equal(enc.input_ids, expected)
  # Hand-written label mask: only the two answers (with their </s>) are learned.
  n_sys = 1 + 29 + 2
  a1 = n_sys + 3 + 8          # after image (3) and "how many digits are there ? ASSISTANT :" (8)
  a2 = a1 + 2 + 12            # after "5 </s>" and "USER : what is the sum of row 2 ? ASSISTANT :"
  assert len(SYSTEM_WORDS.split()) == 29 and len(words) == a2 + 6
  mask = np.zeros(len(words), bool)
  mask[a1:a1 + 2] = True
  mask[a2:a2 + 6] = True
  np.testing.assert_array_equal(enc.labels != -100, mask)
  np.testing.assert_array_equal(enc.labels[mask], expected[mask])
  assert enc.input_ids[0] == 1 and enc.input_ids[a1 + 1] == 2 and enc.input_ids[-1] == 2
  assert (enc.image_start, enc.instr_start, enc.instr_end) == (n_sys, n_sys + 3, a1)
  assert (enc.answer_start, enc.answer_end) == (a2, a2 + 6) == (a2, len(words))
  assert tok.decode(enc.input_ids[enc.answer_start:enc.answer_end], False) == 'column 1 is empty . </s>'
  assert not enc.truncated and enc.has_image


def test_text_only_and_prompt(tok):
  conv = [{'from': 'human', 'value': 'what is 3 plus 4 ?'}, {'from': 'gpt', 'value': '7'}]
  enc = templates.encode_conversation(tok, conv, False, **KW)
  assert 4 not in enc.input_ids
  assert enc.image_start == enc.instr_start == 32
  assert tok.decode(enc.input_ids[enc.instr_start:enc.instr_end]) == 'what is 3 plus 4 ? ASSISTANT :'
  ids, gold = templates.encode_prompt(tok, CONV, True, **KW)
  full = templates.encode_conversation(tok, CONV, True, **KW)
  assert gold == 'column 1 is empty .'
  np.testing.assert_array_equal(ids, full.input_ids[:full.answer_start])
  assert tok.decode(ids[-2:]) == 'ASSISTANT :'


def test_truncation_drops_rounds_and_over_long(tok):
  full = templates.encode_conversation(tok, CONV, True, **KW)
  kw = dict(KW, max_len=full.answer_start)       # the second round does not fit
  enc = templates.encode_conversation(tok, CONV, True, **kw)
  assert enc.truncated and len(enc.input_ids) == full.instr_end + 2
  assert (enc.answer_start, enc.answer_end) == (full.instr_end, full.instr_end + 2)
  kw = dict(KW, max_len=full.instr_end + 1)      # first answer cut to one token
  enc = templates.encode_conversation(tok, CONV, True, **kw)
  assert len(enc.input_ids) == full.instr_end + 1 and enc.answer_end == full.instr_end + 1
  with pytest.raises(policy.SampleProblem) as e:
    templates.encode_conversation(tok, CONV, True, **dict(KW, max_len=full.instr_end))
  assert e.value.reason == policy.OVER_LONG
  kw = dict(KW, max_len=full.image_start + 2)    # never cuts into the image tokens
  with pytest.raises(policy.SampleProblem):
    templates.encode_conversation(tok, CONV, True, **kw)


def test_sentencepiece_style_tokenizer_json():
  """The LLaMA-layout tokenizer.json of the fixture goes through the same path."""
  tok = tokenizer_lib.load_tokenizer(os.path.join(FIXTURE, 'tokenizer.json'))
  conv = [{'from': 'human', 'value': 'What color is the square?\n<image>'},
          {'from': 'gpt', 'value': 'It is red.'},
          {'from': 'human', 'value': 'How many bars are there?'},
          {'from': 'gpt', 'value': 'There are three bars.'}]
  enc = templates.encode_conversation(tok, conv, True, **dict(KW, num_image_tokens=5))
  ids, labels = enc.input_ids, enc.labels
  assert ids[0] == 1 and (ids == 4).sum() == 5
  assert (ids[enc.image_start:enc.image_start + 5] == 4).all()
  learned = np.flatnonzero(labels != -100)
  first = learned[learned < enc.answer_start]
  assert tok.decode(ids[first]) == 'It is red.'
  assert tok.decode(ids[enc.answer_start:enc.answer_end]) == 'There are three bars.'
  assert ids[enc.answer_end - 1] == 2 and enc.answer_end == len(ids)
  assert tok.decode(ids[enc.instr_start:enc.instr_end]).strip() == (
      'What color is the square? ASSISTANT:')


def test_image_preprocessing():
  img = Image.new('RGB', (8, 4), (255, 0, 0))   # padded to 8x8: rows 0-1 and 6-7 are the pad
  x = images.preprocess(img, 8)
  assert x.shape == (8, 8, 3) and x.dtype == np.float32
  mean, std = np.array(images.CLIP_MEAN), np.array(images.CLIP_STD)
  pad = (np.array(images.PAD_COLOR) / 255 - mean) / std
  np.testing.assert_allclose(x[0, 0], pad, atol=1e-5)             # padded rows: mean colour
  np.testing.assert_allclose(x[7, 7], pad, atol=1e-5)
  np.testing.assert_allclose(x[3, 4], (np.array([1, 0, 0]) - mean) / std, atol=1e-5)
  y = images.preprocess(Image.new('RGB', (30, 30), (0, 0, 255)), 8)   # bicubic resize
  np.testing.assert_allclose(y, np.broadcast_to((np.array([0, 0, 1]) - mean) / std, y.shape),
                             atol=1e-5)
  assert images.PAD_COLOR == (122, 116, 104)
  np.testing.assert_array_equal(images.load_pixels(b'', 8, has_image=False), np.zeros((8, 8, 3)))
  with pytest.raises(policy.SampleProblem) as e:
    images.decode_image(b'not an image')
  assert e.value.reason == policy.CORRUPT_IMAGE
