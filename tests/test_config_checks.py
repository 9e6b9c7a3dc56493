"""A wrong configuration value is refused at start, naming the field."""

import os
import re
import subprocess
import sys

import pytest

from configs import test as test_config
from deepfashion_jax import config_checks
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
    ('warmup_steps', 10, 'config.warmup_steps=10 leaves no steps for the cosine decay'),
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
])


def test_wrong_values_are_refused_in_process(field, value, message):
  config = test_config.get_config()
  config.schedule = 'cosine'
  section, _, name = field.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    config_checks.check(config)
