"""Building the tfds datasets (array_record, no TensorFlow) named by `config.data`.

    ds_dir = build(config)          # builds once into config.data.data_dir; fast when already built
    tok = tokenizer.load_tokenizer(tokenizer_path(config))

Beside the tfds files each dataset dir holds `build_report.json` ({total, skipped: {reason: n},
skipped_ids: [[id, reason], ...]}) and, for the digits sets, the word tokenizer: digits_vqa's
`tokenizer.json`; digits_video's `tokenizer_<describe_style>.json`, digits_vqa's tokenizer of that
`data.digits.describe_style` extended by the video words (one video set, a tokenizer per image vocabulary).
"""
import json
import logging
import os

import tensorflow_datasets as tfds

from dynllava_jax.data import digits_video
from dynllava_jax.data import digits_vqa
from dynllava_jax.data import llava_instruct
from dynllava_jax.data import policy
from dynllava_jax.errors import UserError, suggest

log = logging.getLogger('dynllava_jax.data')
REPORT = 'build_report.json'
TOKENIZER = 'tokenizer.json'


def get_builder(config):
  """The tfds builder (array_record file format) for `config.data`."""
  d = config.data
  if d.name == 'digits_vqa':
    g = d.digits
    cfg = digits_vqa.make_config(g.canvas_size, g.num_train, g.num_val, g.num_test, g.seed,
                                 g.describe_style, g.max_rounds, g.extra_round_prob,
                                 g.get('grid', digits_vqa.GRID), g.get('type_probs', digits_vqa.TYPE_PROBS),
                                 g.get('describe_alone', False),
                                 g.get('tile_fraction', digits_vqa.TILE_FRACTION),
                                 g.get('one_round_test', False), g.get('add_echo', False),
                                 g.get('text_rounds', False), g.get('text_only', False),
                                 g.get('text_grid', False))
    return digits_vqa.DigitsVqa(config=cfg, data_dir=d.data_dir, file_format='array_record')
  if d.name == 'digits_video':      # frames: data.max_frames (>= 2), from min(4, max_frames)
    g, top = d.digits, int(d.get('max_frames', 1))
    cfg = digits_video.make_config(g.canvas_size, g.num_train, g.num_val, g.num_test, g.seed, min(4, top), top,
                                   g.get('grid', digits_vqa.GRID), g.get('frame_labels', False),
                                   g.get('video_style', 'short'))
    return digits_video.DigitsVideo(config=cfg, data_dir=d.data_dir, file_format='array_record')
  if d.name == 'llava_instruct':
    if not d.manual_dir:
      raise UserError('llava_instruct needs config.data.manual_dir (folder with the LLaVA JSON and '
                       'the image folders); see docs/data.md')
    json_path = os.path.join(d.manual_dir, d.json_file)
    folder = d.image_folder or d.manual_dir
    cfg = llava_instruct.make_config(json_path, folder, d.val_permille, d.check_images, d.strict)
    return llava_instruct.LlavaInstruct(config=cfg, data_dir=d.data_dir, file_format='array_record')
  raise UserError(f'data.name={d.name!r} is unknown'
                  f'{suggest(d.name, ("digits_vqa", "digits_video", "llava_instruct"))}: '
                  'digits_vqa | digits_video | llava_instruct')


def _write_json(path, obj):
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def read_report(ds_dir):
  path = os.path.join(ds_dir, REPORT)
  if not os.path.exists(path):
    return {'total': 0, 'skipped': {}, 'skipped_ids': []}
  with open(path) as f:
    return json.load(f)


def build(config):
  """Builds (if not yet built) config.data.name into config.data.data_dir; returns the dataset dir.

  Bad records found while building are skipped, counted and logged (the summary is kept in
  `build_report.json`); with config.data.strict the first one raises policy.BadSampleError, also
  when a dataset built earlier in non-strict mode had skipped records.
  """
  builder = get_builder(config)
  ds_dir = os.fspath(builder.data_dir)
  if not os.path.exists(os.path.join(ds_dir, 'dataset_info.json')):
    tfds.disable_progress_bar()
    manual = config.data.manual_dir or None
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual))
    except (OSError, FileExistsError):
      # Another process (e.g. another host on a shared disk) finished the same build first.
      if not os.path.exists(os.path.join(ds_dir, 'dataset_info.json')):
        raise
      log.info('%s was built by another process', ds_dir)
      return _finish(config, ds_dir)
    except AssertionError as e:      # tfds: 'No examples were yielded' for a split
      counter = getattr(builder, 'counter', None)
      if counter is None or 'No examples' not in str(e):
        raise
      raise UserError(f'{config.data.name}: no record of {_source_name(config)} survives the build '
                      f'({counter.summary()}); fix the data (docs/data.md), e.g. the image folder '
                      '(data.image_folder)') from None
    ds_dir = os.fspath(builder.data_dir)
    counter = getattr(builder, 'counter', None)
    report = {'total': 0, 'skipped': {}, 'skipped_ids': []}
    if counter is not None:
      report = {**counter.state(), 'skipped_ids': counter.skipped_ids}
      counter.log_summary(f'{config.data.name} build: ')
    _write_json(os.path.join(ds_dir, REPORT), report)
  return _finish(config, ds_dir)


def _source_name(config):
  d = config.data
  return os.path.join(d.manual_dir, d.json_file) if d.name == 'llava_instruct' else d.name


def _finish(config, ds_dir):
  """Writes the digits tokenizer if missing; applies strict mode to the build report."""
  build_tok = {'digits_vqa': digits_vqa.build_tokenizer, 'digits_video': digits_video.build_tokenizer}
  if config.data.name in build_tok:
    path = os.path.join(ds_dir, _digits_tokenizer(config))
    if not os.path.exists(path):
      build_tok[config.data.name](path, config.data.digits.describe_style)
  report = read_report(ds_dir)
  if config.data.strict and report['skipped_ids']:
    rid, reason = report['skipped_ids'][0]
    raise policy.BadSampleError(rid, reason, f'skipped when {ds_dir} was built (non-strict)')
  return ds_dir


def _digits_tokenizer(config):
  """The digits sets' tokenizer file name in their dataset dir (the module docstring)."""
  return TOKENIZER if config.data.name == 'digits_vqa' else f'tokenizer_{config.data.digits.describe_style}.json'


def tokenizer_path(config):
  """Path of the tokenizer.json for config.data (config.data.tokenizer overrides the default)."""
  d = config.data
  if d.tokenizer:
    return d.tokenizer
  if d.name in ('digits_vqa', 'digits_video'):
    return os.path.join(os.fspath(get_builder(config).data_dir), _digits_tokenizer(config))
  return os.path.join(d.manual_dir, TOKENIZER)
