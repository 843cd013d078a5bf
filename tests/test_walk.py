"""model/walk.py: the segments, the boundary calls and the h_prev split of the one walk (pure Python)."""
import pytest

from dynllava_jax.model.walk import walk


def _trace(n_layers, bounds, prev=()):
  calls = []

  def run(h, start, stop):
    calls.append(('run', start, stop))
    return h + list(range(start, stop))

  def at(p, h, h_prev):
    calls.append(('at', p, None if h_prev is None else tuple(h_prev)))
    return h + [f'b{p}']

  return walk([], n_layers, bounds, run, at, prev), calls


def test_segments_boundaries_and_prev_split():
  h, calls = _trace(6, (2, 4))
  assert h == [0, 1, 'b2', 2, 3, 'b4', 4, 5, 'b6']     # every layer once, in order; `at` after each segment
  assert calls == [('run', 0, 2), ('at', 2, None), ('run', 2, 4), ('at', 4, None), ('run', 4, 6),
                   ('at', 6, None)]
  h, calls = _trace(6, (3, 4), prev=(3, 4))             # 4: its segment is one layer, h_prev = its input
  assert h == [0, 1, 2, 'b3', 3, 'b4', 4, 5, 'b6']
  assert calls == [('run', 0, 2), ('run', 2, 3), ('at', 3, (0, 1)), ('run', 3, 4),
                   ('at', 4, (0, 1, 2, 'b3')), ('run', 4, 6), ('at', 6, None)]
  h, calls = _trace(3, (0,))                            # a hook at layer 0 reads the embeddings
  assert calls[:2] == [('run', 0, 0), ('at', 0, None)] and h == ['b0', 0, 1, 2, 'b3']
  with pytest.raises(ValueError, match='entering layer -1'):
    _trace(3, (0,), prev=(0,))
