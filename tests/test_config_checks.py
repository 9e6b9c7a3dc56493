"""A wrong configuration value is refused at start, naming the field."""

import os
import re
import subprocess
import sys

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import ml_collections
import pytest

from benchmarks.hostile import configs as hostile_configs
from configs import default as default_config
from configs import test as test_config
from deepfashion_jax import config_checks
from deepfashion_jax import errors
from deepfashion_jax import train
from tests import helpers


def test_a_wrong_config_value_is_refused_naming_the_field(tmp_path):
  """As one line and exit status 2, the project's own error: no traceback."""
  command = [sys.executable, os.path.join(helpers.ROOT, 'main.py'), '--config=configs/test.py',
             f'--workdir={tmp_path}', '--config.dtype=float8']
  result = subprocess.run(command, cwd=helpers.ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "main.py: error: config.dtype='float8': expected one of ('float32', 'bfloat16', "
      "'float16')")


def test_verbose_keeps_the_traceback_of_a_user_error(tmp_path):
  """--mode=describe checks the config too, before it writes the synthetic folder."""
  command = [sys.executable, os.path.join(helpers.ROOT, 'main.py'), '--config=configs/test.py',
             f'--workdir={tmp_path / "run"}', '--mode=describe', '--config.dtype=float8',
             '--verbose']
  result = subprocess.run(command, cwd=helpers.ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and 'Traceback' in result.stderr
  assert not os.path.exists(tmp_path / 'run')
  assert result.stderr.strip().splitlines()[-1].startswith(
      "deepfashion_jax.errors.ConfigError: config.dtype='float8'")


@pytest.mark.parametrize('field,value,message', [
    ('data.source', 'lmdb', "config.data.source='lmdb': expected one of ('folder', 'tfds')"),
    # A ResNet's depth alone, as --config.model.backbone=18 gives it, names no backbone.
    # (The list goes on with the other backbones.)
    ('model.backbone', '18', "config.model.backbone='18': expected one of ('resnet18', "
     "'resnet34', 'resnet50', 'resnet101', 'resnet152', 'vgg16', 'vgg16_bn', "),
    ('model.backbone', 'vgg19', "config.model.backbone='vgg19': expected one of ('resnet18', "
     "'resnet34', 'resnet50', 'resnet101', 'resnet152', 'vgg16', 'vgg16_bn', "),
    ('warmup_steps', -1, 'config.warmup_steps=-1: expected 0 (off) or a number of steps'),
    ('data.crop', 'bbox', "config.data.crop='bbox': expected one of ('none', 'gt_box')"),
    ('data.crop_margin', -1.0, 'config.data.crop_margin=-1.0: expected pixels >= 0'),
    ('decay_rate', 1.5, 'config.decay_rate=1.5: expected a factor in (0, 1]'),
    ('layer_decay', 1.5, 'config.layer_decay=1.5: expected a factor in (0, 1] (1: off'),
    ('model.trainable', 'backbone', "config.model.trainable='backbone': expected one of "
     "('all', 'heads')"),
    ('grad_clip_norm', -1.0, 'config.grad_clip_norm=-1.0: expected 0 (off) or a positive'),
    ('decay_every_steps', 0, 'config.decay_every_steps=0: expected a positive integer'),
    ('grad_accum_steps', 3, 'config.batch_size=8 must be a multiple of '
     'config.grad_accum_steps=3 times the number of devices (1)'),
    ('grad_accum_steps', 0, 'config.grad_accum_steps=0: expected a positive integer'),
    ('ema_decay', 1.0, 'config.ema_decay=1.0: expected 0 (off) or a decay in (0, 1)'),
    ('best_metric', 'ema_category_top3', "config.best_metric='ema_category_top3' names a "
     'metric of the moving average of the weights, which config.ema_decay=0 does not keep'),
    ('eval.weights', 'best', "config.eval.weights='best': expected one of ('raw', 'ema')"),
    # config.model's and config.loss's choices: their consumers' Literal annotations.
    ('model.roi_pool', 'max', "config.model.roi_pool='max': expected one of ('align', "
     "'baseline_max')"),
    ('model.landmarks', 'dots', "config.model.landmarks='dots': expected one of ('none', "
     "'heatmaps', 'attention')"),
    ('loss.attribute', 'focal', "config.loss.attribute='focal': expected one of ('bce', "
     "'hinge', 'two_way')"),
    ('loss.landmark_heatmap', 'box', "config.loss.landmark_heatmap='box': expected one of "
     "('gaussian', 'liu_lu')"),
    # A field that is not its consumer's parameter, as a config file written before
    # model.init_from moved to init_from sets it.
    ('model.init_from', 'epoch_200.pth', 'config.model.init_from: not a parameter of '
     "FashionNet that config.model gives (expected one of ('backbone', 'roi_pool', "),
    ('loss.attribute_kind', 'bce', 'config.loss.attribute_kind: not a parameter of '
     "losses.total_loss that config.loss gives (expected one of ('attribute', "),
    # FashionNet's argument that comes from config.data.crop_size, not config.model.
    ('model.image_size', 64, 'config.model.image_size: not a parameter of FashionNet that '
     'config.model gives'),
])


def test_wrong_values_are_refused_in_process(field, value, message):
  config = test_config.get_config()
  config.schedule = 'cosine'
  section, _, name = field.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    config_checks.check(config)


def test_a_frozen_backbone_refuses_what_only_trains_a_backbone():
  """trainable='heads' with layer decay or stochastic depth, each one line naming the
  field; with SGD, a landmark branch or the attention it is a configuration like another
  (they are not the backbone: they train)."""
  config = test_config.get_config()
  config.model.trainable, config.layer_decay = 'heads', 0.65
  with pytest.raises(errors.ConfigError, match=re.escape(
      "config.layer_decay=0.65 lowers the rates of the backbone's layers, which "
      "config.model.trainable='heads' freezes: leave config.layer_decay=1")):
    config_checks.check(config)
  config.layer_decay, config.model.drop_path = 1.0, 0.1  # as a ConvNeXt's or ViT's run
  with pytest.raises(errors.ConfigError, match=re.escape(
      'config.model.drop_path=0.1 drops blocks of the backbone in training; '
      "config.model.trainable='heads' runs it frozen")):
    config_checks.check_fine_tuning(config)
  config.model.drop_path = 0.0
  config.model.landmarks, config.data.crop_size = 'attention', 64
  config_checks.check(config)
  config.model.trainable, config.layer_decay, config.optimizer = 'all', 0.65, 'sgd'
  config_checks.check(config)


@pytest.mark.parametrize('section,field', [('model', 'foo'), ('loss', 'foo')])
def test_an_unknown_model_or_loss_field_stops_training_at_start(section, field, tmp_path):
  """Before the workdir, the data or the model: the run fails naming the field."""
  config = test_config.get_config()
  config[section][field] = 1
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=re.escape(f'config.{section}.{field}: not a '
                                                 'parameter of ')):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


