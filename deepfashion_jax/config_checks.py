"""Checks a configuration at start, so that a wrong value fails in a second, not in an hour.

Every message names the field (`config.x.y`) and what it accepts. config.model and
config.loss are the keyword arguments of FashionNet and of losses.total_loss: their fields
and choices are read from those functions' signatures and Literal annotations.
"""

import dataclasses
import difflib
import inspect
import math
import numbers
import typing

import jax

from deepfashion_jax import errors
from deepfashion_jax import losses
from deepfashion_jax import pretrained
from deepfashion_jax import steps
from deepfashion_jax.data import annotations
from deepfashion_jax.data import pipeline
from deepfashion_jax.data import sources
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
    'data.source': sources.SOURCES,
    'data.normalization': tuple(fashion_net.NORMALIZATIONS),
    'eval.split': vocabulary.SPLIT_NAMES[1:],  # the held-out splits
    'eval.weights': steps.WEIGHTS,
}
# The largest values that the run's arithmetic holds: the train state counts steps in int32,
# grain takes seeds in [0, 2**32 - 1]; and sizes that no DeepFashion run needs, so that a
# mistyped 2**64 fails here, not as an allocation an hour in.
_MAX_STEPS = 2**31 - 1
_MAX_SEED = 2**32 - 1
_MAX_BATCH = 2**20
_MAX_SIDE = 4096  # pixels; DeepFashion's images are at most 300 on a side
_MAX_WORKERS = 256
# Real fields act in float32 (losses, optimiser): a larger value would be an infinity there.
_FLOAT32_MAX = 3.4028234663852886e38


@dataclasses.dataclass(frozen=True)
class Number:
  """What a numeric config field accepts: an int (`integer`) or any real number, never a
  bool, a NaN or an infinity (nor, a real, one beyond float32's range); at least `low`
  (above it when `low_open`) and at most `high` (below it when `high_open`). `expected` is
  what a message says it accepts."""
  expected: str
  low: float = -math.inf
  high: float = math.inf
  integer: bool = False
  low_open: bool = False
  high_open: bool = False

  def accepts(self, value) -> bool:
    kind = numbers.Integral if self.integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
      return False
    # Compared as they are: an int beyond a float's range is not converted (OverflowError).
    if not isinstance(value, numbers.Integral) and not math.isfinite(value):
      return False
    if not self.integer and abs(value) > _FLOAT32_MAX:
      return False
    above = value > self.low if self.low_open else value >= self.low
    below = value < self.high if self.high_open else value <= self.high
    return above and below


def _integer(low: int, high: int, expected: str = '') -> Number:
  if not expected:
    expected = (f'a positive integer (at most {high:,})' if low == 1 else
                f'an integer in [{low:,}, {high:,}]')
  return Number(expected, low, high, integer=True)


def _real(expected: str, low: float, high: float = math.inf, **open_ends) -> Number:
  return Number(expected, low, high, **open_ends)


_POSITIVE_REAL = _real('a positive number', 0, low_open=True)
_WEIGHT = _real('a weight >= 0', 0)
_STEP_COUNT = _integer(1, _MAX_STEPS)
_SIDE = _integer(1, _MAX_SIDE, f'a positive side in pixels (at most {_MAX_SIDE})')
_SEED = _integer(0, _MAX_SEED, "an integer in [0, 2**32 - 1] (grain's seeds)")

