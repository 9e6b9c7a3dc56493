"""Orbax checkpoints of a run: the train state and the data iterator, saved together.

One checkpoint per saved step under `<workdir>/checkpoints/<step>/`, with three items:
`state` (parameters, batch-norm statistics, optimiser state, step, rng), `data` (the grain
iterator's position) and `config` (the run's configuration, to name what differs when
another configuration meets it). Step 0 is reserved for converted PyTorch checkpoints,
which have no `data`: training never saves before its first step. Saving is asynchronous
and atomic (orbax writes a temporary folder and renames it); the newest few are kept,
plus the best by the configured evaluation metric. Each carries FORMAT_VERSION in its step
metadata: one of another version, or of none (written before there were versions), is
refused with its version named, not read under this release's layout.

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
back the raw weights or, with config.eval.weights='ema', their moving average. They read
the weights alone (`restore_weights`), never the optimiser's state: a run trained with
clipping or another optimiser is evaluated, and predicts, under a configuration without
them. They read committed checkpoints only and change nothing (a read-only manager; a
damaged checkpoint is reported, not set aside), so they may run beside a training run in
the same workdir; only that run, which holds the workdir's lock (`run_lock`), moves
checkpoints.
Every restore reads what a checkpoint says of itself once (`read_metadata`, a `Metadata`),
and the checks take that.
"""

import dataclasses
import os
import shutil
import time
from typing import NamedTuple, Optional

from absl import logging
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from deepfashion_jax import errors
from deepfashion_jax import steps
from deepfashion_jax.models import fashion_net

CHECKPOINT_FOLDER = 'checkpoints'
DAMAGED_FOLDER = 'damaged_checkpoints'
# The config fields that shape the model's arrays, named when a checkpoint does not fit.
_SHAPING_FIELDS = ('model', 'dtype', 'data.crop_size', 'optimizer', 'grad_clip_norm')
# Those that shape the weights (what inference restores), not the optimiser's state.
_WEIGHT_SHAPING_FIELDS = ('model', 'data.crop_size')
# The parts of a train state that inference restores (`restore_weights`): the step, the
# weights and their moving average; never the optimiser's state, which evaluation and
# prediction do not need and which another optimiser configuration shapes otherwise.
_WEIGHTS = ('step', 'params', 'batch_stats', 'ema_params', 'ema_batch_stats')
# Fields that change no array but what the weights compute: a checkpoint is meaningful only
# with the values it was trained (or converted) with: FashionNet's CHANGES_MEANING and two
# of the data's.
_MEANING_FIELDS = (tuple(f'model.{name}' for name in fashion_net.CHANGES_MEANING)
                   + ('data.normalization', 'data.crop'))
# Written into every checkpoint's step metadata. Raise it when what a checkpoint holds
# changes (an attribute renamed, a TrainState field added): a checkpoint of another
# version, or of none (written before there were versions: version 0), is refused by name
# instead of being read under this release's layout.
FORMAT_VERSION = 1
_VERSION_KEY = 'format_version'


class CheckpointMismatchError(errors.DeepFashionError, ValueError):
  """A checkpoint written by another configuration than this run's."""


class CheckpointFormatError(CheckpointMismatchError):
  """A checkpoint of another format version than FORMAT_VERSION: this release does not read
  it (as another configuration's, the run stops and the checkpoint stays where it is)."""


class DamagedCheckpointError(errors.DeepFashionError, ValueError):
  """A checkpoint that cannot be read back."""


class NoCheckpointError(errors.DeepFashionError, ValueError):
  """A workdir without the checkpoint that evaluation or prediction asks for."""


