"""The OpenAI-compatible HTTP API (FastAPI / Starlette) over an Engine and a Batcher.

    app = make_app(engine, Limits(), model_name='tiny')      # serve.py runs it with uvicorn

Routes (POST /v1/chat/completions with the extra field "sparsity": {"method", "keep", "overrides"},
GET /v1/models, GET /health {"status", "queued", "running", "batches"}) and the JSON errors
{"error": {"message", "type", "code"}} (400, 404, 413, 429, 503; 500 a failure inside generation):
docs/serving.md. System messages are ignored (the vicuna template has its own system text).
"""
import asyncio
import base64
import binascii
import dataclasses
import io
import json
import os
import time
import uuid

from dynllava_jax.errors import UserError
from dynllava_jax.serve import batcher as B
from dynllava_jax.serve.engine import open_image


@dataclasses.dataclass
class Limits:
  """Per-request bounds. max_tokens: largest max_tokens a request may ask (default: the config's
  eval.max_new_tokens is the default per request); max_prompt_tokens: 0 = the model's max_position less
  max_tokens; image_root: '' = local image paths refused."""
  max_image_bytes: int = 10 * 2**20
  max_image_pixels: int = 4096 * 4096
  max_tokens: int = 512
  max_prompt_tokens: int = 0
  max_queue: int = 64
  require_image: bool = False
  image_root: str = ''


class ApiError(Exception):
  def __init__(self, status, message, code='invalid_request_error'):
    super().__init__(message)
    self.status, self.message, self.code = status, message, code


def _error_body(status, message, code):
  kind = 'invalid_request_error' if status < 500 else 'server_error'
  return {'error': {'message': message, 'type': kind, 'code': code}}


# ---------------------------------------------------------------- request parsing

def _image_from_url(url, limits):
  """PIL image from a data URL or (with image_root) a local path; ApiError for anything else."""
  if not isinstance(url, str) or not url:
    raise ApiError(400, 'image_url.url must be a non-empty string')
  if url.startswith('data:'):
    head, _, data = url.partition(',')
    if ';base64' not in head:
      raise ApiError(400, 'image data URLs must be base64 (data:image/png;base64,...)')
    if len(data) > limits.max_image_bytes * 4 // 3 + 8:
      raise ApiError(413, f'image over max_image_bytes={limits.max_image_bytes}', 'image_too_large')
    try:
      raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
      raise ApiError(400, 'image data URL: invalid base64', 'bad_image') from None
  elif url.startswith(('http://', 'https://')):
    raise ApiError(400, 'remote image URLs are not fetched: send the image as a base64 data URL')
  else:
    if not limits.image_root:
      raise ApiError(400, 'local image paths are off on this server (start serve.py with --image_root DIR) '
                     '— send a base64 data URL')
    path = url[len('file://'):] if url.startswith('file://') else url
    root = os.path.realpath(limits.image_root)
    full = os.path.realpath(os.path.join(root, path))
    if not full.startswith(root + os.sep):
      raise ApiError(400, f'image path {path!r} is outside --image_root')
    if not os.path.isfile(full):
      raise ApiError(400, f'image {path!r} not found under --image_root')
    if os.path.getsize(full) > limits.max_image_bytes:
      raise ApiError(413, f'image over max_image_bytes={limits.max_image_bytes}', 'image_too_large')
    with open(full, 'rb') as f:
      raw = f.read()
  if len(raw) > limits.max_image_bytes:
    raise ApiError(413, f'image over max_image_bytes={limits.max_image_bytes}', 'image_too_large')
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    w, h = Image.open(io.BytesIO(raw)).size          # the header only: bound before decoding
  except Exception:  # pylint: disable=broad-except
    raise ApiError(400, 'the image does not decode (PNG, JPEG, ... expected)', 'bad_image') from None
  if w * h > limits.max_image_pixels:
    raise ApiError(413, f'image of {w}x{h} pixels over max_image_pixels={limits.max_image_pixels}',
                   'image_too_large')
  try:
    return open_image(raw)
  except UserError as e:
    raise ApiError(400, str(e), 'bad_image') from None


