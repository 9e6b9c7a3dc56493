"""Shared fixtures: small synthetic DeepFashion folders, written once per test session."""

import os
import sys

import pytest

# The suite runs on one CPU device. Long runs on several forced host devices
# (--xla_force_host_platform_device_count) now and then deadlock in XLA:CPU's in-process
# all-reduce on this 2-core machine (a rendezvous timeout aborts the process), so the
# sharding checks start their own 4-device processes (test_steps.py, test_multihost.py).

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


@pytest.fixture
def saves_as_on_a_gpu(monkeypatch):
  """torch.save tags every storage 'cuda:0', as for tensors on the first GPU: location_tag
  asks the registered taggers in priority order, and this one comes first. The file is what
  a GPU save writes (torch copies a GPU storage's bytes to the host to write them)."""
  torch = pytest.importorskip('torch')
  registry = torch.serialization._package_registry  # pylint: disable=protected-access
  cuda_tagger = (-1, lambda storage: 'cuda:0', lambda storage, location: None)
  monkeypatch.setattr(torch.serialization, '_package_registry', [cuda_tagger] + registry)
