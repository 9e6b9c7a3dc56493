"""The data-parallel layout: one mesh axis, `data`, over every device of every process."""

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from deepfashion_jax import errors


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """One axis, `data`, over the given devices (all of them by default)."""
  devices = np.array(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(devices, ('data',))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(batch, mesh):
  """This process's share of a batch (a dict of arrays, or a `PackedBatch`) -> the same of
  global arrays split along the mesh's `data` axis.

  With one process its share is the whole batch: one `device_put` of every array at once
  places the same arrays as an assembly per array, in about 40% of its host time (the
  training loop does this every step; benchmarks/loop_overhead.py).
  """
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  batch = batch if isinstance(batch, PackedBatch) else dict(batch)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(lambda value: jax.make_array_from_process_local_data(sharding, value),
                      batch)


@jax.tree_util.register_pytree_node_class
class PackedBatch:
  """A batch of rows as few arrays: the entries of each dtype flattened past their first
  axis and joined along the second, an entry alone in its dtype left as it is (the images:
  no copy). Putting an array on the devices costs the host a fixed time whatever its size,
  so the training batch's 13 entries go as 4 arrays (benchmarks/loop_overhead.py times
  both). `unpack` gives the entries back, in a jitted step too (the layout is the pytree's
  static part)."""

  def __init__(self, groups: dict, layout: tuple):
    self.groups = groups  # dtype name -> (B, ...) array
    self.layout = layout  # (name, dtype name, shape past the first axis), in batch order

  @classmethod
  def pack(cls, batch: dict) -> 'PackedBatch':
    layout = tuple((name, np.dtype(value.dtype).name, tuple(value.shape[1:]))
                   for name, value in batch.items())
    by_dtype = {}
    for name, dtype, _ in layout:
      by_dtype.setdefault(dtype, []).append(batch[name])
    groups = {dtype: values[0] if len(values) == 1 else
              np.concatenate([v.reshape(len(v), -1) for v in values], axis=1)
              for dtype, values in by_dtype.items()}
    return cls(groups, layout)

  def unpack(self) -> dict:
    alone = {dtype for dtype in self.groups
             if sum(entry[1] == dtype for entry in self.layout) == 1}
    batch, columns = {}, dict.fromkeys(self.groups, 0)
    for name, dtype, shape in self.layout:
      group = self.groups[dtype]
      if dtype in alone:
        batch[name] = group
        continue
      width = int(np.prod(shape))
      start, columns[dtype] = columns[dtype], columns[dtype] + width
      batch[name] = group[:, start:start + width].reshape(group.shape[0], *shape)
    return batch

  def tree_flatten(self):
    return (self.groups,), self.layout

  @classmethod
  def tree_unflatten(cls, layout, children):
    return cls(children[0], layout)


def unpacked(batch) -> dict:
  """A batch's entries, whether it came packed (`PackedBatch`) or as a dict."""
  return batch.unpack() if isinstance(batch, PackedBatch) else batch


def local_copy(tree):
  """NumPy values of replicated global arrays, read from this process's own replica.

  Arithmetic on the global arrays themselves would run as computations over every
  process's devices, which the processes must then issue in the same order.
  """
  # device_get starts every copy before waiting for the first. Leaves, not tree.map: the
  # training loop reads every step's metrics, and a tree of replicas (nnx Variables) built
  # and taken apart again is host time on its path.
  leaves, treedef = jax.tree.flatten(tree)
  copies = jax.device_get([x.addressable_data(0) for x in leaves])
  return jax.tree.unflatten(treedef, copies)


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """Starts JAX's multi-controller runtime: with the given coordinator, process count and
  id when they are given; on its own in a cluster JAX recognises (SLURM, Open MPI); not at
  all on a single host without them. CPU collectives (tests, CPU clusters) go through gloo."""
  given = (coordinator_address, num_processes, process_id)
  if any(value is not None for value in given):
    if any(value is None for value in given):
      raise errors.ConfigError('--coordinator_address, --num_processes and --process_id go '
                               'together: give all three, or none in a cluster JAX '
                               'recognises')
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _cluster_detected():
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize()


def _cluster_detected() -> bool:
  """Whether the environment variables of a SLURM or Open MPI job are set, by JAX's own
  tests (its cluster registry is private; the cloud TPU and Kubernetes ones would reach
  for the network, so only these two are asked)."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  return clusters.SlurmCluster.is_env_present() or clusters.OmpiCluster.is_env_present()
