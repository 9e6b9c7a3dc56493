"""--mode=evaluate: the table, the JSON, the breakdowns, every kept checkpoint, and the
unreadable images counted. One training run serves every test here."""

import glob
import json
import logging
import os
import shutil

import numpy as np
from PIL import Image
import pytest

from deepfashion_jax import checkpoints
from deepfashion_jax import errors
from deepfashion_jax import evaluate
from deepfashion_jax import train
from deepfashion_jax.data import trained_on
from deepfashion_jax.data import vocabulary
from tests import helpers


class _Messages(logging.Handler):
  """The messages logged (INFO and up) while it is attached to the root logger."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.fixture(scope='module')
def trained_run(quirky_folder, tmp_path_factory):
  """(config, workdir, what training logged): the tiny config trained for 6 steps on the
  folder with bad images; the checkpoints of steps 4 and 6 are kept."""
  config = helpers.tiny_config(quirky_folder[0], keep_checkpoints=2)
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  root, messages = logging.getLogger(), _Messages()
  level = root.level
  root.addHandler(messages)
  root.setLevel(logging.INFO)
  try:
    train.train_and_evaluate(config, workdir)
  finally:
    root.removeHandler(messages)
    root.setLevel(level)
  return config, workdir, '\n'.join(messages.lines)


def _image_tags(workdir) -> set:
  """(step, tag) of every image in the workdir's TensorBoard event files."""
  from tensorflow.compat.v1 import train as tf_train  # pylint: disable=g-import-not-at-top
  return {(event.step, value.tag)
          for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
          for event in tf_train.summary_iterator(path) for value in event.summary.value
          if value.metadata.plugin_data.plugin_name == 'images'}


def test_evaluate_mode_writes_the_table_and_json(trained_run, quirky_folder, capsys):
  """On the folder with bad images: the run completes and counts what it skipped."""
  config, workdir, training_log = trained_run
  data_dir = quirky_folder[0]
  assert 'unreadable images skipped in training since the last evaluation' in training_log
  capsys.readouterr()
  evaluate.evaluate_checkpoint(config, workdir)
  printed = capsys.readouterr().out
  with open(os.path.join(workdir, 'eval_val_6.json')) as f:
    written = json.load(f)
  expected_keys = {'category_top1', 'category_top3', 'category_top5', 'attr_recall_top3',
                   'attr_recall_top5', 'attr_recall_top3_texture', 'attr_recall_top5_style',
                   'baseline_attr_recall_top3_texture', 'bbox_iou', 'loss'}
  assert expected_keys <= set(written) and written['step'] == 6
  assert written['data'] == dict(path=os.path.abspath(data_dir),
                                 lists_sha256=trained_on.lists_sha256(data_dir),
                                 trained_on_these_lists=True)
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
  images = sum(split == 'val' for split in split_of.values()) - bad_in_val
  _check_breakdowns(written, images)
  _check_what_was_measured(written, printed, data_dir, images, bad_in_val)
  _check_examples_file(os.path.join(workdir, 'examples_val_6.npz'), written, images, bad_in_val)
  assert 'most confused categories' in printed and 'confusion_val_6.png' in printed
  with Image.open(os.path.join(workdir, 'confusion_val_6.png')) as picture:
    assert picture.size == (1000, 1000)
  assert (6, 'eval_val_confusion') in _image_tags(workdir)


def _check_what_was_measured(written: dict, printed: str, data_dir: str, images: int,
                             skipped: int):
  """The JSON and the printed table name the folder, partition, split, crop protocol, step,
  weights and the images scored; the table groups the metrics, the baseline's apart."""
  measured = written['measured']
  assert {key: measured[key] for key in ('data_dir', 'partition', 'split', 'crop', 'step',
                                         'weights', 'images_scored', 'skipped_images')} == dict(
      data_dir=os.path.abspath(data_dir), partition='official', split='val', crop='none',
      step=6, weights='raw', images_scored=images, skipped_images=skipped)
  assert measured['crop_protocol'].startswith('the whole image, resized to 72 x 72')
  for line in (f'data folder: {os.path.abspath(data_dir)}', 'partition: official',
               f'images scored: {images}', "the baseline's formulas:", 'box:'):
    assert line in printed, line
  assert printed.index('category:') < printed.index('baseline_attr_recall_top3_texture')
  assert 'report: ' in printed and 'report_val_6.html' in printed


def _check_examples_file(path: str, written: dict, images: int, skipped: int):
  """One row per image of the split (the unreadable ones not valid), named by its file;
  the correct ones add up to the top-1 accuracy."""
  with np.load(path) as examples:
    assert set(examples) >= {'image', 'index', 'valid', 'category', 'category_logits', 'top5',
                             'correct', 'true_box', 'predicted_box', 'box_valid', 'region'}
    assert len(examples['image']) == images + skipped == examples['valid'].size
    assert examples['valid'].sum() == images
    assert all(name.startswith('img/') and name.endswith('.jpg') for name in examples['image'])
    assert examples['correct'].sum() / images == pytest.approx(written['category_top1'])
    assert (examples['top5'][:, 0] == examples['category_logits'].argmax(axis=1)).all()


