"""The data-parallel layout: one step on 4 devices is one step on 1 device, to rounding.

The computations run in a worker process with 4 forced CPU devices
(tests/four_device_worker.py); the multi-process case is tests/test_multihost.py.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from deepfashion_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def four_devices(synthetic_folder, tmp_path_factory):
  """What tests/four_device_worker.py measured, on 4 forced CPU devices."""
  out = str(tmp_path_factory.mktemp('four_devices') / 'results.json')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  result = subprocess.run(
      [sys.executable, '-m', 'tests.four_device_worker', synthetic_folder[0], out],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out) as f:
    results = json.load(f)
  assert results['device_count'] == 4
  return results


def test_one_and_four_devices_give_the_same_update(four_devices):
  """Devices change only the order of float32 sums (dropout's masks included, below): XLA:CPU's convolutions sum in another
  order when the batch is split, and a few batch-norm updates are near-cancelling sums
  whose relative error that order moves to ~3e-3, while the median update agrees to ~2e-6.
  A sharding error moves every update: batch-norm statistics over each device's share of
  the batch instead of the whole, for one, moves the median update by ~120%
  (measured when this test was written)."""
  relative = four_devices['relative_updates']
  assert len(relative) > 50  # parameters, batch-norm statistics and optimiser state
  assert np.median(relative) < 1e-4, np.median(relative)
  assert max(relative) < 1e-2, max(relative)


def test_dropout_masks_do_not_depend_on_the_devices(four_devices):
  """The key is replicated and random bits are drawn per global index, not per shard: the
  heads, whose gradients pass through the masks, get the same update on 1 and 4 devices
  (another mask would move them by ~100%)."""
  assert max(four_devices['head_updates']) < 1e-3, four_devices['head_updates']
  one, four = four_devices['losses']
  assert abs(four - one) < 1e-4 * abs(one), (one, four)


def test_a_batch_is_split_along_the_data_axis_and_a_replica_read_back():
  mesh = sharding.make_mesh()
  batch = {'x': np.arange(8 * 3, dtype=np.float32).reshape(8, 3)}
  placed = sharding.global_batch(batch, mesh)['x']
  assert placed.shape == (8, 3) and placed.sharding.spec == jax.sharding.PartitionSpec('data')
  np.testing.assert_array_equal(np.asarray(placed), batch['x'])
  replica = jax.device_put(np.ones(3, np.float32), sharding.replicated(mesh))
  np.testing.assert_array_equal(sharding.local_copy({'r': replica})['r'], np.ones(3))
