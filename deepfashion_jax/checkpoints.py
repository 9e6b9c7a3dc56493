"""Orbax checkpoints of a run: the train state and the data iterator, saved together.

One checkpoint per saved step under `<workdir>/checkpoints/<step>/`, with two items:
`state` (parameters, batch-norm statistics, optimiser state, step) and `data` (the grain
iterator's position). Step 0 is reserved for converted PyTorch checkpoints, which have no
`data`: training never saves before its first step. Saving is asynchronous; the
newest few are kept, plus the best by the configured evaluation metric.
"""

import os
from typing import Optional

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

CHECKPOINT_FOLDER = 'checkpoints'


def create_manager(workdir: str, keep: int = 3, best_metric: str = '',
                   read_only: bool = False) -> ocp.CheckpointManager:
  """Keeps the newest `keep` checkpoints, and the best one by `best_metric` (higher is
  better) among those saved with evaluation metrics."""
  policies = [checkpoint_managers.LatestN(n=keep)]
  best = {}
  if best_metric:
    get_metric = lambda metrics: metrics[best_metric]
    # BestN keeps the last n in sorted order: ascending keeps the highest.
    policies.append(checkpoint_managers.BestN(get_metric_fn=get_metric, reverse=False, n=1,
                                              keep_checkpoints_without_metrics=False))
    best = dict(best_fn=get_metric, best_mode='max')
  options = ocp.CheckpointManagerOptions(
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      read_only=read_only, create=not read_only, **best)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_FOLDER),
                               item_names=('state', 'data'), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None,
         metrics: Optional[dict] = None):
  """Starts an asynchronous save of the state (and the data iterator) at `step`."""
  items = dict(state=ocp.args.StandardSave(state))
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
  """The state saved at `step`, placed like `abstract_state` (a tree of
  jax.ShapeDtypeStruct with shardings); restores the data iterator in place if given."""
  items = dict(state=ocp.args.StandardRestore(abstract_state))
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored['state']


def abstract_like(state):
  """Shapes, dtypes and shardings of a state, to restore into."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