def parse_messages(messages, limits):
  """OpenAI messages -> (turns [(question, answer)... (question, None)], PIL image or None)."""
  if not isinstance(messages, list) or not messages:
    raise ApiError(400, 'messages must be a non-empty list')
  image, turns, pending = None, [], None
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get('role') not in ('system', 'user', 'assistant', 'developer'):
      raise ApiError(400, f'messages[{i}]: expected an object with role system | user | assistant')
    role, content = m['role'], m.get('content')
    texts = []
    if isinstance(content, str):
      texts.append(content)
    elif isinstance(content, list):
      for j, part in enumerate(content):
        kind = part.get('type') if isinstance(part, dict) else None
        if kind == 'text':
          texts.append(str(part.get('text', '')))
        elif kind == 'image_url':
          if role != 'user':
            raise ApiError(400, f'messages[{i}]: images belong in user messages')
          if image is not None:
            raise ApiError(400, 'this model takes one image per conversation')
          iu = part.get('image_url')
          image = _image_from_url(iu.get('url') if isinstance(iu, dict) else iu, limits)
        else:
          raise ApiError(400, f'messages[{i}].content[{j}]: type must be text or image_url')
    elif content is not None:
      raise ApiError(400, f'messages[{i}].content must be a string or a list of parts')
    text = '\n'.join(t for t in texts if t)
    if role in ('system', 'developer'):
      continue
    if role == 'user':
      if pending is not None:                   # two user messages in a row: one question
        pending += '\n' + text
      else:
        pending = text
    else:
      if pending is None:
        raise ApiError(400, f'messages[{i}]: an assistant message must follow a user message')
      turns.append((pending, text))
      pending = None
  if pending is None:
    raise ApiError(400, 'the last message must be a user message')
  turns.append((pending, None))
  if limits.require_image and image is None:
    raise ApiError(400, 'this server needs an image in the conversation (an image_url part)', 'image_required')
  return turns, image


def _number(body, key, kind, lo, hi, default):
  v = body.get(key, default)
  if v is None:
    return default
  if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v):
    raise ApiError(400, f'{key} must be {"an integer" if kind is int else "a number"}')
  v = kind(v)
  if not lo <= v <= hi:
    raise ApiError(400, f'{key}={v} must be in [{lo}, {hi}]')
  return v


# ---------------------------------------------------------------- the app

def make_app(engine, limits=None, model_name='dynllava', slots=8, wait_s=0.01, graceful=None):
  """The FastAPI app; its lifespan starts the Batcher and closes it on shutdown."""
  from contextlib import asynccontextmanager  # pylint: disable=g-import-not-at-top
  from fastapi import FastAPI, Request  # pylint: disable=g-import-not-at-top
  from fastapi.responses import JSONResponse, StreamingResponse  # pylint: disable=g-import-not-at-top
  from starlette.exceptions import HTTPException  # pylint: disable=g-import-not-at-top
  limits = limits or Limits()
  max_pos = int(engine.mc.llm.max_position)
  state = {}

  @asynccontextmanager
  async def lifespan(_):
    state['batcher'] = B.Batcher(engine, slots=slots, wait_s=wait_s, max_queue=limits.max_queue)
    yield
    await asyncio.get_running_loop().run_in_executor(None, state['batcher'].close, 60)

  app = FastAPI(title='dynllava_jax', lifespan=lifespan)

  @app.exception_handler(ApiError)
  async def _api_error(_, e):
    return JSONResponse(_error_body(e.status, e.message, e.code), status_code=e.status)

  @app.exception_handler(HTTPException)
  async def _http_error(_, e):
    return JSONResponse(_error_body(e.status_code, str(e.detail), 'not_found' if e.status_code == 404
                                    else 'http_error'), status_code=e.status_code)

  @app.get('/health')
  async def health():
    b = state['batcher']
    return {'status': 'ok', 'queued': b.queued(), 'running': b.running, 'batches': b.batches}

  @app.get('/v1/models')
  async def models():
    return {'object': 'list', 'data': [{'id': model_name, 'object': 'model', 'created': 0,
                                        'owned_by': 'dynllava_jax'}]}

  @app.post('/v1/chat/completions')
  async def chat(request: Request):
    raw = await request.body()
    if len(raw) > limits.max_image_bytes * 4 // 3 + 2**20:
      raise ApiError(413, 'request body too large', 'request_too_large')
    try:
      body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise ApiError(400, 'the request body is not valid JSON', 'malformed_json') from None
    if not isinstance(body, dict):
      raise ApiError(400, 'the request body must be a JSON object')
    if body.get('model') not in (None, model_name):
      raise ApiError(404, f'model {body.get("model")!r} not found; this server has {model_name!r}',
                     'model_not_found')
    if body.get('n', 1) != 1:
      raise ApiError(400, 'n must be 1')
    max_new = _number(body, 'max_completion_tokens', int, 1, limits.max_tokens, None)
    max_new = _number(body, 'max_tokens', int, 1, limits.max_tokens, max_new)
    max_new = int(max_new or min(engine.max_new_tokens, limits.max_tokens))
    temperature = _number(body, 'temperature', float, 0.0, 100.0, engine.temperature)
    top_p = _number(body, 'top_p', float, 1e-6, 1.0, engine.top_p)
    seed = _number(body, 'seed', int, 0, 2**31 - 1, 0)
    method, overrides = _sparsity(body.get('sparsity'), engine)
    turns, image = parse_messages(body.get('messages'), limits)
    limit = limits.max_prompt_tokens or (max_pos - max_new)
    try:
      prompt = engine.encode(turns, image, max_prompt_tokens=limit)
    except ValueError as e:
      raise ApiError(400, str(e), 'prompt_too_long') from None
    if len(prompt.ids) + max_new > max_pos:
      raise ApiError(400, f'prompt of {len(prompt.ids)} tokens + max_tokens={max_new} exceeds the model\'s '
                     f'{max_pos} positions', 'prompt_too_long')
    params = B.Params(method, tuple(sorted(overrides.items())), max_new, temperature, top_p, seed)
    created, rid = int(time.time()), f'chatcmpl-{uuid.uuid4().hex[:24]}'
    loop = asyncio.get_running_loop()
    if body.get('stream'):
      q = asyncio.Queue()
      job = _submit(state['batcher'], prompt, params, lambda piece: loop.call_soon_threadsafe(q.put_nowait, piece))
      job.on_done(lambda j: loop.call_soon_threadsafe(q.put_nowait, None))
      return StreamingResponse(_stream(job, q, rid, created, model_name), media_type='text/event-stream')
    fut = loop.create_future()
    job = _submit(state['batcher'], prompt, params, None)
    job.on_done(lambda j: loop.call_soon_threadsafe(_resolve, fut, j))
    await fut
    if job.error is not None:
      raise ApiError(500, f'generation failed: {type(job.error).__name__}: {job.error}', 'generation_failed')
    r = job.result
    return {'id': rid, 'object': 'chat.completion', 'created': created, 'model': model_name,
            'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': r.text},
                         'finish_reason': r.finish_reason}],
            'usage': _usage(r), 'dynllava': _extra(r, method, overrides)}

  return app


