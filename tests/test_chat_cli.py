"""generate.py --chat carries the KV cache over turns (`serve/chat.py`): a text turn 1, then `/image PATH`
and turn 2, which extends the caches with the image and the question; with the dense method turn 2's
answer equals a fresh generation on the whole conversation's ids, and those ids are turn 1's prompt, its
tokens and the vicuna_v1 template's next turn (`<image>` before the question); a full cache falls back to
a fresh prefill and says so (one test: each step reuses the programs compiled by the ones before)."""
import io
import types

import numpy as np
import pytest

from dynllava_jax import source
from dynllava_jax.data import images
from dynllava_jax.serve.chat import Chat
from dynllava_jax.serve import cli
from dynllava_jax.serve.engine import Engine, Prompt, open_image
import use_utils

QUESTIONS = ('what digit is in the top left cell ?', 'how many digits are there ?')
MAX_NEW = 6
quiet = lambda i, s: None      # streamed, as the CLI: the same compiled loop


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  path, _ = use_utils.shared_workdir(tmp_path_factory)
  [img] = use_utils.write_images(tmp_path_factory.mktemp('chat_imgs'), n=1)
  eng = Engine(source.load_source(workdir=path, one_device=True, report=lambda _: None), method='dense')
  eng.max_new_tokens = MAX_NEW      # as generate.py --max_new_tokens
  return img, eng


def test_chat_extends_the_cache_equals_a_prefill_and_falls_back_when_full(setup, capsys):
  img, eng = setup
  out = io.StringIO()
  stdin = f'{QUESTIONS[0]}\n/image {img}\n{QUESTIONS[1]}\n/image {img}\n\n'
  # generate.py --chat's loop on this engine (its flags and loading: tests/test_use_generate.py)
  fv = types.SimpleNamespace(seed=0, stats=True)
  assert cli._chat(eng, None, out, io.StringIO(stdin), fv, 'dense') == 0
  lines = out.getvalue().splitlines()
  answers = [l.split('ASSISTANT: ', 1)[1] for l in lines if 'ASSISTANT: ' in l]
  stats = [l for l in lines if 'kept image' in l]
  assert len(answers) == 2 and len(stats) == 2
  assert 'turn=1 prefill' in stats[0] and 'turn=2 extend +' in stats[1], stats
  assert 'image attached' in out.getvalue() and 'has its image already' in out.getvalue()
  assert 'full' not in capsys.readouterr().err
  assert 'kept image 1.000' in stats[1]            # the dense method keeps the image that came in turn 2
  # the same conversation in-process: the same answers, turn 2 by extending the caches with the image
  image = open_image(img)
  chat = Chat(eng)
  r1 = chat.ask(QUESTIONS[0], max_new_tokens=MAX_NEW, on_text=quiet)
  r2 = chat.ask(QUESTIONS[1], image=image, max_new_tokens=MAX_NEW, on_text=quiet)
  assert chat.mode == 'extend' and [r1.text, r2.text] == answers and r2.kept_image_ratio == 1.0
  with pytest.raises(ValueError, match='image already'):
    chat.ask('q', image=image)
  # ≡ generating from scratch on the conversation's ids with the image
  n2 = len(r2.token_ids) + (r2.finish_reason == 'stop')
  conv = chat.ids[:len(chat.ids) - n2]
  pixels = images.preprocess(image, eng.image_size)
  [ref] = eng.run([Prompt(np.asarray(conv, np.int32), pixels)], max_new_tokens=MAX_NEW, on_text=quiet)
  assert ref.token_ids == r2.token_ids and ref.finish_reason == r2.finish_reason
  # the conversation's ids: turn 1's prompt, its tokens, `</s>USER: <image>\n<question 2> ASSISTANT:`
  one = eng.encode([(QUESTIONS[0], None)]).ids.tolist()
  assert conv[:len(one) + len(r1.token_ids)] == one + r1.token_ids
  tail = conv[len(one) + len(r1.token_ids):]
  mc = eng.mc
  assert tail[0] == mc.eos_token_id and tail.count(mc.image_token_id) == (mc.vision.image_size //
                                                                          mc.vision.patch_size) ** 2
  text = eng.tok.decode([t for t in tail if t != mc.image_token_id], skip_special_tokens=False)
  assert text.split() == ['</s>', 'USER', ':', *QUESTIONS[1].split(), 'ASSISTANT', ':'], text
  # a full cache (the next turn + its max_new_tokens past max_position): a fresh prefill of the image and
  # the question
  said = []
  chat.report = said.append
  lc = eng.mc.llm
  keep = lc.max_position
  lc.max_position = len(chat.ids) + 2
  try:
    r3 = chat.ask(QUESTIONS[1], max_new_tokens=MAX_NEW, on_text=quiet)
  finally:
    lc.max_position = keep
  assert chat.mode == 'prefill' and len(said) == 1 and 'KV cache is full' in said[0]
  assert chat.turns == [(QUESTIONS[1], r3.text)]
  [ref] = eng.run([eng.encode([(QUESTIONS[1], None)], image)], max_new_tokens=MAX_NEW, on_text=quiet)
  assert r3.token_ids == ref.token_ids
