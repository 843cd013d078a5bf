"""The grain input pipeline: tfds array_record source → shuffle → shard → tokenize → bucketed batches.

    it = make_iterator(config, 'train')            # infinite, shuffled, this process's shard
    batch = next(it)                               # dict of numpy arrays, see `make_iterator`
    state = it.get_state()                         # JSON-able dict; it.set_state(state) resumes
    gbatch = to_global(batch, NamedSharding(mesh, P(('data', 'fsdp'))))

Order of operations (docs/data.md, "Reading order and checkpoints"): array_record source → grain
`MapDataset` → global index shuffle (per epoch) → repeat → `[process_index::process_count]` (trimmed to
equal counts) → decode + tokenize (`num_workers` processes) → drop-and-count bad samples → batches of
batch_size // process_count, right-padded to the smallest bucket ≥ the longest sample.
"""
import logging
import os

from absl import flags
import jax
import numpy as np
import grain.python as grain
import tensorflow_datasets as tfds

from dynllava_jax.data import builders
from dynllava_jax.data import frames as frames_lib
from dynllava_jax.data import images
from dynllava_jax.data import policy
from dynllava_jax.data import records
from dynllava_jax.data import templates
from dynllava_jax.data import tokenizer as tokenizer_lib
from dynllava_jax.errors import UserError, one_line
from dynllava_jax.model.projector import num_visual_tokens

log = logging.getLogger('dynllava_jax.data')
SPAN_KEYS = ('image_start', 'instr_start', 'instr_end', 'answer_start', 'answer_end')


