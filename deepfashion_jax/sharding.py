"""The data-parallel layout: one mesh axis, `data`, over every device of every process."""

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """One axis, `data`, over the given devices (all of them by default)."""
  devices = np.array(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(devices, ('data',))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(batch: dict, mesh) -> dict:
  """This process's share of a batch -> global arrays split along the mesh's `data` axis."""
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in batch.items()}
