"""An OpenAI-compatible HTTP server (chat completions, streaming) for a trained or converted model.

    python serve.py --workdir runs/tiny [--step N] [--method dynamic] [--keep 0.25] [--port 8000]
    python serve.py --model export/tiny --slots 8 --max_tokens_limit 256
    curl http://127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What digit is top left?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}]}'

Binds 127.0.0.1 unless --host says otherwise. Concurrent requests are batched into the jitted decode
loop. SIGTERM / Ctrl-C: requests in flight are answered, queued ones refused, then exit 0. See
docs/serving.md. Bad input at start-up: one line on stderr, exit status 2.
"""
import logging
import sys

if __name__ == '__main__':
  logging.getLogger('absl').setLevel(logging.WARNING)
  from dynllava_jax.serve.cli import serve_main
  sys.exit(serve_main(sys.argv))
