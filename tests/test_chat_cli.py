"""generate.py --chat carries the KV cache over turns (`serve/chat.py`): turn 2 extends the caches, and
with the dense method its answer equals a fresh generation on the whole conversation's prompt (the
vicuna_v1 template's ids); a full cache falls back to a fresh prefill and says so (one test: every
step reuses the compiled programs of the one before)."""
import io

import numpy as np
import pytest

from dynllava_jax import source
from dynllava_jax.serve.chat import Chat
from dynllava_jax.serve.cli import generate_main
from dynllava_jax.serve.engine import Engine, Prompt, open_image
import use_utils

QUESTIONS = ('what digit is in the top left cell ?', 'how many digits are there ?')
MAX_NEW = 6
quiet = lambda i, s: None      # streamed: the CLI's compiled loop is reused


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  path, _ = use_utils.shared_workdir(tmp_path_factory)
  [img] = use_utils.write_images(tmp_path_factory.mktemp('chat_imgs'), n=1)
  eng = Engine(source.load_source(workdir=path, one_device=True, report=lambda _: None), method='dense')
  return path, img, eng


def test_chat_extends_the_cache_equals_a_prefill_and_falls_back_when_full(setup, capsys):
  path, img, eng = setup
  out = io.StringIO()
  code = generate_main(['generate.py', '--workdir', path, '--one_device', '--method', 'dense', '--max_new_tokens',
                        str(MAX_NEW), '--image', img, '--chat'], out=out, stdin=io.StringIO('\n'.join(QUESTIONS) + '\n\n'))
  assert code == 0
  lines = out.getvalue().splitlines()
  answers = [l.split('ASSISTANT: ', 1)[1] for l in lines if 'ASSISTANT: ' in l]
  stats = [l for l in lines if 'kept image' in l]
  assert len(answers) == 2 and len(stats) == 2
  assert 'turn=1 prefill' in stats[0] and 'turn=2 extend +' in stats[1], stats
  assert 'full' not in capsys.readouterr().err
  # the same conversation in-process: the same answers, turn 2 by extending the caches
  image = open_image(img)
  chat = Chat(eng, image)
  r1 = chat.ask(QUESTIONS[0], max_new_tokens=MAX_NEW, on_text=quiet)
  r2 = chat.ask(QUESTIONS[1], max_new_tokens=MAX_NEW, on_text=quiet)
  assert chat.mode == 'extend' and [r1.text, r2.text] == answers
  # ≡ generating from scratch on the conversation's ids: turn 1's prompt and tokens, then the template
  n2 = len(r2.token_ids) + (r2.finish_reason == 'stop')
  conv = chat.ids[:len(chat.ids) - n2]
  [ref] = eng.run([Prompt(np.asarray(conv, np.int32), eng.encode([('q', None)], image).pixels)],
                  max_new_tokens=MAX_NEW, on_text=quiet)
  assert ref.token_ids == r2.token_ids and ref.finish_reason == r2.finish_reason
  # the conversation's ids: turn 1's prompt, its answer's tokens, the template's `</s>USER: … ASSISTANT:`
  eos = int(eng.mc.eos_token_id)
  want = eng.encode([(QUESTIONS[0], 'x'), (QUESTIONS[1], None)], image).ids.tolist()
  tail = want[want.index(eos):]
  assert eng.tok.decode(tail, skip_special_tokens=False).split() == ['</s>', 'USER', ':', *QUESTIONS[1].split(),
                                                                     'ASSISTANT', ':']
  assert conv == eng.encode([(QUESTIONS[0], None)], image).ids.tolist() + r1.token_ids + tail
  # a full cache (the next turn + its max_new_tokens past max_position): a fresh prefill of the question
  said = []
  chat.report = said.append
  lc = eng.mc.llm
  keep = lc.max_position
  lc.max_position = len(chat.ids) + 2
  try:
    r3 = chat.ask(QUESTIONS[0], max_new_tokens=MAX_NEW, on_text=quiet)
  finally:
    lc.max_position = keep
  assert chat.mode == 'prefill' and len(said) == 1 and 'KV cache is full' in said[0]
  assert chat.turns == [(QUESTIONS[0], r1.text)] and r3.token_ids == r1.token_ids
