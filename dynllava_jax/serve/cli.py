"""Flags shared by generate.py and serve.py (a model source + the sparsification and sampling defaults),
parsed into their own `FlagValues` so both entry points can run in one process (tests), and the
generate command itself.

    python generate.py --workdir runs/x --image a.png --prompt "What digit is top left?"
    python generate.py --model export/x --image a.png --prompt "…" --image b.png --prompt "…"   # a batch
    python generate.py --workdir runs/x --image a.png --chat                                     # multi-turn

Model source: --workdir W [--step N] (its config.json; no --config needed) or --model DIR (an export,
a convert.py directory or an HF / released checkpoint). --config FILE replaces the run's config,
--config.a.b=v overrides one field. Method: --method NAME [--keep R] [--set k=v,...] (R: the fraction
of image tokens kept, `eval/budgets.py`; --set: the method's own keyword overrides).
"""
import ast
import os
import sys

from absl import flags
from ml_collections import config_flags

from dynllava_jax import errors

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(ROOT, 'configs', 'dynllava.py')


def define_model_flags(fv, argv):
  """The model-source, method and sampling flags on `fv` (argv: for the config file's overrides)."""
  try:
    config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'Config (default: the workdir\'s config.json).',
                                    flag_values=fv, lock_config=True, sys_argv=list(argv))
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    raise errors.UserError(errors._flag_message(e)) from None  # pylint: disable=protected-access
  flags.DEFINE_string('workdir', None, 'Training workdir (checkpoints/, config.json).', flag_values=fv)
  flags.DEFINE_integer('step', None, 'Checkpoint step of --workdir (default: the newest).', flag_values=fv)
  flags.DEFINE_string('model', None, 'An exported, convert.py or HF / released checkpoint directory.',
                      flag_values=fv)
  flags.DEFINE_string('tokenizer', None, 'tokenizer.json (default: the model\'s / the run\'s).', flag_values=fv)
  flags.DEFINE_string('method', None, 'Sparsification method (default: config eval.method).', flag_values=fv)
  flags.DEFINE_float('keep', None, 'Fraction of image tokens kept (the method\'s budget knob).', flag_values=fv)
  flags.DEFINE_string('set', '', 'The method\'s keyword overrides, k=v[,k=v] (e.g. k=2 for fastv).',
                      flag_values=fv)
  flags.DEFINE_integer('max_new_tokens', None, 'Generation budget (default: config eval.max_new_tokens).',
                       flag_values=fv)
  flags.DEFINE_float('temperature', None, '0 = greedy (default: config eval.temperature).', flag_values=fv)
  flags.DEFINE_float('top_p', None, 'Nucleus mass (default: config eval.top_p).', flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'Sampling seed.', flag_values=fv)
  flags.DEFINE_bool('one_device', False, 'Put the model on the first device (default: a workdir\'s params '
                    'are restored into its config\'s mesh).', flag_values=fv)


def parse(prog, argv, define):
  """A fresh FlagValues with the model flags + define(fv), parsed from argv (argv[0] = program)."""
  fv = flags.FlagValues()
  define_model_flags(fv, argv)
  define(fv)
  try:
    rest = fv(list(argv))
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    raise errors.UserError(errors._flag_message(e)) from None  # pylint: disable=protected-access
  if len(rest) > 1:
    raise errors.UserError(f'unexpected arguments: {rest[1:]}')
  return fv


def method_overrides(fv, method):
  """--keep and --set as the method's keyword overrides."""
  from dynllava_jax.eval.budgets import keep_overrides  # pylint: disable=g-import-not-at-top
  out = keep_overrides(method, fv.keep) if fv.keep is not None else {}
  out.update(parse_set(fv.set))
  return out


def parse_set(text):
  """'k=2,r=0.5' -> {'k': 2, 'r': 0.5} (Python literals; bare words stay strings)."""
  out = {}
  for item in [x for x in str(text or '').split(',') if x.strip()]:
    if '=' not in item:
      raise errors.UserError(f'--set {item!r}: expected key=value')
    k, v = item.split('=', 1)
    try:
      out[k.strip()] = ast.literal_eval(v.strip())
    except (ValueError, SyntaxError):
      out[k.strip()] = v.strip()
  return out


def check_method_name(name):
  """ValueError for a method name no module registers (cheap: before any model is loaded)."""
  from dynllava_jax.sparsity import registry  # pylint: disable=g-import-not-at-top
  if name and name not in registry.names():
    raise ValueError(f'unknown sparsification method {name!r}; known: {registry.names()}')


