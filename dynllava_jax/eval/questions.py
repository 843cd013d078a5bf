"""Benchmark question files in the LLaVA evaluation format -> the answer files LLaVA's scripts read.

    qs = read_questions('llava-bench/questions.jsonl', image_folder='llava-bench/images')
    answer_questions(engine, qs, 'answers.jsonl', method='dynamic', overrides={}, model_id='tiny')

Question file: JSON lines with `question_id`, `text` (a `<image>` tag in it is dropped: the image goes
first, as in LLaVA) and optionally `image` (relative to image_folder); other keys are kept in the answer's
metadata. Answer file: one line per question, in order, with the fields of LLaVA's `model_vqa*.py`
output (`answer_id`: a fresh uuid4 hex; docs/eval.md). Greedy by default (the config's eval.temperature).
"""
import json
import os
import uuid

from dynllava_jax.errors import UserError
from dynllava_jax.eval.report import write_jsonl


def read_questions(path, image_folder=''):
  """-> [{'question_id', 'text', 'image' (absolute path or None), 'extra': {other keys}}]; UserError (one
  line, naming the file and line) for bad JSON, missing fields or a missing image file."""
  if not os.path.isfile(path):
    raise UserError(f'--questions {path}: no such file')
  out, seen = [], set()
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        q = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f'{path}:{n}: not JSON ({e.msg})') from None
      if not isinstance(q, dict) or 'question_id' not in q or not isinstance(q.get('text'), str):
        raise UserError(f'{path}:{n}: a question needs "question_id" and "text" (LLaVA question format)')
      if q['question_id'] in seen:
        raise UserError(f'{path}:{n}: question_id {q["question_id"]!r} appears twice')
      seen.add(q['question_id'])
      image = q.get('image')
      if image:
        image = os.path.join(image_folder, str(image)) if image_folder else str(image)
        if not os.path.isfile(image):
          raise UserError(f'{path}:{n}: image {image} not found (--image_folder {image_folder!r})')
      extra = {k: v for k, v in q.items() if k not in ('question_id', 'text', 'image')}
      out.append({'question_id': q['question_id'], 'text': q['text'], 'image': image or None, 'extra': extra})
  if not out:
    raise UserError(f'--questions {path}: no questions')
  return out


def answer_questions(engine, questions, answers_path, *, method=None, overrides=None, model_id='dynllava',
                     batch_size=8, max_new_tokens=None, report=print):
  """Answers every question (batches of batch_size, images opened per batch) and writes the answer file
  (atomically, parent dirs made). Returns the list of answer dicts."""
  from dynllava_jax.serve.engine import open_image  # pylint: disable=g-import-not-at-top
  answers = []
  for start in range(0, len(questions), batch_size):
    group = questions[start:start + batch_size]
    prompts = [engine.encode([(q['text'], None)], open_image(q['image']) if q['image'] else None)
               for q in group]
    results = engine.run(prompts, method=method, overrides=overrides, max_new_tokens=max_new_tokens,
                         slots=batch_size)
    for q, r in zip(group, results):
      answers.append({'question_id': q['question_id'], 'prompt': q['text'], 'text': r.text,
                      'answer_id': uuid.uuid4().hex, 'model_id': model_id,
                      'metadata': {**q['extra'], 'method': method or engine.method_name,
                                   'overrides': _jsonable(overrides or {}),
                                   'kept_image_ratio': r.kept_image_ratio, 'kept_text_ratio': r.kept_text_ratio,
                                   'kv_bytes': r.kv_bytes, 'finish_reason': r.finish_reason}})
    report(f'  answered {len(answers)}/{len(questions)}')
  write_jsonl(answers_path, answers)
  return answers


def run_question_file(src, questions_path, answers_path, *, image_folder='', methods=('dynamic',),
                      keep_ratios=(), batch_size=8, limit=None, model_id='dynllava', report=print):
  """eval.py --questions: every (method, budget) point answers the file; one answer file per point
  (answers_path itself for a single point, else answers.<label>.jsonl). Returns {label: path}."""
  from dynllava_jax.eval import budgets  # pylint: disable=g-import-not-at-top
  from dynllava_jax.serve.engine import Engine  # pylint: disable=g-import-not-at-top
  qs = read_questions(questions_path, image_folder)[:limit or None]
  points = budgets.sweep_points([m.strip() for m in methods if m.strip()], keep_ratios)
  if not points:
    raise UserError('no methods given; e.g. --methods dynamic')
  try:
    eng = Engine(src, method=points[0][0], overrides=points[0][1])
    for name, ov in points:
      eng.method(name, ov)                      # every budget valid before answering anything
  except ValueError as e:
    raise UserError(' '.join(str(e).split())) from None
  root, ext = os.path.splitext(answers_path)
  out = {}
  for name, ov in points:
    label = budgets.label(name, ov)
    path = answers_path if len(points) == 1 else f'{root}.{label.replace(" ", "_")}{ext or ".jsonl"}'
    report(f'{label}: {len(qs)} questions -> {path}')
    answer_questions(eng, qs, path, method=name, overrides=ov, model_id=model_id, batch_size=batch_size,
                     report=report)
    out[label] = path
  return out


def _jsonable(d):
  return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
