"""Train states from PyTorch files: --config.init_from and --mode=convert.

Both load the file through `torch_io.load_into`, which says what files it reads (the
baseline's checkpoints, Liu & Lu's network, torchvision's ImageNet backbones) and refuses
one that does not fit the configured model.
"""

from absl import logging
from flax import nnx
import jax

from deepfashion_jax import checkpoints
from deepfashion_jax import config_checks
from deepfashion_jax import run_lock
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax import torch_io
from deepfashion_jax.data import trained_on


def with_torch_weights(step_config, state, path: str, mesh):
  """The train state with weights from a PyTorch file: a baseline checkpoint or Liu &
  Lu's state dict sets the whole model, a torchvision state dict the backbone; the
  optimiser starts afresh, and a moving average of the weights (config.ema_decay > 0)
  from the loaded weights."""
  model = nnx.merge(step_config.graphdef, state.params, state.batch_stats, copy=True)
  loaded = torch_io.load_into(model, path)
  logging.info('Initialised the %s from the %s checkpoint %s', loaded.part, loaded.family,
               path)
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  new_state = state.replace(params=params, batch_stats=batch_stats,
                            opt_state=step_config.optimizer.init(params))
  if steps.has_ema(new_state):
    new_state = steps.restart_ema(new_state)
  return jax.device_put(new_state, sharding.replicated(mesh))


def convert(config, workdir: str, torch_checkpoint: str) -> int:
  """--mode=convert: writes a PyTorch baseline, Liu & Lu (or torchvision) checkpoint as this
  project's step-0 checkpoint in `workdir`, for `--mode=evaluate` and prediction; returns
  the step. Holds the workdir's lock meanwhile (`run_lock`): refused while a run trains
  there."""
  config_checks.check(config)
  names = trained_on.conversion_record(config.data, torch_checkpoint)  # a bad folder: first
  with run_lock.hold(workdir, 'convert'):
    mesh = sharding.make_mesh()
    step_config, state = steps.create_train_state(config, mesh)
    state = with_torch_weights(step_config, state, torch_checkpoint, mesh)
    manager = checkpoints.create_manager(workdir, config.keep_checkpoints, config.best_metric)
    checkpoints.save(manager, 0, state, config=config)
    manager.wait_until_finished()
    trained_on.record_conversion(workdir, names)
  logging.info('Wrote %s as the step-0 checkpoint of %s', torch_checkpoint, workdir)
  return 0