def load_engine(fv, report=print):
  """The Engine for the parsed flags (model source, config, method defaults)."""
  from dynllava_jax import source  # pylint: disable=g-import-not-at-top
  from dynllava_jax.serve.engine import Engine  # pylint: disable=g-import-not-at-top
  if bool(fv.workdir) == bool(fv.model):
    raise errors.UserError('give the model: --workdir W [--step N] or --model DIR (one of them)')
  config = source.resolve_config(fv, fv.workdir, fv.model)
  src = source.load_source(workdir=fv.workdir, step=fv.step, model_dir=fv.model, config=config,
                           tokenizer=fv.tokenizer, report=report, one_device=fv.one_device)
  if config is None:
    source.apply_config_flags(src.config, fv)
  ev = src.config.eval
  with ev.unlocked():
    if fv.max_new_tokens is not None:
      ev.max_new_tokens = int(fv.max_new_tokens)
    if fv.temperature is not None:
      ev.temperature = float(fv.temperature)
    if fv.top_p is not None:
      ev.top_p = float(fv.top_p)
  method = fv.method or str(ev.method)
  try:
    return Engine(src, method=method, overrides=method_overrides(fv, method))
  except ValueError as e:
    raise errors.UserError(' '.join(str(e).split())) from None


# ---------------------------------------------------------------- generate.py

def _define_generate(fv):
  flags.DEFINE_multi_string('image', [], 'Image file (one per --prompt, or one for all, or none).',
                            flag_values=fv)
  flags.DEFINE_multi_string('prompt', [], 'Question; several --prompt form a batch.', flag_values=fv)
  flags.DEFINE_bool('chat', False, 'Interactive multi-turn chat on stdin, the KV cache carried over turns (one '
                    'image: --image, or `/image PATH` before a question).',
                    flag_values=fv)
  flags.DEFINE_bool('stream', True, 'Print the answer as it is generated (a single prompt).', flag_values=fv)
  flags.DEFINE_bool('stats', True, 'Print the stats line after the answers.', flag_values=fv)
  flags.DEFINE_bool('warmup', False, 'Run the batch once before the timed run, so the stats line\'s prefill '
                    'and ms/token exclude compilation.', flag_values=fv)


def generate_main(argv, out=None, stdin=None):
  """generate.py: returns the exit status (2 with one line on stderr for bad input)."""
  out = out or sys.stdout
  try:
    return errors.guard('generate.py', lambda: _generate(argv, out, stdin or sys.stdin), extra=(ValueError,))
  except SystemExit as e:
    return e.code


def _generate(argv, out, stdin):
  fv = parse('generate.py', argv, _define_generate)
  if not fv.prompt and not fv.chat:
    raise errors.UserError('give --prompt "question" (several for a batch) or --chat')
  images = list(fv.image)
  if fv.chat:
    if len(images) > 1 or fv.prompt:
      raise errors.UserError('--chat takes at most one --image and no --prompt (type the questions)')
  elif len(images) not in (0, 1, len(fv.prompt)):
    raise errors.UserError(f'{len(images)} --image for {len(fv.prompt)} --prompt: give one image per '
                           'prompt, one for all, or none')
  from dynllava_jax.serve.engine import open_image  # pylint: disable=g-import-not-at-top
  pil = [open_image(p) for p in images]               # bad input first, before the (slow) load
  check_method_name(fv.method)
  eng = load_engine(fv, report=lambda m: print(m, file=sys.stderr, flush=True))
  desc = eng.method().describe() if hasattr(eng.method(), 'describe') else eng.method_name
  desc = _desc(desc)
  if fv.chat:
    return _chat(eng, pil[0] if pil else None, out, stdin, fv, desc)
  prompts = [eng.encode([(q, None)], pil[0] if len(pil) == 1 else (pil[i] if pil else None))
             for i, q in enumerate(fv.prompt)]
  single = len(prompts) == 1 and fv.stream
  if fv.warmup:
    eng.run(prompts, seed=fv.seed, on_text=(lambda i, piece: None) if single else None)
  on_text = (lambda i, piece: (out.write(piece), out.flush())) if single else None
  results = eng.run(prompts, seed=fv.seed, on_text=on_text)
  for i, r in enumerate(results):
    if single:
      out.write('\n')
    else:
      out.write(f'[{i}] {r.text}\n')
  if fv.stats:
    from dynllava_jax.serve.engine import stats_line  # pylint: disable=g-import-not-at-top
    out.write(stats_line(results, desc) + '\n')
  out.flush()
  return 0


def _chat(eng, image, out, stdin, fv, desc):
  """Multi-turn (`serve/chat.py`): the first question is prefilled, each later one appended to the
  conversation's KV caches (a fresh prefill only when they are full: said on stderr)."""
  from dynllava_jax.serve.chat import Chat  # pylint: disable=g-import-not-at-top
  from dynllava_jax.serve.engine import stats_line  # pylint: disable=g-import-not-at-top
  from dynllava_jax.serve.engine import open_image  # pylint: disable=g-import-not-at-top
  chat = Chat(eng, image, seed=fv.seed, report=lambda m: print(m, file=sys.stderr, flush=True))
  out.write('chat: type a question (`/image PATH` first attaches an image to the next one), an empty line '
            'or EOF ends\n')
  pending = None
  while True:
    out.write('USER: ')
    out.flush()
    line = stdin.readline()
    if not line or not line.strip():
      out.write('\n')
      return 0
    if line.startswith('/image '):
      try:
        if chat.image is not None:
          raise ValueError('this conversation has its image already (one image per conversation)')
        pending = open_image(line[len('/image '):].strip())
        out.write('(image attached to the next question)\n')
      except (ValueError, errors.UserError) as e:
        out.write(f'({e})\n')
      continue
    out.write('ASSISTANT: ')
    try:
      r = chat.ask(line.strip(), image=pending, on_text=lambda i, piece: (out.write(piece), out.flush()))
    except ValueError as e:
      out.write(f'({e})\n')
      continue
    pending = None
    out.write('\n')
    if fv.stats:
      how = 'prefill' if chat.mode == 'prefill' else f'extend +{r.prompt_tokens} tokens'
      out.write(stats_line([r], f'{desc} turn={len(chat.turns)} {how} conversation={len(chat.ids)}') + '\n')


