"""serve.py over real HTTP on 127.0.0.1 (httpx): completions and streamed completions equal the CLI's
answers, 8 concurrent requests equal their single answers (and were batched), bad requests get a 4xx JSON
error while the server keeps serving, and SIGTERM with requests in flight ends cleanly (exit 0).
One server subprocess for the module (the tiny workdir of tests/use_utils.py)."""
import base64
import concurrent.futures as cf
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from dynllava_jax.serve.cli import generate_main
import use_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ('what digit is in the top left cell ?', 'how many digits are there ?',
             'what is the sum of the first row ?', 'what digit is in the center cell ?')
MAX_NEW = 8


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  path, _ = use_utils.shared_workdir(tmp_path_factory)
  imgs = use_utils.write_images(tmp_path_factory.mktemp('serve_imgs'), n=2)
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'serve.py'), '--workdir', path, '--port', str(port),
       '--max_new_tokens', str(MAX_NEW), '--max_tokens_limit', '64', '--max_image_bytes', '60000',
       '--max_queue', '32', '--model_name', 'tiny', '--nowarmup', '--require_image'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  url = f'http://127.0.0.1:{port}'
  deadline = time.time() + 600
  while True:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    try:
      if httpx.get(url + '/health', timeout=2).status_code == 200:
        break
    except httpx.TransportError:
      pass
    assert time.time() < deadline, 'server did not start'
    time.sleep(0.5)
  yield url, proc, path, imgs
  if proc.poll() is None:
    proc.kill()
    proc.wait()


def _data_url(path):
  with open(path, 'rb') as f:
    return 'data:image/png;base64,' + base64.b64encode(f.read()).decode()


def _body(question, image, **kw):
  content = [{'type': 'text', 'text': question}]
  if image is not None:
    content.append({'type': 'image_url', 'image_url': {'url': _data_url(image) if os.path.exists(image)
                                                       else image}})
  return {'model': 'tiny', 'messages': [{'role': 'user', 'content': content}], **kw}


def _ask(url, question, image, **kw):
  r = httpx.post(url + '/v1/chat/completions', json=_body(question, image, **kw), timeout=300)
  assert r.status_code == 200, r.text
  return r.json()['choices'][0]['message']['content']


def _ask_stream(url, question, image):
  pieces, done = [], False
  with httpx.stream('POST', url + '/v1/chat/completions', json=_body(question, image, stream=True),
                    timeout=300) as r:
    assert r.status_code == 200 and r.headers['content-type'].startswith('text/event-stream')
    for line in r.iter_lines():
      if not line.startswith('data: '):
        continue
      if line == 'data: [DONE]':
        done = True
        break
      chunk = json.loads(line[6:])
      pieces.append(chunk['choices'][0]['delta'].get('content', ''))
  assert done
  return ''.join(pieces), len([p for p in pieces if p])


def test_completion_and_stream_equal_cli(server):
  url, _, path, imgs = server
  out = io.StringIO()
  code = generate_main(['generate.py', '--workdir', path, '--one_device', '--max_new_tokens', str(MAX_NEW),
                        '--nostats', '--image', imgs[0], '--prompt', QUESTIONS[0], '--image', imgs[1],
                        '--prompt', QUESTIONS[1]], out=out)
  assert code == 0
  cli = [line.split('] ', 1)[1] for line in out.getvalue().splitlines()]
  assert cli[0] != cli[1]
  assert _ask(url, QUESTIONS[0], imgs[0]) == cli[0]
  text, n_pieces = _ask_stream(url, QUESTIONS[1], imgs[1])
  assert text == cli[1] and n_pieces > 1
  models = httpx.get(url + '/v1/models', timeout=10).json()
  assert [m['id'] for m in models['data']] == ['tiny']


def test_concurrent_requests_equal_single_answers(server):
  url, _, _, imgs = server
  cases = [(q, imgs[i % 2]) for i, q in enumerate(QUESTIONS * 2)]
  single = [_ask(url, q, im) for q, im in cases]
  assert len(set(single)) > 2
  before = httpx.get(url + '/health', timeout=10).json()['batches']
  with cf.ThreadPoolExecutor(8) as ex:
    together = list(ex.map(lambda c: _ask(url, *c), cases))
  after = httpx.get(url + '/health', timeout=10).json()['batches']
  assert together == single
  assert after - before < len(cases)              # some requests shared a batch


def test_bad_requests_get_4xx_json_and_server_keeps_serving(server):
  url, _, _, imgs = server
  post = lambda **kw: httpx.post(url + '/v1/chat/completions', timeout=60, **kw)
  big = 'data:image/png;base64,' + base64.b64encode(os.urandom(70000)).decode()
  cases = {
      'no image (required)': post(json=_body('q', None)),
      'malformed JSON': post(content=b'{"messages": [', headers={'content-type': 'application/json'}),
      'bad base64': post(json=_body('q', 'data:image/png;base64,%%%not base64')),
      'not an image': post(json=_body('q', 'data:image/png;base64,' + base64.b64encode(b'hello').decode())),
      'oversize image': post(json=_body('q', big)),
      'too many tokens': post(json=_body('q', imgs[0], max_tokens=10_000)),
      'unknown method': post(json=_body('q', imgs[0], sparsity={'method': 'nosuch'})),
      'unknown model': post(json={**_body('q', imgs[0]), 'model': 'gpt-9'}),
      'no messages': post(json={'model': 'tiny', 'messages': []}),
      'local path (off)': post(json=_body('q', '/etc/hostname')),
  }
  for what, r in cases.items():
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
    assert r.json()['error']['message'], what
  assert cases['oversize image'].status_code == 413 and cases['unknown model'].status_code == 404
  assert cases['no image (required)'].json()['error']['code'] == 'image_required'
  # Still serving (the per-request method field, here naming the server's default: no new compile).
  assert _ask(url, QUESTIONS[0], imgs[0], sparsity={'method': 'dynamic'})


def test_sigterm_with_requests_in_flight(server):
  url, proc, _, imgs = server
  with cf.ThreadPoolExecutor(16) as ex:
    futs = [ex.submit(httpx.post, url + '/v1/chat/completions', json=_body(q, imgs[i % 2]), timeout=120)
            for i, q in enumerate(QUESTIONS * 4)]
    deadline = time.time() + 60
    while time.time() < deadline:               # SIGTERM once requests are in the batcher
      h = httpx.get(url + '/health', timeout=10).json()
      if h['queued'] + h['running'] > 0:
        break
      time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    codes = []
    for f in futs:
      try:
        codes.append(f.result().status_code)
      except httpx.TransportError:
        codes.append('refused')
  assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]
  assert all(c in (200, 503, 'refused') for c in codes), codes
  assert 200 in codes                              # the ones in flight were answered