# What each numeric field of configs/default.py accepts besides its ordinary values, said
# here apart from config_checks' table: 0 where it means off or is a legal origin, -1 where
# it means adaptive. NaN, the infinities, 2**64 and a fraction in an int field never are.
ZERO_IS_LEGAL = {'seed', 'weight_decay', 'momentum', 'warmup_steps', 'grad_clip_norm',
                 'ema_decay', 'num_box_images', 'model.roi_sampling_ratio', 'model.dropout',
                 'model.drop_path', 'model.landmark_block', 'loss.pos_weights_scale',
                 'loss.beta', 'loss.category_weight', 'loss.attribute_weight',
                 'loss.two_way_negative_weight',
                 'loss.landmark_weight', 'data.synthetic_images', 'data.synthetic_seed',
                 'data.crop_margin', 'data.processes', 'eval.report_examples'}
ZERO_IS_NOT = {'batch_size', 'num_train_steps', 'learning_rate', 'adam_eps', 'decay_rate',
               'layer_decay',
               'decay_every_steps', 'grad_accum_steps', 'max_nonfinite_in_a_row',
               'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
               'keep_checkpoints', 'eval.batch_size', 'predict.temperature',
               'predict.top_k_attributes', 'predict.batch_size', 'loss.landmark_radius',
               'data.img_size', 'data.crop_size', 'data.canvas_size', 'data.threads',
               'data.max_image_bytes', 'data.max_image_pixels'}
MINUS_ONE_IS_LEGAL = {'model.roi_sampling_ratio'}
FRACTIONS = {'momentum', 'decay_rate', 'ema_decay', 'layer_decay', 'model.dropout',
             'model.drop_path'}  # at most 1
NEVER_LEGAL = (float('nan'), float('inf'), -float('inf'), 1e39)  # 1e39: inf in float32


def _set(config, field, value):
  section, _, name = field.rpartition('.')
  (config[section] if section else config)[name] = value
  return config


def test_every_numeric_field_of_the_default_config_is_checked():
  """Each numeric field of configs/default.py, set to NaN, +-inf, 1e39, 2**64, -1, 0 and (an
  int field) 1.5 on the test config: a ConfigError naming the field, or acceptance where the
  value is legal (2**64: in a real field that is not a fraction)."""
  fields = list(hostile_configs.numeric_fields(default_config.get_config()))
  unknown = set(fields) - ZERO_IS_LEGAL - ZERO_IS_NOT
  assert not unknown, f'say here whether 0 is legal for {unknown}'
  base = test_config.get_config()
  for field in fields:
    is_int = isinstance(_get(base, field), int)
    cases = [(v, False) for v in NEVER_LEGAL] + [(-1, field in MINUS_ONE_IS_LEGAL),
                                                 (0, field in ZERO_IS_LEGAL),
                                                 (2**64, not is_int and field not in FRACTIONS)]
    cases += [(1.5, False)] if is_int else []
    for value, legal in cases:
      config = ml_collections.ConfigDict(_set(base.to_dict(), field, value))
      if legal:
        config_checks.check(config)
      else:
        with pytest.raises(errors.ConfigError, match=re.escape(f'config.{field}={value!r}: '
                                                               'expected ')):
          config_checks.check(config)


