"""The config files: each passes the checks, config.model and config.loss are the keyword
arguments of what they configure, and the published protocol's recipe trains (shrunk)."""

import importlib
import inspect
import json
import operator
import os

from flax import nnx
import jax
import jax.numpy as jnp
import pytest

from configs import landmark_attention
from configs import published_protocol
from configs import test as test_config
from deepfashion_jax import config_checks
from deepfashion_jax import evaluate
from deepfashion_jax import losses
from deepfashion_jax import predict
from deepfashion_jax import steps
from deepfashion_jax import train
from deepfashion_jax.models import fashion_net
from deepfashion_jax.data import annotations
from deepfashion_jax.data import landmark_slots
from tests import helpers

CONFIG_NAMES = sorted(name[:-3] for name in os.listdir(os.path.join(helpers.ROOT, 'configs'))
                      if name.endswith('.py') and name != '__init__.py')


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_every_config_passes_the_checks(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  config_checks.check(config)


def _keyword_parameters(function) -> set:
  return {p.name for p in inspect.signature(function).parameters.values()
          if p.kind == p.KEYWORD_ONLY}


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_model_and_loss_sections_are_their_consumers_keyword_arguments(name, monkeypatch):
  """config.model's fields and the arguments steps.py adds are exactly FashionNet's keyword
  arguments, config.loss's and pos_weight exactly losses.total_loss's: a field without a
  parameter, or a parameter that neither a field nor steps.py gives, fails here. And
  steps.create_model hands FashionNet each field's value as the config holds it."""
  config = importlib.import_module(f'configs.{name}').get_config()
  elsewhere = steps.model_arguments_from_elsewhere(config, nnx.Rngs(0))
  assert not set(config.model) & set(elsewhere)
  assert set(config.model) | set(elsewhere) == _keyword_parameters(
      fashion_net.FashionNet.__init__)
  assert set(config.loss) | set(steps.LOSS_ARGUMENTS_FROM_ELSEWHERE) == _keyword_parameters(
      losses.total_loss)
  received = {}
  monkeypatch.setattr(fashion_net, 'FashionNet', lambda **kwargs: received.update(kwargs))
  steps.create_model(config, nnx.Rngs(0))
  assert {field: received.get(field, 'not passed') for field in config.model} == (
      config.model.to_dict())


# FashionNet's attribute that holds each config.model field, where it is not the field's name.
_MODEL_ATTRIBUTES = {'backbone': 'backbone_name', 'dropout': 'dropout.rate'}


def test_every_model_and_loss_field_reaches_the_model_and_the_loss(monkeypatch):
  """configs/test.py's model, built as the steps build it, with every field (but heads,
  whose other value forbids some of these) off FashionNet's default: each value is the
  model's; and each config.loss field is what the step's forward pass hands
  losses.total_loss. Shapes only (`nnx.eval_shape`, `jax.eval_shape`): no weights."""
  config = test_config.get_config()
  config.model.update(backbone='resnet34', roi_pool='baseline_max', roi_sampling_ratio=3,
                      roi_aligned=False, box_gradient_into_roi=True,
                      category_head='per_garment_type', dropout=0.25, landmarks='heatmaps')
  config.loss.update(attribute='hinge', reduce_sum=False, pos_weights_scale=2.0, beta=0.5,
                     category_weight=2.0, attribute_weight=3.0, two_way_negative_weight=0.2,
                     landmark_weight=4.0, landmark_heatmap='liu_lu', landmark_radius=8.0)
  step_config = steps.create_step_config(config)
  model = nnx.eval_shape(lambda: steps.create_model(config, nnx.Rngs(0)))
  for field, value in config.model.items():
    assert operator.attrgetter(_MODEL_ATTRIBUTES.get(field, field))(model) == value, field
  received = {}

  def recording_loss(outputs, batch, **options):
    del outputs, batch
    received.update(options)
    return jnp.zeros(()), {}

  monkeypatch.setattr(losses, 'total_loss', recording_loss)
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  side = config.data.canvas_size
  batch = dict(canvas=jax.ShapeDtypeStruct((2, side, side, 3), jnp.uint8),
               window=jax.ShapeDtypeStruct((2, 4), jnp.int32),
               region=jax.ShapeDtypeStruct((2, 4), jnp.float32),
               flip=jax.ShapeDtypeStruct((2,), jnp.bool_))
  jax.eval_shape(lambda p, s, b: steps._forward(step_config, p, s, b, train=False),
                 params, batch_stats, batch)
  assert {field: received.get(field, 'not passed') for field in config.loss} == (
      config.loss.to_dict())


def test_the_published_protocol_cuts_to_the_box_and_decays_per_epoch():
  config = published_protocol.get_config()
  assert (config.model.backbone, config.data.crop, config.data.normalization) == (
      'vgg16', 'gt_box', 'imagenet')
  assert config.data.img_size == config.data.crop_size == 224 and not config.data.random_flip
  assert (config.optimizer, config.learning_rate, config.batch_size) == ('adam', 1e-4, 16)
  assert (config.schedule, config.decay_rate) == ('step_decay', 0.8)
  assert config.decay_every_steps == -(-209_222 // 16)  # an epoch of the official train split
  assert config.eval.split == 'test'


@pytest.mark.slow
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
