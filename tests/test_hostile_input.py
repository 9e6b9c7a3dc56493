"""The hostile-input driver: its counts, its exit status, and the surface modules' interface."""

import importlib
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from benchmarks import hostile_input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CLEAN_SURFACE = '''
from deepfashion_jax import errors

SURFACE = 'clean surface'


def _refuse():
  raise errors.ConfigError('config.x=1: expected 2')


def tries(folder):
  (folder / 'input.txt').write_text('written by tries()')
  yield 'an input that loads', lambda: (folder / 'input.txt').read_text()
  yield 'an input that is refused', _refuse
'''

_UNCLEAN_SURFACE = '''
import time

import numpy as np

SURFACE = 'unclean surface'


def _bare_error():
  raise TypeError('a bare error\\nits second line')


def tries(folder):
  yield 'an input that allocates 8 MiB', lambda: np.ones(8 * 2**20, np.uint8).sum()
  yield 'an input that escapes as a TypeError', _bare_error
  yield 'an input that hangs', lambda: time.sleep(30)
'''


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
  """A package of surface modules like benchmarks/hostile/: one all clean, one not, one
  without the interface."""
  name = f'fake_hostile_{os.getpid()}_{tmp_path.name}'
  package = tmp_path / name
  package.mkdir()
  (package / '__init__.py').write_text('')
  (package / 'clean.py').write_text(textwrap.dedent(_CLEAN_SURFACE))
  (package / 'unclean.py').write_text(textwrap.dedent(_UNCLEAN_SURFACE))
  (package / 'no_interface.py').write_text('TRIES = []\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  return name


def _run(package, capsys, tmp_path, *args):
  out = tmp_path / 'hostile.json'
  status = hostile_input.main(['--timeout', '0.2', '--json', str(out), *args], package=package)
  return status, json.loads(out.read_text()), capsys.readouterr().out


def test_a_clean_surface_exits_0_with_its_counts(fake_package, capsys, tmp_path):
  status, result, printed = _run(fake_package, capsys, tmp_path, '--surfaces', 'clean')
  assert status == 0 and result['all_clean']
  [surface] = result['surfaces']
  assert (surface['surface'], surface['tries'], surface['accepted'], surface['refused_cleanly'],
          surface['not_clean']) == ('clean surface', 2, 1, 1, 0)
  assert surface['outcomes'][1]['error'] == 'ConfigError: config.x=1: expected 2'
  assert '| clean surface | 2 | 1 | 1 | 0 |' in printed and 'NOT CLEAN' not in printed


def test_an_unclean_try_is_named_and_fails_the_run(fake_package, capsys, tmp_path):
  # Chosen by its SURFACE name this time.
  status, result, printed = _run(fake_package, capsys, tmp_path, '--surfaces',
                                 'unclean surface')
  assert status == 1 and not result['all_clean']
  [surface] = result['surfaces']
  assert [o['outcome'] for o in surface['outcomes']] == ['accepted', 'not clean', 'not clean']
  assert surface['outcomes'][0]['traced_bytes'] >= 8 * 2**20
  assert surface['max_traced_bytes'] == surface['outcomes'][0]['traced_bytes']
  assert surface['outcomes'][1]['error'] == 'TypeError: a bare error'
  assert surface['outcomes'][2]['error'] == 'TryTimedOut: still running after 0.2 s'
  assert re.search(r'/unclean.py:\d+ in _bare_error$', surface['outcomes'][1]['raised_at'])
  assert ('NOT CLEAN  unclean surface: an input that escapes as a TypeError: TypeError: a bare '
          'error (raised at ') in printed
  assert 'its second line' not in printed
  assert '| unclean surface | 3 | 1 | 0 | 2 |' in printed


def test_every_module_runs_and_one_without_the_interface_is_not_clean(fake_package, capsys,
                                                                      tmp_path):
  status, result, printed = _run(fake_package, capsys, tmp_path)
  assert status == 1
  assert [(s['module'], s['tries'], s['not_clean']) for s in result['surfaces']] == [
      ('clean', 2, 0), ('no_interface', 1, 1), ('unclean', 3, 2)]
  assert '| all | 6 | 2 | 1 | 3 |' in printed
  with pytest.raises(SystemExit):  # argparse's usage error, naming what there is
    hostile_input.main(['--surfaces', 'nonexistent'], package=fake_package)
  assert 'no surface nonexistent (there are: clean, no_interface, unclean)' in \
      capsys.readouterr().err


def test_every_surface_module_gives_the_interface():
  names = hostile_input.surface_names()
  assert 'pipeline' in names
  surfaces = []
  for name in names:
    module = importlib.import_module(f'benchmarks.hostile.{name}')
    assert isinstance(module.SURFACE, str) and module.SURFACE, name
    inspect.signature(module.tries).bind(pathlib.Path('folder'))  # the driver's one argument
    surfaces.append(module.SURFACE)
  assert len(set(surfaces)) == len(surfaces)  # one table row each


@pytest.mark.slow
def test_the_pipeline_surface_runs_clean_from_the_command_line(tmp_path):
  # A process of its own, which parses no absl flags: the library caller's condition.
  out = tmp_path / 'pipeline.json'
  completed = subprocess.run(
      [sys.executable, '-m', 'benchmarks.hostile_input', '--surfaces', 'pipeline', '--json',
       str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
  [surface] = json.loads(out.read_text())['surfaces']
  assert surface['not_clean'] == 0 and surface['tries'] >= 30
  accepted = [o['input'] for o in surface['outcomes'] if o['outcome'] == 'accepted']
  assert 'processes=2, no absl flags parsed' in accepted