def _get(config, field):
  for part in field.split('.'):
    config = config[part]
  return config


@pytest.mark.parametrize('field,value,message', [
    ('learning_rate', float('nan'), 'config.learning_rate=nan: expected a positive number'),
    ('learning_rate', float('inf'), 'config.learning_rate=inf: expected a positive number'),
    ('loss.beta', float('nan'), 'config.loss.beta=nan: expected a weight >= 0'),
    ('adam_eps', -1.0, "config.adam_eps=-1.0: expected a positive number (Adam's epsilon"),
    ('weight_decay', -0.1, 'config.weight_decay=-0.1: expected 0 (off) or a positive decay'),
    ('weight_decay', float('inf'), 'config.weight_decay=inf: expected 0 (off) or a positive'),
    ('momentum', 1.0, 'config.momentum=1.0: expected a momentum in [0, 1)'),
    ('seed', -1, "config.seed=-1: expected an integer in [0, 2**32 - 1] (grain's seeds)"),
    ('seed', 2**32, "config.seed=4294967296: expected an integer in [0, 2**32 - 1]"),
    ('num_train_steps', 2**31, 'config.num_train_steps=2147483648: expected a positive '
     'integer (at most 2,147,483,647)'),
    ('batch_size', True, 'config.batch_size=True: expected a positive integer'),
    ('batch_size', '32', "config.batch_size='32': expected a positive integer"),
    ('learning_rate', None, 'config.learning_rate=None: expected a positive number'),
    ('data.strict', 'yes', "config.data.strict='yes': expected True or False"),
    ('init_from', None, 'config.init_from=None: expected a string'),
    ('data.img_size', 10**6, 'config.data.img_size=1000000: expected a positive side in '
     'pixels (at most 4096)'),
])
def test_numbers_and_kinds_are_refused_naming_the_field(field, value, message):
  """As a config file (or a notebook) builds them: a dict of any values."""
  config = ml_collections.ConfigDict(_set(test_config.get_config().to_dict(), field, value))
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    config_checks.check(config)


def test_a_config_without_a_field_is_refused_naming_it():
  """A config file written before a field existed, not built on configs/default.py."""
  values = test_config.get_config().to_dict()
  del values['adam_eps']
  with pytest.raises(errors.ConfigError, match=re.escape('config.adam_eps: missing')):
    config_checks.check(ml_collections.ConfigDict(values))


@pytest.mark.parametrize('name,message', [
    ('num_train_step', 'config.num_train_step: no such field in configs/demo.py; did you mean '
     'num_train_steps?'),
    ('model.roi_pol', 'config.model.roi_pol: no such field in configs/demo.py; did you mean '
     'roi_pool?'),
    ('modle.roi_pool', 'config.modle: no such field in configs/demo.py; did you mean model?'),
    ('seed.x', 'config.seed.x: no such field in configs/demo.py; config.seed is a value'),
])
def test_a_mistyped_field_name_is_refused_with_the_nearest_field(name, message):
  config = test_config.get_config()
  config_checks.check_field_names(config, ['batch_size', 'data.strict'], 'configs/demo.py')
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    config_checks.check_field_names(config, ['batch_size', name], 'configs/demo.py')


def _leaf_fields(config, prefix=''):
  for name, value in config.items():
    if hasattr(value, 'items'):
      yield from _leaf_fields(value, f'{prefix}{name}.')
    else:
      yield prefix + name


ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3), st.tuples(st.integers(), st.integers()),
    st.dictionaries(st.sampled_from(['a', 'b']), st.integers(), max_size=2))


def _any_value_in_any_field(field, value):
  """check() accepts the value, or refuses it with a ConfigError whose message names the
  field (alone, or beside the field it must agree with); nothing else escapes."""
  config = ml_collections.ConfigDict(_set(test_config.get_config().to_dict(), field, value))
  try:
    config_checks.check(config)
  except errors.ConfigError as e:
    assert field.rsplit('.', 1)[-1] in f'{e}', (field, value, f'{e}')


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(list(_leaf_fields(default_config.get_config()))), value=ANY_VALUE)
def test_any_value_in_any_field_is_accepted_or_a_config_error_naming_it(field, value):
  _any_value_in_any_field(field, value)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None)
@given(field=st.sampled_from(list(_leaf_fields(default_config.get_config()))), value=ANY_VALUE)
def test_any_value_in_any_field_is_accepted_or_a_config_error_naming_it_at_length(field, value):
  _any_value_in_any_field(field, value)
