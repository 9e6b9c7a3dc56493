"""main.py and the data folder resolution, end to end on the tiny test config."""

import os
import subprocess
import sys

import ml_collections
import pytest

from configs import test as test_config
from deepfashion_jax.data import folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_describe_writes_synthetic_data_once_then_uses_the_cache(tmp_path):
  command = [sys.executable, os.path.join(ROOT, 'main.py'), '--config=configs/test.py',
             f'--workdir={tmp_path / "run"}', '--mode=describe']
  first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
  assert 'DeepFashion index of' in first.stdout and '60 images' in first.stdout
  assert 'Writing 60 synthetic DeepFashion images' in first.stderr
  second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
  assert second.stdout == first.stdout
  assert 'Writing' not in second.stderr and 'from the cache' in second.stderr
  assert os.listdir(tmp_path / 'annotation_cache')  # next to the workdir


def test_main_refuses_flags_it_does_not_have(tmp_path):
  """The synthetic writer's own flags (--seed, --root, ...) are not main.py's: refused,
  not silently ignored."""
  command = [sys.executable, os.path.join(ROOT, 'main.py'), '--config=configs/test.py',
             f'--workdir={tmp_path / "run"}', '--mode=describe', '--seed=3']
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "Unknown command line flag 'seed'" in result.stderr
  assert not os.path.exists(tmp_path / 'run')


def test_a_folder_without_deepfashion_is_refused_with_the_field_named(tmp_path):
  config = test_config.get_config()
  config.data.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match=r'config.data.data_dir=.* does not hold DeepFashion: '
                                       r'missing Anno/list_category_cloth.txt'):
    folder.data_root(config.data, str(tmp_path / 'run'))


def test_no_data_dir_and_no_synthetic_data_is_refused(tmp_path):
  data = ml_collections.ConfigDict(dict(data_dir='', synthetic_images=0))
  with pytest.raises(ValueError, match='config.data.data_dir is empty'):
    folder.data_root(data, str(tmp_path))


def test_configured_folder_is_read(synthetic_folder, tmp_path):
  root, summary = synthetic_folder
  config = test_config.get_config()
  config.data.data_dir = root
  index = folder.load_index(config.data, str(tmp_path / 'run'))
  assert len(index) == summary['num_images']
