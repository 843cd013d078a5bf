"""A multi-turn conversation that carries its (sparsified) KV caches over turns.

    chat = Chat(engine, image=engine.open_image('x.png'))
    r1 = chat.ask('What digit is top left?', on_text=print)    # a prefill of the first prompt
    r2 = chat.ask('And bottom right?')                          # extends the caches with turn 2's tokens

    chat = Chat(engine)                                         # no image yet
    chat.ask('Hello?'); chat.ask('What is this?', image=img)    # turn 2 brings the image (pruned on entry)

The conversation is held as token ids (not re-tokenized text); a turn after the first appends only the
tokens the caches do not hold yet with `generate(past=)` (`decode/extend.py`; earlier pruning stands,
and a turn may bring the conversation's one image). When the conversation would outgrow `max_position`
the chat says so through `report` and starts over with a fresh prefill of the image and this question.
What that means for a pruning method, and the tests: docs/serving.md, `--chat`.
"""
import numpy as np

from dynllava_jax.serve.engine import IMAGE_TAG


class Chat:
  """One conversation on an Engine (module docstring). method / overrides: its sparsification (default
  the engine's); seed: the sampling seed of every turn; report(line): where the fall-back is announced."""

  def __init__(self, eng, image=None, *, method=None, overrides=None, seed=0, report=None):
    self.eng, self.image = eng, image
    self.method, self.overrides, self.seed = method, overrides, seed
    self.report = report or (lambda line: None)
    self.turns = []             # (question, answer text)
    self.ids = []               # the conversation's token ids so far (through the last answer)
    self.caches = None          # segment caches holding self.ids minus the unfed last token
    self.image_ratio = 1.0
    self.mode = None            # how the last turn ran: 'prefill' | 'extend'

  def turn_suffix(self, question, with_image=False):
    """Token ids the template puts after an answer for the next question: `</s>USER: q ASSISTANT:`, with
    the image's placeholders (`<image>\\n` before q) when the turn brings the conversation's image (from
    the template itself: everything from the stop token that ends a placeholder first turn)."""
    from dynllava_jax.data import templates  # pylint: disable=g-import-not-at-top
    from dynllava_jax.model.projector import num_visual_tokens  # pylint: disable=g-import-not-at-top
    mc = self.eng.mc
    q = (IMAGE_TAG + '\n' + question) if with_image else question
    conv = [{'from': 'human', 'value': 'q'}, {'from': 'gpt', 'value': 'a'},
            {'from': 'human', 'value': q}, {'from': 'gpt', 'value': ''}]
    ids, _ = templates.encode_prompt(self.eng.tok, conv, False, num_image_tokens=num_visual_tokens(mc),
                                     image_token_id=int(mc.image_token_id), bos_id=int(mc.bos_token_id),
                                     max_len=int(mc.llm.max_position))
    ids = [int(t) for t in ids]
    return ids[ids.index(int(mc.eos_token_id)):]

  def ask(self, question, *, image=None, max_new_tokens=None, on_text=None):
    """Answers `question` given the conversation so far -> Result (kept_image_ratio: of the
    conversation's image). image: a PIL image this turn brings (a conversation holds one image: the
    Chat's own, or the first one a turn brings; ValueError for a second)."""
    question = str(question).replace(IMAGE_TAG, ' ').strip()
    eng = self.eng
    if image is not None and self.image is not None:
      raise ValueError('this conversation has its image already (one image per conversation): start a new '
                       'chat for another image')
    kw = dict(method=self.method, overrides=self.overrides, max_new_tokens=max_new_tokens, seed=self.seed,
              on_text=on_text)
    if self.caches is not None:
      eos = int(eng.mc.eos_token_id)
      last = self.ids[-1]
      chunk = ([] if last == eos else [eos]) + self.turn_suffix(question, image is not None)[1:]
      m = int(max_new_tokens or eng.max_new_tokens)
      room = int(eng.mc.llm.max_position) - (len(self.ids) - 1) - (len(chunk) + 1) - m
      if room >= 0:
        from dynllava_jax.data import images  # pylint: disable=g-import-not-at-top
        from dynllava_jax.serve.engine import Prompt  # pylint: disable=g-import-not-at-top
        pix = None if image is None else images.preprocess(image, eng.image_size)
        prompt = Prompt(np.asarray([last] + chunk, np.int32), pix)
        [r], out = eng.run_with_caches([prompt], past=self.caches, **kw)
        self._record(question, r, out, self.ids + chunk, 'extend')
        if image is not None:
          self.image, self.image_ratio = image, r.kept_image_ratio
        r.kept_image_ratio = self.image_ratio
        return r
      self.report(f'chat: the KV cache is full ({len(self.ids) - 1} conversation tokens + {len(chunk) + 1} '
                  f'new + max_new_tokens={m} > max_position={int(eng.mc.llm.max_position)}): starting over '
                  'with a fresh prefill of the image and this question')
      self.turns, self.ids, self.caches = [], [], None
    self.image = self.image if image is None else image
    if self.turns:      # an engine that returned no caches (eval.use_cache=False): the whole conversation
      prompt = eng.encode(self.turns + [(question, None)], self.image)
    else:
      prompt = eng.encode([(question, None)], self.image)
    [r], out = eng.run_with_caches([prompt], **kw)
    self.image_ratio = r.kept_image_ratio
    self._record(question, r, out, [int(t) for t in prompt.ids], 'prefill')
    return r

  def _record(self, question, r, out, ids, mode):
    n = int(out.lengths[0])
    self.ids = ids + [int(t) for t in out.tokens[0, :n]]
    self.caches = out.caches
    self.turns.append((question, r.text))
    self.mode = mode
