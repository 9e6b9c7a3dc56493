"""The main job end to end on the tiny config: train, evaluate, convert, and exact resume."""

import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(workdir, data_dir, *flags):
  command = [sys.executable, os.path.join(ROOT, 'main.py'), '--config=configs/test.py',
             f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *flags]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _scalars(workdir):
  """(step, tag) -> value of every scalar in the workdir's TensorBoard event files."""
  from tensorflow.compat.v1 import train as tf_train  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  values = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf_train.summary_iterator(path):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == 'scalars':
          values[(event.step, value.tag)] = float(tf.make_ndarray(value.tensor))
  return values


def _final_state(workdir, step):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  item_names=('state', 'data'))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored['state']


def _jsonl(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {line['step']: line for line in map(json.loads, f)}


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(synthetic_folder, tmp_path):
  data_dir = synthetic_folder[0]
  straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
  _main(straight, data_dir)  # 6 steps
  _main(split, data_dir, '--config.num_train_steps=4')
  resumed = _main(split, data_dir)  # a new process: steps 5 and 6
  assert 'Resuming from the checkpoint of step 4' in resumed.stderr

  import jax  # pylint: disable=g-import-not-at-top
  for a, b in zip(jax.tree.leaves(_final_state(straight, 6)),
                  jax.tree.leaves(_final_state(split, 6))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  straight_scalars, split_scalars = _scalars(straight), _scalars(split)
  train_tags = [key for key in straight_scalars if key[1].startswith('train_')]
  assert {step for step, _ in train_tags} == {2, 4, 6}
  eval_tags = [key for key in straight_scalars if key[1].startswith('eval_')]
  assert {step for step, _ in eval_tags} == {3, 6}
  for key in train_tags + [key for key in eval_tags if key[0] == 6]:
    np.testing.assert_equal(split_scalars[key], straight_scalars[key], err_msg=str(key))
  assert _jsonl(split)[6] == _jsonl(straight)[6]  # the evaluation logged at the end


def test_evaluate_mode_writes_the_table_and_json(quirky_folder, tmp_path):
  """On the folder with bad images: the run completes and counts what it skipped."""
  data_dir, workdir = quirky_folder[0], str(tmp_path / 'run')
  trained = _main(workdir, data_dir)
  result = _main(workdir, data_dir, '--mode=evaluate')
  with open(os.path.join(workdir, 'eval_val_6.json')) as f:
    written = json.load(f)
  expected_keys = {'category_top1', 'category_top3', 'category_top5', 'attr_recall_top3',
                   'attr_recall_top5', 'attr_recall_top3_texture', 'attr_recall_top5_style',
                   'baseline_attr_recall_top3_texture', 'bbox_iou', 'loss'}
  assert expected_keys <= set(written) and written['step'] == 6
  assert 'category_top1' in result.stdout and 'eval_val_6.json' in result.stdout
  logged = _jsonl(workdir)[6]  # the training run's own evaluation of step 6
  for key in expected_keys:
    assert written[key] == pytest.approx(logged[key], rel=1e-5, abs=1e-7, nan_ok=True), key
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  quirks = quirky_folder[1]['quirks']
  with open(os.path.join(data_dir, 'Eval', 'list_eval_partition.txt')) as f:
    split_of = dict(line.split() for line in f.read().splitlines()[2:])
  bad_in_val = sum(split_of[quirks[name]] == 'val' for name in ('truncated', 'missing'))
  assert written['skipped_images_eval'] == logged['skipped_images_eval'] == bad_in_val
  assert 'unreadable images skipped in training since the last evaluation' in trained.stderr


def test_a_wrong_config_value_is_refused_naming_the_field(synthetic_folder, tmp_path):
  command = [sys.executable, os.path.join(ROOT, 'main.py'), '--config=configs/test.py',
             f'--workdir={tmp_path}', '--config.dtype=float8']
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "config.dtype='float8': expected one of ('float32', 'bfloat16', 'float16')" in \
      result.stderr


@pytest.mark.parametrize('field,value,message', [
    ('data.source', 'lmdb', "config.data.source='lmdb': expected one of ('folder', 'tfds')"),
    ('warmup_steps', 10, 'config.warmup_steps=10 leaves no steps for the cosine decay'),
])
def test_wrong_values_are_refused_in_process(field, value, message):
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from deepfashion_jax import config_checks  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.schedule = 'cosine'
  section, _, name = field.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    config_checks.check(config)


def test_convert_writes_a_checkpoint_that_holds_the_baseline(tmp_path, saves_as_on_a_gpu):
  """A checkpoint as the baseline's users have them (PyTorch < 1.6's format, saved from a
  GPU, through nn.DataParallel) converts, evaluates and predicts."""
  torch = pytest.importorskip('torch')
  sys.path.insert(0, os.path.dirname(__file__))
  import torch_reference  # pylint: disable=g-import-not-at-top
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from deepfashion_jax import evaluate  # pylint: disable=g-import-not-at-top
  from deepfashion_jax import train  # pylint: disable=g-import-not-at-top
  reference = torch_reference.FashionResnet(18, feature_size=3)  # 72 px
  path = str(tmp_path / 'epoch_3.pth')
  optimiser = torch.optim.Adam(reference.parameters())
  torch.save({'model': torch.nn.DataParallel(reference).state_dict(),
              'optim': optimiser.state_dict(), 'epoch': 3}, path,
             _use_new_zipfile_serialization=False)
  config = test_config.get_config()
  workdir = str(tmp_path / 'converted')
  with pytest.raises(ValueError, match='--config.model.roi_pool=baseline_max'):
    train.convert(config, workdir, path)
  config.model.roi_pool = 'baseline_max'
  assert train.convert(config, workdir, path) == 0
  results = evaluate.evaluate_checkpoint(config, workdir)
  assert 0 <= results['category_top5'] <= 1 and os.path.isfile(
      os.path.join(workdir, 'eval_val_0.json'))
  state = _final_state(workdir, 0)
  kernel = np.asarray(state['params']['backbone']['conv1']['kernel']['value'])
  np.testing.assert_array_equal(
      kernel, reference.state_dict()['basemodel.0.weight'].numpy().transpose(2, 3, 1, 0))
  # Prediction uses the converted checkpoint directly, with the baseline's pooling even
  # when the config names another (the checkpoint's config wins, with a warning).
  from deepfashion_jax import predict  # pylint: disable=g-import-not-at-top
  photo = str(tmp_path / 'photo.jpg')
  Image.new('RGB', (120, 200), (200, 30, 30)).save(photo)
  config.model.roi_pool = 'align'
  with open(predict.predict(config, workdir, photo, str(tmp_path / 'out'))) as f:
    line = json.loads(f.readline())
  assert line['path'] == photo and len(line['categories']) == 5 and os.path.isfile(line['figure'])
