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
run stops with the differences named; so does one trained with another pooling or pixel
scaling (`_MEANING_FIELDS`), whose arrays fit but would compute something else, and one
that keeps a moving average of the weights (config.ema_decay > 0) in a run that keeps
none, or the other way round (the message names config.ema_decay).
Evaluation and prediction restore through `restore_for_inference`, which takes those
fields, and whether there is a moving average, from the checkpoint itself instead
(`restore_every_kept`: each kept one in turn, for config.eval.checkpoint=all), and hand
back the raw weights or, with config.eval.weights='ema', their moving average.
"""

import dataclasses
import inspect
import os
import shutil
import time
from typing import Optional

from absl import logging
from flax import nnx
import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from deepfashion_jax import steps
from deepfashion_jax.models import backbones
from deepfashion_jax.models import fashion_net

CHECKPOINT_FOLDER = 'checkpoints'
DAMAGED_FOLDER = 'damaged_checkpoints'
# The config fields that shape the model's arrays, named when a checkpoint does not fit.
_SHAPING_FIELDS = ('model', 'dtype', 'data.crop_size', 'optimizer', 'grad_clip_norm')
# Fields that change no array but what the weights compute: a checkpoint is meaningful only
# with the values it was trained (or converted) with: FashionNet's CHANGES_MEANING and two
# of the data's. The value a checkpoint saved before the field existed had is given here
# (a model option's: its default).
_MODEL_OPTIONS = inspect.signature(fashion_net.FashionNet.__init__).parameters
_MEANING_FIELDS = {**{f'model.{name}': _MODEL_OPTIONS[name].default
                      for name in fashion_net.CHANGES_MEANING},
                   'data.normalization': 'baseline', 'data.crop': 'none'}
# FashionNet's attributes as checkpoints written before they were renamed name them (the
# baseline's PyTorch names) -> their names now: such checkpoints restore under their own.
_RENAMED = {'reduce_1x1': 'box_reduce', 'fc_bbox_xy': 'box_top_left',
            'fc_bbox_offset': 'box_size', 'fc_bin': 'attribute_classifier',
            'fc_cls': 'category_classifier', 'fc_garment_type': 'garment_type_classifier',
            'fc_cls_per_type': 'per_type_category_classifiers'}


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


# TrainState fields that are None when unused and that checkpoints written before they
# existed do not have at all (orbax then refuses the tree as another structure).
_LATER_OPTIONAL_FIELDS = ('ema_params', 'ema_batch_stats')


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
  """The state saved at `step`, placed like `abstract_state` (a tree of
  jax.ShapeDtypeStruct with shardings); restores the data iterator in place if given."""
  absent = _absent_optional_fields(manager, step, abstract_state)
  target = abstract_state
  if absent:  # restored as the dict of the other fields, then made a state again
    target = {f.name: getattr(abstract_state, f.name)
              for f in dataclasses.fields(abstract_state) if f.name not in absent}
  items = dict(state=ocp.args.StandardRestore(target))
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))['state']
  if absent:
    restored = type(abstract_state)(**restored, **{name: None for name in absent})
  return restored


def _absent_optional_fields(manager, step: int, abstract_state) -> tuple:
  """The _LATER_OPTIONAL_FIELDS that are None in `abstract_state` and missing from the
  checkpoint of `step` (one written before they existed)."""
  if not dataclasses.is_dataclass(abstract_state):
    return ()
  try:
    saved = manager.item_metadata(step)['state']
  except Exception:  # pylint: disable=broad-except  (unreadable: check_compatible says so)
    return ()
  return tuple(name for name in _LATER_OPTIONAL_FIELDS
               if getattr(abstract_state, name, 0) is None and name not in saved)


def abstract_like(state):
  """Shapes, dtypes and shardings of a state, to restore into."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def rename_model_attributes(tree, names: dict):
  """`tree` with the top-level keys of every nnx.State in it (params, batch_stats, the
  optimiser's moments: the model's attributes) renamed by `names`; others kept."""
  rename = lambda node: type(node)({names.get(k, k): v for k, v in node.raw_mapping.items()})
  is_state = lambda node: isinstance(node, nnx.State)
  return jax.tree.map(lambda node: rename(node) if is_state(node) else node, tree,
                      is_leaf=is_state)