def _check_breakdowns(written: dict, images: int):
  """The breakdowns of an eval_<split>_<step>.json: named, one per category and per
  attribute, over the split's readable images, and pooled, equal to the clu metrics."""
  categories = written['per_category']
  assert [c['name'] for c in categories] == list(vocabulary.CATEGORY_NAMES)
  assert all(set(c) == {'name', 'images', 'top1', 'top3', 'top5'} for c in categories)
  assert sum(c['images'] for c in categories) == images
  assert any(c['images'] == 0 for c in categories)  # a tiny split: some have no image
  assert all(c['top1'] is c['top5'] is None for c in categories if c['images'] == 0)
  for k in (1, 3, 5):
    hits = sum(c['images'] * c[f'top{k}'] for c in categories if c['images'])
    assert hits / images == pytest.approx(written[f'category_top{k}'], rel=1e-5), k
  counts = np.array(written['confusion_matrix'])
  assert counts.shape == (50, 50) and counts.sum() == images
  assert len(written['most_confused_pairs']) <= 10
  attributes = written['per_attribute']
  assert len(attributes) == 1000 and all(
      set(a) == {'name', 'type', 'positives', 'recall_top3', 'recall_top5', 'average_precision'}
      for a in attributes)
  with_positives = [a for a in attributes if a['positives']]
  assert written['mean_attribute_average_precision'] == pytest.approx(
      np.mean([a['average_precision'] for a in with_positives]))
  for type_name in vocabulary.ATTRIBUTE_TYPE_NAMES:
    of_type = [a for a in with_positives if a['type'] == type_name]
    if of_type:
      found = sum(a['recall_top3'] * a['positives'] for a in of_type)
      assert found / sum(a['positives'] for a in of_type) == pytest.approx(
          written[f'attr_recall_top3_{type_name}'], rel=1e-5), type_name


def test_every_kept_checkpoint_is_evaluated_into_one_table(trained_run, capsys):
  """config.eval.checkpoint=all: each kept step's files, then one table and a figure per
  headline metric against the step."""
  config, workdir, _ = trained_run
  config = config.copy_and_resolve_references()
  config.eval.checkpoint = 'all'
  evaluated = evaluate.evaluate_checkpoint(config, workdir)
  assert sorted(evaluated) == [4, 6]
  assert 'every kept checkpoint' in capsys.readouterr().out
  with open(os.path.join(workdir, 'eval_val_all.json')) as f:
    table = json.load(f)
  assert table['split'] == 'val' and [row['step'] for row in table['checkpoints']] == [4, 6]
  # This model has no landmark branch: no landmark_error column.
  headline = [name for name in evaluate.HEADLINE_METRICS if name != 'landmark_error']
  for row in table['checkpoints']:
    assert set(row) == {'step', *headline}
    with open(os.path.join(workdir, f'eval_val_{row["step"]}.json')) as f:
      one = json.load(f)
    assert {name: one[name] for name in headline} == {name: row[name] for name in headline}
    assert os.path.isfile(os.path.join(workdir, f'confusion_val_{row["step"]}.png'))
  for name in headline:
    assert os.path.isfile(os.path.join(workdir, f'eval_val_{name}_vs_step.png')), name
  assert {(4, 'eval_val_confusion'), (6, 'eval_val_confusion')} <= _image_tags(workdir)


def test_the_moving_average_evaluation_has_files_of_its_own(tmp_path):
  """config.eval.weights='ema': the files say `<split>_ema` and their `weights`, beside
  (not over) the raw weights' ones."""
  workdir = str(tmp_path)
  raw = evaluate.write_json(workdir, 'val', 6, {'category_top1': 0.25})
  ema = evaluate.write_json(workdir, 'val', 6, {'category_top1': 0.5}, weights='ema')
  assert os.path.basename(raw) == 'eval_val_6.json'
  assert os.path.basename(ema) == 'eval_val_ema_6.json'
  with open(raw) as f, open(ema) as g:
    assert (json.load(f)['weights'], json.load(g)) == (
        'raw', dict(step=6, split='val', weights='ema', category_top1=0.5))
  evaluate.report_steps(workdir, 'val', {4: {'category_top1': 0.1}, 6: {'category_top1': 0.2}},
                        weights='ema')
  with open(os.path.join(workdir, 'eval_val_ema_all.json')) as f:
    assert json.load(f)['weights'] == 'ema'
  assert os.path.isfile(os.path.join(workdir, 'eval_val_ema_category_top1_vs_step.png'))


