"""The decoder's layer plan: each layer's kind and trainability, grouped into runs of equal layers.

`model.layer_plan` is a string of comma-separated entries `kind[*count][:train]`, e.g.
    ''                                   every layer `dense`, trained (today's LLaVA decoder)
    'dense*2,dense_alt,dense'            4 layers, the third of another kind (three groups)
    'dense:frozen,dense*3'               the first layer frozen (no gradient, no optimizer state)
    'dense:frozen,dense:lora8,dense*2:frozen'   LoRA (rank 8) on the seven linear layers of layer 1 only
    'dense*2,skip,dense'                 layer 2 removed (the identity; no weights)
kind: a registered layer kind (`llama.LAYER_KINDS`: `dense`, `dense_alt`, `mod`, `skip`); train: `full`
(default), `frozen` or `lora<r>` (rank r > 0; `model.lora` holds alpha and dropout). The counts add up to
`llm.layers`. Consecutive layers with equal (kind, train) form one group (one stacked module, one scan)
under `language_model.layers` (the group at layer 0) or `language_model.layers_<start>`, so a uniform plan
keeps today's parameter paths; `resolve` also starts a group where a training hook acts (a Dynamic-LLaVA
model: at its sparse and text layers). docs/architecture.md, "Layer plan and trainability".

The visual region (`model.region`, `resolve`): the layers that train, the rest frozen. 'auto' = the
released even spread (`region_layers`), or a list '1,5,9'; `model.region_train` = 'full' or 'lora<r>'.
"""
import dataclasses
import itertools
import math
import re
from typing import Tuple

SKIP = 'skip'


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

  @property
  def lora_rank(self):
    """LoRA rank of a `lora<r>` group, else 0."""
    return int(self.train[4:]) if self.train.startswith('lora') else 0

  @property
  def trains(self):
    """Whether any of the group's parameters train (full or LoRA); a skipped layer has none."""
    return self.kind != SKIP and self.train != 'frozen'


_ENTRY = re.compile(r'^([a-z_][a-z0-9_]*)(?:\*(\d+))?(?::(full|frozen|lora-?\d+))?$')


def check_train(flag, where):
  """A train flag `full | frozen | lora<r>` -> itself; ValueError (one line) for a LoRA rank <= 0."""
  if flag.startswith('lora') and int(flag[4:]) <= 0:
    raise ValueError(f'{where}: LoRA rank must be > 0 (got {flag!r}; write e.g. lora8)')
  if flag not in ('full', 'frozen') and not re.fullmatch(r'lora\d+', flag):
    raise ValueError(f"{where}: train flag {flag!r} unknown: use full, frozen or lora<r>")
  return flag


