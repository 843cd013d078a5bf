"""The vicuna_v1 conversation template of LLaVA-1.5, tokenization, labels and per-sample spans.

Text as LLaVA-1.5's `conv_vicuna_v1.get_prompt()` (sep " ", sep2 "</s>", no space before the next
"USER:"); `<image>` moved to the front of the first question, then expanded to N placeholders
(docs/data.md, "The template"; tokens are assigned to text parts by character offsets):

    <s>{SYSTEM} USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

Spans (docs/data.md; end exclusive) are positions in the expanded sequence; a text-only sample's
image_start is where its image would stand (after the first "USER:"); the instruction span runs from the
first question's "\n" on. Labels: the ids of every assistant answer (incl. "</s>"), -100 elsewhere.
Truncation to max_len drops whole trailing rounds; a first round cut inside its answer keeps the cut
part as the last-answer span (without "</s>"); no answer token left after the first "ASSISTANT:" is
`over_long`.
"""
import dataclasses

import numpy as np

from dynllava_jax.data import policy

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")
ROLES = ('USER', 'ASSISTANT')
SEP, SEP2 = ' ', '</s>'
IGNORE = -100


@dataclasses.dataclass
class Encoded:
  """One tokenized conversation. `input_ids`, `labels`: (L,) int32, L <= max_len."""
  input_ids: np.ndarray
  labels: np.ndarray
  has_image: bool
  image_start: int
  instr_start: int
  instr_end: int
  answer_start: int
  answer_end: int
  truncated: bool = False
  num_rounds: int = 1   # (question, answer) rounds kept after truncation


def normalize_turns(conversations, has_image, frames=1):
  """LLaVA `conversations` (list of {from, value}) → list of (question, answer) rounds.

  Moves `<image>` to the front of the first question ("<image>\\n" + question), as LLaVA does; with
  frames > 1 the tags (one per frame, `data/frames.py`) stay where they are, in order.
  """
  rounds = []
  for i in range(0, len(conversations), 2):
    q, a = conversations[i]['value'], conversations[i + 1]['value']
    if i == 0 and has_image and frames == 1:
      q = policy.IMAGE_TAG + '\n' + q.replace(policy.IMAGE_TAG, '').strip()
    rounds.append((q, a))
  return rounds


def format_vicuna(rounds, last_answer=True):
  """The vicuna_v1 text (without `<s>`) of rounds [(question, answer)] and character regions of its parts
  -> text, questions [(start, end)], role_ends [end of each "ASSISTANT:"], answers [(start, end)] (incl. the
  "</s>"). last_answer=False leaves the last answer out: the text ends with its "ASSISTANT:" (generation).
  """
  text = SYSTEM + SEP
  questions, role_ends, answers = [], [], []
  for i, (q, a) in enumerate(rounds):
    text += ROLES[0] + ': '
    questions.append((len(text), len(text) + len(q)))
    text += q + SEP + ROLES[1] + ':'
    role_ends.append(len(text))
    if i == len(rounds) - 1 and not last_answer:
      break
    start = len(text)   # the answer region starts at its separating space (sentencepiece's '▁')
    text += ' ' + a + SEP2
    answers.append((start, len(text)))
  return text, questions, role_ends, answers


def _token_ends(offsets):
  """The character each token ends on (its last char; empty spans use their start)."""
  return np.where(offsets[:, 1] > offsets[:, 0], offsets[:, 1] - 1, offsets[:, 0])


def _first_at_or_after(ends, char):
  return int(np.searchsorted(ends, char, side='left'))


def _tokenize(tok, text, image_token_id, num_image_tokens, bos_id, frames=1):
  """Tokenizes `text`, prepends bos, expands each `<image>` token (at most `frames` of them) to N
  placeholders. Returns ids, char ends, the first image position (-1: none)."""
  ids, offsets = tok.encode(text)
  ends = _token_ends(offsets)
  where = np.flatnonzero(ids == image_token_id)
  if len(where) > frames:
    raise policy.SampleProblem(policy.MULTIPLE_TAGS, f'{len(where)} image tokens after tokenization'
                               + (f' for {frames} frames' if frames > 1 else ''))
  ids = np.concatenate([[bos_id], ids]).astype(np.int32)
  ends = np.concatenate([[-1], ends])
  pos = -1
  for w in where[::-1]:          # from the last, so earlier positions stay valid
    pos = int(w) + 1
    n = num_image_tokens
    ids = np.concatenate([ids[:pos], np.full(n, image_token_id, np.int32), ids[pos + 1:]])
    ends = np.concatenate([ends[:pos], np.full(n, ends[pos]), ends[pos + 1:]])
  return ids.astype(np.int32), ends, pos