def _desc(d):
  if isinstance(d, dict):
    return ' '.join(f'{k}={v}' for k, v in d.items())
  return str(d)


# ---------------------------------------------------------------- serve.py

def _define_serve(fv):
  flags.DEFINE_string('host', '127.0.0.1', 'Address to bind (127.0.0.1: this machine only).', flag_values=fv)
  flags.DEFINE_integer('port', 8000, 'Port.', flag_values=fv)
  flags.DEFINE_string('model_name', None, 'Model id in the API (default: the workdir / model dir name).',
                      flag_values=fv)
  flags.DEFINE_integer('slots', 8, 'Rows of every generation batch (requests batched together, padded).',
                       flag_values=fv)
  flags.DEFINE_float('batch_wait_ms', 10.0, 'How long the first request of a batch waits for others.',
                     flag_values=fv)
  flags.DEFINE_integer('max_queue', 64, 'Requests waiting beyond this get 429.', flag_values=fv)
  flags.DEFINE_integer('max_image_bytes', 10 * 2**20, 'Largest encoded image.', flag_values=fv)
  flags.DEFINE_integer('max_image_pixels', 4096 * 4096, 'Largest image (width x height).', flag_values=fv)
  flags.DEFINE_integer('max_tokens_limit', 512, 'Largest max_tokens a request may ask.', flag_values=fv)
  flags.DEFINE_integer('max_prompt_tokens', 0, 'Longest prompt (0: max_position less max_tokens).',
                       flag_values=fv)
  flags.DEFINE_bool('require_image', False, 'Refuse conversations without an image.', flag_values=fv)
  flags.DEFINE_string('image_root', '', 'Allow image_url local paths under this folder (default: off).',
                      flag_values=fv)
  flags.DEFINE_bool('warmup', True, 'Compile the batch programs before serving.', flag_values=fv)
  flags.DEFINE_float('graceful_s', 60.0, 'On SIGTERM: seconds to finish requests in flight.', flag_values=fv)


def serve_main(argv):
  """serve.py: runs until SIGTERM / SIGINT (exit 0); bad input: one line on stderr, exit 2."""
  try:
    return errors.guard('serve.py', lambda: _serve(argv), extra=(ValueError,))
  except SystemExit as e:
    return e.code


def _serve(argv):
  import uvicorn  # pylint: disable=g-import-not-at-top
  from dynllava_jax.serve.app import Limits, make_app  # pylint: disable=g-import-not-at-top
  fv = parse('serve.py', argv, _define_serve)
  check_method_name(fv.method)
  say = lambda m: print(m, file=sys.stderr, flush=True)
  eng = load_engine(fv, report=say)
  limits = Limits(max_image_bytes=fv.max_image_bytes, max_image_pixels=fv.max_image_pixels,
                  max_tokens=fv.max_tokens_limit, max_prompt_tokens=fv.max_prompt_tokens,
                  max_queue=fv.max_queue, require_image=fv.require_image, image_root=fv.image_root)
  name = fv.model_name or os.path.basename(os.path.normpath(fv.workdir or fv.model))
  if fv.warmup:
    warmup(eng, fv.slots, min(eng.max_new_tokens, fv.max_tokens_limit), say)
  app = make_app(eng, limits, model_name=name, slots=fv.slots, wait_s=fv.batch_wait_ms / 1000.0)
  say(f'serving {name!r} ({eng.method_name}) on http://{fv.host}:{fv.port}/v1 with {fv.slots} slots')
  config = uvicorn.Config(app, host=fv.host, port=fv.port, log_level='warning',
                          timeout_graceful_shutdown=fv.graceful_s)
  import signal  # pylint: disable=g-import-not-at-top
  # uvicorn handles SIGTERM / SIGINT (graceful shutdown), then re-raises the signal to the handler it
  # found: a Python no-op here, so a requested stop ends with exit status 0, not -15.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: None)
  uvicorn.Server(config).run()
  say('serve.py: stopped')
  return 0


def warmup(eng, slots, max_new, say):
  """Compiles the batch programs an image request runs (the streaming loop) with a grey image."""
  import time  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  p = eng.encode([('warm up', None)], Image.new('RGB', (eng.image_size, eng.image_size), (128, 128, 128)))
  eng.run([p], max_new_tokens=max_new, slots=slots, on_text=lambda i, s: None)
  say(f'warm-up (compiles) took {time.perf_counter() - t:.1f} s')
