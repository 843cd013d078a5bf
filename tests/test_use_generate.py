"""generate.py: its answer equals `generate()`'s for the same inputs (the ~20 lines of glue a user would
otherwise write), streamed or batched; the stats line; --chat; bad input is one line."""
import io

import jax
import numpy as np
import pytest

from dynllava_jax.data import digits_vqa, images, templates
from dynllava_jax.data.pipeline import left_pad_batch
from dynllava_jax.decode.generate import generate
from dynllava_jax.eval.run import load_model
from dynllava_jax.model.projector import num_visual_tokens
from dynllava_jax.serve.cli import generate_main
from dynllava_jax.source import to_one_device
import use_utils

QUESTIONS = ('what digit is in the top left cell ?', 'how many digits are there ?')
MAX_NEW = 8


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  path, cfg = use_utils.shared_workdir(tmp_path_factory)
  imgs = use_utils.write_images(tmp_path_factory.mktemp('imgs'), n=2)
  return path, cfg, imgs


def glue_answers(path, cfg, imgs, questions):
  """What generate.py saves a user from writing: load, tokenize, preprocess, pad, generate, decode."""
  model, _ = load_model(cfg, path, report_fn=lambda _: None)
  to_one_device(model)                          # as --one_device (the tests' 8 fake devices: one is faster)
  tok = digits_vqa.build_tokenizer(None, cfg.data.digits.describe_style)
  mc = cfg.model
  prompts, pix = [], []
  for q, img in zip(questions, imgs):
    conv = [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': ''}]
    ids, _ = templates.encode_prompt(tok, conv, True, num_image_tokens=num_visual_tokens(mc),
                                     image_token_id=mc.image_token_id, bos_id=mc.bos_token_id, max_len=512)
    prompts.append(ids)
    pix.append(images.preprocess(images.decode_image(open(img, 'rb').read()), mc.vision.image_size))
  ids, mask = left_pad_batch(prompts, mc.pad_token_id)
  out = generate(model, cfg, 'dynamic', ids, np.stack(pix), mask, max_new_tokens=MAX_NEW, sampling='greedy',
                 rng=jax.random.PRNGKey(0))
  texts = []
  for b in range(len(prompts)):
    gen = [int(t) for t in out.tokens[b, :out.lengths[b]] if int(t) != mc.eos_token_id]
    texts.append(tok.decode(gen))
  return texts


def _cli(*args, stdin=''):
  out = io.StringIO()
  code = generate_main(['generate.py', *args], out=out, stdin=io.StringIO(stdin))
  return code, out.getvalue()


def test_cli_answer_equals_generate(setup, tmp_path_factory):
  path, cfg, imgs = setup
  want = glue_answers(path, cfg, imgs, QUESTIONS)
  assert want[0] != want[1]                       # the model's answers depend on the input
  base = ['--workdir', path, '--max_new_tokens', str(MAX_NEW), '--one_device']
  # Two image/prompt pairs: one batch.
  code, text = _cli(*base, '--image', imgs[0], '--prompt', QUESTIONS[0], '--image', imgs[1], '--prompt',
                    QUESTIONS[1], '--nostats')
  assert code == 0 and text.splitlines() == [f'[0] {want[0]}', f'[1] {want[1]}']
  # The same on the workdir's HF export (`convert --export --workdir`: run_config.json, tokenizer.json).
  export = use_utils.shared_export(tmp_path_factory)
  code, text = _cli('--model', export, *base[2:], '--image', imgs[0], '--prompt', QUESTIONS[0], '--image',
                    imgs[1], '--prompt', QUESTIONS[1], '--nostats')
  assert code == 0 and text.splitlines() == [f'[0] {want[0]}', f'[1] {want[1]}']
  # Chat, streamed piece by piece into `out`: the first answer is the single prompt's, then a stats line.
  # (One turn: a second one is a longer prompt, i.e. another compile; its prompt is checked below.)
  code, text = _cli(*base, '--image', imgs[0], '--chat', stdin=f'{QUESTIONS[0]}\n\n')
  assert code == 0
  lines = text.splitlines()
  answers = [l.split('ASSISTANT: ', 1)[1] for l in lines if 'ASSISTANT: ' in l]
  assert answers == [want[0]]
  stats = [l for l in lines if 'kept image' in l]
  assert len(stats) == 1 and all(k in stats[0] for k in ('KV', 'ms/token', 'prefill'))


def test_chat_prompt_carries_the_conversation(setup):
  """Turn 2's prompt is the vicuna_v1 conversation with turn 1's question and answer in it."""
  path, cfg, imgs = setup
  from dynllava_jax import source
  from dynllava_jax.serve.engine import Engine, open_image
  eng = Engine(source.load_source(workdir=path, one_device=True, report=lambda _: None))
  img = open_image(imgs[0])
  one = eng.encode([(QUESTIONS[0], None)], img)
  two = eng.encode([(QUESTIONS[0], '6'), (QUESTIONS[1], None)], img)
  assert list(two.ids[:len(one.ids)]) == list(one.ids)          # turn 1's prompt is a prefix
  text = eng.tok.decode(two.ids[len(one.ids):], skip_special_tokens=False)
  assert text.split() == ['6', '</s>', 'USER', ':', *QUESTIONS[1].split(), 'ASSISTANT', ':']


def test_cli_bad_input_is_one_line(setup, capsys):
  path, _, imgs = setup
  assert _cli('--workdir', path, '--prompt', 'q', '--method', 'nosuch')[0] == 2
  assert 'unknown sparsification method' in capsys.readouterr().err
  assert _cli('--workdir', path, '--image', imgs[0], '--image', imgs[1], '--image', imgs[1],
              '--prompt', 'a', '--prompt', 'b')[0] == 2
  assert _cli('--workdir', path, '--image', '/nonexistent.png', '--prompt', 'q')[0] == 2
  err = capsys.readouterr().err
  assert err.count('generate.py:') == 2 and 'Traceback' not in err and '/nonexistent.png' in err