def encode_conversation(tok, conversations, has_image, *, num_image_tokens, image_token_id,
                        bos_id, max_len, frames=1):
  """Tokenizes one LLaVA conversation for teacher forcing -> Encoded with (L,) int32 arrays, L <= max_len.

  tok: tokenizer.Tokenizer; conversations: [{from: human|gpt, value}] (checked by policy.check_record);
  has_image: its first question then holds `<image>`; num_image_tokens: N per image; frames: F frames
  (`data/frames.py`): F `<image>` tags, each expanded to N placeholders where it stands, the image span
  starting at the first; truncation never cuts a frame (such a sample is `over_long`). Raises
  policy.SampleProblem: over_long, or an `<image>` tag count that tokenization contradicts.
  """
  rounds = normalize_turns(conversations, has_image, frames)
  text, questions, role_ends, answers = format_vicuna(rounds)
  ids, ends, pos = _tokenize(tok, text, image_token_id, num_image_tokens, bos_id, frames)
  if has_image != (pos >= 0):
    raise policy.SampleProblem(policy.TAG_WITHOUT_IMAGE if pos >= 0 else policy.IMAGE_WITHOUT_TAG,
                               'image token count does not match the image')
  n_img = num_image_tokens if has_image else 0
  if has_image and frames > 1:
    got = int((ids == image_token_id).sum()) // num_image_tokens
    if got != frames:
      raise policy.SampleProblem(policy.IMAGE_WITHOUT_TAG, f'{frames} frames but {got} `<image>` tags')
    where = np.flatnonzero(ids == image_token_id)
    last_image_end = int(where[-1]) + 1
    pos = int(where[0])
  # Spans in the expanded sequence; image tokens share the char end of the tag, so search the
  # ends of the text tokens only and shift past the image.
  def at(char):
    return _first_at_or_after(ends, char)
  if has_image:
    image_start = pos
    instr_start = pos + n_img
  else:
    instr_start = at(questions[0][0])
    image_start = instr_start
  instr_end = at(role_ends[0])
  if has_image and frames > 1:       # the first turn's text after its last frame
    instr_start = max(instr_start, min(last_image_end, instr_end))
  ans = [(at(s), at(e)) for s, e in answers]
  labels = np.full_like(ids, IGNORE)
  for s, e in ans:
    labels[s:e] = ids[s:e]
  truncated = False
  kept = len(ans)
  if len(ids) > max_len:
    truncated = True
    fit = [i for i, (_, e) in enumerate(ans) if e <= max_len]
    if fit:
      kept = fit[-1] + 1
      ans = ans[:kept]
      length = ans[-1][1]
    elif ans[0][0] < max_len:
      kept = 1
      ans = [(ans[0][0], max_len)]
      length = max_len
    else:
      raise policy.SampleProblem(
          policy.OVER_LONG, f'{len(ids)} tokens; image + first question need {instr_end + 1} > '
          f'max_len {max_len}')
    if has_image and frames > 1 and length < last_image_end:
      raise policy.SampleProblem(policy.OVER_LONG, f'{len(ids)} tokens; the {frames} frames end at '
                                 f'{last_image_end} > max_len {max_len}')
    ids, labels = ids[:length], labels[:length]
  return Encoded(ids, labels.astype(np.int32), bool(has_image), int(image_start), int(instr_start),
                 int(instr_end), int(ans[-1][0]), int(ans[-1][1]), truncated, kept)


def encode_prompt(tok, conversations, has_image, *, num_image_tokens, image_token_id, bos_id,
                  max_len, frames=1):
  """Generation prompt: everything up to and including the last "ASSISTANT:" -> (prompt_ids (P,) int32,
  gold last answer string). Raises SampleProblem(over_long) if P > max_len."""
  rounds = normalize_turns(conversations, has_image, frames)
  text, _, _, _ = format_vicuna(rounds, last_answer=False)
  ids, _, _ = _tokenize(tok, text, image_token_id, num_image_tokens, bos_id, frames)
  if len(ids) > max_len:
    raise policy.SampleProblem(policy.OVER_LONG, f'prompt has {len(ids)} > max_len {max_len} tokens')
  return ids, rounds[-1][1]