# Every numeric field of configs/default.py and what it accepts, checked first, each naming
# its field. A new numeric field gets its line here (tests/test_config_checks.py walks
# default.py's numeric fields and fails for one that takes NaN, an infinity or 2**64).
NUMBERS = {
    'seed': _SEED,
    'batch_size': _integer(1, _MAX_BATCH),
    'num_train_steps': _STEP_COUNT,
    'learning_rate': _POSITIVE_REAL,
    'adam_eps': _real("a positive number (Adam's epsilon, e.g. 1e-8)", 0, low_open=True),
    'momentum': _real('a momentum in [0, 1)', 0, 1, high_open=True),
    'weight_decay': _real('0 (off) or a positive decay', 0),
    'layer_decay': _real('a factor in (0, 1] (1: off, e.g. 0.65)', 0, 1, low_open=True),
    'decay_rate': _real('a factor in (0, 1]', 0, 1, low_open=True),
    'decay_every_steps': _STEP_COUNT,
    'warmup_steps': _integer(0, _MAX_STEPS, f'0 (off) or a number of steps (at most '
                             f'{_MAX_STEPS:,})'),
    'grad_clip_norm': _real('0 (off) or a positive norm', 0),
    'ema_decay': _real('0 (off) or a decay in (0, 1), e.g. 0.999', 0, 1, high_open=True),
    'grad_accum_steps': _integer(1, _MAX_BATCH),
    'max_nonfinite_in_a_row': _STEP_COUNT,
    'log_every_steps': _STEP_COUNT,
    'eval_every_steps': _STEP_COUNT,
    'checkpoint_every_steps': _STEP_COUNT,
    'keep_checkpoints': _STEP_COUNT,
    'num_box_images': _integer(0, _MAX_BATCH),
    'eval.batch_size': _integer(1, _MAX_BATCH),
    'eval.report_examples': _integer(0, 1000, '0 (no galleries) or a number of images (at '
                                     'most 1,000)'),
    'predict.temperature': _POSITIVE_REAL,
    'predict.top_k_attributes': _STEP_COUNT,
    'predict.batch_size': _integer(1, _MAX_BATCH),
    'model.roi_sampling_ratio': _integer(-1, 64, '-1 or 0 (adaptive), or samples per bin and '
                                         'axis, at most 64'),
    'model.dropout': _real('a rate in [0, 1)', 0, 1, high_open=True),
    'model.drop_path': _real('a rate in [0, 1)', 0, 1, high_open=True),
    'model.landmark_block': _integer(0, 1024, '0 (the middle block) or a block number'),
    'loss.pos_weights_scale': _real('0 (no weighting) or a positive number', 0),
    'loss.beta': _WEIGHT,
    'loss.category_weight': _WEIGHT,
    'loss.attribute_weight': _WEIGHT,
    'loss.two_way_negative_weight': _WEIGHT,
    'loss.landmark_weight': _WEIGHT,
    'loss.landmark_radius': _real('pixels > 0', 0, low_open=True),
    'data.synthetic_images': _integer(0, 1_000_000, '0 (off) or a number of images (at most '
                                      '1,000,000)'),
    'data.synthetic_seed': _SEED,
    'data.img_size': _SIDE,
    'data.crop_size': _SIDE,
    'data.canvas_size': _SIDE,
    'data.crop_margin': _real('pixels >= 0', 0),
    'data.threads': _integer(1, _MAX_WORKERS),
    'data.processes': _integer(0, _MAX_WORKERS, '0 (decode in the main process) or a number '
                               f'of worker processes (at most {_MAX_WORKERS})'),
    # Larger image files, and images of more pixels (from their headers), are refused as
    # unreadable ones are.
    'data.max_image_bytes': _integer(1, 2**40, 'a positive number of bytes'),
    'data.max_image_pixels': _integer(1, 2**40, 'a positive number of pixels'),
}
# The fields that hold a bool or a str (a path, a metric's name; the fields with a fixed
# set of values are `_CHOICES`' and the Literal annotations').
_BOOLEANS = ('decay_norms_and_biases', 'predict.ten_crop', 'export.ten_crop',
             'model.roi_aligned', 'model.box_gradient_into_roi', 'loss.reduce_sum',
             'data.synthetic_quirks', 'data.random_flip', 'data.strict', 'eval.report')
_STRINGS = ('init_from', 'best_metric', 'eval.checkpoint', 'data.data_dir', 'data.cache_dir',
            'data.tfds_dir')


def _get(config, name):
  """config.<name>; a field that the config lacks is a ConfigError naming it."""
  value, parts = config, name.split('.')
  for depth, part in enumerate(parts):
    if not hasattr(value, 'keys'):
      section = '.'.join(['config'] + parts[:depth])
      raise errors.ConfigError(f'{section}={value!r}: expected a section of fields, as '
                               'configs/default.py has it')
    if part not in value:
      raise errors.ConfigError(f'config.{name}: missing; a config starts from '
                               'configs/default.get_config(), which has every field')
    value = value[part]
  return value


def check_field_names(config, names, source: str = 'the config'):
  """Raises ConfigError for the first dotted name ('num_train_step', 'model.roi_pol') that
  names no field of `config` (from `source`, a config file), with the nearest field's name:
  main.py's --config.x overrides, before config_flags applies them."""
  for name in names:
    node, parts = config, name.split('.')
    for depth, part in enumerate(parts):
      if hasattr(node, 'keys') and part in node:
        node = node[part]
        continue
      parent = '.'.join(['config'] + parts[:depth])
      fields = sorted(node.keys()) if hasattr(node, 'keys') else []
      close = difflib.get_close_matches(part, fields, n=1)
      if close:
        hint = f'did you mean {close[0]}?'
      elif fields:
        hint = f"{parent}'s fields are {', '.join(fields)}"
      else:
        hint = f'{parent} is a value, not a section'
      raise errors.ConfigError(f'{parent}.{part}: no such field in {source}; {hint}')


def check_numbers_and_kinds(config):
  """Each field of `NUMBERS` a finite number in its range, each of `_BOOLEANS` a bool and
  each of `_STRINGS` a str; raises ConfigError naming the first that is not."""
  for name, number in NUMBERS.items():
    value = _get(config, name)
    if not number.accepts(value):
      beyond = (not number.integer and isinstance(value, numbers.Real)
                and not isinstance(value, bool) and abs(value) > _FLOAT32_MAX)
      raise errors.ConfigError(f'config.{name}={value!r}: expected {number.expected}'
                               + (" within float32's range (the run's)" if beyond else ''))
  for names, kind, what in ((_BOOLEANS, bool, 'True or False'), (_STRINGS, str, 'a string')):
    for name in names:
      if not isinstance(_get(config, name), kind):
        raise errors.ConfigError(f'config.{name}={_get(config, name)!r}: expected {what}')


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
        raise errors.ConfigError(
            f'config.{section}.{field}={value!r}: expected one of {choices}')


