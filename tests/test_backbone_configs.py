"""The modern backbones' configs (configs/convnext_tiny.py, clip_vit_b16_probe.py,
clip_vit_b16_finetune.py): what each sets, and each trained shrunk on a synthetic folder,
then evaluated and run on a photo. Shrunk means the backbone's shrunk variant of the same
family (convnext_test, clip_vit_test), 32 px, batches of 8, 2 steps, and no published
weights (config.init_from=''): loading those is tested with each family's files
(test_convnext.py, test_clip_siglip_parity.py, test_pretrained.py)."""

import json
import os

import pytest

from configs import clip_vit_b16_finetune
from configs import clip_vit_b16_probe
from configs import convnext_tiny
from deepfashion_jax import evaluate
from deepfashion_jax import predict
from deepfashion_jax import pretrained
from deepfashion_jax import train
from deepfashion_jax.data import annotations
from tests import helpers


def test_each_config_names_published_weights_for_its_backbone():
  for module, backbone in ((convnext_tiny, 'convnext_tiny'),
                           (clip_vit_b16_probe, 'clip_vit_b16'),
                           (clip_vit_b16_finetune, 'clip_vit_b16')):
    config = module.get_config()
    assert config.model.backbone == backbone
    assert pretrained.REGISTRY[config.init_from].backbone == backbone
    assert config.data.crop == 'gt_box' and config.eval.split == 'test'


def test_the_probe_freezes_the_tower_and_the_finetune_decays_its_layers():
  probe, finetune = clip_vit_b16_probe.get_config(), clip_vit_b16_finetune.get_config()
  assert (probe.model.trainable, probe.layer_decay, probe.model.drop_path) == ('heads', 1.0, 0)
  assert (finetune.model.trainable, finetune.layer_decay) == ('all', 0.65)
  assert finetune.model.drop_path > 0 and finetune.ema_decay > 0
  assert probe.data.normalization == finetune.data.normalization == 'clip'


def _shrunk(module, backbone, data_dir):
  config = module.get_config()
  config.init_from = ''
  config.model.backbone = backbone
  config.data.data_dir = data_dir
  config.data.img_size = config.data.crop_size = 32
  config.data.threads = 1
  config.batch_size = config.eval.batch_size = config.predict.batch_size = 8
  config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.warmup_steps = 1
  config.num_box_images = 2
  config.predict.ten_crop = False
  return config


# In `make test-slow`: each compiles a train, an evaluation and a prediction step. `make
# test` trains the shrunk backbones' steps (test_vit.py, test_fine_tuning.py) and runs the
# same train, evaluate and predict functions on ResNet-18 (test_configs.py, test_predict.py).
@pytest.mark.slow
@pytest.mark.parametrize('module, backbone', [(clip_vit_b16_probe, 'clip_vit_test'),
                                              (convnext_tiny, 'convnext_test'),
                                              (clip_vit_b16_finetune, 'clip_vit_test')])
def test_each_config_trains_evaluates_and_predicts_shrunk(module, backbone, synthetic_folder,
                                                          tmp_path):
  config = _shrunk(module, backbone, synthetic_folder[0])
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)
  assert 0 <= results['category_top5'] <= 1 and 0 <= results['bbox_iou'] <= 1
  assert list(helpers.logged_evaluations(workdir)) == [2]
  config.eval.checkpoint = ''
  evaluated = evaluate.evaluate_checkpoint(config, workdir)
  assert evaluated['category_top5'] == pytest.approx(results['category_top5'], abs=1e-6)
  index = annotations.read_deepfashion(synthetic_folder[0])
  photo = os.path.join(index.image_dir(), index.image_paths[0])
  line = json.loads(open(predict.predict(config, workdir, photo,
                                         str(tmp_path / 'out'))).readline())
  assert len(line['categories']) > 0 and os.path.getsize(line['figure']) > 0
