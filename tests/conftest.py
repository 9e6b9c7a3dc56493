"""Shared fixtures: small synthetic DeepFashion folders, written once per test session."""

import os
import sys

import pytest

# Four CPU devices, so that sharded steps are tested on one machine (before JAX starts).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepfashion_jax.data import synthetic  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='session')
def synthetic_folder(tmp_path_factory):
  """A clean 80-image synthetic folder and the writer's summary of it."""
  root = str(tmp_path_factory.mktemp('deepfashion'))
  return root, synthetic.write_synthetic_deepfashion(root, num_images=80, seed=0)


@pytest.fixture(scope='session')
def quirky_folder(tmp_path_factory):
  """A 70-image synthetic folder with the real release's hazards (--quirks)."""
  root = str(tmp_path_factory.mktemp('deepfashion_quirks'))
  return root, synthetic.write_synthetic_deepfashion(root, num_images=70, seed=1, quirks=True)
