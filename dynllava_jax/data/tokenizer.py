"""Tokenizers: loading any HF `tokenizer.json`, and the word-level one built for digits_vqa.

`load_tokenizer` accepts the tokenizer.json of llava-1.5-hf (a LLaMA sentencepiece-style BPE with
`<image>` = 32000, `<pad>` = 32001 as added tokens) and the word-level digits_vqa one alike. Text is
always encoded WITHOUT the tokenizer's own special-token template; templates.py adds `<s>` itself.
"""
import dataclasses
import os

import numpy as np
import tokenizers
from tokenizers import models, pre_tokenizers

from dynllava_jax.errors import UserError, one_line

# Fixed special ids of the digits_vqa vocabulary (the tiny model config relies on them).
SPECIALS = ('<unk>', '<s>', '</s>', '<pad>', '<image>')
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_ID = range(5)
MAX_WORD_VOCAB = 256


@dataclasses.dataclass
class Tokenizer:
  """A thin wrapper of `tokenizers.Tokenizer` with the ids the templates need."""
  tok: tokenizers.Tokenizer
  path: str = ''

  def encode(self, text):
    """Returns (ids (L,) int32, offsets (L, 2) int32 char spans into `text`), no special template."""
    e = self.tok.encode(text, add_special_tokens=False)
    offsets = np.asarray(e.offsets, np.int32).reshape(-1, 2)
    return np.asarray(e.ids, np.int32), offsets

  def decode(self, ids, skip_special_tokens=True):
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token):
    return self.tok.token_to_id(token)

  @property
  def vocab_size(self):
    return self.tok.get_vocab_size(with_added_tokens=True)

  def require_id(self, token, expected=None):
    """The id of `token`; raises when it is missing or differs from the model config's `expected`."""
    i = self.token_to_id(token)
    if i is None:
      raise UserError(f'tokenizer {self.path!r} has no {token!r} token')
    if expected is not None and i != expected:
      raise UserError(f'tokenizer {self.path!r}: {token!r} has id {i}, the model config says {expected}; '
                      'use the tokenizer the model was made with or fix the model config\'s token ids')
    return i


def load_tokenizer(path):
  """Loads a HF `tokenizer.json` (a file, or a folder holding one) into a `Tokenizer`."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, 'tokenizer.json')
  if not os.path.exists(path):
    raise UserError(f'no tokenizer.json at {path!r}: set data.tokenizer to the tokenizer.json of the model')
  try:
    return Tokenizer(tokenizers.Tokenizer.from_file(path), path)
  except Exception as e:  # pylint: disable=broad-except  (the tokenizers library raises plain Exception)
    raise UserError(f'{path} is not a valid tokenizer.json ({one_line(e, 160)}); set data.tokenizer to '
                    'a HF tokenizer.json') from None


def word_pre_tokenizer():
  """Splits on whitespace, every punctuation character a token of its own."""
  return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                  pre_tokenizers.Punctuation('isolated')])


def split_words(text):
  """The words `build_word_tokenizer` sees in `text` (for vocabulary building)."""
  return [w for w, _ in word_pre_tokenizer().pre_tokenize_str(text)]


def _words(texts):
  words = set()
  for t in texts:
    words.update(split_words(t))
  return words - set(SPECIALS)


def build_word_tokenizer(texts, path=None, extend=()):
  """Builds a word-level tokenizer whose vocabulary is every word of `texts` (and of `extend`).

  Ids 0..4 are `<unk> <s> </s> <pad> <image>`, then the words of `texts` sorted, then the words of
  `extend` that `texts` lacks, sorted: every id of the tokenizer of `texts` alone names the same word
  here, so a model trained with that one reads this one's texts. Raises when more than MAX_WORD_VOCAB
  tokens result. Saves to `path` (tokenizer.json) when given.
  """
  words = _words(texts)
  vocab = {s: i for i, s in enumerate(SPECIALS)}
  for w in sorted(words) + sorted(_words(extend) - words):
    vocab[w] = len(vocab)
  if len(vocab) > MAX_WORD_VOCAB:
    raise ValueError(f'word vocabulary has {len(vocab)} > {MAX_WORD_VOCAB} tokens')
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = word_pre_tokenizer()
  tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in SPECIALS])
  if path:
    os.makedirs(os.path.dirname(os.fspath(path)) or '.', exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    tok.save(tmp)
    os.replace(tmp, path)
  return Tokenizer(tok, os.fspath(path) if path else '')
