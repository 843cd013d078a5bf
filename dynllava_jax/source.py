"""Where a model comes from: a training workdir, a converted (orbax) directory, or an HF / released one.

    cfg_path = save_run_config(config, workdir)           # train.py: <workdir>/config.json
    src = load_source(workdir='runs/x', step=None)        # newest checkpoint, the run's own config
  config = resolve_config(flags.FLAGS, workdir)         # an entry point's config: --config or the workdir's
    src = load_source(model_dir='export/hf')              # HF / released layout, or a convert.py orbax dir
    src.model, src.config, src.tokenizer, src.step, src.describe()

A workdir carries its resolved config (`config.json`, written by train.py), so eval.py, generate.py and
serve.py need no --config for it. An exported or converted directory carries the model config in its own
files (`config.json` / `model_config.json`) and, when it was exported from a workdir, the run's config as
`run_config.json` (its eval / data sections) and the run's `tokenizer.json`. Other directories get the
`eval` defaults of their size and need a tokenizer.json beside the weights or `--tokenizer`.
Bad input (no such directory, nothing restorable, no tokenizer) is a UserError with one line.
"""
import dataclasses
import json
import os
import time
from typing import Any, Optional

import ml_collections

from dynllava_jax.errors import UserError

RUN_CONFIG = 'config.json'             # in a workdir
EXPORTED_RUN_CONFIG = 'run_config.json'  # in an exported / converted model directory
TOKENIZER = 'tokenizer.json'


# ---------------------------------------------------------------- the run's config

def config_to_json(config):
  return config.to_json_best_effort(indent=2, sort_keys=True) + '\n'


