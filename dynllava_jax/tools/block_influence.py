"""Block Influence per decoder layer, and the command that writes it (JSON + a bar chart, region marked).

    python -m dynllava_jax.tools.block_influence --config configs/dynllava.py:size=tiny --workdir runs/tiny \
        [--n 1000] [--variant all|image_text] [--split validation] [--batch_size 8] [--out DIR] \
        [--prompt "Please describe this image in detail."]

BI_l = 1 − mean over samples of (mean over the sample's real tokens of cos(h_in_l, h_out_l)) at prefill,
the last layer's output after the final norm; zero vectors are left out as in the release
(`bunny/eval/block_influence_calc.py`); variant 'image_text' averages the image- and text-token means.
Calibration: the first N samples of the config's split (or one --prompt for all), in the conversation
template up to "ASSISTANT:". Definitions and the release's choices: docs/training.md, "Block Influence".
Writes <out>/block_influence.json {bi, ranking (least influential first), region, variant, samples, step}
and <out>/block_influence.png (default out: <workdir>/block_influence). Bad input: one line, exit 2.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dynllava_jax.errors import UserError
from dynllava_jax.model import plan as P

VARIANTS = ('all', 'image_text')


def layer_states(model, input_ids, pixel_values, attention_mask):
  """-> (h_in, h_out) (L, B, T, H): each decoder layer's input and output, the last layer's output
  after the final norm."""
  _, aux = model(input_ids, pixel_values, attention_mask, intermediates=True)
  h_out = aux['hidden_out']
  h_out = h_out.at[-1].set(model.language_model.norm(h_out[-1]))
  return aux['hidden_in'], h_out


def per_sample_bi(h_in, h_out, valid, image=None, variant='all'):
  """h_in, h_out (L, B, T, H); valid (B, T) bool (real tokens); image (B, T) bool (image tokens; needed
  for 'image_text') -> (bi (L, B) float32, counted (B,) bool: the sample had a token to average)."""
  if variant not in VARIANTS:
    raise UserError(f'block influence variant {variant!r} unknown: use one of {VARIANTS}')
  a, b = h_in.astype(jnp.float32), h_out.astype(jnp.float32)
  na, nb = jnp.linalg.norm(a, axis=-1), jnp.linalg.norm(b, axis=-1)
  ok = valid[None] & (na > 0) & (nb > 0)
  cos = jnp.where(ok, jnp.sum(a * b, -1) / jnp.where(ok, na * nb, 1.0), 0.0)

  def mean(sel):
    m = ok & sel[None]
    n = jnp.sum(m, -1)
    return jnp.sum(jnp.where(m, cos, 0.0), -1) / jnp.maximum(n, 1), n[0] > 0

  if variant == 'all':
    c, has = mean(valid)
  else:
    ci, hi = mean(valid & image)
    ct, ht = mean(valid & ~image)
    c = jnp.where(hi & ht, (ci + ct) / 2, jnp.where(hi, ci, ct))
    has = hi | ht
  return 1.0 - c, has


def block_influence(model, batches, variant='all'):
  """Mean BI per layer over the samples of `batches` (an iterable of (ids, pix or None, mask) arrays) ->
  (bi (L,) numpy float64, samples counted)."""
  image_id = model.mc.image_token_id

  @jax.jit
  def one(ids, pix, mask):
    h_in, h_out = layer_states(model, ids, pix, mask)
    return per_sample_bi(h_in, h_out, mask.astype(bool), ids == image_id, variant)

  total, count = None, 0
  for ids, pix, mask in batches:
    bi, has = jax.device_get(one(jnp.asarray(ids), None if pix is None else jnp.asarray(pix), jnp.asarray(mask)))
    s = np.sum(np.where(has[None], bi, 0.0), axis=1, dtype=np.float64)
    total = s if total is None else total + s
    count += int(np.sum(has))
  if not count:
    raise UserError('block influence: no calibration sample had a token to average')
  return total / count, count


def ranking(bi):
  """Layer indices, least influential first (ties: the lower layer first)."""
  return [int(i) for i in np.argsort(np.asarray(bi), kind='stable')]


def plot(bi, region, path, title='Block Influence'):
  """Bar chart of BI per layer, region layers in another colour -> path (png)."""
  from dynllava_jax.eval.report import plt, save_figure  # pylint: disable=g-import-not-at-top  (Agg)
  n = len(bi)
  fig, ax = plt.subplots(figsize=(max(5.0, 0.28 * n + 2), 3.2))
  colors = ['tab:orange' if i in set(region) else 'tab:blue' for i in range(n)]
  ax.bar(range(n), bi, color=colors)
  ax.set_xlabel('decoder layer')
  ax.set_ylabel('BI = 1 − mean cos(h_in, h_out)')
  ax.set_title(title, fontsize=9)
  ax.set_xticks(range(n))
  ax.tick_params(axis='x', labelsize=7)
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
  ax.legend(handles=[Patch(color='tab:orange', label='visual region'), Patch(color='tab:blue', label='other')],
            fontsize=8)
  return save_figure(fig, path, dpi=120)


def region_of(mc):
  """The config's region, or the released spread when it has none (what the chart marks)."""
  return P.parse_region(mc.get('region', ''), mc.llm.layers) or P.region_layers(mc.llm.layers)


