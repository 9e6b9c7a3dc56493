"""Checks a configuration at start, so that a wrong value fails in a second, not in an hour.

Every message names the field (`config.x.y`) and what it accepts. config.model and
config.loss are the keyword arguments of FashionNet and of losses.total_loss: their fields
and choices are read from those functions' signatures and Literal annotations.
"""

import inspect
import typing

import jax

from deepfashion_jax import errors
from deepfashion_jax import losses
from deepfashion_jax import steps
from deepfashion_jax.data import annotations
from deepfashion_jax.data import sources
from deepfashion_jax.data import transforms
from deepfashion_jax.data import vocabulary
from deepfashion_jax.models import backbones
from deepfashion_jax.models import fashion_net

# Each field's allowed values, from the module that acts on them (config.model's and
# config.loss's: their consumers' annotations, `_check_keyword_section`).
_CHOICES = {
    'dtype': tuple(steps.DTYPES),
    'optimizer': steps.OPTIMIZERS,
    'schedule': steps.SCHEDULES,
    'model.backbone': tuple(backbones.BACKBONES),
    'data.partition': annotations.PARTITIONS,
    'data.eval_crop': transforms.EVAL_CROPS,
    'data.crop': transforms.CROPS,
    'data.source': sources.SOURCES,
    'data.normalization': tuple(fashion_net.NORMALIZATIONS),
    'eval.split': vocabulary.SPLIT_NAMES[1:],  # the held-out splits
    'eval.weights': steps.WEIGHTS,
}
_POSITIVE = ('batch_size', 'num_train_steps', 'log_every_steps', 'eval_every_steps',
             'checkpoint_every_steps', 'keep_checkpoints', 'max_nonfinite_in_a_row',
             'decay_every_steps', 'grad_accum_steps',
             'eval.batch_size', 'predict.top_k_attributes', 'predict.batch_size',
             'data.img_size', 'data.crop_size', 'data.canvas_size',
             'data.threads')


def _get(config, name):
  value = config
  for part in name.split('.'):
    value = value[part]
  return value


# The config sections that are a function's keyword arguments (steps.py makes the calls):
# section -> (the function, its name in messages).
_CONSUMERS = {'model': (fashion_net.FashionNet.__init__, 'FashionNet'),
              'loss': (losses.total_loss, 'losses.total_loss')}


def section_parameters(config, section: str) -> tuple:
  """The keyword arguments of config.<section>'s function that the section may give: all
  but those steps.py passes from elsewhere (the input side, the dtype, pos_weight, ...)."""
  if section == 'model':
    elsewhere = steps.model_arguments_from_elsewhere(config, rngs=None)
  else:
    elsewhere = steps.LOSS_ARGUMENTS_FROM_ELSEWHERE
  parameters = inspect.signature(_CONSUMERS[section][0]).parameters.values()
  return tuple(p.name for p in parameters
               if p.kind == p.KEYWORD_ONLY and p.name not in elsewhere)


def _check_keyword_section(config, section: str):
  """Each field of config.<section> is a parameter of its function, and one of the
  choices of a parameter annotated with a Literal."""
  function, function_name = _CONSUMERS[section]
  parameters = section_parameters(config, section)
  annotations = typing.get_type_hints(function)
  for field, value in config[section].items():
    if field not in parameters:
      raise errors.ConfigError(f'config.{section}.{field}: not a parameter of {function_name} '
                       f'that config.{section} gives (expected one of {parameters})')
    if typing.get_origin(annotations.get(field)) is typing.Literal:
      choices = typing.get_args(annotations[field])
      if value not in choices:
        raise errors.ConfigError(f'config.{section}.{field}={value!r}: expected one of {choices}')


