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


def test_a_packed_batch_goes_as_one_array_per_dtype_and_unpacks_to_the_same_entries():
  """The training loop's batch: the entries of one dtype joined (an entry alone in its dtype
  left as it is), put on the mesh as those few arrays, and unpacked in a jitted step."""
  rows = np.random.default_rng(0)
  batch = dict(canvas=rows.integers(0, 255, (8, 5, 5, 3), np.uint8),
               flip=rows.random(8) < 0.5, box=rows.random((8, 4), np.float32),
               positive=rows.random((8, 7)) < 0.5, landmarks=rows.random((8, 3, 2), np.float32),
               category=rows.integers(0, 50, 8, np.int32))
  packed = sharding.PackedBatch.pack(batch)
  assert {name: group.shape for name, group in packed.groups.items()} == {
      'uint8': (8, 5, 5, 3), 'bool': (8, 8), 'float32': (8, 10), 'int32': (8,)}
  assert packed.groups['uint8'] is batch['canvas']  # the images are not copied
  placed = sharding.global_batch(packed, sharding.make_mesh())
  assert len(jax.tree.leaves(placed)) == 4
  unpacked = jax.jit(sharding.unpacked)(placed)
  assert sorted(unpacked) == sorted(batch)
  for name, value in batch.items():
    assert unpacked[name].dtype == value.dtype, name
    np.testing.assert_array_equal(np.asarray(unpacked[name]), value, err_msg=name)
  assert sharding.unpacked(batch) is batch
