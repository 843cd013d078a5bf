"""Text + images in, answers out: the glue between a loaded model (`dynllava_jax.source`) and `generate`.

    eng = Engine(load_source(workdir='runs/x'), method='dynamic')
    p = eng.encode([('What digit is top left?', None)], image=eng.open_image('x.png'))
    [res] = eng.run([p], max_new_tokens=32, on_text=lambda i, new_text: print(new_text, end=''))
    res.text, res.finish_reason, res.kept_image_ratio, res.kv_bytes

Prompts use the vicuna_v1 template of LLaVA-1.5 (`data/templates.py`): turns are (question, answer)
pairs, the last answer None; the image, if any, belongs to the first question. A batch is left-padded
(`pipeline.left_pad_batch`) and may be padded to a fixed number of rows (`slots`, filler rows are copies
of the first prompt, dropped from the results) so one compiled program serves any number of requests.
Greedy answers do not depend on the other rows of the batch (each sample is exact: tested).
"""
import dataclasses
import threading
import time
from typing import List, Optional

import jax
import numpy as np

from dynllava_jax.errors import UserError

IMAGE_TAG = '<image>'


@dataclasses.dataclass
class Prompt:
  """One encoded request: ids (P,) int32 with N image placeholders when pixels (S, S, 3) is given."""
  ids: np.ndarray
  pixels: Optional[np.ndarray] = None


@dataclasses.dataclass
class Result:
  """One answer. token_ids: the generated ids (EOS excluded); finish_reason 'stop' (EOS) | 'length';
  kept_image_ratio / kept_text_ratio: this sample's; kv_bytes: K/V bytes holding its tokens at the end;
  prefill_s / decode_ms_per_token: of the whole batch it ran in."""
  text: str
  token_ids: List[int]
  finish_reason: str
  prompt_tokens: int
  kept_image_ratio: float
  kept_text_ratio: float
  kv_bytes: float
  prefill_s: float
  decode_ms_per_token: float