def _resolve(fut, job):
  if not fut.done():
    fut.set_result(job)


def _submit(b, prompt, params, on_text):
  try:
    return b.submit(prompt, params, on_text)
  except B.QueueFull as e:
    raise ApiError(429, str(e), 'queue_full') from None
  except B.Closed as e:
    raise ApiError(503, str(e), 'shutting_down') from None


def _sparsity(spec, engine):
  """The request's {"method", "keep", "overrides"} -> (method, overrides), validated (ApiError 400)."""
  from dynllava_jax.eval.budgets import keep_overrides  # pylint: disable=g-import-not-at-top
  if spec is None:
    return engine.method_name, dict(engine.overrides)
  if not isinstance(spec, dict) or set(spec) - {'method', 'keep', 'overrides'}:
    raise ApiError(400, 'sparsity must be an object with method, keep, overrides')
  method = spec.get('method') or engine.method_name
  overrides = {} if 'method' in spec else dict(engine.overrides)
  try:
    if spec.get('keep') is not None:
      overrides.update(keep_overrides(method, spec['keep']))
    extra = spec.get('overrides') or {}
    if not isinstance(extra, dict):
      raise ValueError('sparsity.overrides must be an object')
    overrides.update({k: tuple(v) if isinstance(v, list) else v for k, v in extra.items()})
    engine.method(method, overrides)
  except (ValueError, TypeError) as e:
    raise ApiError(400, f'sparsity: {" ".join(str(e).split())}', 'bad_method') from None
  return method, overrides


def _usage(r):
  n = len(r.token_ids) + (1 if r.finish_reason == 'stop' else 0)
  return {'prompt_tokens': r.prompt_tokens, 'completion_tokens': n, 'total_tokens': r.prompt_tokens + n}


def _extra(r, method, overrides):
  return {'method': method, 'overrides': {k: v for k, v in overrides.items()},
          'kept_image_ratio': r.kept_image_ratio, 'kept_text_ratio': r.kept_text_ratio, 'kv_bytes': r.kv_bytes}


async def _stream(job, q, rid, created, model_name):
  """Server-sent events: a role chunk, content chunks as generated, a finish chunk, [DONE]."""
  head = {'id': rid, 'object': 'chat.completion.chunk', 'created': created, 'model': model_name}

  def chunk(delta, finish=None, **extra):
    return 'data: ' + json.dumps({**head, 'choices': [{'index': 0, 'delta': delta, 'finish_reason': finish}],
                                  **extra}) + '\n\n'

  yield chunk({'role': 'assistant', 'content': ''})
  while True:
    piece = await q.get()
    if piece is None:
      break
    yield chunk({'content': piece})
  if job.error is not None:
    yield 'data: ' + json.dumps(_error_body(500, f'generation failed: {job.error}', 'generation_failed')) + '\n\n'
    return
  r, p = job.result, job.params
  yield chunk({}, r.finish_reason, usage=_usage(r), dynllava=_extra(r, p.method, dict(p.overrides)))
  yield 'data: [DONE]\n\n'