def check(config):
  """Raises ValueError naming the first field with a wrong value."""
  # The registry's own check, so that a new backbone needs no line here.
  backbones.check_name(config.model.backbone, field='config.model.backbone')
  for name, choices in _CHOICES.items():
    if _get(config, name) not in choices:
      raise errors.ConfigError(f'config.{name}={_get(config, name)!r}: expected one of {choices}')
  for section in _CONSUMERS:
    _check_keyword_section(config, section)
  for name in _POSITIVE:
    value = _get(config, name)
    if not isinstance(value, int) or value <= 0:
      raise errors.ConfigError(f'config.{name}={value!r}: expected a positive integer')
  if config.data.source == 'tfds' and config.data.partition != 'official':
    raise errors.ConfigError(f"config.data.source='tfds' reads the official partition; "
                     f'config.data.partition={config.data.partition!r} needs '
                     "config.data.source='folder'")
  if not config.data.crop_margin >= 0:
    raise errors.ConfigError(f'config.data.crop_margin={config.data.crop_margin}: expected pixels >= 0')
  if config.data.crop_size > config.data.img_size:
    raise errors.ConfigError(f'config.data.crop_size={config.data.crop_size} is larger than '
                     f'config.data.img_size={config.data.img_size}')
  # Devices are spread evenly over processes: a multiple of the device count is also one
  # of the process count, which each process's share of a batch needs.
  for name in ('batch_size', 'eval.batch_size'):
    if _get(config, name) % jax.device_count():
      raise errors.ConfigError(f'config.{name}={_get(config, name)} must be a multiple of the number '
                       f'of devices ({jax.device_count()})')
  if config.batch_size % (config.grad_accum_steps * jax.device_count()):
    raise errors.ConfigError(f'config.batch_size={config.batch_size} must be a multiple of '
                     f'config.grad_accum_steps={config.grad_accum_steps} times the number of '
                     f'devices ({jax.device_count()}): each micro-batch is split over the '
                     'devices')
  if not 0.0 <= config.ema_decay < 1.0:
    raise errors.ConfigError(f'config.ema_decay={config.ema_decay}: expected 0 (off) or a decay in '
                     '(0, 1), e.g. 0.999')
  if config.best_metric.startswith(steps.EMA_PREFIX) and not config.ema_decay > 0:
    raise errors.ConfigError(f'config.best_metric={config.best_metric!r} names a metric of the moving '
                     'average of the weights, which config.ema_decay=0 does not keep: set '
                     'config.ema_decay > 0, or name a metric of the raw weights')
  if config.checkpoint_every_steps % config.log_every_steps:
    raise errors.ConfigError(f'config.checkpoint_every_steps={config.checkpoint_every_steps} must be a '
                     f'multiple of config.log_every_steps={config.log_every_steps}, so that '
                     'a resumed run logs the same training metrics')
  if config.schedule == 'cosine' and config.warmup_steps >= config.num_train_steps:
    raise errors.ConfigError(f'config.warmup_steps={config.warmup_steps} leaves no steps for the cosine '
                     f'decay: config.num_train_steps={config.num_train_steps} must be larger')
  if not config.grad_clip_norm >= 0:
    raise errors.ConfigError(f'config.grad_clip_norm={config.grad_clip_norm}: expected 0 (off) or a '
                     'positive norm')
  if not 0 < config.decay_rate <= 1:
    raise errors.ConfigError(f'config.decay_rate={config.decay_rate}: expected a factor in (0, 1]')
  if config.learning_rate <= 0:
    raise errors.ConfigError(f'config.learning_rate={config.learning_rate}: expected a positive number')
  if not 0.0 <= config.model.dropout < 1.0:
    raise errors.ConfigError(f'config.model.dropout={config.model.dropout}: expected a rate in [0, 1)')
  if config.loss.pos_weights_scale < 0:
    raise errors.ConfigError(f'config.loss.pos_weights_scale={config.loss.pos_weights_scale}: expected '
                     '0 (no weighting) or a positive number')
  if config.loss.pos_weights_scale and config.loss.attribute != 'bce':
    raise errors.ConfigError('config.loss.pos_weights_scale weights the BCE loss; it has no meaning '
                     f'with config.loss.attribute={config.loss.attribute!r}')
  _check_liu_lu_parts(config)
  if not config.predict.temperature > 0:
    raise errors.ConfigError(f'config.predict.temperature={config.predict.temperature}: expected a '
                     'positive number')
  _check_profile_steps(config)
  _check_image_caps(config)


def _check_image_caps(config):
  """config.data.max_image_bytes and max_image_pixels: positive integers."""
  for name in ('max_image_bytes', 'max_image_pixels'):
    value = config.data[name]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise errors.ConfigError(f'config.data.{name}={value!r}: expected a positive integer '
                               '(images with more are refused, as unreadable ones)')


def _check_profile_steps(config):
  """config.profile_steps: (0, 0) or () off, else (a, b), steps a to b both traced."""
  window = config.get('profile_steps', (0, 0))
  if isinstance(window, (tuple, list)) and tuple(window) in ((), (0, 0)):
    return
  if not (isinstance(window, (tuple, list)) and len(window) == 2
          and all(isinstance(s, int) and not isinstance(s, bool) for s in window)
          and 1 <= window[0] <= window[1]):
    raise errors.ConfigError(f'config.profile_steps={window!r}: expected (0, 0) (off) or (a, b), '
                     'the steps a to b (both included) to trace, 1 <= a <= b, e.g. '
                     "--config.profile_steps='(10,15)'")


def _check_liu_lu_parts(config):
  """The options of Liu & Lu's design (heads, landmarks, their losses) that need others."""
  model, loss = config.model, config.loss
  if loss.attribute == 'two_way' and model.heads != 'liu_lu':
    raise errors.ConfigError("config.loss.attribute='two_way' needs two logits per attribute: "
                     "config.model.heads='liu_lu'")
  if model.heads == 'liu_lu' and (model.category_head != 'single' or model.dropout):
    raise errors.ConfigError("config.model.heads='liu_lu' has its own category head and no "
                     "dropout: leave config.model.category_head='single' and "
                     'config.model.dropout=0')
  for name in ('category_weight', 'attribute_weight', 'landmark_weight',
               'two_way_negative_weight'):
    if not loss[name] >= 0:
      raise errors.ConfigError(f'config.loss.{name}={loss[name]}: expected a weight >= 0')
  if not loss.landmark_radius > 0:
    raise errors.ConfigError(f'config.loss.landmark_radius={loss.landmark_radius}: expected pixels > 0')
  side = config.data.crop_size
  if model.landmarks != 'none' and side % 8:
    raise errors.ConfigError(f'config.model.landmarks={model.landmarks!r} predicts heatmaps at 8x '
                     f'a stride-8 map: config.data.crop_size={side} must be a multiple of 8')
  if model.landmarks == 'attention' and side % 32:
    raise errors.ConfigError(f"config.model.landmarks='attention' runs a U-Net over the stride-8 "
                     f'map, halving it twice: config.data.crop_size={side} must be a '
                     'multiple of 32')
