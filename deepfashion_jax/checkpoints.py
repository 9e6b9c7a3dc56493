"""Orbax checkpoints of a run: the train state and the data iterator, saved together.

One checkpoint per saved step under `<workdir>/checkpoints/<step>/`, with three items:
`state` (parameters, batch-norm statistics, optimiser state, step, rng), `data` (the grain
iterator's position) and `config` (the run's configuration, to name what differs when
another configuration meets it). Step 0 is reserved for converted PyTorch checkpoints,
which have no `data`: training never saves before its first step. Saving is asynchronous
and atomic (orbax writes a temporary folder and renames it); the newest few are kept,
plus the best by the configured evaluation metric.

Resuming takes the newest checkpoint that reads back: a damaged one (truncated files,
say) is moved to `<workdir>/damaged_checkpoints/` with a warning, and the one before it is
used. A checkpoint whose arrays do not fit this run's model is never half-loaded: the
run stops with the differences named.
"""

import os
import shutil
import time
from typing import Optional

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

CHECKPOINT_FOLDER = 'checkpoints'
DAMAGED_FOLDER = 'damaged_checkpoints'
# The config fields that shape the model's arrays, named when a checkpoint does not fit.
_SHAPING_FIELDS = ('model', 'dtype', 'data.crop_size', 'optimizer')


class CheckpointMismatchError(ValueError):
  """A checkpoint written by another configuration than this run's."""


class DamagedCheckpointError(ValueError):
  """A checkpoint that cannot be read back."""


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
  # Handlers named up front, so that a checkpoint's metadata reads before any restore.
  handlers = dict(state=ocp.StandardCheckpointHandler(),
                  data=grain.checkpoint.CheckpointHandler(), config=ocp.JsonCheckpointHandler())
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_FOLDER),
                               item_handlers=handlers, options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None,
         metrics: Optional[dict] = None, config=None):
  """Starts an asynchronous save of the state (and the data iterator, and the config) at
  `step`. A failure (a full disk, say) raises OSError here or at the next save; the
  checkpoints already written stay intact."""
  items = dict(state=ocp.args.StandardSave(state))
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  if config is not None:
    items['config'] = ocp.args.JsonSave(config.to_dict())
  try:
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)
  except OSError as e:
    raise OSError(f'Could not save the checkpoint of step {step} in {manager.directory}: '
                  f'{e}. The checkpoints written before are intact: steps '
                  f'{manager.all_steps()}.') from e


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


def _flat_fields(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat_fields(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _config_differences(manager, step: int, config) -> list:
  """'config.x: A in the checkpoint, B here' for the shaping fields that differ."""
  try:
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    saved = _flat_fields(saved['config'])
  except Exception:  # pylint: disable=broad-except  (older or converted checkpoints have none)
    return []
  here = _flat_fields(config.to_dict())
  return [f'config.{name}: {saved.get(name)!r} in the checkpoint, {here.get(name)!r} here'
          for name in sorted(set(saved) | set(here))
          if name.startswith(_SHAPING_FIELDS) and saved.get(name) != here.get(name)]


def check_compatible(manager, step: int, abstract_state, config=None):
  """Raises CheckpointMismatchError naming the arrays (and config fields) that differ
  between the checkpoint at `step` and this run's state; DamagedCheckpointError when its
  description cannot be read."""
  try:
    metadata = manager.item_metadata(step)['state']
    saved = ocp.tree.to_flat_dict(metadata, sep='/') if metadata is not None else {}
  except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds here)
    raise DamagedCheckpointError(f'{type(e).__name__}: {e}') from e
  if not saved:
    raise DamagedCheckpointError('it has no readable state')
  expected = ocp.tree.to_flat_dict(abstract_state, sep='/')
  differences = [f'{k}: only in the checkpoint' for k in saved.keys() - expected.keys()]
  differences += [f'{k}: not in the checkpoint' for k in expected.keys() - saved.keys()]
  differences += [f'{k}: shape {tuple(saved[k].shape)} in the checkpoint, '
                  f'{tuple(expected[k].shape)} here'
                  for k in saved.keys() & expected.keys()
                  if tuple(saved[k].shape) != tuple(expected[k].shape)]
  differences.sort(key=lambda d: (not d.startswith('params/'), d))  # the model's first
  if differences:
    fields = _config_differences(manager, step, config) if config is not None else []
    raise CheckpointMismatchError(
        f'The checkpoint of step {step} in {manager.directory} was written by another '
        'configuration; it is not loaded. '
        + (f'Config: {"; ".join(fields)}. ' if fields else '')
        + f'{len(differences)} arrays differ, e.g. {"; ".join(differences[:4])}. Use the '
        'configuration it was trained with, or a new --workdir.')


def restore_checked(manager, step: int, abstract_state, data_iterator=None, config=None):
  """`restore` after `check_compatible`; a checkpoint that fails to read back raises
  DamagedCheckpointError."""
  check_compatible(manager, step, abstract_state, config)
  try:
    return restore(manager, step, abstract_state, data_iterator)
  except Exception as e:  # pylint: disable=broad-except  (truncated files: many kinds)
    raise DamagedCheckpointError(f'{type(e).__name__}: {str(e)[:300]}') from e


def _set_aside(manager, step: int, reason: str):
  """Moves a damaged checkpoint out of the manager's sight, keeping it for inspection."""
  workdir = os.path.dirname(os.fspath(manager.directory))
  target = os.path.join(workdir, DAMAGED_FOLDER, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
  os.makedirs(os.path.dirname(target), exist_ok=True)
  shutil.move(os.path.join(os.fspath(manager.directory), str(step)), target)
  logging.warning('The checkpoint of step %d is damaged (%s); moved it to %s and trying the '
                  'one before it.', step, reason, target)
  manager.reload()


def restore_newest_intact(manager, abstract_state, data_iterator=None, config=None):
  """(step, state) of the newest checkpoint that reads back, or (None, None) when there is
  none; damaged ones are set aside, one of another configuration stops the run. Step 0
  (converted weights) restores no data iterator."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = restore_checked(manager, step, abstract_state,
                              data_iterator if step > 0 else None, config)
      return step, state
    except DamagedCheckpointError as e:
      _set_aside(manager, step, str(e))
  return None, None
