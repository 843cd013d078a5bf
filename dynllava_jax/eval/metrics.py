"""Evaluation metrics: answer matching (digits_vqa exact match, VQA-style exact match), perplexity and
warm timings (KV-cache bytes come from the engine: `GenerateOutput.kv_cache_bytes_*`).

Perplexity: exp(Σ NLL / Σ tokens) over gold answer tokens (teacher forcing); `dynllava_jax.eval.teacher`
computes the per-token NLL with each method's pruning applied.
Timings: warm (after `warmup` calls, so compile time is excluded), the median of `runs` calls, each ended
by `jax.block_until_ready`.
"""
import math
import re
import statistics
import time

import jax
import numpy as np

# ---------------------------------------------------------------- answers

_SPACE = re.compile(r'\s+')


def normalize_digits(text):
  """digits_vqa answers: lower case, whitespace collapsed, end-of-sequence text and outer spaces removed.

  The dataset's answers are word-tokenised ("there are 6 digits . row 1 : ..."), so inner punctuation is
  part of the answer and stays.
  """
  text = text.replace('</s>', ' ').lower()
  return _SPACE.sub(' ', text).strip()


def digits_match(pred, gold):
  """1.0 if the normalised generated answer equals the normalised gold answer, else 0.0."""
  return float(normalize_digits(pred) == normalize_digits(gold))


NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
                'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
ARTICLES = {'a', 'an', 'the'}
CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                "wont": "won't", "im": "i'm", "ive": "i've", "youre": "you're", "thats": "that's",
                "whats": "what's", "wasnt": "wasn't", "werent": "weren't", "hasnt": "hasn't",
                "havent": "haven't", "couldnt": "couldn't", "shouldnt": "shouldn't", "wouldnt": "wouldn't"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:]")
_PERIOD = re.compile(r'(?<!\d)\.|\.(?!\d)')
_COMMA_NUM = re.compile(r'(\d)(,)(\d)')


def normalize_vqa(text):
  """VQA-style answer normalisation: lower case, punctuation removed (commas inside numbers and decimal
  points kept as the number), periods not between digits dropped, number words → digits, articles
  removed, common apostrophe-less contractions restored, whitespace collapsed."""
  t = text.replace('</s>', ' ').replace('\n', ' ').replace('\t', ' ').strip().lower()
  t = _COMMA_NUM.sub(r'\1\3', t)
  t = _PUNCT.sub(' ', t)
  t = _PERIOD.sub('', t)
  words = []
  for w in t.split():
    w = NUMBER_WORDS.get(w, w)
    if w in ARTICLES:
      continue
    words.append(CONTRACTIONS.get(w, w))
  return ' '.join(words)


def vqa_match(pred, golds):
  """VQA exact match. golds: one string, or the list of annotator answers (then the VQA score
  min(#matching annotators / 3, 1))."""
  p = normalize_vqa(pred)
  if isinstance(golds, str):
    return float(p == normalize_vqa(golds))
  hits = sum(p == normalize_vqa(g) for g in golds)
  return min(hits / 3.0, 1.0)


def accuracy(matches):
  matches = list(matches)
  return float(np.mean(matches)) if matches else float('nan')


# ---------------------------------------------------------------- perplexity

def perplexity(nll_sum, n_tokens):
  """exp(Σ NLL / Σ tokens); nan when there are no tokens."""
  n = float(np.sum(n_tokens))
  if n <= 0:
    return float('nan')
  return math.exp(float(np.sum(nll_sum)) / n)


# ---------------------------------------------------------------- timing

def time_call(fn, *args, runs=5, warmup=1, **kwargs):
  """Median wall seconds of `fn(*args, **kwargs)` over `runs` warm calls (each block_until_ready).

  Returns (median_s, last_output)."""
  if runs < 1:
    raise ValueError(f'runs={runs} must be >= 1')
  out = None
  for _ in range(warmup):
    out = jax.block_until_ready(fn(*args, **kwargs))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def decode_ms_per_token(t_long, n_long, t_short, n_short):
  """Per-token decode time from two warm generations of different lengths (prefill cancels):
  (t_long − t_short) / (n_long − n_short) in milliseconds."""
  if n_long <= n_short:
    raise ValueError(f'need n_long ({n_long}) > n_short ({n_short}) generated tokens')
  return 1000.0 * (t_long - t_short) / (n_long - n_short)
