"""eval.py --questions: the LLaVA question file (tests/assets/llava_questions) -> the answer file LLaVA's
scripts read, from the workdir and from its HF export alike; bad question files are one line."""
import json
import os

import pytest

from dynllava_jax import source
from dynllava_jax.errors import UserError
from dynllava_jax.eval import questions as Q
import use_utils

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets', 'llava_questions')
QFILE = os.path.join(ASSETS, 'questions.jsonl')


def test_question_file_round_trip_workdir_and_export(tmp_path, tmp_path_factory):
  path, cfg = use_utils.shared_workdir(tmp_path_factory)
  export = use_utils.shared_export(tmp_path_factory)
  got = {}
  for kind, src in [('workdir', source.load_source(workdir=path, one_device=True, report=lambda _: None)),
                    ('export', source.load_source(model_dir=export))]:
    src.config.eval.max_new_tokens = 8
    out = tmp_path / kind / 'answers.jsonl'
    Q.run_question_file(src, QFILE, str(out), image_folder=os.path.join(ASSETS, 'images'),
                        methods=['dynamic'], batch_size=2, model_id='tiny', report=lambda _: None)
    got[kind] = [json.loads(l) for l in out.read_text().splitlines()]
  qs = [json.loads(l) for l in open(QFILE)]
  answers = got['workdir']
  assert [a['question_id'] for a in answers] == [q['question_id'] for q in qs]       # ids kept, in order
  for a, q in zip(answers, qs):
    assert set(a) == {'question_id', 'prompt', 'text', 'answer_id', 'model_id', 'metadata'}
    assert a['prompt'] == q['text'] and a['model_id'] == 'tiny' and a['metadata']['category'] == q['category']
    assert a['text'] and len(a['answer_id']) == 32
  assert answers[3]['metadata']['kept_image_ratio'] == 1.0          # the text-only question
  assert answers[0]['metadata']['kept_image_ratio'] < 1.0
  assert [a['text'] for a in got['export']] == [a['text'] for a in answers]   # the export answers the same


def test_bad_question_files_are_one_line(tmp_path):
  bad = tmp_path / 'q.jsonl'
  for text, msg in [('{"question_id": 1}\n', 'needs "question_id" and "text"'),
                    ('{"question_id": 1, "text": "a"\n', 'not JSON'),
                    ('{"question_id": 1, "text": "a", "image": "nope.png"}\n', 'nope.png not found'),
                    ('{"question_id": 1, "text": "a"}\n{"question_id": 1, "text": "b"}\n', 'appears twice')]:
    bad.write_text(text)
    with pytest.raises(UserError, match=msg):
      Q.read_questions(str(bad), str(tmp_path))
