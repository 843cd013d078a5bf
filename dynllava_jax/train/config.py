"""Defaults of the `train` config section (owned by the training loop)."""
import ml_collections


def train_defaults(size='tiny'):
  c = ml_collections.ConfigDict()
  c.steps = 200 if size == 'tiny' else 10000
  return c