def create_manager(workdir: str, keep: int = 3, best_metric: str = '',
                   read_only: bool = False) -> ocp.CheckpointManager:
  """Keeps the newest `keep` checkpoints, and the best one by `best_metric` (higher is
  better) among those saved with evaluation metrics.

  read_only: for evaluation and prediction, beside a run that may be training in the same
  workdir: it sees committed checkpoints only (not orbax's temporary folders), never
  creates, deletes or moves anything, and restores with `restore_weights`."""
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
  # A reader restores part of the state (`restore_weights`): the PyTree handler does that.
  state_handler = (ocp.PyTreeCheckpointHandler() if read_only
                   else ocp.StandardCheckpointHandler())
  handlers = dict(state=state_handler,
                  data=grain.checkpoint.CheckpointHandler(), config=ocp.JsonCheckpointHandler())
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_FOLDER),
                               item_handlers=handlers, options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None,
         metrics: Optional[dict] = None, config=None):
  """Starts an asynchronous save of the state (and the data iterator, and the config) at
  `step`, marked with FORMAT_VERSION. A failure (a full disk, say) raises OSError here or
  at the next save; the checkpoints already written stay intact."""
  items = dict(state=ocp.args.StandardSave(state))
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  if config is not None:
    items['config'] = ocp.args.JsonSave(config.to_dict())
  try:
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                 custom_metadata={_VERSION_KEY: FORMAT_VERSION})
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
  return manager.restore(step, args=ocp.args.Composite(**items))['state']


