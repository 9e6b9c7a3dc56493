"""Hostile configuration values through the start-up checks (`config_checks`), as a config
file, a notebook or a --config.x override gives them.

Every numeric field of configs/default.py set to NaN, infinity, -1, 0 and 2**64; fields of
the wrong kind (a string for a number, None, a bool for a count, a number for a section, a
value beyond float32; a sample of tests/test_config_checks.py's property test's values);
fields missing; and mistyped field names, as main.py checks its --config.x overrides
(`config_checks.check_field_names`). Each try comes out accepted (a legal value: 0 where it
means off) or refused with errors.ConfigError naming the field.
"""

import pathlib

import ml_collections

from configs import default as default_config
from configs import test as test_config
from deepfashion_jax import config_checks

SURFACE = 'configs'
VALUES = (float('nan'), float('inf'), -1, 0, 2**64)
WRONG_KINDS = (
    ('batch_size', '32'), ('batch_size', True), ('batch_size', 8.0), ('learning_rate', '1e-3'),
    ('learning_rate', None), ('seed', 1.5), ('data.strict', 'yes'), ('loss.reduce_sum', 1),
    ('init_from', None), ('best_metric', 3), ('data.data_dir', ['/data']),
    ('model.backbone', 18), ('dtype', None), ('eval.split', ['val']),
    ('data.normalization', {'mean': 0.5}), ('profile_steps', '10,15'), ('profile_steps', (1,)),
    ('profile_steps', (5, 2)), ('profile_steps', (1.5, 2)), ('profile_steps', None),
    ('seed', {'a': 1}), ('init_from', (1, 2)), ('learning_rate', 1e39), ('model', 5),
    ('data', 'folder'),
)
MISSING = ('adam_eps', 'data.crop_size', 'model.backbone', 'loss', 'predict')
MISTYPED = ('num_train_step', 'lerning_rate', 'model.roi_pol', 'modle.backbone',
            'data.data_dirr', 'seed.x', 'loss.beta.x', 'evaluate.split', 'config.batch_size', '')


def numeric_fields(config, prefix=''):
  for name, value in config.items():
    if hasattr(value, 'items'):
      yield from numeric_fields(value, f'{prefix}{name}.')
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield prefix + name


def _with(field: str, value=None, remove: bool = False) -> ml_collections.ConfigDict:
  """The test config with `field` set to `value` (or removed), as a config file builds it."""
  values = test_config.get_config().to_dict()
  *sections, name = field.split('.')
  holder = values
  for section in sections:
    holder = holder[section]
  if remove:
    del holder[name]
  else:
    holder[name] = value
  return ml_collections.ConfigDict(values)


def _check(config):
  return lambda: config_checks.check(config)


def tries(folder: pathlib.Path):
  """(description, thunk) pairs; `folder` is not needed: nothing is written."""
  del folder
  for field in numeric_fields(default_config.get_config()):
    for value in VALUES:
      yield f'config.{field}={value!r}', _check(_with(field, value))
  for field, value in WRONG_KINDS:
    yield f'config.{field}={value!r} (wrong kind)', _check(_with(field, value))
  for field in MISSING:
    yield f'config.{field} missing', _check(_with(field, remove=True))
  demo = test_config.get_config()
  for name in MISTYPED:
    yield (f'--config.{name}=1 (mistyped)',
           lambda name=name: config_checks.check_field_names(demo, [name], 'configs/test.py'))