def fixed_prompt_ids(config, question):
  """The prompt ids of `question` about an image in the data config's template (up to "ASSISTANT:")."""
  from dynllava_jax.data import builders, templates  # pylint: disable=g-import-not-at-top
  from dynllava_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  from dynllava_jax.model.projector import num_visual_tokens  # pylint: disable=g-import-not-at-top
  tok = tok_lib.load_tokenizer(builders.tokenizer_path(config))
  m = config.model
  ids, _ = templates.encode_prompt(
      tok, [{'from': 'human', 'value': question}, {'from': 'gpt', 'value': ''}], True,
      num_image_tokens=num_visual_tokens(m), image_token_id=int(m.image_token_id), bos_id=int(m.bos_token_id),
      max_len=int(config.data.max_len))
  return np.asarray(ids, np.int32)


def run(config, workdir, *, n=1000, variant='all', split='validation', batch_size=8, out=None, prompt='',
        allow_random_init=False, report_fn=print):
  """The command: BI over the first n samples of `split` (their prompts, or `prompt` for every image)
  -> the JSON dict (also written to out)."""
  from dynllava_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from dynllava_jax.eval.run import _batches, _prompt_batch, load_model  # pylint: disable=g-import-not-at-top
  if n < 1 or batch_size < 1:
    raise UserError(f'--n={n} and --batch_size={batch_size} must be >= 1')
  if variant not in VARIANTS:
    raise UserError(f'--variant={variant!r} unknown: use one of {VARIANTS}')
  model, step = load_model(config, workdir, allow_random_init, report_fn)
  from dynllava_jax.data import builders  # pylint: disable=g-import-not-at-top
  builders.build(config)
  samples = pipeline.make_eval_samples(config, split, n)
  if prompt:
    fixed = fixed_prompt_ids(config, prompt)
    samples = [dict(s, prompt_ids=fixed) for s in samples if s['has_image']]
  if not samples:
    raise UserError(f'{config.data.name}/{split} gave no calibration samples')
  batches = ((ids, pix, mask) for ids, mask, pix in (_prompt_batch(config, c) for c in _batches(samples, batch_size)))
  bi, count = block_influence(model, batches, variant)
  region = region_of(config.model)
  res = {'bi': [float(x) for x in bi], 'ranking': ranking(bi), 'region': list(region),
         'region_from': 'model.region' if config.model.get('region', '') else 'released spread (auto)',
         'variant': variant, 'samples': count, 'split': f'{config.data.name}/{split}', 'step': step,
         'layers': int(config.model.llm.layers), 'prompt': prompt or 'the samples\' own'}
  out = out or os.path.join(workdir, 'block_influence')
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'block_influence.json'), 'w') as f:
    json.dump(res, f, indent=1)
  plot(bi, region, os.path.join(out, 'block_influence.png'),
       f'Block Influence ({variant})\n{count} samples of {config.data.name}/{split}')
  report_fn(f'block influence over {count} samples -> {out}/block_influence.json; least influential '
            f'first: {res["ranking"]}')
  return res


def main(argv=None):
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from dynllava_jax import errors  # pylint: disable=g-import-not-at-top
  prog = 'python -m dynllava_jax.tools.block_influence'
  cfg_flag = errors.define_config_flag(prog, 'configs/dynllava.py', 'Model / data config.')
  workdir = flags.DEFINE_string('workdir', None, 'Training workdir (checkpoints/).')
  n = flags.DEFINE_integer('n', 1000, 'Calibration samples (the release: 1,000).')
  variant = flags.DEFINE_enum('variant', 'all', list(VARIANTS), 'all tokens, or image/text means averaged.')
  split = flags.DEFINE_string('split', 'validation', 'Dataset split.')
  bs = flags.DEFINE_integer('batch_size', 8, 'Prefill batch size.')
  out = flags.DEFINE_string('out', None, 'Output folder (default <workdir>/block_influence).')
  rnd = flags.DEFINE_bool('allow_random_init', False, 'Use a random-init model when no checkpoint.')
  prompt = flags.DEFINE_string('prompt', '', 'One question for every image (release: "Please describe this '
                               'image in detail."); default: each sample\'s own prompt.')
  flags.mark_flag_as_required('workdir')

  def _main(args):
    if len(args) > 1:
      raise app.UsageError(f'unexpected arguments: {args[1:]}')
    errors.guard(prog, lambda: run(cfg_flag.value, workdir.value, n=n.value, variant=variant.value,
                                   split=split.value, batch_size=bs.value, out=out.value,
                                   prompt=prompt.value, allow_random_init=rnd.value), extra=(ValueError,))

  app.run(_main, argv, flags_parser=errors.flags_parser(prog))


if __name__ == '__main__':
  sys.exit(main())