def abstract_like(state):
  """Shapes, dtypes and shardings of a state, to restore into."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


# ------------------------------------------------------------- what a checkpoint says


@dataclasses.dataclass(frozen=True)
class Metadata:
  """What the checkpoint of one step says of itself, read once per restore
  (`read_metadata`): the checks below take it instead of reading the checkpoint again."""
  step: int
  directory: str  # the manager's folder, for messages
  arrays: dict  # the state's arrays: flat name ('params/box_size/kernel/value') -> shape
  config: Optional[dict]  # the flattened config saved with it; None when saved without one

  @property
  def title(self) -> str:
    """How messages name it, at the start of a sentence."""
    return f'The checkpoint of step {self.step} in {self.directory}'

  @property
  def has_ema(self) -> bool:
    """Whether it keeps a moving average of the weights (trained with config.ema_decay > 0)."""
    return _has_ema_arrays(self.arrays)


def read_metadata(manager: ocp.CheckpointManager, step: int) -> Metadata:
  """The Metadata of the checkpoint of `step`. Raises CheckpointFormatError for one of
  another format version than FORMAT_VERSION, before its config is read, and
  DamagedCheckpointError when its description or its config cannot be read."""
  try:
    step_metadata = manager.metadata(step)
    items = step_metadata.item_metadata
    state = items['state']
    arrays = ocp.tree.to_flat_dict(state, sep='/') if state is not None else {}
  except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds here)
    raise DamagedCheckpointError(f'{type(e).__name__}: {e}') from e
  _check_format_version(step_metadata.custom_metadata.get(_VERSION_KEY, 0), step,
                        manager.directory)
  if not arrays:
    raise DamagedCheckpointError('it has no readable state')
  return Metadata(step=step, directory=os.fspath(manager.directory),
                  arrays={k: tuple(v.shape) for k, v in arrays.items()},
                  config=_saved_config(manager, step) if 'config' in items else None)


def _saved_config(manager, step: int) -> Optional[dict]:
  """The flattened config saved with the checkpoint of `step`."""
  try:
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds here)
    raise DamagedCheckpointError(f'its config: {type(e).__name__}: {e}') from e
  return _flat_fields(saved['config']) if saved['config'] else None


def _check_format_version(version, step: int, directory):
  """Raises CheckpointFormatError, naming `version` and what to do, unless it is
  FORMAT_VERSION."""
  if version == FORMAT_VERSION:
    return
  written = (' (written before checkpoints carried one)' if version == 0 else '')
  raise CheckpointFormatError(
      f'The checkpoint of step {step} in {directory} is of checkpoint format version '
      f'{version}{written}; this release reads version {FORMAT_VERSION} only, so it is not '
      'loaded. Evaluate or predict with it using the release that wrote it, or retrain in a '
      'new --workdir (a converted PyTorch checkpoint: convert the .pth file again with '
      '--mode=convert).')


def _flat_fields(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat_fields(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


_EMA_ARRAYS = ('ema_params/', 'ema_batch_stats/')


def _has_ema_arrays(flat: dict) -> bool:
  return any(key.startswith(_EMA_ARRAYS) for key in flat)


# ------------------------------------------------------------------------ the checks


def _config_differences(metadata: Metadata, config, fields=_SHAPING_FIELDS) -> list:
  """'config.x: A in the checkpoint, B here' for the shaping `fields` that differ."""
  if metadata.config is None:
    return []
  saved, here = metadata.config, _flat_fields(config.to_dict())
  return [f'config.{name}: {saved.get(name)!r} in the checkpoint, {here.get(name)!r} here'
          for name in sorted(set(saved) | set(here))
          if name.startswith(fields) and saved.get(name) != here.get(name)]


def _meaning_differences(metadata: Metadata, config) -> dict:
  """{field: value in the checkpoint} for the _MEANING_FIELDS whose value here differs."""
  if metadata.config is None:
    return {}
  saved, here = metadata.config, _flat_fields(config.to_dict())
  return {name: saved[name] for name in _MEANING_FIELDS
          if name in saved and saved[name] != here.get(name)}


def check_compatible(metadata: Metadata, abstract_state, config=None,
                     weights_only: bool = False):
  """Raises CheckpointMismatchError naming the arrays (and config fields) that differ
  between the checkpoint and this run's state, or the _MEANING_FIELDS it was trained with
  that differ from `config`. weights_only: `abstract_state` holds the _WEIGHTS alone, and
  the checkpoint's other arrays (the optimiser's) are not compared."""
  saved = metadata.arrays
  shaping = _SHAPING_FIELDS
  if weights_only:
    saved = {k: v for k, v in saved.items() if k.split('/', 1)[0] in _WEIGHTS}
    shaping = _WEIGHT_SHAPING_FIELDS
  expected = {k: tuple(v.shape)
              for k, v in ocp.tree.to_flat_dict(abstract_state, sep='/').items()}
  differences = [f'{k}: only in the checkpoint' for k in saved.keys() - expected.keys()]
  differences += [f'{k}: not in the checkpoint' for k in expected.keys() - saved.keys()]
  differences += [f'{k}: shape {saved[k]} in the checkpoint, {expected[k]} here'
                  for k in saved.keys() & expected.keys() if saved[k] != expected[k]]
  differences.sort(key=lambda d: (not d.startswith('params/'), d))  # the model's first
  _check_same_ema(metadata, _has_ema_arrays(expected), config)
  meaning = _meaning_differences(metadata, config) if config is not None else {}
  if meaning and not differences:
    here = _flat_fields(config.to_dict())
    raise CheckpointMismatchError(
        f'{metadata.title} was trained with '
        + ', '.join(f'config.{k}={v!r}' for k, v in meaning.items()) + ' ('
        + ', '.join(f'{here.get(k)!r} here' for k in meaning) + '): its weights compute '
        'something else with this configuration; it is not loaded. Set '
        + ' '.join(f'--config.{k}={v}' for k, v in meaning.items()) + '.')
  if differences:
    fields = _config_differences(metadata, config, shaping) if config is not None else []
    raise CheckpointMismatchError(
        f'{metadata.title} was written by another configuration; it is not loaded. '
        + (f'Config: {"; ".join(fields)}. ' if fields else '')
        + f'{len(differences)} arrays differ, e.g. {"; ".join(differences[:4])}. Use the '
        'configuration it was trained with, or a new --workdir.')


def _check_same_ema(metadata: Metadata, here_has_ema: bool, config):
  """Raises CheckpointMismatchError naming config.ema_decay when the checkpoint keeps a
  moving average of the weights and this run does not, or the other way round."""
  if metadata.has_ema == here_has_ema:
    return
  saved_decay = (metadata.config or {}).get('ema_decay')
  here_decay = config.ema_decay if config is not None else None
  if metadata.has_ema:
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
      f'{metadata.title} {what}; it is not loaded. Set {fix}, or use a new --workdir.')


def restore_checked(manager, metadata: Metadata, abstract_state, data_iterator=None,
                    config=None):
  """`restore` of the checkpoint `metadata` describes, after `check_compatible`; one that
  fails to read back raises DamagedCheckpointError."""
  check_compatible(metadata, abstract_state, config)
  try:
    return restore(manager, metadata.step, abstract_state, data_iterator)
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


class Resumed(NamedTuple):
  """What `restore_newest_intact` found: all None when there is no checkpoint."""
  step: Optional[int]
  state: Optional[steps.TrainState]
  config: Optional[dict]  # the flattened config saved with it (None: saved without one)


def restore_newest_intact(manager, abstract_state, data_iterator=None,
                          config=None) -> Resumed:
  """The newest checkpoint that reads back; damaged ones are set aside, one of another
  configuration or format version stops the run. Step 0 (converted weights) restores no
  data iterator. Only a run that holds the workdir's lock (`run_lock`) calls this: it moves
  checkpoints."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      metadata = read_metadata(manager, step)
      state = restore_checked(manager, metadata, abstract_state,
                              data_iterator if step > 0 else None, config)
      return Resumed(step, state, metadata.config)
    except DamagedCheckpointError as e:
      _set_aside(manager, step, str(e))
  return Resumed(None, None, None)


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
      raise NoCheckpointError(f'config.eval.checkpoint={choice!r}: expected \'\', \'best\' or '
                              f'one of the saved steps {manager.all_steps()}{also}')
    step = int(choice)
  else:
    step = manager.latest_step()
  if step is None:
    raise NoCheckpointError(f'no checkpoint in {manager.directory}: train first, or write '
                            'one with --mode=convert')
  return step


