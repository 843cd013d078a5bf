"""The decoder's layer plan: a uniform plan is the model recorded before the reshape, bit for bit."""
import os

import numpy as np
import pytest

from scripts import record_model_fixture as fixture

ASSET = os.path.join(os.path.dirname(__file__), 'assets', 'model_fixture.npz')


@pytest.fixture(scope='module')
def recorded():
  with np.load(ASSET) as f:
    return {k: f[k] for k in f.files}


def test_uniform_plan_is_bit_identical_to_the_recorded_model(recorded):
  """A subset that compiles in about a minute (`scripts/record_model_fixture.py --check` compares all)."""
  got = fixture.compute(methods=('dense', 'dynamic', 'fastv', 'pdrop'), teacher_methods=('dynamic', 'fastv'),
                        generated=('dense', 'dynamic'), nocache=False)
  assert len(got) >= 15
  for k in got:
    np.testing.assert_array_equal(got[k], recorded[k], err_msg=k)
