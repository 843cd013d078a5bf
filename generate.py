"""Ask the model: streams the answer to the terminal, then one stats line.

    python generate.py --workdir runs/tiny --image x.png --prompt "What digit is top left?" \
        [--step N] [--method dynamic] [--keep 0.25] [--max_new_tokens 32] [--temperature 0.7]
    python generate.py --model export/tiny --image a.png --prompt "…" --image b.png --prompt "…"  # a batch
    python generate.py --workdir runs/tiny --image x.png --chat                                   # multi-turn

See docs/serving.md (and `dynllava_jax/serve/cli.py`). Bad input: one line on stderr, exit status 2.
"""
import logging
import sys

if __name__ == '__main__':
  logging.getLogger('absl').setLevel(logging.WARNING)
  from dynllava_jax.serve.cli import generate_main
  sys.exit(generate_main(sys.argv))
