"""A wrong configuration value is refused at start, naming the field."""

import os
import re
import subprocess
import sys

import pytest

from configs import test as test_config
from deepfashion_jax import config_checks
from deepfashion_jax import train
from tests import helpers


def test_a_wrong_config_value_is_refused_naming_the_field(synthetic_folder, tmp_path):
  command = [sys.executable, os.path.join(helpers.ROOT, 'main.py'), '--config=configs/test.py',
             f'--workdir={tmp_path}', '--config.dtype=float8']
  result = subprocess.run(command, cwd=helpers.ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "config.dtype='float8': expected one of ('float32', 'bfloat16', 'float16')" in \
      result.stderr


@pytest.mark.parametrize('field,value,message', [
    ('data.source', 'lmdb', "config.data.source='lmdb': expected one of ('folder', 'tfds')"),
    # A ResNet's depth alone, as --config.model.backbone=18 gives it, names no backbone.
    ('model.backbone', '18', "config.model.backbone='18': expected one of ('resnet18', "
     "'resnet34', 'resnet50', 'resnet101', 'resnet152', 'vgg16', 'vgg16_bn')"),
    ('model.backbone', 'vgg19', "config.model.backbone='vgg19': expected one of ('resnet18', "
     "'resnet34', 'resnet50', 'resnet101', 'resnet152', 'vgg16', 'vgg16_bn')"),
    ('warmup_steps', -1, 'config.warmup_steps=-1: expected 0 (off) or a number of steps'),
    ('data.crop', 'bbox', "config.data.crop='bbox': expected one of ('none', 'gt_box')"),
    ('data.crop_margin', -1.0, 'config.data.crop_margin=-1.0: expected pixels >= 0'),
    ('decay_rate', 1.5, 'config.decay_rate=1.5: expected a factor in (0, 1]'),
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
