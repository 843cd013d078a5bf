"""Server throughput: N requests one at a time vs from C concurrent clients, over real HTTP on 127.0.0.1.

    python benchmarks/serve_throughput.py --size tiny [--requests 32] [--clients 8] [--max_tokens 16]
    python benchmarks/serve_throughput.py --model export/x         # an existing export instead

Without --model it writes a random-init model of the preset `--size` (configs/dynllava.py) as an HF
export (weights, run_config.json, tokenizer.json) into a temporary directory and serves that. Starts
serve.py as a subprocess, waits for it, sends the requests (each a different question / image, greedy),
first sequentially, then from `--clients` threads, `--repeats` times (alternating), checks every
concurrent answer equals its sequential one, prints a markdown table (the median over the repeats of
wall time and requests/s; p50 / p95 latency over every request of the mode; the speed-up as the ratio
of the medians, and each repeat's) and the machine's load average, and stops the server with SIGTERM.
--json writes the figures.
"""
import argparse
import base64
import concurrent.futures as cf
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QUESTIONS = ('what digit is in the top left cell ?', 'how many digits are there ?',
             'what is the sum of the first row ?', 'what digit is in the center cell ?')


def random_export(size, out):
  """A random-init model of preset `size` exported with its run config and tokenizer; returns out."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from configs.dynllava import get_config  # pylint: disable=g-import-not-at-top
  from dynllava_jax import hf, source  # pylint: disable=g-import-not-at-top
  from dynllava_jax.data import digits_vqa  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.llava import Llava  # pylint: disable=g-import-not-at-top
  cfg = get_config(f'size={size}')
  tok = digits_vqa.build_tokenizer(None, cfg.data.digits.describe_style)
  mc = cfg.model     # the served tokenizer is the digits one: its special ids for any size (random weights)
  mc.image_token_id, mc.pad_token_id, mc.bos_token_id, mc.eos_token_id = (
      tok.token_to_id(t) for t in ('<image>', '<pad>', '<s>', '</s>'))
  model = nnx.jit(lambda: Llava(cfg.model, rngs=nnx.Rngs(0)))()
  jax.block_until_ready(nnx.state(model))
  hf.save_llava(model, cfg.model, out, layout='hf5')
  source.write_atomic(os.path.join(out, source.EXPORTED_RUN_CONFIG), source.config_to_json(cfg))
  digits_vqa.build_tokenizer(os.path.join(out, source.TOKENIZER), cfg.data.digits.describe_style)
  return out


def _png(seed, size=64):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(buf, format='PNG')
  return 'data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode()


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size', default='tiny')
  ap.add_argument('--model', default=None)
  ap.add_argument('--requests', type=int, default=32)
  ap.add_argument('--clients', type=int, default=8)
  ap.add_argument('--max_tokens', type=int, default=16)
  ap.add_argument('--slots', type=int, default=8)
  ap.add_argument('--repeats', type=int, default=3, help='Sequential + concurrent rounds (medians reported).')
  ap.add_argument('--json', default=None)
  a = ap.parse_args()
  import httpx  # pylint: disable=g-import-not-at-top
  tmp = tempfile.mkdtemp(prefix='serve_bench_')
  model = a.model or random_export(a.size, os.path.join(tmp, a.size))
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'serve.py'), '--model', model, '--port', str(port),
                           '--max_new_tokens', str(a.max_tokens), '--slots', str(a.slots), '--model_name', 'm',
                           '--max_queue', str(a.requests * 2)], cwd=ROOT, env=env)
  url = f'http://127.0.0.1:{port}'
  try:
    t0 = time.time()
    while True:
      if proc.poll() is not None:
        raise SystemExit('serve.py exited during start-up')
      try:
        if httpx.get(url + '/health', timeout=2).status_code == 200:
          break
      except httpx.TransportError:
        time.sleep(0.5)
    print(f'server up in {time.time() - t0:.1f} s (start-up + warm-up compile)', flush=True)
    images = [_png(i) for i in range(4)]
    bodies = [{'model': 'm', 'max_tokens': a.max_tokens, 'messages': [{'role': 'user', 'content': [
        {'type': 'text', 'text': QUESTIONS[i % 4]}, {'type': 'image_url', 'image_url': {'url': images[i // 4 % 4]}}]}]}
              for i in range(a.requests)]
    client = httpx.Client(timeout=600)

    def ask(body):
      t = time.perf_counter()
      r = client.post(url + '/v1/chat/completions', json=body)
      r.raise_for_status()
      return r.json()['choices'][0]['message']['content'], time.perf_counter() - t

    ask(bodies[0])                                  # any compile the warm-up missed
    load0 = os.getloadavg()
    runs = {'seq': [], 'conc': []}
    for _ in range(max(1, a.repeats)):
      t = time.perf_counter()
      seq = [ask(b) for b in bodies]
      runs['seq'].append((seq, time.perf_counter() - t))
      t = time.perf_counter()
      with cf.ThreadPoolExecutor(a.clients) as ex:
        conc = list(ex.map(ask, bodies))
      runs['conc'].append((conc, time.perf_counter() - t))
    load1 = os.getloadavg()
    first = [x[0] for x in runs['seq'][0][0]]
    checked = [res for key in ('seq', 'conc') for res, _ in runs[key]]
    same = sum(all(res[i][0] == first[i] for res in checked) for i in range(len(first)))
    rows = []
    for key, name in (('seq', 'one at a time'), ('conc', f'{a.clients} concurrent clients')):
      walls = [w for _, w in runs[key]]
      lat = np.array([x[1] for res, _ in runs[key] for x in res]) * 1000
      rows.append(dict(mode=name, requests=a.requests, repeats=len(walls), wall_s=float(np.median(walls)),
                       requests_per_s=float(np.median([a.requests / w for w in walls])),
                       p50_ms=float(np.percentile(lat, 50)), p95_ms=float(np.percentile(lat, 95)),
                       walls=walls))
    speedup = rows[1]['requests_per_s'] / rows[0]['requests_per_s']
    each = [s_ / c_ for s_, c_ in zip(rows[0]['walls'], rows[1]['walls'])]
    print(f'\nserve.py --model {a.model or a.size + " (random init)"} --slots {a.slots}, max_tokens {a.max_tokens}, '
          f'{a.requests} requests x {len(each)} repeats; load average before {load0[0]:.2f}, after {load1[0]:.2f} '
          f'({os.cpu_count()} CPUs)\n')
    print('| mode | requests | wall s (median) | requests/s (median) | p50 ms | p95 ms |\n|---|---|---|---|---|---|')
    for r in rows:
      print(f'| {r["mode"]} | {r["requests"]} | {r["wall_s"]:.2f} | {r["requests_per_s"]:.2f} | '
            f'{r["p50_ms"]:.0f} | {r["p95_ms"]:.0f} |')
    print(f'\nspeed-up {speedup:.2f}x (ratio of the medians; per repeat: '
          f'{", ".join(f"{x:.2f}x" for x in each)}); answers identical in every round and mode: '
          f'{same}/{len(first)}')
    if a.json:
      with open(a.json, 'w') as f:
        json.dump(dict(rows=rows, speedup=speedup, per_repeat=each, identical=same, load=[load0, load1],
                       size=a.size), f, indent=1)
    return 0 if same == len(first) else 1
  finally:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


if __name__ == '__main__':
  sys.exit(main())
