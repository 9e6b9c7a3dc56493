"""--mode=evaluate: the table, the JSON, and the unreadable images counted."""

import glob
import json
import logging
import os

import pytest

from deepfashion_jax import evaluate
from deepfashion_jax import train
from tests import helpers


def test_evaluate_mode_writes_the_table_and_json(quirky_folder, tmp_path, capsys, caplog):
  """On the folder with bad images: the run completes and counts what it skipped."""
  caplog.set_level(logging.INFO)
  data_dir, workdir = quirky_folder[0], str(tmp_path / 'run')
  config = helpers.tiny_config(data_dir)
  train.train_and_evaluate(config, workdir)
  assert 'unreadable images skipped in training since the last evaluation' in caplog.text
  capsys.readouterr()
  evaluate.evaluate_checkpoint(config, workdir)
  printed = capsys.readouterr().out
  with open(os.path.join(workdir, 'eval_val_6.json')) as f:
    written = json.load(f)
  expected_keys = {'category_top1', 'category_top3', 'category_top5', 'attr_recall_top3',
                   'attr_recall_top5', 'attr_recall_top3_texture', 'attr_recall_top5_style',
                   'baseline_attr_recall_top3_texture', 'bbox_iou', 'loss'}
  assert expected_keys <= set(written) and written['step'] == 6
  assert 'category_top1' in printed and 'eval_val_6.json' in printed
  logged = helpers.logged_evaluations(workdir)[6]  # the training run's own evaluation of step 6
  for key in expected_keys:
    assert written[key] == pytest.approx(logged[key], rel=1e-5, abs=1e-7, nan_ok=True), key
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  quirks = quirky_folder[1]['quirks']
  with open(os.path.join(data_dir, 'Eval', 'list_eval_partition.txt')) as f:
    split_of = dict(line.split() for line in f.read().splitlines()[2:])
  bad_in_val = sum(split_of[quirks[name]] == 'val' for name in ('truncated', 'missing'))
  assert written['skipped_images_eval'] == logged['skipped_images_eval'] == bad_in_val
