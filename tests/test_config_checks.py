"""A wrong configuration value is refused at start, naming the field."""

import os
import re
import subprocess
import sys

import pytest

from configs import test as test_config
from deepfashion_jax import config_checks
from tests import helpers


def test_a_wrong_config_value_is_refused_naming_the_field(synthetic_folder, tmp_path):
  command = [sys.executable, os.path.join(helpers.ROOT, 'main.py'), '--config=configs/test.py',
             f'--workdir={tmp_path}', '--config.dtype=float8']
  result = subprocess.run(command, cwd=helpers.ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "config.dtype='float8': expected one of ('float32', 'bfloat16', 'float16')" in \
      result.stderr


@pytest.mark.parametrize('field,value,message', [
    ('data.source', 'lmdb', "config.data.source='lmdb': expected one of ('folder', 'tfds')"),
    ('warmup_steps', 10, 'config.warmup_steps=10 leaves no steps for the cosine decay'),
])


def test_wrong_values_are_refused_in_process(field, value, message):
  config = test_config.get_config()
  config.schedule = 'cosine'
  section, _, name = field.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    config_checks.check(config)
