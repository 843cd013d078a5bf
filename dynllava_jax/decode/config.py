"""Defaults of the `eval` config section (owned by inference / evaluation)."""
import ml_collections


def eval_defaults(size='tiny'):
  c = ml_collections.ConfigDict()
  c.max_new_tokens = 64 if size == 'tiny' else 512
  return c
