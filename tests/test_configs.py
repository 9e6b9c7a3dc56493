"""The config files: each passes the checks, and the published protocol's trains (shrunk)."""

import importlib
import json
import os

import pytest

from configs import landmark_attention
from configs import published_protocol
from deepfashion_jax import config_checks
from deepfashion_jax import evaluate
from deepfashion_jax import predict
from deepfashion_jax import train
from deepfashion_jax.data import annotations
from deepfashion_jax.data import landmark_slots
from tests import helpers

CONFIG_NAMES = sorted(name[:-3] for name in os.listdir(os.path.join(helpers.ROOT, 'configs'))
                      if name.endswith('.py') and name != '__init__.py')


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_every_config_passes_the_checks(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  config_checks.check(config)


def test_the_published_protocol_cuts_to_the_box_and_decays_per_epoch():
  config = published_protocol.get_config()
  assert (config.model.backbone, config.data.crop, config.data.normalization) == (
      'vgg16', 'gt_box', 'imagenet')
  assert config.data.img_size == config.data.crop_size == 224 and not config.data.random_flip
  assert (config.optimizer, config.learning_rate, config.batch_size) == ('adam', 1e-4, 16)
  assert (config.schedule, config.decay_rate) == ('step_decay', 0.8)
  assert config.decay_every_steps == -(-209_222 // 16)  # an epoch of the official train split
  assert config.eval.split == 'test'


def test_the_published_protocol_trains_and_evaluates_on_a_synthetic_folder(synthetic_folder,
                                                                          tmp_path):
  """Shrunk: 48 px (VGG-16's conv5_3 is 3 x 3), batches of 8, a learning-rate decay
  every step."""
  config = published_protocol.get_config()
  config.data.data_dir = synthetic_folder[0]
  config.data.img_size = config.data.crop_size = 48
  config.data.threads = 1
  config.batch_size = config.eval.batch_size = 8
  config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.decay_every_steps = 1
  config.num_box_images = 2
  results = train.train_and_evaluate(config, str(tmp_path))
  assert 0 <= results['category_top5'] <= 1 and 0 <= results['bbox_iou'] <= 1
  logged = helpers.logged_evaluations(str(tmp_path))
  assert list(logged) == [2]


@pytest.mark.slow  # ~60 s: VGG-16 with attention compiled for training, evaluation, prediction
def test_the_landmark_attention_recipe_trains_evaluates_and_predicts_landmarks(
    synthetic_folder, tmp_path, capsys):
  """Liu & Lu's recipe shrunk to 64 px (the U-Net halves conv4_3's 8 x 8 twice): it trains
  with its three losses, --mode=evaluate reports the landmark metrics, and --mode=predict
  writes each photo's eight points, inside the photo, and draws them."""
  config = landmark_attention.get_config()
  config.data.data_dir = synthetic_folder[0]
  config.data.img_size = config.data.crop_size = 64
  config.data.threads = 1
  config.batch_size = config.eval.batch_size = 8
  config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.num_box_images = 2
  results = train.train_and_evaluate(config, str(tmp_path))
  assert 'bbox_iou' not in results and 'box_loss' not in results
  for name in ('landmark_error', 'landmark_loss', 'attribute_loss', 'category_loss'):
    assert results[name] > 0, name
  config.eval.checkpoint = ''
  evaluated = evaluate.evaluate_checkpoint(config, str(tmp_path))
  assert evaluated['landmark_error'] == pytest.approx(results['landmark_error'], abs=1e-6)
  assert 'landmark_error_left_collar' in capsys.readouterr().out
  index = annotations.read_deepfashion(synthetic_folder[0])
  photo = os.path.join(index.image_dir(), index.image_paths[0])
  line = json.loads(open(predict.predict(config, str(tmp_path), photo,
                                         str(tmp_path / 'out'))).readline())
  assert list(line['landmarks']) == list(landmark_slots.SLOT_NAMES) and 'box' not in line
  for point in line['landmarks'].values():
    assert -0.5 <= point['x'] <= line['width'] and -0.5 <= point['y'] <= line['height']
  assert os.path.getsize(line['figure']) > 0