def check(config):
  """Raises ConfigError (a ValueError) naming the first field with a wrong value."""
  check_numbers_and_kinds(config)  # first: the checks below compute with them
  # The registry's own check, so that a new backbone needs no line here.
  backbones.check_name(_get(config, 'model.backbone'), field='config.model.backbone')
  # The backbone's own check reads the options and the input side (a ViT's patches).
  backbones.check_options(config.model.backbone,
                          {f: _get(config, f'model.{f}') for f in backbones.OPTIONS},
                          side=config.data.crop_size)
  # A pretrained name: registered, and for the configured backbone (nothing is downloaded).
  pretrained.check_backbone(config.init_from, config.model.backbone, field='config.init_from')
  for name, choices in _CHOICES.items():
    if _get(config, name) not in choices:
      raise errors.ConfigError(
          f'config.{name}={_get(config, name)!r}: expected one of {choices}')
  for section in _CONSUMERS:
    _check_keyword_section(config, section)
  if config.data.source == 'tfds' and config.data.partition != 'official':
    raise errors.ConfigError(f"config.data.source='tfds' reads the official partition; "
                             f'config.data.partition={config.data.partition!r} needs '
                             "config.data.source='folder'")
  # The image options (crops, sides, margin) are checked where the pipeline takes them, for
  # a library call too.
  pipeline.image_options(config.data)
  # Devices are spread evenly over processes: a multiple of the device count is also one
  # of the process count, which each process's share of a batch needs.
  for name in ('batch_size', 'eval.batch_size'):
    if _get(config, name) % jax.device_count():
      raise errors.ConfigError(f'config.{name}={_get(config, name)} must be a multiple of the '
                               f'number of devices ({jax.device_count()})')
  if config.batch_size % (config.grad_accum_steps * jax.device_count()):
    raise errors.ConfigError(f'config.batch_size={config.batch_size} must be a multiple of '
                             f'config.grad_accum_steps={config.grad_accum_steps} times the number '
                             f'of devices ({jax.device_count()}): each micro-batch is split over '
                             'the devices')
  if config.best_metric.startswith(steps.EMA_PREFIX) and not config.ema_decay > 0:
    raise errors.ConfigError(f'config.best_metric={config.best_metric!r} names a metric of the '
                             'moving average of the weights, which config.ema_decay=0 does not '
                             'keep: set config.ema_decay > 0, or name a metric of the raw weights')
  if config.checkpoint_every_steps % config.log_every_steps:
    raise errors.ConfigError(f'config.checkpoint_every_steps={config.checkpoint_every_steps} '
                             f'must be a multiple of config.log_every_steps='
                             f'{config.log_every_steps}, so that a resumed run logs the same '
                             'training metrics')
  if config.loss.pos_weights_scale and config.loss.attribute != 'bce':
    raise errors.ConfigError('config.loss.pos_weights_scale weights the BCE loss; it has no '
                             f'meaning with config.loss.attribute={config.loss.attribute!r}')
  _check_liu_lu_parts(config)
  check_fine_tuning(config)
  _check_profile_steps(config)



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


def check_fine_tuning(config):
  """A frozen backbone (config.model.trainable='heads') with what only trains a backbone:
  layer-wise learning-rate decay, stochastic depth (the frozen backbone runs in inference
  mode). The landmark branch and attention are not the backbone's: they train."""
  if config.model.trainable != 'heads':
    return
  if config.layer_decay != 1:
    raise errors.ConfigError(f'config.layer_decay={config.layer_decay} lowers the rates of the '
                             "backbone's layers, which config.model.trainable='heads' freezes: "
                             'leave config.layer_decay=1')
  if config.model.drop_path != backbones.OPTIONS['drop_path']:
    raise errors.ConfigError(f'config.model.drop_path={config.model.drop_path} drops blocks of '
                             "the backbone in training; config.model.trainable='heads' runs it "
                             'frozen, in inference mode: leave config.model.drop_path='
                             f"{backbones.OPTIONS['drop_path']}")


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
  side = config.data.crop_size
  if model.landmarks != 'none' and side % 8:
    raise errors.ConfigError(f'config.model.landmarks={model.landmarks!r} predicts heatmaps at '
                             f'8x a stride-8 map: config.data.crop_size={side} must be a multiple '
                             'of 8')
  if model.landmarks == 'attention' and side % 32:
    raise errors.ConfigError(f"config.model.landmarks='attention' runs a U-Net over the stride-8 "
                             f'map, halving it twice: config.data.crop_size={side} must be a '
                             'multiple of 32')
