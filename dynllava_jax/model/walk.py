"""The one walk over the decoder's layers split at a method's boundaries (docs/architecture.md).

The engine's prefill (`decode/prefill.py`), teacher forcing (`eval/teacher.py`), the training forward
(`train/forward.py`) and the next-turn append (`decode/extend.py`) all run layers [0, L) as segments
between boundaries (drop points, the text layer, training hooks' layers, MoD layers) and act at each
boundary; they differ only in the strategy: 'drop by gather' (the engine: a segment runs on the packed
kept tokens, a boundary gathers the kept ones) or 'mask keys' (`KeyMask`: every token stays, a boundary
narrows the keys later layers attend to).
"""


def walk(h, n_layers, bounds, run, at, prev=()):
  """h (B, T, H) through layers [0, n_layers) -> the last segment's output (after its `at`).

  bounds: sorted layer indices in [0, n_layers), each the first layer of a segment.
  run(h, start, stop) -> h: layers [start, stop).
  at(p, h, h_prev) -> h: after the segment ending at p (p = n_layers after the last one); the returned h
  is what the next segment starts from.
  prev: boundaries whose `at` reads h_prev, the hidden state entering layer p − 1 (the segment then runs
  as [start, p − 1) and [p − 1, p)); elsewhere h_prev is None.
  """
  start = 0
  for stop in tuple(bounds) + (n_layers,):
    h_prev = None
    if stop in prev and stop < n_layers:
      if stop < 1:
        raise ValueError(f'boundary {stop} needs the hidden state entering layer {stop - 1}')
      h_prev = run(h, start, stop - 1) if stop - 1 > start else h
      h = run(h_prev, stop - 1, stop)
    else:
      h = run(h, start, stop)
    h = at(stop, h, h_prev)
    start = stop
  return h


class KeyMask:
  """'Mask keys' for `walk` (training, teacher forcing): shapes stay static; `run` runs the layers over
  every token with `keep` (B, T) float as the key-column mask (None: dense, in `mode`; set: in
  `masked_mode` — training's MaskedSoftmax, teacher forcing's 'exact_zero', which equals removing the
  masked tokens). The caller's `at` sets `keep` (and `positions` (B, T), when a method renumbers)."""

  def __init__(self, lm, positions, allowed, mode, masked_mode=None, **kw):
    self.lm, self.positions, self.allowed, self.kw = lm, positions, allowed, kw
    self.mode, self.masked_mode = mode, mode if masked_mode is None else masked_mode
    self.keep = None

  def run(self, h, start, stop):
    return self.lm.run_layers(h, self.positions, self.allowed, start=start, stop=stop, key_keep=self.keep,
                              mode=self.mode if self.keep is None else self.masked_mode, **self.kw)