def test_no_synthetic_stand_in_for_a_model_trained_on_a_folder(trained_run, quirky_folder):
  """config.data.data_dir left empty (as configs/demo.py has it) on a workdir trained on a
  folder: one clear error naming the field and that folder, before a single synthetic
  image is written; resuming training the same way is refused too."""
  _, workdir, _ = trained_run
  config = helpers.tiny_config('', keep_checkpoints=2)
  assert config.data.synthetic_images > 0  # what would write the stand-in
  for run in (evaluate.evaluate_checkpoint, train.train_and_evaluate):
    with pytest.raises(errors.DeepFashionError) as raised:
      run(config, workdir)
    assert 'config.data.data_dir' in str(raised.value), run
    assert os.path.abspath(quirky_folder[0]) in str(raised.value), run
    assert not os.path.exists(os.path.join(workdir, 'synthetic_deepfashion')), run


class _Stop(Exception):
  """Raised where the checkpoint would be restored: the test ends there."""


def test_evaluating_other_lists_says_so_naming_both(trained_run, quirky_folder,
                                                     synthetic_folder, tmp_path, monkeypatch,
                                                     caplog):
  """Another folder's lists: a warning naming both folders and fingerprints; the same lists
  copied elsewhere: no such warning."""
  _, workdir, _ = trained_run
  monkeypatch.setattr(checkpoints, 'restore_for_inference', _raise_stop)
  copy = str(tmp_path / 'copy')
  shutil.copytree(quirky_folder[0], copy)
  warnings = {}
  for name, data_dir in (('other', synthetic_folder[0]), ('copy', copy)):
    caplog.clear()
    with caplog.at_level(logging.INFO), pytest.raises(_Stop):
      evaluate.evaluate_checkpoint(helpers.tiny_config(data_dir, keep_checkpoints=2), workdir)
    warnings[name] = [r.getMessage() for r in caplog.records
                      if r.levelno >= logging.WARNING and 'TRAINED ON' in r.getMessage()]
  (warning,) = warnings['other']
  trained = trained_on.read(workdir).data
  assert os.path.abspath(quirky_folder[0]) in warning and trained.lists_sha256 in warning
  assert os.path.abspath(synthetic_folder[0]) in warning
  assert trained_on.lists_sha256(synthetic_folder[0]) in warning
  assert not warnings['copy']


def _raise_stop(*args, **kwargs):
  raise _Stop()


def test_resuming_on_other_lists_is_refused(trained_run, synthetic_folder):
  """Before anything is restored or written: the checkpoints and the record stay."""
  _, workdir, _ = trained_run
  kept = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  record = trained_on.read(workdir)
  config = helpers.tiny_config(synthetic_folder[0], keep_checkpoints=2)
  with pytest.raises(trained_on.TrainedOnError, match='does not resume on other data') as raised:
    train.train_and_evaluate(config, workdir)
  assert os.path.abspath(synthetic_folder[0]) in str(raised.value)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == kept
  assert trained_on.read(workdir) == record


def _column(browser, table: int, column: int) -> list:
  return browser.execute_script(
      'var column = arguments[1];'
      'return Array.from(document.querySelectorAll("table.sortable")[arguments[0]].tBodies[0]'
      '.rows).map(function (r) { return r.cells[column].textContent; });', table, column)


def test_the_report_opens_sorts_and_shows_every_image(trained_run, tmp_path, monkeypatch):
  """The report of --mode=evaluate in a real browser: every image loaded, a click on the
  per-category table's `images` header sorts it by images, most first; a screenshot saved."""
  config, workdir, _ = trained_run
  path = os.path.join(workdir, 'report_val_6.html')
  if not os.path.isfile(path):  # this file's first test writes it; run alone, write it here
    evaluate.evaluate_checkpoint(config, workdir)
  monkeypatch.setenv('SE_OFFLINE', 'true')
  browser = helpers.chromium_driver()
  try:
    browser.get('file://' + path)
    assert browser.title == 'Evaluation: val split, step 6'
    images = browser.execute_script(
        'return Array.from(document.images).map(function (i) {'
        ' return [i.alt, i.complete && i.naturalWidth > 0]; });')
    assert len(images) > 2 and all(loaded for _, loaded in images), images
    assert not browser.find_elements('css selector', '.missing')  # every file was read
    names_before = _column(browser, 0, 0)
    assert names_before[:3] == ['Anorak', 'Blazer', 'Blouse']  # label order
    header = browser.find_elements('css selector', 'table.sortable')[0].find_elements(
        'css selector', 'th')[1]
    assert header.text == 'images'
    header.click()
    counts = [int(text) for text in _column(browser, 0, 1)]
    assert counts == sorted(counts, reverse=True) and _column(browser, 0, 0) != names_before
    assert header.get_attribute('aria-sort') == 'descending'
    header.click()
    assert [int(text) for text in _column(browser, 0, 1)] == sorted(counts)
    screenshot = tmp_path / 'report.png'
    assert browser.save_screenshot(str(screenshot))
    with Image.open(screenshot) as picture:
      assert picture.size[0] > 1000
  finally:
    browser.quit()
