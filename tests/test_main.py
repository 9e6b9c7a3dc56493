"""main.py and the data folder resolution, end to end on the tiny test config."""

import errno
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from configs import test as test_config
from deepfashion_jax import errors
from deepfashion_jax.data import folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
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
  with pytest.raises(errors.ConfigError, match=r'config.data.data_dir=.* does not hold '
                                                r'DeepFashion: missing Anno/list_category_'):
    folder.data_root(config.data, str(tmp_path / 'run'))


def test_no_data_dir_and_no_synthetic_data_is_refused(tmp_path):
  data = ml_collections.ConfigDict(dict(data_dir='', synthetic_images=0))
  with pytest.raises(errors.ConfigError, match='config.data.data_dir is empty'):
    folder.data_root(data, str(tmp_path))


def test_configured_folder_is_read(synthetic_folder, tmp_path):
  root, summary = synthetic_folder
  config = test_config.get_config()
  config.data.data_dir = root
  index = folder.load_index(config.data, str(tmp_path / 'run'))
  assert len(index) == summary['num_images']


def _denied_under(folder, real_makedirs):
  """os.makedirs as in a read-only `folder` (root writes anywhere, so the test pretends)."""
  def makedirs(name, *args, **kwargs):
    if os.path.abspath(name).startswith(str(folder) + os.sep):
      raise PermissionError(errno.EACCES, 'Permission denied', name)
    return real_makedirs(name, *args, **kwargs)
  return makedirs


def test_a_workdir_in_a_read_only_folder_is_named_not_a_raw_permission_error(
    synthetic_folder, tmp_path, monkeypatch):
  """The annotation cache goes next to the workdir: a parent that cannot be written is an
  UnwritableFolderError naming the workdir, the cache and the flag that moves it."""
  config = test_config.get_config()
  config.data.data_dir = synthetic_folder[0]
  workdir = tmp_path / 'read_only' / 'run'
  workdir.mkdir(parents=True)
  monkeypatch.setattr(os, 'makedirs', _denied_under(tmp_path / 'read_only', os.makedirs))
  with pytest.raises(folder.UnwritableFolderError, match=re.escape(
      f'--workdir={workdir}: the annotation cache goes next to it, in '
      f'{tmp_path / "read_only" / "annotation_cache"}, which cannot be written (Permission '
      'denied): put the workdir in a writable folder, or set --config.data.cache_dir')):
    folder.load_index(config.data, str(workdir))


def test_a_cache_dir_that_cannot_be_made_is_named(synthetic_folder, tmp_path):
  """A file where config.data.cache_dir's folder would go: named, not a FileExistsError."""
  config = test_config.get_config()
  config.data.data_dir = synthetic_folder[0]
  (tmp_path / 'cache').write_text('not a folder')
  config.data.cache_dir = str(tmp_path / 'cache')
  with pytest.raises(errors.DeepFashionError, match=re.escape(
      f'config.data.cache_dir={tmp_path / "cache"} cannot be written (File exists): set it to '
      'a writable folder')):
    folder.load_index(config.data, str(tmp_path / 'run'))


def _main(*flags_given, workdir):
  command = [sys.executable, os.path.join(ROOT, 'main.py'), f'--workdir={workdir}', *flags_given]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_mistyped_override_is_one_line_with_the_field_it_meant(tmp_path):
  """config_flags' chained traceback (before main runs) becomes one line, exit status 2."""
  result = _main('--config=configs/demo.py', '--config.num_train_step=10',
                 workdir=tmp_path / 'run')
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      'main.py: error: config.num_train_step: no such field in configs/demo.py; did you mean '
      'num_train_steps?')
  assert not os.path.exists(tmp_path / 'run')
