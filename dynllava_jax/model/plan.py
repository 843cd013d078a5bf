"""The decoder's layer plan: each layer's kind and trainability, grouped into runs of equal layers.

`model.layer_plan` is a string of comma-separated entries `kind[*count][:train]`, e.g.
    ''                                   every layer `dense`, trained (today's LLaVA decoder)
    'dense*2,dense_alt,dense'            4 layers, the third of another kind (three groups)
    'dense:frozen,dense*3'               the first layer frozen (no gradient, no optimizer state)
kind: a registered layer kind (`llama.LAYER_KINDS`: `dense`, `dense_alt`); train: `full` (default),
`frozen` or `lora<r>` (a placeholder: parsed, refused until LoRA exists). The counts must add up to
`llm.layers`. Consecutive layers with equal (kind, train) form one group: one stacked module, one scan;
group g's parameters live under `language_model.layers` (the group starting at layer 0) or
`language_model.layers_<start>`, so a uniform plan keeps today's parameter paths.
"""
import dataclasses
import re
from typing import Tuple


@dataclasses.dataclass(frozen=True)
class Group:
  """Layers [start, stop) of one kind and trainability."""
  kind: str
  train: str
  start: int
  stop: int

  @property
  def attr(self):
    """Attribute of `Llama` holding this group's stacked layers."""
    return 'layers' if self.start == 0 else f'layers_{self.start}'

  @property
  def size(self):
    return self.stop - self.start


_ENTRY = re.compile(r'^([a-z_][a-z0-9_]*)(?:\*(\d+))?(?::(full|frozen|lora\d+))?$')


def parse_plan(spec, n_layers, kinds=None) -> Tuple[Group, ...]:
  """`model.layer_plan` -> groups covering [0, n_layers). Raises ValueError (one line) on a bad plan."""
  spec = (spec or '').replace(' ', '')
  entries = []
  for item in (spec.split(',') if spec else [f'dense*{n_layers}']):
    m = _ENTRY.match(item)
    if not m:
      raise ValueError(f"model.layer_plan entry {item!r}: write kind[*count][:full|frozen|lora<r>]")
    kind, count, train = m.group(1), int(m.group(2) or 1), m.group(3) or 'full'
    if kinds is not None and kind not in kinds:
      raise ValueError(f'model.layer_plan: layer kind {kind!r} unknown; known: {sorted(kinds)}')
    if train.startswith('lora'):
      raise ValueError(f'model.layer_plan: {item!r}: LoRA layers are not implemented yet (use full or frozen)')
    entries += [(kind, train)] * count
  if len(entries) != n_layers:
    raise ValueError(f'model.layer_plan describes {len(entries)} layers; llm.layers={n_layers}')
  groups, start = [], 0
  for i in range(1, n_layers + 1):
    if i == n_layers or entries[i] != entries[start]:
      groups.append(Group(entries[start][0], entries[start][1], start, i))
      start = i
  return tuple(groups)


def spans(groups, start, stop):
  """The groups meeting layers [start, stop), each with its local range: [(group, lo, hi)]."""
  return [(g, max(start, g.start) - g.start, min(stop, g.stop) - g.start)
          for g in groups if g.start < stop and start < g.stop]


def locate(groups, i):
  """Global layer index -> (group, index inside the group)."""
  for g in groups:
    if g.start <= i < g.stop:
      return g, i - g.start
  raise IndexError(f'layer {i} is outside the plan (0..{groups[-1].stop - 1})')