def buckets(config):
  """Sorted padded lengths; the last is max_len."""
  m = config.data.max_len
  b = tuple(config.data.buckets) or (m // 4, m // 2, m)
  return tuple(sorted({int(x) for x in b if 0 < x < m} | {m}))


class Processor:
  """Record (raw tfds dict) → training sample dict, or a skip marker `{'skip': reason, ...}`.

  Picklable (worker processes load the tokenizer themselves). Sample fields, L <= max_len:
    input_ids, labels (L,) int32; pixel_values (H, W, 3) float32 — (F, H, W, 3) with data.max_frames = F
    > 1 (`data/frames.py`; more frames in a record: one-line UserError); has_image bool; image_start,
    instr_start, instr_end, answer_start, answer_end int32; id int32 (the record `index`).
  With `prompt=True` it also gives prompt_ids (P,) int32, answer str, question_type str, record_id.
  """

  def __init__(self, config, tokenizer_path, prompt=False):
    m = config.model
    self.image_size = int(m.vision.image_size)
    self.n_img = int(num_visual_tokens(m))
    self.image_token_id, self.bos_id = int(m.image_token_id), int(m.bos_token_id)
    self.max_len = int(config.data.max_len)
    self.max_frames = int(config.data.get('max_frames', 1) or 1)
    self.strict = bool(config.data.strict)
    self.tokenizer_path = tokenizer_path
    self.prompt = prompt
    self._tok = None

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_tok'} | {'_tok': None}

  @property
  def tok(self):
    if self._tok is None:
      self._tok = tokenizer_lib.load_tokenizer(self.tokenizer_path)
    return self._tok

  def __call__(self, raw):
    rid = '?'
    try:
      try:
        rec = records.decode(raw)
      except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise policy.SampleProblem(policy.MALFORMED, f'{type(e).__name__}: {e}') from None
      rid = rec['id']
      try:
        rec['frames'] = len(frames_lib.unpack_frames(rec['image'])) if rec['has_image'] else 0
      except ValueError as e:
        raise policy.SampleProblem(policy.CORRUPT_IMAGE, str(e)) from None
      if rec['frames'] > self.max_frames:
        raise UserError(f"record id={rid} has {rec['frames']} frames; data.max_frames={self.max_frames}: "
                        'raise data.max_frames or drop the record')
      tags = (frames_lib.check_frame_tags(rec['conversations'], rec['frames']) if rec['frames'] > 1
              else policy.check_image_tags(rec['conversations'], rec['has_image']))
      bad = policy.check_conversation(rec['conversations']) or tags
      if bad:
        raise policy.SampleProblem(*bad)
      return self._process(rec)
    except policy.SampleProblem as p:
      if self.strict:
        raise policy.BadSampleError(rid, p.reason, p.detail) from None
      return {'skip': p.reason, 'record_id': rid, 'detail': p.detail}

  def _process(self, rec):
    rid = rec['id']
    kw = dict(num_image_tokens=self.n_img, image_token_id=self.image_token_id, bos_id=self.bos_id,
              max_len=self.max_len, frames=max(rec['frames'], 1))
    enc = templates.encode_conversation(self.tok, rec['conversations'], rec['has_image'], **kw)
    out = {'input_ids': enc.input_ids, 'labels': enc.labels, 'has_image': np.bool_(enc.has_image),
           'id': np.int32(rec['index'])}
    for k in SPAN_KEYS:
      out[k] = np.int32(getattr(enc, k))
    if self.prompt:   # prompt of the last round kept by truncation; its gold answer
      conv = rec['conversations'][:2 * enc.num_rounds]
      out['prompt_ids'], gold = templates.encode_prompt(self.tok, conv, rec['has_image'], **kw)
      if len(conv) == len(rec['conversations']):
        gold = rec['answer']
      out.update(answer=gold, question_type=rec['question_type'], record_id=rec['id'])
    if self.max_frames > 1:     # (F_max, S, S, 3): absent frames zero (their placeholders absent too)
      data = rec['image'] if rec['has_image'] else b''
      out['pixel_values'] = frames_lib.load_frames(data, self.image_size, self.max_frames, rid)[0]
    else:
      out['pixel_values'] = images.load_pixels(rec['image'], self.image_size, rec['has_image'])
    return out


class SkipFilter:
  """Drops skip markers, counting them (runs in the main process, after any workers).

  When the first `limit` samples (one pass over the source) are all skipped, raises UserError with the
  counts: nothing would ever be yielded (e.g. data.max_len too small for every sample), so the reader
  would otherwise spin forever.
  """

  def __init__(self, counter, limit=None, what=''):
    self.counter, self.limit, self.what = counter, limit, what
    self.kept = 0

  def __call__(self, sample):
    if 'skip' in sample:
      self.counter.skip(sample['record_id'], sample['skip'], sample.get('detail', ''))
      if self.limit and not self.kept and self.counter.num_skipped >= self.limit:
        raise UserError(f'{self.what}: every sample was skipped ({self.counter.summary()}); see '
                        'docs/data.md (over_long: raise data.max_len)')
      return False
    self.counter.ok()
    self.kept += 1
    return True


def pad_batch(samples, bucket_lens, pad_id):
  """List of samples → batch dict, right-padded to the smallest bucket ≥ the longest sample: input_ids,
  attention_mask, labels (B, T) int32; pixel_values (B, H, W, 3) float32; has_image (B,) bool; id and the
  span keys (B,) int32."""
  longest = max(len(s['input_ids']) for s in samples)
  t = next(b for b in bucket_lens if b >= longest)
  n = len(samples)
  ids = np.full((n, t), pad_id, np.int32)
  mask = np.zeros((n, t), np.int32)
  labels = np.full((n, t), templates.IGNORE, np.int32)
  for i, s in enumerate(samples):
    k = len(s['input_ids'])
    ids[i, :k], mask[i, :k], labels[i, :k] = s['input_ids'], 1, s['labels']
  out = {'input_ids': ids, 'attention_mask': mask, 'labels': labels,
         'pixel_values': np.stack([s['pixel_values'] for s in samples]).astype(np.float32),
         'has_image': np.asarray([s['has_image'] for s in samples], np.bool_),
         'id': np.asarray([s['id'] for s in samples], np.int32)}
  for k in SPAN_KEYS:
    out[k] = np.asarray([s[k] for s in samples], np.int32)
  return out


class DataIterator:
  """Iterator of batches with checkpointable state.

  `get_state()` returns a JSON-able dict `{'grain': <grain DatasetIterator state>, 'skipped':
  {'total': int, 'skipped': {reason: int}}}` (store it with orbax, e.g. as JSON);
  `set_state(state)` continues exactly after the batch the state was taken at.
  """

  LOG_EVERY = 1000   # batches between summary lines while skips keep occurring

  def __init__(self, it, counter, name):
    self._it, self.counter, self.name = it, counter, name
    self._batches, self._logged = 0, 0

  def __iter__(self):
    return self

  def __next__(self):
    try:
      batch = next(self._it)
    except StopIteration:
      self.counter.log_summary(f'{self.name}: ')
      raise
    self._batches += 1
    if self._batches % self.LOG_EVERY == 0 and self.counter.num_skipped > self._logged:
      self._logged = self.counter.num_skipped
      self.counter.log_summary(f'{self.name}: ')
    return batch

  def get_state(self):
    return {'grain': self._it.get_state(), 'skipped': self.counter.state()}

  def set_state(self, state):
    self._it.set_state(state['grain'])
    self.counter.load_state(state.get('skipped', {}))

  def close(self):
    close = getattr(self._it, 'close', None)
    if close:
      close()


def check_tokenizer(config, tok):
  """Checks the tokenizer's `<image>`, `<s>`, `</s>` (and `<pad>` if present) ids against config.model."""
  m = config.model
  tok.require_id('<image>', m.image_token_id)
  tok.require_id('<s>', m.bos_token_id)
  tok.require_id('</s>', m.eos_token_id)
  if tok.token_to_id('<pad>') is not None:
    tok.require_id('<pad>', m.pad_token_id)


UNK_WARN_FRACTION = 0.1     # warn when more than this share of the sampled text tokens are <unk>
UNK_SAMPLE_RECORDS = 32


def unk_fraction(tok, recs):
  """Share of the text tokens of `recs` (decoded records) that the tokenizer maps to `<unk>` (None if it
  has no `<unk>`)."""
  unk = tok.token_to_id('<unk>')
  if unk is None:
    return None
  n = n_unk = 0
  for rec in recs:
    for turn in rec['conversations']:
      ids, _ = tok.encode(turn['value'].replace(policy.IMAGE_TAG, ' '))
      n += len(ids)
      n_unk += int((ids == unk).sum())
  return n_unk / n if n else 0.0


def _source(config, split):
  ds_dir = builders.build(config)
  report = builders.read_report(ds_dir)
  built = policy.SkipCounter('records')
  built.load_state(report)
  if report['skipped']:
    built.log_summary(f'{config.data.name} build: ')
  tok_path = builders.tokenizer_path(config)
  tok = tokenizer_lib.load_tokenizer(tok_path)
  check_tokenizer(config, tok)
  try:
    src = tfds.builder_from_directory(ds_dir).as_data_source(split=split)
  except (KeyError, ValueError) as e:
    raise UserError(f'{ds_dir} has no split {split!r} ({one_line(e, 120)}); llava_instruct has a '
                    'validation split only with data.val_permille > 0') from None
  if len(src) == 0:
    raise UserError(f'{config.data.name}/{split} has no records: the build {built.summary()} '
                    f'(details in {os.path.join(ds_dir, builders.REPORT)})')
  recs = []
  for i in range(min(len(src), UNK_SAMPLE_RECORDS)):
    try:
      recs.append(records.decode(src[i]))
    except Exception:  # pylint: disable=broad-except  (a malformed record is the reader's business)
      pass
  frac = unk_fraction(tok, recs)
  if frac is not None and frac > UNK_WARN_FRACTION:
    log.warning('tokenizer %s maps %.0f%% of the text tokens of the first %d %s records to <unk>: is it '
                "the data's tokenizer (data.tokenizer)?", tok_path, 100 * frac, len(recs), config.data.name)
  return src, tok_path


def make_iterator(config, split, *, shuffle=True, num_epochs=None, process_index=None,
                  process_count=None, drop_remainder=True):
  """This process's batches of `split` (see the module docstring): dicts of numpy arrays, B =
  batch_size // process_count, T one of `buckets(config)`, keys and shapes as `pad_batch` (the batch table
  of docs/data.md). num_epochs=None repeats forever. Returns a DataIterator (get_state / set_state).
  """
  d = config.data
  pi = jax.process_index() if process_index is None else int(process_index)
  pc = jax.process_count() if process_count is None else int(process_count)
  if d.batch_size % pc:
    raise ValueError(f'batch_size {d.batch_size} is not divisible by process_count {pc}')
  src, tok_path = _source(config, split)
  ds = grain.MapDataset.source(src)
  if shuffle:
    ds = ds.shuffle(seed=int(d.seed))
  ds = ds.repeat(num_epochs)
  if num_epochs is not None:
    ds = ds[:len(ds) // pc * pc]
  ds = ds[pi::pc].map(Processor(config, tok_path))
  threads = 0 if d.num_workers else 2
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=64))
  if d.num_workers:
    if not flags.FLAGS.is_parsed():   # grain's workers read absl flags (defaults outside absl.app)
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(d.num_workers)))
  counter = policy.SkipCounter('samples', strict=d.strict)
  it_ds = it_ds.filter(SkipFilter(counter, limit=max(len(src) // pc, 1), what=f'{d.name}/{split}'))
  bucket_lens = buckets(config)
  pad_id = int(config.model.pad_token_id)
  it_ds = it_ds.batch(d.batch_size // pc, drop_remainder=drop_remainder,
                      batch_fn=lambda xs: pad_batch(xs, bucket_lens, pad_id))
  return DataIterator(iter(it_ds), counter, f'{d.name}/{split} process {pi}/{pc}')


def make_eval_samples(config, split, limit=None):
  """Per-sample dicts for generation evaluation, in record order (bad records skipped, counted).

  Each: prompt_ids (P,) int32 (up to and including the last "ASSISTANT:"), pixel_values (H, W, 3)
  float32, has_image bool, image_start int, answer str (gold short answer; when truncation
  dropped trailing rounds, prompt and answer are those of the last kept round), question_type str,
  id int (record index), record_id str, full: the teacher-forcing sample (input_ids, labels,
  attention_mask (L,) int32, pixel_values, has_image and the span keys, unbatched).
  """
  src, tok_path = _source(config, split)
  proc = Processor(config, tok_path, prompt=True)
  counter = policy.SkipCounter('samples', strict=config.data.strict)
  out = []
  for i in range(len(src)):
    if limit is not None and len(out) >= limit:
      break
    s = proc(src[i])
    if 'skip' in s:
      counter.skip(s['record_id'], s['skip'], s['detail'])
      continue
    counter.ok()
    full = {k: s[k] for k in ('input_ids', 'labels', 'pixel_values', 'has_image', 'id') + SPAN_KEYS}
    full['attention_mask'] = np.ones_like(s['input_ids'])
    out.append({'prompt_ids': s['prompt_ids'], 'pixel_values': s['pixel_values'],
                'has_image': bool(s['has_image']), 'image_start': int(s['image_start']),
                'answer': s['answer'], 'question_type': s['question_type'], 'id': int(s['id']),
                'record_id': s['record_id'], 'full': full})
  counter.log_summary(f'{config.data.name}/{split} eval: ')
  return out


def left_pad_batch(prompts, pad_id, length=None):
  """LEFT-pads 1-D id arrays for batched generation -> (ids (B, T) int32, attention_mask (B, T) int32),
  T = `length` or the longest prompt."""
  t = max(len(p) for p in prompts) if length is None else int(length)
  ids = np.full((len(prompts), t), pad_id, np.int32)
  mask = np.zeros((len(prompts), t), np.int32)
  for i, p in enumerate(prompts):
    if len(p) > t:
      raise ValueError(f'prompt {i} has {len(p)} > {t} tokens')
    if len(p):
      ids[i, t - len(p):], mask[i, t - len(p):] = p, 1
  return ids, mask


def pad_length(batch, length, pad_id):
  """Right-pads a batch's (B, T) token arrays to T = length: input_ids with pad_id, attention_mask with 0,
  labels with -100 (other arrays unchanged)."""
  t = batch['input_ids'].shape[1]
  if length < t:
    raise ValueError(f'cannot pad a batch of length {t} to {length}')
  if length == t:
    return batch
  out = dict(batch)
  for key, fill in (('input_ids', pad_id), ('attention_mask', 0), ('labels', templates.IGNORE)):
    if key in out:
      out[key] = np.pad(np.asarray(out[key]), ((0, 0), (0, length - t)), constant_values=fill)
  return out


def agree_length(batch, pad_id):
  """Multi-process: every process pads its part to the longest bucket any process picked (each process
  buckets its own samples, but a global array needs one T). A no-op in a single process."""
  if jax.process_count() == 1 or 'input_ids' not in batch:
    return batch
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  t = int(np.max(multihost_utils.process_allgather(np.int32(batch['input_ids'].shape[1]))))
  return pad_length(batch, t, pad_id)


def to_global(batch, sharding, pad_id=0):
  """Per-process numpy batch (dict of arrays, leading axis = this process's part) → global jax arrays
  (`jax.make_array_from_process_local_data`). sharding: one Sharding for every array (leading axis over
  the data axes) or a dict key → Sharding; pad_id fills the extra columns when processes picked different
  buckets (`agree_length`)."""
  batch = agree_length(batch, pad_id)

  def one(k, x):
    s = sharding[k] if isinstance(sharding, dict) else sharding
    return jax.make_array_from_process_local_data(s, np.asarray(x))
  return {k: one(k, v) for k, v in batch.items()}
