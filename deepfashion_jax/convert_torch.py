"""Train states from PyTorch files: --config.init_from and --mode=convert.

Both take a path or a pretrained name (`torchvision:convnext_tiny`), which
`pretrained.resolve` turns into the cached file, downloading it once. Both load the file
through `torch_io.load_into`, which says what files it reads (the
baseline's checkpoints, Liu & Lu's network, torchvision's ImageNet backbones) and refuses
one that does not fit the configured model. --mode=convert first sets the config fields that
the file's weights need (a baseline checkpoint's pooling, normalisation and crop size), unless
the user gave them.
"""

from absl import logging
from flax import nnx
import jax

from deepfashion_jax import checkpoints
from deepfashion_jax import config_checks
from deepfashion_jax import run_lock
from deepfashion_jax import errors
from deepfashion_jax import pretrained
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax import torch_io
from deepfashion_jax.data import trained_on


def with_torch_weights(step_config, state, path: str, mesh, content=None):
  """The train state with weights from a PyTorch file, or a pretrained name (each process
  resolves it: `pretrained.resolve`), or what `torch_io.read` returned for the file,
  `content`: a baseline checkpoint or Liu & Lu's state dict sets the whole model, a
  torchvision state dict the backbone; the optimiser starts afresh, and a moving average of
  the weights (config.ema_decay > 0) from the loaded weights."""
  path = pretrained.resolve(path)
  model = nnx.merge(step_config.graphdef, state.params, state.batch_stats, copy=True)
  loaded = torch_io.load_into(model, path, content)
  logging.info('Initialised the %s from the %s checkpoint %s', loaded.part, loaded.family,
               path)
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  new_state = state.replace(params=params, batch_stats=batch_stats,
                            opt_state=step_config.optimizer.init(params))
  if steps.has_ema(new_state):
    new_state = steps.restart_ema(new_state)
  return jax.device_put(new_state, sharding.replicated(mesh))


def _get(config, name: str):
  for part in name.split('.'):
    config = config[part]
  return config


def fitted_config(config, content, path: str, given=frozenset()):
  """`config` with the fields that the file's weights need (`torch_io.fitting_config`) set,
  and a log line naming them; ConfigError when one of them is in `given` (the fields the
  user set: main.py's --config.x overrides) with another value."""
  family, needed = torch_io.fitting_config(content, config, path)
  crop_size = needed.get('data.crop_size', config.data.crop_size)
  if config.data.img_size < crop_size:  # training's resize is never smaller than its crop
    needed = {**needed, 'data.img_size': crop_size}
  changes = {name: value for name, value in needed.items() if _get(config, name) != value}
  conflicts = [f'--config.{name}={_get(config, name)} (its weights need {value!r})'
               for name, value in changes.items() if name in given]
  if conflicts:
    raise errors.ConfigError(f'{path} is a {family} checkpoint, which these flags do not fit: '
                             f'{"; ".join(conflicts)}. Drop them: --mode=convert sets what '
                             'the file needs')
  if not changes:
    return config
  config = config.copy_and_resolve_references()
  for name, value in changes.items():
    section, _, field = name.rpartition('.')
    (config[section] if section else config)[field] = value
  logging.info('%s is a %s checkpoint: set %s, as its weights need (saved with the converted '
               'checkpoint)', path, family,
               ', '.join(f'config.{name}={value!r}' for name, value in changes.items()))
  return config


def convert(config, workdir: str, torch_checkpoint: str, given=frozenset()) -> int:
  """--mode=convert: writes a PyTorch baseline, Liu & Lu (or torchvision) checkpoint as this
  project's step-0 checkpoint in `workdir`, for `--mode=evaluate` and prediction; returns
  the step. The config fields the file's weights need are set (`fitted_config`; those in
  `given`, the fields the user set, are refused when they differ) and saved with it. Holds
  the workdir's lock meanwhile (`run_lock`): refused while a run trains there.
  `torch_checkpoint` may be a pretrained name (`pretrained.REGISTRY`), downloaded once."""
  config_checks.check(config)
  pretrained.check_backbone(torch_checkpoint, config.model.backbone, field='--torch_checkpoint')
  with run_lock.hold(workdir, 'convert'):
    torch_checkpoint = pretrained.resolve(torch_checkpoint, field='--torch_checkpoint')
    content = torch_io.read(torch_checkpoint)
    config = fitted_config(config, content, torch_checkpoint, given)
    config_checks.check(config)  # again: the fitted crop size against the rest
    names = trained_on.conversion_record(config.data, torch_checkpoint)  # a bad folder: first
    mesh = sharding.make_mesh()
    step_config, state = steps.create_train_state(config, mesh)
    state = with_torch_weights(step_config, state, torch_checkpoint, mesh, content)
    manager = checkpoints.create_manager(workdir, config.keep_checkpoints, config.best_metric)
    checkpoints.save(manager, 0, state, config=config)
    manager.wait_until_finished()
    trained_on.record_conversion(workdir, names)
  logging.info('Wrote %s as the step-0 checkpoint of %s', torch_checkpoint, workdir)
  return 0