class Restored(NamedTuple):
  """A checkpoint restored for evaluation or prediction (`restore_for_inference`)."""
  config: ml_collections.ConfigDict  # with the values the checkpoint was trained with
  step: int
  step_config: steps.StepConfig
  state: steps.TrainState  # config.eval.weights' weights as its params and batch_stats


def inference_config(metadata: Metadata, config):
  """`config` with the _MEANING_FIELDS the checkpoint was trained with, each change logged:
  evaluation and prediction compute what training computed."""
  differences = _meaning_differences(metadata, config)
  if not differences:
    return config
  config = config.copy_and_resolve_references()
  here = _flat_fields(config.to_dict())
  for name, value in differences.items():
    logging.warning('config.%s=%r here, but the checkpoint of step %d was trained with %r: '
                    'using %r.', name, here.get(name), metadata.step, value, value)
    section, field = name.split('.')
    config[section][field] = value
  return config


def restore_for_inference(config, workdir: str, mesh, attributes=None) -> Restored:
  """config.eval.checkpoint of `workdir`, the config holding the values the checkpoint was
  trained with (`inference_config`); `attributes` as in `steps.create_train_state` (None:
  for prediction only). Only the weights are read (`restore_weights`): the optimiser's
  configuration may differ from the training run's. Reads beside a training run without
  disturbing it (`create_manager`'s read_only)."""
  manager = _read_only_manager(config, workdir)
  metadata = _read_metadata_for_inference(
      manager, checkpoint_step(manager, config.eval.checkpoint))
  config = _with_checkpoint_ema(metadata, inference_config(metadata, config))
  step_config, state = steps.create_train_state(config, mesh, attributes)
  state = state.replace(**restore_weights(manager, metadata, weights_target(state), config))
  return Restored(config, metadata.step, step_config, _chosen_weights(metadata, state, config))


def _read_metadata_for_inference(manager, step: int) -> Metadata:
  """`read_metadata`, whose DamagedCheckpointError names the checkpoint: a reader reports
  it and leaves it where it is (only training sets one aside)."""
  try:
    return read_metadata(manager, step)
  except DamagedCheckpointError as e:
    raise DamagedCheckpointError(
        f'The checkpoint of step {step} in {manager.directory} cannot be read ({e}); it is '
        'left where it is. Choose another with --config.eval.checkpoint=STEP (saved: '
        f'{manager.all_steps()}).') from e


