"""Shared set-up: small synthetic DeepFashion folders, written once per test session, and
one compilation cache for the session.

The suite runs on one CPU device. Long runs on several forced host devices
(--xla_force_host_platform_device_count) can deadlock in XLA:CPU's in-process all-reduce
on a 2-core machine, so the sharded checks run in processes of their own
(test_sharding.py, test_multihost.py).
"""

import atexit
import os
import shutil
import tempfile

import pytest

from deepfashion_jax.data import synthetic


_CACHE_VARIABLE = 'DEEPFASHION_JAX_TEST_COMPILATION_CACHE'


def _shared_compilation_cache() -> str:
  """The session's compilation cache folder: made by the first pytest process (the only
  one, or pytest-xdist's controller, which configures itself before it starts its
  workers) and named in the environment, which the workers and the processes the tests
  start inherit: one cache for them all, removed when its maker exits."""
  cache = os.environ.get(_CACHE_VARIABLE)
  if not cache:
    cache = tempfile.mkdtemp(prefix='deepfashion_jax_test_cache_')
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    os.environ[_CACHE_VARIABLE] = cache
  return cache


def pytest_configure(config):  # pylint: disable=unused-argument
  """Before any test: a persistent compilation cache shared by this process, pytest-xdist's
  other workers and the processes the tests start (main.py runs, workers), since many
  tests compile the same few steps; and absl flags marked parsed, so that code reading a
  flag (main.py's) takes its default, as in a parsed run. (The pipeline needs no parsing:
  test_pipeline.py runs grain's workers from an unparsed process.)"""
  try:
    import filelock  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:  # JAX would warn at each cache read and compile everything again
    raise pytest.UsageError('the shared compilation cache needs the filelock package: '
                            'pip install -r requirements-dev.txt') from e
  cache = _shared_compilation_cache()
  os.environ['JAX_COMPILATION_CACHE_DIR'] = cache
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '1'
  # A size limit turns on JAX's file lock around each read and write of the cache: two
  # workers may write and read one entry at once (without it a half-written entry is read,
  # warned about and compiled again). 20 GB: nothing is ever evicted.
  os.environ['JAX_COMPILATION_CACHE_MAX_SIZE'] = str(20 * 2**30)
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  jax.config.update('jax_compilation_cache_max_size', 20 * 2**30)
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope='session')
def synthetic_folder(tmp_path_factory):
  """A clean 80-image synthetic folder and the writer's summary of it."""
  root = str(tmp_path_factory.mktemp('deepfashion'))
  return root, synthetic.write_synthetic_deepfashion(root, num_images=80, seed=0)


@pytest.fixture(scope='session')
def trained_workdir(synthetic_folder, tmp_path_factory):
  """A workdir holding a tiny model (configs/test.py) trained for two steps on the
  synthetic folder, evaluated and checkpointed at step 2. Tests read it; one that writes
  into a workdir copies it first."""
  from deepfashion_jax import train  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('trained_run'))
  train.train_and_evaluate(helpers.tiny_config(synthetic_folder[0], num_train_steps=2,
                                               eval_every_steps=2, checkpoint_every_steps=2),
                           workdir)
  return workdir


@pytest.fixture(scope='session')
def quirky_folder(tmp_path_factory):
  """A 70-image synthetic folder with the real release's hazards (--quirks)."""
  root = str(tmp_path_factory.mktemp('deepfashion_quirks'))
  return root, synthetic.write_synthetic_deepfashion(root, num_images=70, seed=1, quirks=True)


@pytest.fixture
def saves_as_on_a_gpu(monkeypatch):
  """torch.save tags every storage 'cuda:0', as for tensors on the first GPU: location_tag
  asks the registered taggers in priority order, and this one comes first. The file is what
  a GPU save writes (torch copies a GPU storage's bytes to the host to write them)."""
  torch = pytest.importorskip('torch')
  registry = torch.serialization._package_registry  # pylint: disable=protected-access
  cuda_tagger = (-1, lambda storage: 'cuda:0', lambda storage, location: None)
  monkeypatch.setattr(torch.serialization, '_package_registry', [cuda_tagger] + registry)