class Engine:
  """A model ready for requests (see the module docstring). method / overrides: the default
  sparsification; max_new_tokens / temperature / top_p default to the config's eval section."""

  def __init__(self, src, method=None, overrides=None):
    self.src = src
    self.model, self.config = src.model, src.config
    self.mc = self.model.mc
    self.tok = src.require_tokenizer()
    ev = self.config.eval
    self.method_name = method or str(ev.method)
    if not method and self.method_name.startswith('dynamic') and not self.mc.sparse.enabled:
      self.method_name = 'dense'       # the config's default cannot run on a model without predictors
    self.overrides = dict(overrides or {})
    self.max_new_tokens = int(ev.max_new_tokens)
    self.temperature, self.top_p = float(ev.temperature), float(ev.top_p)
    self._methods = {}
    self.method(self.method_name, self.overrides)      # an unknown / unusable default fails at start-up

  # ------------------------------------------------------------ inputs

  @property
  def image_size(self):
    return int(self.mc.vision.image_size)

  def method(self, name=None, overrides=None):
    """The Sparsifier for (name, overrides), made once; ValueError naming the problem."""
    from dynllava_jax.sparsity.registry import make_sparsifier  # pylint: disable=g-import-not-at-top
    name = name or self.method_name
    overrides = self.overrides if overrides is None else overrides
    key = (name, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
    if key not in self._methods:
      if name.startswith('dynamic') and not self.mc.sparse.enabled:
        raise ValueError(f'method {name!r} needs the keep-predictors; this model has none (use dense, fastv, '
                         'pdrop, random or uniform)')
      m = make_sparsifier(name, self.mc, **overrides)
      m.drop_points(self.mc)              # validates layers against this model (raises ValueError)
      self._methods[key] = m
    return self._methods[key]

  @staticmethod
  def open_image(data_or_path):
    """`open_image` (module function)."""
    return open_image(data_or_path)

  def encode(self, turns, image=None, max_prompt_tokens=None):
    """turns: [(question, answer), ..., (question, None)] -> Prompt. image: a PIL image (or None)."""
    from dynllava_jax.data import images, templates  # pylint: disable=g-import-not-at-top
    from dynllava_jax.model.projector import num_visual_tokens  # pylint: disable=g-import-not-at-top
    if not turns or turns[-1][1] is not None:
      raise ValueError('the last turn must be a question without an answer')
    conv = []
    for q, a in turns:
      conv += [{'from': 'human', 'value': str(q).replace(IMAGE_TAG, ' ').strip()},
               {'from': 'gpt', 'value': '' if a is None else str(a)}]
    limit = int(max_prompt_tokens or self.mc.llm.max_position)
    try:
      ids, _ = templates.encode_prompt(self.tok, conv, image is not None,
                                       num_image_tokens=num_visual_tokens(self.mc),
                                       image_token_id=int(self.mc.image_token_id),
                                       bos_id=int(self.mc.bos_token_id), max_len=limit)
    except Exception as e:  # pylint: disable=broad-except  (SampleProblem: over_long)
      raise ValueError(f'prompt too long: {e} (limit {limit} tokens)') from None
    pix = None if image is None else images.preprocess(image, self.image_size)
    return Prompt(np.asarray(ids, np.int32), pix)

  # ------------------------------------------------------------ generation

  def run(self, prompts, **kw):
    """Generates for a batch of Prompts -> [Result] in order; keywords (method, overrides, max_new_tokens,
    temperature, top_p, seed, slots, on_text, on_token): `run_with_caches`."""
    return self.run_with_caches(prompts, **kw)[0]

  def run_with_caches(self, prompts, *, method=None, overrides=None, max_new_tokens=None, temperature=None,
                      top_p=None, seed=0, slots=None, on_text=None, on_token=None, past=None):
    """`run` -> ([Result], GenerateOutput) (its `caches`: the segment caches at the end, for a next turn).
    slots: pad the batch to this many rows (fixed shapes; None = len(prompts)). on_text(i, new_text):
    streamed text of prompt i as it is generated; on_token(step, tokens (B,), active (B,)) the raw stream.
    past: caches of an earlier call with the same rows and method: the prompts are then the next turn's
    text tokens, appended to them (`decode/extend.py`) instead of a prefill."""
    from dynllava_jax.data.pipeline import left_pad_batch  # pylint: disable=g-import-not-at-top
    from dynllava_jax.decode.generate import generate  # pylint: disable=g-import-not-at-top
    from dynllava_jax.decode.sampling import Sampling  # pylint: disable=g-import-not-at-top
    from dynllava_jax.eval.run import per_sample_kv_bytes  # pylint: disable=g-import-not-at-top
    n = len(prompts)
    rows = list(prompts) + [prompts[0]] * (max(int(slots or n), n) - n)
    ids, mask = left_pad_batch([p.ids for p in rows], int(self.mc.pad_token_id))
    pix = None
    if any(p.pixels is not None for p in rows):
      s = self.image_size
      pix = np.stack([p.pixels if p.pixels is not None else np.zeros((s, s, 3), np.float32) for p in rows])
    m = int(max_new_tokens or self.max_new_tokens)
    temp = self.temperature if temperature is None else float(temperature)
    samp = Sampling(temp, self.top_p if top_p is None else float(top_p))
    meth = self.method(method, overrides)
    stream = None
    if on_text is not None or on_token is not None:
      stream = _TextStream(self.tok, n, int(self.mc.eos_token_id), on_text, on_token)
    t0 = time.perf_counter()
    out = generate(self.model, self.config, meth, ids, pix, mask, max_new_tokens=m, sampling=samp,
                   rng=jax.random.PRNGKey(int(seed)), return_caches=True, on_token=stream, past=past)
    total = time.perf_counter() - t0
    decode_s = float(out.decode_s or 0.0)
    steps = int(np.max(out.lengths)) - 1
    ms_tok = decode_s * 1000.0 / steps if steps > 0 else float('nan')
    kv = per_sample_kv_bytes(out.caches)
    eos = int(self.mc.eos_token_id)
    results = []
    for b in range(n):
      gen = [int(t) for t in out.tokens[b, :out.lengths[b]]]
      stop = bool(gen) and gen[-1] == eos
      gen = gen[:-1] if stop else gen
      results.append(Result(self.tok.decode(gen), gen, 'stop' if stop else 'length', int(mask[b].sum()),
                            float(out.kept_image_ratio[b]), float(out.kept_text_ratio[b]), float(kv[b]),
                            max(total - decode_s, 0.0), ms_tok))
    return results, out


class _TextStream:
  """on_token adapter: steps put in order and de-duplicated (the loop's callback is unordered), then per
  prompt the decoded text so far; calls on_text(i, new_text) with each new piece (decoding the whole
  prefix each time, so multi-token characters and word spacing come out right)."""

  def __init__(self, tok, n, eos, on_text, on_token):
    self.tok, self.n, self.eos = tok, n, eos
    self.on_text, self.on_token = on_text, on_token
    self.ids = [[] for _ in range(n)]
    self.sent = [''] * n
    self.done = [False] * n
    self.next_step, self.pending = 0, {}
    self.lock = threading.Lock()

  def __call__(self, step, tokens, active):
    with self.lock:
      if step < self.next_step or step in self.pending:
        return
      self.pending[step] = (np.array(tokens), np.array(active))
      while self.next_step in self.pending:
        self._one(self.next_step, *self.pending.pop(self.next_step))
        self.next_step += 1

  def _one(self, step, tokens, active):
    if self.on_token is not None:
      self.on_token(step, tokens, active)
    if self.on_text is None:
      return
    for i in range(self.n):
      if self.done[i] or not active[i]:
        continue
      t = int(tokens[i])
      if t == self.eos:
        self.done[i] = True
        continue
      self.ids[i].append(t)
      text = self.tok.decode(self.ids[i])
      if text.startswith(self.sent[i]) and len(text) > len(self.sent[i]):
        self.on_text(i, text[len(self.sent[i]):])
        self.sent[i] = text


def open_image(data_or_path):
  """A PIL RGB image from bytes or a file path; UserError for a missing or undecodable image."""
  from dynllava_jax.data import images, policy  # pylint: disable=g-import-not-at-top
  try:
    if isinstance(data_or_path, (bytes, bytearray)):
      return images.decode_image(bytes(data_or_path))
    return images.decode_image(images.check_image_file(str(data_or_path), decode=False))
  except policy.SampleProblem as e:
    name = f'({len(data_or_path)} bytes)' if isinstance(data_or_path, (bytes, bytearray)) else data_or_path
    raise UserError(f'image {name}: {e}') from None


def stats_line(results, method_desc):
  """One line: kept image / text ratios, KV bytes, prefill time and ms/token (means over the batch)."""
  r = results
  kv = np.mean([x.kv_bytes for x in r])
  return (f'[{method_desc}] kept image {np.mean([x.kept_image_ratio for x in r]):.3f} '
          f'text {np.mean([x.kept_text_ratio for x in r]):.3f} | KV {kv / 1024:.1f} KiB/sample | '
          f'prefill {r[0].prefill_s * 1000:.1f} ms | {r[0].decode_ms_per_token:.2f} ms/token | '
          f'{sum(len(x.token_ids) for x in r)} tokens')