def region_layers(n_layers):
  """The released even spread of ⌈L/4⌉ trainable layers (32 layers -> 1, 5, 9, 13, 19, 23, 27, 31).

  Cut [0, L) into k = ⌈L/4⌉ equal chunks [⌊iL/k⌋, ⌊(i+1)L/k⌋); take the second layer of each chunk in
  the lower half (i < ⌊k/2⌋; layer 0 stays frozen) and the last layer of each chunk in the upper half
  (layer L−1 trains). For L = 32 the chunks are 4 wide: 1, 5, 9, 13 | 19, 23, 27, 31, the release's list.
  Chunks in the lower half are ≥ 2 wide whenever k ≥ 2, so the layers are distinct.
  """
  if n_layers <= 0:
    return ()
  k = math.ceil(n_layers / 4)
  out = []
  for i in range(k):
    lo, hi = (i * n_layers) // k, ((i + 1) * n_layers) // k
    out.append(lo + 1 if i < k // 2 else hi - 1)
  return tuple(out)


def parse_layers(spec, n_layers, what):
  """'1,5,9' (or a sequence of ints) -> sorted tuple of distinct layer indices in [0, n_layers);
  ValueError (one line, naming `what`) for anything else."""
  if isinstance(spec, str):
    items = [s for s in spec.replace(' ', '').split(',') if s]
    try:
      layers = [int(s) for s in items]
    except ValueError:
      raise ValueError(f'{what}={spec!r}: write comma-separated layer numbers, e.g. 1,5,9') from None
  else:
    layers = [int(x) for x in spec]
  bad = [i for i in layers if not 0 <= i < n_layers]
  if bad:
    raise ValueError(f'{what}: layer {bad[0]} is outside 0..{n_layers - 1}')
  if len(set(layers)) != len(layers):
    raise ValueError(f'{what}={spec!r} lists a layer twice')
  return tuple(sorted(layers))


def parse_region(spec, n_layers):
  """`model.region`: '' -> () (no region), 'auto' -> `region_layers(L)`, '1,5,9' -> (1, 5, 9)."""
  spec = (spec or '').strip()
  if not spec:
    return ()
  if spec == 'auto':
    return region_layers(n_layers)
  out = parse_layers(spec, n_layers, 'model.region')
  if not out:
    raise ValueError('model.region is empty: give layers, e.g. 1,5,9, or auto')
  return out


def _entries(spec, n_layers, kinds):
  """[(kind, train or None when not written)] per layer."""
  spec = (spec or '').replace(' ', '')
  entries = []
  for item in (spec.split(',') if spec else [f'dense*{n_layers}']):
    m = _ENTRY.match(item)
    if not m:
      raise ValueError(f"model.layer_plan entry {item!r}: write kind[*count][:full|frozen|lora<r>]")
    kind, count, train = m.group(1), int(m.group(2) or 1), m.group(3)
    if kinds is not None and kind not in kinds:
      raise ValueError(f'model.layer_plan: layer kind {kind!r} unknown; known: {sorted(kinds)}')
    if train is not None:
      check_train(train, f'model.layer_plan entry {item!r}')
      if kind == SKIP and train != 'frozen' and train != 'full':
        raise ValueError(f'model.layer_plan entry {item!r}: a skipped layer has no weights to train')
    entries += [(kind, train)] * count
  if len(entries) != n_layers:
    raise ValueError(f'model.layer_plan describes {len(entries)} layers; llm.layers={n_layers}')
  return entries


def parse_plan(spec, n_layers, kinds=None, *, region=(), region_train='full', cuts=()) -> Tuple[Group, ...]:
  """`model.layer_plan` (+ an optional region) -> groups covering [0, n_layers). Raises ValueError (one
  line) on a bad plan.

  region: layer indices that train with `region_train` ('full' | 'lora<r>'); every other layer is frozen.
  With a region, plan entries must not write a train flag themselves (the region decides).
  cuts: layers that start a group whatever their neighbours (`resolve`: the training hooks' layers).
  """
  entries = _entries(spec, n_layers, kinds)
  if region:
    check_train(region_train, 'model.region_train')
    if region_train == 'frozen':
      raise ValueError("model.region_train='frozen' trains nothing: use full or lora<r>")
    written = [i for i, (_, t) in enumerate(entries) if t is not None]
    if written:
      raise ValueError(f'model.layer_plan gives layer {written[0]} a train flag and model.region is set: '
                       'let the region decide (drop the :flag) or clear model.region')
    skipped = [i for i in region if entries[i][0] == SKIP]
    if skipped:
      raise ValueError(f'model.region layer {skipped[0]} is skipped in model.layer_plan')
    entries = [(k, region_train if i in region else 'frozen') for i, (k, _) in enumerate(entries)]
  entries = [(k, 'frozen' if k == SKIP else (t or 'full')) for k, t in entries]
  groups, start = [], 0
  for i in range(1, n_layers + 1):
    if i == n_layers or entries[i] != entries[start] or i in cuts:
      groups.append(Group(entries[start][0], entries[start][1], start, i))
      start = i
  return tuple(groups)


def with_kind(spec, n_layers, layers, kind, kinds=None):
  """`spec` with the layers in `layers` turned into `kind` (their train flags kept) -> a plan string.
  ValueError (one line) when one of them is skipped in `spec`."""
  entries = _entries(spec, n_layers, kinds)
  out = []
  for i, (k, t) in enumerate(entries):
    if i in layers:
      if k == SKIP:
        raise ValueError(f'model.mod.layers: layer {i} is skipped in model.layer_plan')
      k = kind
    out.append(k + (f':{t}' if t is not None else ''))
  return ','.join(out)


def resolve(mc, kinds=None):
  """The model config's groups: `model.layer_plan` with `model.mod.layers` (those layers become `mod`)
  and `model.region` / `model.region_train` applied, and a group starting at each layer where a training
  hook acts (`sparsity/registry.py::layer_cuts`, e.g. Dynamic-LLaVA's sparse and text layers): the walk
  splits its scans there, and a scan over a whole group reads its stacked weights as they are, where a
  sub-range would be copied out of the stack (and its gradient padded back) on every training step."""
  from dynllava_jax.sparsity.registry import layer_cuts  # pylint: disable=g-import-not-at-top
  n = mc.llm.layers
  region = parse_region(mc.get('region', ''), n)
  spec = mc.get('layer_plan', '')
  if 'mod' in mc and str(mc.mod.get('layers', '') or ''):
    from dynllava_jax.model import mod as M  # pylint: disable=g-import-not-at-top
    spec = with_kind(spec, n, M.mod_layers(mc.mod.layers, n), M.KIND, kinds)
  return parse_plan(spec, n, kinds, region=region,
                    region_train=str(mc.get('region_train', 'full') or 'full'), cuts=layer_cuts(mc))


def kind_layers(groups, kind):
  """Global indices of the layers of one kind."""
  return [i for g in groups if g.kind == kind for i in range(g.start, g.stop)]


def skipped_layers(groups):
  return [i for g in groups if g.kind == SKIP for i in range(g.start, g.stop)]


def to_spec(groups, train=True):
  """Groups -> a `model.layer_plan` string that parses back to them (no region needed). train=False:
  kinds only (every layer `full`): consecutive groups of one kind fuse into one scan (inference)."""
  if train:
    return ','.join(f'{g.kind}*{g.size}:{g.train}' for g in groups)
  return ','.join(f'{k}*{sum(g.size for g in run)}' for k, run in itertools.groupby(groups, lambda g: g.kind))


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