def _tuples(x):
  """JSON lists back to the tuples the config files use."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


def config_from_json(text, where=''):
  try:
    d = json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f'{where}: not a JSON config ({e})') from None
  if not isinstance(d, dict) or 'model' not in d:
    raise UserError(f'{where}: not a run config (no "model" section)')
  return ml_collections.ConfigDict(_tuples(d))


def write_atomic(path, text):
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def save_run_config(config, workdir):
  """Writes the resolved config to <workdir>/config.json. An existing, different one is kept as
  config.<time>.json beside it (a run's earlier settings are never lost). Returns the path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, RUN_CONFIG)
  text = config_to_json(config)
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old == text:
      return path
    os.replace(path, os.path.join(workdir, f'config.{time.strftime("%Y%m%d-%H%M%S")}.json'))
  write_atomic(path, text)
  return path


def save_train_config(config, workdir):
  """train.py's call: checks the config can train on this host's devices (a config that cannot train
  replaces nothing; multi-host runs are checked later, by the loop), takes the workdir's lock for the
  write (a workdir another train.py holds: UserError, nothing written) and writes config.json (process 0
  only, when the process id is known). Returns the path or None."""
  if int(config.train.get('process_id', -1)) > 0:
    return None
  if not config.train.distributed:
    import jax  # pylint: disable=g-import-not-at-top
    from dynllava_jax.train.config import check_config  # pylint: disable=g-import-not-at-top
    check_config(config, len(jax.devices()))
  from dynllava_jax.train.workdir import WorkdirLock  # pylint: disable=g-import-not-at-top
  with WorkdirLock(workdir, report=lambda _: None):
    return save_run_config(config, workdir)


def read_run_config(workdir):
  """The config train.py wrote into `workdir`, or None when it has none."""
  path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return config_from_json(f.read(), path)


def apply_config_flags(config, flag_values):
  """Applies the `--config.a.b=v` overrides present on the command line to `config` (used when the
  config comes from a workdir instead of --config). Returns config."""
  for name in flag_values:
    if not name.startswith('config.') or not flag_values[name].present:
      continue
    *path, last = name.split('.')[1:]
    node = config
    for p in path:
      if p not in node:
        raise UserError(f'--{name}: this model\'s config has no {p!r} section (a checkpoint directory '
                        'without run_config.json carries only model and eval); pass --config')
      node = node[p]
    node[last] = flag_values[name].value
  return config


def resolve_config(flag_values, workdir=None, model_dir=None):
  """The root config an entry point (eval.py, generate.py, serve.py) runs with: --config when given on
  the command line; else the workdir's config.json (with the --config.x=v overrides applied); else None
  for a model directory (its files say; see load_source); else the --config default file's."""
  given = flag_values['config'].present
  if given:
    return flag_values['config'].value
  if workdir:
    run = read_run_config(workdir)
    if run is not None:
      return apply_config_flags(run, flag_values)
  if model_dir:
    return None
  return flag_values['config'].value


def default_root_config(model_cfg):
  """A root config around a model config from a checkpoint directory: the eval defaults of its size."""
  from dynllava_jax.decode.config import eval_defaults  # pylint: disable=g-import-not-at-top
  small = int(model_cfg.llm.hidden) <= 256
  c = ml_collections.ConfigDict()
  c.size = 'tiny' if small else 'checkpoint'
  c.model = model_cfg
  c.eval = eval_defaults('tiny' if small else '7b')
  if not model_cfg.sparse.enabled:
    c.eval.method = 'dense'          # a plain LLaVA checkpoint: no keep-predictors to run 'dynamic' with
  c.seed = 0
  return c


# ---------------------------------------------------------------- loading

@dataclasses.dataclass
class Source:
  """A loaded model and what goes with it. kind: 'workdir' | 'converted' | 'hf'; step: the checkpoint
  step (workdir) or None; config: the root config (model, eval, ...); tokenizer: a data.tokenizer.Tokenizer
  or None when none was found (`require_tokenizer` says what to do)."""
  model: Any
  config: Any
  tokenizer: Any
  kind: str
  path: str
  step: Optional[int] = None
  tokenizer_error: str = ''

  def describe(self):
    at = f' step {self.step}' if self.step is not None else ''
    return f'{self.kind} {self.path}{at}'

  def require_tokenizer(self):
    if self.tokenizer is None:
      raise UserError(self.tokenizer_error or f'no tokenizer for {self.path}: pass --tokenizer')
    return self.tokenizer


def _tokenizer(paths, config, tokenizer=None):
  """(Tokenizer or None, error line). Looks at --tokenizer, then `paths`, then the run's data config."""
  from dynllava_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  if tokenizer:
    return tok_lib.load_tokenizer(tokenizer), ''
  for p in paths:
    if os.path.isfile(os.path.join(p, TOKENIZER)):
      return tok_lib.load_tokenizer(os.path.join(p, TOKENIZER)), ''
  if 'data' in config:
    from dynllava_jax.data import builders  # pylint: disable=g-import-not-at-top
    path = builders.tokenizer_path(config)
    if os.path.isfile(path):
      return tok_lib.load_tokenizer(path), ''
    if config.data.name == 'digits_vqa':        # built from the builder's settings, no data needed
      from dynllava_jax.data import digits_vqa  # pylint: disable=g-import-not-at-top
      return digits_vqa.build_tokenizer(None, config.data.digits.describe_style), ''
    return None, f'no tokenizer.json at {path} (data.tokenizer) nor in {paths[0]}: pass --tokenizer'
  return None, f'no tokenizer.json in {paths[0]}: pass --tokenizer FILE'


def check_tokenizer(tok, model_cfg, where):
  """The tokenizer's special ids must be the model's."""
  tok.require_id('<image>', model_cfg.image_token_id)
  tok.require_id('</s>', model_cfg.eos_token_id)
  if tok.vocab_size > int(model_cfg.llm.vocab_size):
    raise UserError(f'{where}: the tokenizer has {tok.vocab_size} tokens, the model {model_cfg.llm.vocab_size}; '
                    'use the tokenizer the model was trained with')


def to_one_device(model, device=None):
  """Moves every array of `model` (in place) to one device (default: the first); returns model."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  nnx.update(model, jax.device_put(nnx.state(model), device or jax.devices()[0]))
  return model


def load_source(*, workdir=None, step=None, model_dir=None, config=None, tokenizer=None, dtype=None,
                report=print, allow_random_init=False, one_device=False):
  """Loads a model from exactly one of `workdir` (with optional `step`) or `model_dir`.

  config: a root config that replaces the workdir's own (--config given explicitly) or, for a model
  directory, gives its eval / data sections (its model section is replaced by the directory's).
  one_device: put the whole model on the first device (a workdir restores into its config's mesh, e.g.
  FSDP over every device; a checkpoint directory loads onto the default device anyway).
  """
  if bool(workdir) == bool(model_dir):
    raise UserError('give exactly one model source: --workdir W [--step N] or --model DIR '
                    '(an export, a convert.py directory or an HF / released checkpoint)')
  if workdir:
    src = _from_workdir(workdir, step, config, tokenizer, report, allow_random_init)
  elif step is not None:
    raise UserError('--step applies to --workdir only')
  else:
    src = _from_dir(model_dir, config, tokenizer, dtype)
  if one_device:
    to_one_device(src.model)
  return src


def _from_workdir(workdir, step, config, tokenizer, report, allow_random_init=False):
  from dynllava_jax.eval.run import load_model  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir) and not allow_random_init:
    raise UserError(f'--workdir {workdir} does not exist')
  if config is None:
    config = read_run_config(workdir)
    if config is None:
      raise UserError(f'{workdir} has no {RUN_CONFIG} (written by train.py): pass the --config it was '
                      'trained with')
  model, got = load_model(config, workdir, allow_random_init, report_fn=report, step=step, params_only=True)
  tok, err = _tokenizer([workdir], config, tokenizer)
  if tok is not None:
    check_tokenizer(tok, config.model, workdir)
  return Source(model, config, tok, 'workdir', workdir, got, err)


def _from_dir(path, config, tokenizer, dtype):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dynllava_jax import hf  # pylint: disable=g-import-not-at-top
  from dynllava_jax import params_dir as convert  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise UserError(f'--model {path} does not exist (give an exported, converted or HF checkpoint directory)')
  if os.path.isfile(os.path.join(path, convert.CONFIG_NAME)):
    model, mc = convert.load_params(path)
    kind = 'converted'
  elif os.path.isfile(os.path.join(path, 'config.json')):
    try:
      model, mc = hf.load_llava(path, dtype=jnp.dtype(dtype or 'float32'))
    except (ValueError, FileNotFoundError) as e:
      raise UserError(f'{path}: {" ".join(str(e).split())}') from None
    kind = 'hf'
  else:
    raise UserError(f'{path} holds neither config.json (HF / released) nor {convert.CONFIG_NAME} '
                    '(convert.py): not a model directory')
  run_cfg = config
  if run_cfg is None and os.path.isfile(os.path.join(path, EXPORTED_RUN_CONFIG)):
    with open(os.path.join(path, EXPORTED_RUN_CONFIG)) as f:
      run_cfg = config_from_json(f.read(), os.path.join(path, EXPORTED_RUN_CONFIG))
  if run_cfg is None:
    root = default_root_config(mc)
  else:
    root = ml_collections.ConfigDict(run_cfg.to_dict())
    root.model = mc          # the weights' own model config (the file's), not the run's copy
  tok, err = _tokenizer([path], root if run_cfg is not None else {}, tokenizer)
  if tok is not None:
    check_tokenizer(tok, root.model, path)
  return Source(model, root, tok, kind, path, None, err)

