"""Each method's budget knob: one number in (0, 1] (the fraction of image tokens kept) -> its overrides.

    keep_overrides('fastv', 0.25)       # {'r': 0.75}: FastV drops R = 1 - keep at layer K
    sweep_points(['dense', 'dynamic', 'fastv'], keep_ratios=[0.1, 0.5])
    # [('dense', {}), ('dynamic', {'keep_ratio': 0.1}), ('dynamic', {'keep_ratio': 0.5}),
    #  ('fastv', {'r': 0.9}), ('fastv', {'r': 0.5})]

A method with another kind of knob (a token count, a layer) adds its own sweep flag and passes its points
as `extra={'<method>': [overrides, ...]}`; `KEEP_KNOBS` is the one table to extend for a keep-fraction
knob. Methods with no entry (dense) get one point with no overrides.
"""

KEEP_KNOBS = {
    'dynamic': lambda r: {'keep_ratio': r},
    'dynamic_image': lambda r: {'keep_ratio': r},
    'dynamic_text': lambda r: {'keep_ratio': r},
    'random': lambda r: {'keep_ratio': r},
    'uniform': lambda r: {'keep_ratio': r},
    'fastv': lambda r: {'r': round(1.0 - r, 6)},                        # R = the fraction dropped
    'pdrop': lambda r: {'ratios': (r, r / 2, r / 4)},                   # λ, λ/2, λ/4 (default λ = 0.5)
    'visionzip': lambda r: {'ratio': r},                                # k = round(r·N) before the LLM
    'divprune': lambda r: {'ratio': r},
}


def keep_overrides(method, keep):
  """The overrides that make `method` keep about `keep` of the image tokens; ValueError when it has no
  keep-fraction knob or keep is outside (0, 1]."""
  if keep is None:
    return {}
  keep = float(keep)
  if not 0.0 < keep <= 1.0:
    raise ValueError(f'keep ratio {keep:g} must be in (0, 1]')
  if method not in KEEP_KNOBS:
    raise ValueError(f'method {method!r} has no keep-ratio knob (methods with one: {sorted(KEEP_KNOBS)})')
  return KEEP_KNOBS[method](keep)


def parse_list(text, what='--keep_ratios'):
  """'0.1,0.2' -> [0.1, 0.2] (ValueError with one line on a bad item)."""
  out = []
  for item in str(text or '').split(','):
    if item.strip():
      try:
        out.append(float(item))
      except ValueError:
        raise ValueError(f'{what}: {item!r} is not a number') from None
  return out


def sweep_points(methods, keep_ratios=(), extra=None):
  """[(method, overrides)] in method order: for each method its points from `extra`, else one per keep
  ratio when it has a keep knob and ratios were given, else one point with no overrides."""
  extra = extra or {}
  out = []
  for m in methods:
    if m in extra:
      out += [(m, dict(o)) for o in extra[m]]
    elif keep_ratios and m in KEEP_KNOBS:
      out += [(m, keep_overrides(m, r)) for r in keep_ratios]
    else:
      out.append((m, {}))
  return out


def label(method, overrides):
  """'fastv r=0.75' — a point's name in tables and plots."""
  if not overrides:
    return method
  return method + ' ' + ','.join(f'{k}={_short(v)}' for k, v in sorted(overrides.items()))


def _short(v):
  if isinstance(v, (tuple, list)):
    return '/'.join(_short(x) for x in v)
  if isinstance(v, float):
    return f'{v:g}'
  return str(v)