def _in_saved_names(manager, step: int, abstract_state):
  """`abstract_state` with the model's attributes named as the checkpoint of `step` names
  them: their names before `_RENAMED` when it was written before the rename."""
  try:
    saved_params = manager.item_metadata(step)['state']['params']
  except Exception:  # pylint: disable=broad-except  (unreadable: check_compatible says so)
    return abstract_state
  if _RENAMED.keys().isdisjoint(saved_params):
    return abstract_state
  return rename_model_attributes(abstract_state, {new: old for old, new in _RENAMED.items()})


def _flat_fields(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat_fields(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _saved_config(manager, step: int) -> Optional[dict]:
  """The flattened config saved with the checkpoint of `step`; None for checkpoints
  written without one. A backbone saved as a ResNet depth (`18`, before backbones were
  named) reads as its name ('resnet18'), so that it is no difference from a config that
  names the same backbone."""
  try:
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  except Exception:  # pylint: disable=broad-except  (orbax raises many kinds here)
    return None
  if not saved.get('config'):
    return None
  flat = _flat_fields(saved['config'])
  if 'model.backbone' in flat:
    flat['model.backbone'] = backbones.canonical_name(flat['model.backbone'])
  return flat


def _config_differences(manager, step: int, config) -> list:
  """'config.x: A in the checkpoint, B here' for the shaping fields that differ."""
  saved = _saved_config(manager, step)
  if saved is None:
    return []
  here = _flat_fields(config.to_dict())
  return [f'config.{name}: {saved.get(name)!r} in the checkpoint, {here.get(name)!r} here'
          for name in sorted(set(saved) | set(here))
          if name.startswith(_SHAPING_FIELDS) and saved.get(name) != here.get(name)]


def _meaning_differences(manager, step: int, config) -> dict:
  """{field: value in the checkpoint} for the _MEANING_FIELDS whose value here differs."""
  saved = _saved_config(manager, step)
  if saved is None:
    return {}
  here = _flat_fields(config.to_dict())
  return {name: saved.get(name, default) for name, default in _MEANING_FIELDS.items()
          if saved.get(name, default) != here.get(name, default)}


def check_compatible(manager, step: int, abstract_state, config=None):
  """Raises CheckpointMismatchError naming the arrays (and config fields) that differ
  between the checkpoint at `step` and this run's state, or the _MEANING_FIELDS it was
  trained with that differ from `config`; DamagedCheckpointError when its description
  cannot be read."""
  try:
    metadata = manager.item_metadata(step)['state']
    saved = ocp.tree.to_flat_dict(metadata, sep='/') if metadata is not None else {}
  except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds here)
    raise DamagedCheckpointError(f'{type(e).__name__}: {e}') from e
  if not saved:
    raise DamagedCheckpointError('it has no readable state')
  expected = ocp.tree.to_flat_dict(_in_saved_names(manager, step, abstract_state), sep='/')
  differences = [f'{k}: only in the checkpoint' for k in saved.keys() - expected.keys()]
  differences += [f'{k}: not in the checkpoint' for k in expected.keys() - saved.keys()]
  differences += [f'{k}: shape {tuple(saved[k].shape)} in the checkpoint, '
                  f'{tuple(expected[k].shape)} here'
                  for k in saved.keys() & expected.keys()
                  if tuple(saved[k].shape) != tuple(expected[k].shape)]
  differences.sort(key=lambda d: (not d.startswith('params/'), d))  # the model's first
  _check_same_ema(manager, step, saved, expected, config)
  meaning = _meaning_differences(manager, step, config) if config is not None else {}
  if meaning and not differences:
    here = _flat_fields(config.to_dict())
    raise CheckpointMismatchError(
        f'The checkpoint of step {step} in {manager.directory} was trained with '
        + ', '.join(f'config.{k}={v!r}' for k, v in meaning.items()) + ' ('
        + ', '.join(f'{here.get(k)!r} here' for k in meaning) + '): its weights compute '
        'something else with this configuration; it is not loaded. Set '
        + ' '.join(f'--config.{k}={v}' for k, v in meaning.items()) + '.')
  if differences:
    fields = _config_differences(manager, step, config) if config is not None else []
    raise CheckpointMismatchError(
        f'The checkpoint of step {step} in {manager.directory} was written by another '
        'configuration; it is not loaded. '
        + (f'Config: {"; ".join(fields)}. ' if fields else '')
        + f'{len(differences)} arrays differ, e.g. {"; ".join(differences[:4])}. Use the '
        'configuration it was trained with, or a new --workdir.')


_EMA_ARRAYS = ('ema_params/', 'ema_batch_stats/')


def _has_ema_arrays(flat: dict) -> bool:
  return any(key.startswith(_EMA_ARRAYS) for key in flat)


def _check_same_ema(manager, step: int, saved: dict, expected: dict, config):
  """Raises CheckpointMismatchError naming config.ema_decay when the checkpoint keeps a
  moving average of the weights and this run does not, or the other way round."""
  in_checkpoint, here = _has_ema_arrays(saved), _has_ema_arrays(expected)
  if in_checkpoint == here:
    return
  saved_decay = (_saved_config(manager, step) or {}).get('ema_decay')
  here_decay = config.ema_decay if config is not None else None
  if in_checkpoint:
    what = ('keeps a moving average of the weights'
            + (f' (config.ema_decay={saved_decay})' if saved_decay else '')
            + f' and this run does not (config.ema_decay={here_decay})')
    fix = (f'--config.ema_decay={saved_decay}' if saved_decay else
           'a config.ema_decay > 0')
  else:
    what = ('keeps no moving average of the weights (config.ema_decay=0) and this run '
            f'does (config.ema_decay={here_decay})')
    fix = '--config.ema_decay=0'
  raise CheckpointMismatchError(
      f'The checkpoint of step {step} in {manager.directory} {what}; it is not loaded. '
      f'Set {fix}, or use a new --workdir.')


def restore_checked(manager, step: int, abstract_state, data_iterator=None, config=None):
  """`restore` after `check_compatible`; a checkpoint that fails to read back raises
  DamagedCheckpointError."""
  check_compatible(manager, step, abstract_state, config)
  try:
    state = restore(manager, step, _in_saved_names(manager, step, abstract_state),
                    data_iterator)
  except Exception as e:  # pylint: disable=broad-except  (truncated files: many kinds)
    raise DamagedCheckpointError(f'{type(e).__name__}: {str(e)[:300]}') from e
  return rename_model_attributes(state, _RENAMED)


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


# ----------------------------------------------------------------------------- inference


EVERY_CHECKPOINT = 'all'  # config.eval.checkpoint: every kept one (--mode=evaluate only)


def checkpoint_step(manager, choice: str) -> int:
  """config.eval.checkpoint: '' the newest, 'best', or a step number."""
  if choice == 'best':
    step = manager.best_step()
  elif choice:
    if not choice.isdigit() or int(choice) not in manager.all_steps():
      also = (f" ('{EVERY_CHECKPOINT}' is for --mode=evaluate only)"
              if choice == EVERY_CHECKPOINT else '')
      raise ValueError(f'config.eval.checkpoint={choice!r}: expected \'\', \'best\' or one of '
                       f'the saved steps {manager.all_steps()}{also}')
    step = int(choice)
  else:
    step = manager.latest_step()
  if step is None:
    raise ValueError(f'no checkpoint in {manager.directory}: train first, or write one '
                     'with --mode=convert')
  return step


def inference_config(manager, step: int, config):
  """`config` with the _MEANING_FIELDS the checkpoint of `step` was trained with, each
  change logged: evaluation and prediction compute what training computed."""
  differences = _meaning_differences(manager, step, config)
  if not differences:
    return config
  config = config.copy_and_resolve_references()
  here = _flat_fields(config.to_dict())
  for name, value in differences.items():
    logging.warning('config.%s=%r here, but the checkpoint of step %d was trained with %r: '
                    'using %r.', name, here.get(name), step, value, value)
    section, field = name.split('.')
    config[section][field] = value
  return config


def restore_for_inference(config, workdir: str, mesh, attributes=None):
  """(config, step, StepConfig, state) of config.eval.checkpoint in `workdir`, the config
  holding the values the checkpoint was trained with (`inference_config`); `attributes`
  as in `steps.create_train_state` (None: for prediction only)."""
  manager = _read_only_manager(config, workdir)
  step = checkpoint_step(manager, config.eval.checkpoint)
  config = _with_checkpoint_ema(manager, step, inference_config(manager, step, config))
  step_config, state = steps.create_train_state(config, mesh, attributes)
  state = restore_checked(manager, step, abstract_like(state), config=config)
  return config, step, step_config, _chosen_weights(manager, step, state, config)


def _with_checkpoint_ema(manager, step: int, config):
  """`config` whose ema_decay keeps a moving average exactly when the checkpoint of
  `step` does (inference restores it either way: config.eval.weights chooses)."""
  try:
    saved = ocp.tree.to_flat_dict(manager.item_metadata(step)['state'], sep='/')
  except Exception:  # pylint: disable=broad-except  (unreadable: check_compatible says so)
    return config
  if _has_ema_arrays(saved) == (config.ema_decay > 0):
    return config
  decay = 0.0
  if _has_ema_arrays(saved):  # the value matters not for inference, only being > 0
    decay = (_saved_config(manager, step) or {}).get('ema_decay') or 0.999
  config = config.copy_and_resolve_references()
  config.ema_decay = decay
  return config


def _chosen_weights(manager, step: int, state, config):
  """The restored state with config.eval.weights' weights as its params and batch_stats:
  'raw' as trained, 'ema' their moving average (refused on a checkpoint without one)."""
  if config.eval.weights != 'ema':
    return state
  if not steps.has_ema(state):
    raise ValueError(f'config.eval.weights=ema: the checkpoint of step {step} in '
                     f'{manager.directory} keeps no moving average of the weights (it was '
                     'trained with config.ema_decay=0); use --config.eval.weights=raw')
  return steps.ema_weights(state)


def restore_every_kept(config, workdir: str, mesh, attributes=None):
  """Yields `restore_for_inference`'s (config, step, StepConfig, state) for every kept
  checkpoint of `workdir`, in step order, one state at a time (config.eval.checkpoint=all).

  They share the first one's config and StepConfig, so that the steps compile once: a
  workdir's checkpoints come from one configuration (training refuses another), and one
  that does not fit stops here with CheckpointMismatchError.
  """
  manager = _read_only_manager(config, workdir)
  kept = sorted(manager.all_steps())
  if not kept:
    raise ValueError(f'no checkpoint in {manager.directory}: train first, or write one '
                     'with --mode=convert')
  config = _with_checkpoint_ema(manager, kept[0], inference_config(manager, kept[0], config))
  step_config, state = steps.create_train_state(config, mesh, attributes)
  abstract_state = abstract_like(state)
  del state  # the initial values: only their shapes and shardings are needed
  for step in kept:
    state = restore_checked(manager, step, abstract_state, config=config)
    yield config, step, step_config, _chosen_weights(manager, step, state, config)


def _read_only_manager(config, workdir: str) -> ocp.CheckpointManager:
  return create_manager(workdir, config.keep_checkpoints, config.best_metric, read_only=True)