def weights_target(state) -> dict:
  """The _WEIGHTS of a train state as `restore_weights` takes them: name -> the shapes,
  dtypes and shardings to restore into."""
  return {name: abstract_like(getattr(state, name)) for name in _WEIGHTS
          if getattr(state, name) is not None}


def restore_weights(manager, metadata: Metadata, target: dict, config) -> dict:
  """The _WEIGHTS of the checkpoint `metadata` describes, placed like `target`
  (`weights_target`), after `check_compatible` of those alone: the optimiser's state is
  neither read nor compared, so that a run trained with clipping or another optimiser is
  evaluated with a configuration without them. `manager` is read-only. One that fails to
  read back raises DamagedCheckpointError."""
  check_compatible(metadata, target, config, weights_only=True)
  partial = ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True)
  try:
    return dict(manager.restore(metadata.step, args=ocp.args.Composite(state=partial))['state'])
  except Exception as e:  # pylint: disable=broad-except  (truncated files: many kinds)
    raise DamagedCheckpointError(f'{metadata.title} cannot be read back ({type(e).__name__}: '
                                 f'{str(e)[:300]}); it is left where it is.') from e


def _with_checkpoint_ema(metadata: Metadata, config):
  """`config` whose ema_decay keeps a moving average exactly when the checkpoint does
  (inference restores it either way: config.eval.weights chooses)."""
  if metadata.has_ema == (config.ema_decay > 0):
    return config
  decay = 0.0
  if metadata.has_ema:  # the value matters not for inference, only being > 0
    decay = (metadata.config or {}).get('ema_decay') or 0.999
  config = config.copy_and_resolve_references()
  config.ema_decay = decay
  return config


def _chosen_weights(metadata: Metadata, state, config):
  """The restored state with config.eval.weights' weights as its params and batch_stats:
  'raw' as trained, 'ema' their moving average (refused on a checkpoint without one)."""
  if config.eval.weights != 'ema':
    return state
  if not steps.has_ema(state):
    raise errors.ConfigError(
        f'config.eval.weights=ema: the checkpoint of step {metadata.step} in '
        f'{metadata.directory} keeps no moving average of the weights (it was trained with '
        'config.ema_decay=0); use --config.eval.weights=raw')
  return steps.ema_weights(state)


def restore_every_kept(config, workdir: str, mesh, attributes=None):
  """Yields `restore_for_inference`'s Restored for every kept checkpoint of `workdir`, in
  step order, one state at a time (config.eval.checkpoint=all).

  They share the first one's config and StepConfig, so that the steps compile once: a
  workdir's checkpoints come from one configuration (training refuses another), and one
  that does not fit stops here with CheckpointMismatchError.
  """
  manager = _read_only_manager(config, workdir)
  kept = sorted(manager.all_steps())
  if not kept:
    raise NoCheckpointError(f'no checkpoint in {manager.directory}: train first, or write '
                            'one with --mode=convert')
  metadata = _read_metadata_for_inference(manager, kept[0])
  config = _with_checkpoint_ema(metadata, inference_config(metadata, config))
  step_config, state = steps.create_train_state(config, mesh, attributes)
  target = weights_target(state)
  # The initial weights: only their shapes and shardings (`target`) are needed.
  state = state.replace(**{name: None for name in target if name != 'step'})
  for step in kept:
    try:
      if step != metadata.step:
        metadata = _read_metadata_for_inference(manager, step)
      weights = restore_weights(manager, metadata, target, config)
    except DamagedCheckpointError:
      if os.path.isdir(os.path.join(os.fspath(manager.directory), str(step))):
        raise
      logging.warning('The checkpoint of step %d in %s was removed while the others were '
                      'read (by the run training there: it keeps the newest '
                      'config.keep_checkpoints); skipped.', step, manager.directory)
      continue
    yield Restored(config, step, step_config,
                   _chosen_weights(metadata, state.replace(**weights), config))


def _read_only_manager(config, workdir: str) -> ocp.CheckpointManager:
  return create_manager(workdir, config.keep_checkpoints, config.best_metric, read_only=True)
