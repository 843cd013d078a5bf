"""Bad-input policy: reasons, counting, strict errors, and the LLaVA-record structure checks.

Build time (tfds builders) checks the JSON structure, the human/gpt alternation, the `<image>` tag
against the image, and that the image file exists and decodes. Read time (the grain pipeline) checks
the length against `max_len` and decodes the image again. Each bad record is, by default, skipped and
counted by reason (logged with a summary line such as
`skipped 5 of 12 records: missing_image=1, corrupt_image=1, ...`); with `strict=True` it raises
`BadSampleError` whose one-line message names the record id and the reason.
"""
import collections
import logging

from dynllava_jax.errors import UserError

log = logging.getLogger('dynllava_jax.data')

IMAGE_TAG = '<image>'

# Every reason a record can be skipped for.
MALFORMED = 'malformed'                  # missing keys, wrong types, empty conversation
BAD_ROLES = 'bad_roles'                  # not human/gpt alternating, starts with gpt, ends with human
MISSING_IMAGE = 'missing_image'          # image file not found
CORRUPT_IMAGE = 'corrupt_image'          # image does not decode
TAG_WITHOUT_IMAGE = 'tag_without_image'  # `<image>` in the text but no image
IMAGE_WITHOUT_TAG = 'image_without_tag'  # image but no `<image>` in the first human turn
MULTIPLE_TAGS = 'multiple_image_tags'    # more than one `<image>` (one image per sample)
OVER_LONG = 'over_long'                  # image + first question do not fit in max_len
REASONS = (MALFORMED, BAD_ROLES, MISSING_IMAGE, CORRUPT_IMAGE, TAG_WITHOUT_IMAGE, IMAGE_WITHOUT_TAG,
           MULTIPLE_TAGS, OVER_LONG)


def printable(value):
  """str(value) with characters UTF-8 cannot encode (lone surrogates from a JSON's escapes) written as
  backslash escapes, so a log line or report never fails to encode."""
  return str(value).encode('utf-8', 'backslashreplace').decode('utf-8')


class BadSampleError(UserError):
  """A bad record in strict mode. `str(err)` is one line: `bad record id=<id>: <reason>: <detail>`."""

  def __init__(self, record_id, reason, detail=''):
    self.record_id, self.reason, self.detail = record_id, reason, detail
    msg = f'bad record id={record_id}: {reason}' + (f': {detail}' if detail else '')
    super().__init__(msg.replace('\n', ' '))


class SkipCounter:
  """Counts records seen and skipped (by reason); logs the first few skips and a summary."""

  def __init__(self, what='records', strict=False, max_logged=10):
    self.what, self.strict, self.max_logged = what, strict, max_logged
    self.total = 0
    self.skipped = collections.Counter()
    self.skipped_ids = []   # (id, reason) of the first skips, for reports

  def ok(self):
    self.total += 1

  def skip(self, record_id, reason, detail=''):
    """Counts a bad record, or raises BadSampleError in strict mode."""
    if self.strict:
      raise BadSampleError(record_id, reason, detail)
    self.total += 1
    self.skipped[reason] += 1
    n = sum(self.skipped.values())
    record_id, detail = printable(record_id), printable(detail)
    if n <= self.max_logged:
      log.warning('skipping %s id=%s: %s%s', self.what[:-1], record_id, reason,
                  f': {detail}' if detail else '')
    if len(self.skipped_ids) < 1000:
      self.skipped_ids.append((record_id, reason))

  @property
  def num_skipped(self):
    return sum(self.skipped.values())

  def summary(self):
    parts = ', '.join(f'{r}={self.skipped[r]}' for r in sorted(self.skipped, key=_reason_order))
    return f'skipped {self.num_skipped} of {self.total} {self.what}' + (f': {parts}' if parts else '')

  def log_summary(self, prefix=''):
    (log.warning if self.num_skipped else log.info)('%s%s', prefix, self.summary())

  def state(self):
    """JSON-able dict."""
    return {'total': self.total, 'skipped': dict(self.skipped)}

  def load_state(self, state):
    self.total = int(state.get('total', 0))
    self.skipped = collections.Counter({k: int(v) for k, v in state.get('skipped', {}).items()})


def _reason_order(r):
  return REASONS.index(r) if r in REASONS else len(REASONS)


def check_conversation(conversations):
  """Checks a LLaVA `conversations` value (a list of `{'from': 'human'|'gpt', 'value': str}`); returns
  (reason, detail) or None if it is well-formed."""
  if not isinstance(conversations, list) or not conversations:
    return MALFORMED, '`conversations` must be a non-empty list'
  for i, turn in enumerate(conversations):
    if not isinstance(turn, dict) or 'from' not in turn or 'value' not in turn:
      return MALFORMED, f'turn {i} lacks from/value'
    if not isinstance(turn['from'], str) or not isinstance(turn['value'], str):
      return MALFORMED, f'turn {i} from/value must be strings'
  roles = [t['from'] for t in conversations]
  for i, role in enumerate(roles):
    want = 'human' if i % 2 == 0 else 'gpt'
    if role != want:
      return BAD_ROLES, f'turn {i} is {role!r}, expected {want!r} (roles {roles[:6]})'
  if len(roles) % 2:
    return BAD_ROLES, 'ends with a human turn'
  return None


def check_image_tags(conversations, has_image):
  """Checks that `<image>` occurs once, in the first human turn, iff there is an image."""
  counts = [t['value'].count(IMAGE_TAG) for t in conversations]
  total = sum(counts)
  if total > 1:
    return MULTIPLE_TAGS, f'{total} `<image>` tags'
  if has_image and counts[0] != 1:
    return IMAGE_WITHOUT_TAG, 'image given but no `<image>` tag in the first human turn'
  if not has_image and total:
    return TAG_WITHOUT_IMAGE, '`<image>` tag but no image'
  return None


def check_record(record):
  """Structure checks of one LLaVA JSON record `{id, image?: relative path, conversations}`; returns
  (reason, detail) or None."""
  if not isinstance(record, dict):
    return MALFORMED, 'record is not an object'
  if 'conversations' not in record:
    return MALFORMED, 'missing key `conversations`'
  if 'id' in record and not isinstance(record['id'], (str, int)):
    return MALFORMED, '`id` must be a string or int'
  image = record.get('image')
  if image is not None and (not isinstance(image, str) or not image):
    return MALFORMED, '`image` must be a non-empty string path'
  bad = check_conversation(record['conversations'])
  if bad:
    return bad
  return check_image_tags(record['conversations'], image is not None)


class SampleProblem(Exception):
  """Raised by per-sample code (templates, images) when a record is bad; callers count or re-raise."""

  def __init__(self, reason, detail=''):
    self.reason, self.detail = reason, detail
    super().__init__(f'{reason}: {detail}' if detail else reason)


def check_unicode(record):
  """(MALFORMED, detail) when a string of the record (id, roles, texts) cannot be stored as UTF-8 (a lone
  surrogate such as "\\ud800" from a JSON escape), else None."""
  strings = [('id', record.get('id'))] + [(f'turn {i}', t.get(k)) for i, t in enumerate(record['conversations'])
                                          for k in ('from', 'value')]
  for where, text in strings:
    if isinstance(text, str):
      try:
        text.encode('utf-8')
      except UnicodeEncodeError as e:
        return MALFORMED, f'{where} is not valid Unicode ({e.reason} at character {e.start})'
  return None
