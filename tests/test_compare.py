"""--mode=compare: McNemar's test, the images paired by file, the galleries of both
directions, protocols refused by name, and whole comparisons (of evaluations written here,
and of a trained run against a converted baseline checkpoint)."""

import json
import logging
import math
import os
import re
import shutil

import numpy as np
import pytest

from deepfashion_jax import compare
from deepfashion_jax import evaluate
from deepfashion_jax.data import annotations
from deepfashion_jax.data import trained_on
from deepfashion_jax.data import vocabulary
from tests import helpers


# ------------------------------------------------------------------------ McNemar's test


def _correctness(b: int, c: int, both_right: int = 5, both_wrong: int = 3) -> tuple:
  """Two runs' correctness over images of which b only the first gets right, c only the
  second."""
  first = [True] * b + [False] * c + [True] * both_right + [False] * both_wrong
  second = [False] * b + [True] * c + [True] * both_right + [False] * both_wrong
  return np.array(first), np.array(second)


def test_mcnemar_by_hand():
  """b=1, c=6: 2 (C(7,0) + C(7,1)) / 2^7 = 16/128, exact (7 discordant images); b=10,
  c=30: (|10 - 30| - 1)^2 / 40 = 361/40 with one degree of freedom, chi-square (40)."""
  small = compare.mcnemar(*_correctness(1, 6))
  assert (small['first_right_second_wrong'], small['first_wrong_second_right']) == (1, 6)
  assert small['images'] == 15 and small['test'] == 'exact binomial'
  assert small['p_value'] == small['exact_p_value'] == pytest.approx(0.125, rel=1e-12)
  large = compare.mcnemar(*_correctness(10, 30))
  assert large['chi_square'] == pytest.approx(9.025, rel=1e-12)
  assert large['test'] == 'chi-square, continuity corrected'
  # P(chi2_1 > x) = P(|Z| > sqrt(x)) = erfc(sqrt(x / 2)); x = 9.025 lies between the
  # tables' 7.88 (p = 0.005) and 10.83 (p = 0.001).
  assert large['p_value'] == large['chi_square_p_value'] == pytest.approx(0.0026631, rel=1e-4)
  even = compare.mcnemar(*_correctness(4, 4))
  assert (even['p_value'], even['chi_square']) == (1.0, 0.0)
  none = compare.mcnemar(*_correctness(0, 0))
  assert (none['p_value'], none['exact_p_value'], none['chi_square_p_value']) == (1.0, 1.0, 1.0)


def _exact_tail(k: int, n: int) -> float:
  """2 P(K <= min(k, n - k)), K ~ Bin(n, 1/2), at most 1, in exact integers (math.comb)."""
  k = min(k, n - k)
  return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


@pytest.mark.parametrize('b, c', [(0, 1), (3, 0), (2, 9), (11, 13), (12, 12), (40, 25),
                                  (310, 250), (1200, 1800)])
def test_mcnemar_against_exact_integers_and_scipy(b, c):
  """The exact p-value against exact integer sums, and both against scipy.stats."""
  figures = compare.mcnemar(*_correctness(b, c))
  assert figures['exact_p_value'] == pytest.approx(_exact_tail(b, b + c), rel=1e-9, abs=1e-300)
  stats = pytest.importorskip('scipy.stats')
  assert figures['exact_p_value'] == pytest.approx(stats.binomtest(b, b + c).pvalue,
                                                   rel=1e-9, abs=1e-300)
  statistic = max(abs(b - c) - 1, 0) ** 2 / (b + c)
  assert figures['chi_square'] == pytest.approx(statistic, rel=1e-12)
  assert figures['chi_square_p_value'] == pytest.approx(stats.chi2.sf(statistic, 1), rel=1e-9,
                                                        abs=1e-300)
  chosen = 'exact_p_value' if b + c < compare.EXACT_BELOW else 'chi_square_p_value'
  assert figures['p_value'] == figures[chosen]


# ------------------------------------------------------------- pairing and the galleries


def test_images_are_paired_by_file_readable_in_both():
  """Another order, a file only in each, one unreadable in the second, one listed twice:
  the files in both, readable in both, in the first's order, each at its first row."""
  first = np.array(['img/a.jpg', 'img/b.jpg', 'img/c.jpg', 'img/only_1.jpg', 'img/d.jpg'])
  second = np.array(['img/d.jpg', 'img/only_2.jpg', 'img/c.jpg', 'img/a.jpg', 'img/b.jpg',
                     'img/d.jpg'])
  valid_second = np.array([True, True, True, True, False, True])
  paths, rows = compare.align([first, second], [np.ones(5, bool), valid_second])
  assert paths.tolist() == ['img/a.jpg', 'img/c.jpg', 'img/d.jpg']
  assert [r.tolist() for r in rows] == [[0, 2, 4], [3, 2, 0]]
  np.testing.assert_array_equal(first[rows[0]], second[rows[1]])
  third = np.array(['img/c.jpg', 'img/a.jpg'])
  paths, rows = compare.align([first, second, third], [np.ones(5, bool), valid_second,
                                                      np.array([True, False])])
  assert paths.tolist() == ['img/c.jpg'] and [r.tolist() for r in rows] == [[2], [2], [0]]


def _examples(categories, predicted, confidence) -> dict:
  """Examples whose top-1 is `predicted`, with that logit `confidence` above the others."""
  logits = np.zeros((len(categories), vocabulary.NUM_CATEGORIES), np.float32)
  logits[np.arange(len(categories)), predicted] = confidence
  return dict(category=np.array(categories), category_logits=logits,
              correct=np.array(predicted) == np.array(categories))


def test_both_directions_are_shown_surest_mistake_first():
  """Rows 0-5: the first run right on 0, 2, 3, 5; the second on 1, 2, 4. First right and
  second wrong: 0, 3, 5, by the second's confidence in its mistake (3: 4.0, 0: 2.0, 5:
  2.0, equal ones in row order); the other way: 4 (5.0) before 1 (1.0)."""
  truth = [1, 2, 3, 4, 5, 6]
  first = _examples(truth, [1, 9, 3, 4, 9, 6], [1, 3, 1, 1, 5, 1])
  second = _examples(truth, [9, 2, 3, 9, 5, 9], [2, 1, 1, 4, 1, 2])
  first_right, second_right = compare.disagreements(first, second, n=5)
  assert first_right.tolist() == [3, 0, 5] and second_right.tolist() == [4, 1]
  first_right, second_right = compare.disagreements(first, second, n=1)
  assert first_right.tolist() == [3] and second_right.tolist() == [4]
  figures = compare.mcnemar(first['correct'], second['correct'])
  assert (figures['first_right_second_wrong'], figures['first_wrong_second_right']) == (3, 2)


# ----------------------------------------------------------------- protocols, refused


def _measured(data_dir: str, **changes) -> dict:
  data_config = _tiny_data_config()
  measured = evaluate.measured_facts(data_config, 'val', 6, 'raw', data_dir, 4, 0)
  measured.update(changes)
  return measured


def _tiny_data_config():
  return helpers.tiny_config('').data


def _run(label, measured, images=('img/a.jpg', 'img/b.jpg'), lists='0' * 64) -> compare.Run:
  evaluation = dict(measured=measured, data=dict(path=measured['data_dir'], lists_sha256=lists),
                    per_category=[], weights='raw', step=measured['step'])
  examples = dict(image=np.array(images), valid=np.ones(len(images), bool))
  return compare.Run(label, f'runs/{label.lower()}', 'eval.json', evaluation, 'examples.npz',
                     examples)


def test_runs_measured_differently_are_refused_naming_each_field(caplog):
  first = _run('A', _measured('/data/df'))
  same_lists_elsewhere = _run('B', _measured('/copy/of/df'))
  assert compare.protocol_differences([first, same_lists_elsewhere]) == []
  center = _measured('/data/df', partition='random', eval_crop='center_crop',
                     crop_protocol='the whole image, center cropped')
  other = _run('C', center, images=('img/a.jpg', 'img/c.jpg', 'img/d.jpg'), lists='1' * 64)
  with pytest.raises(compare.ProtocolError) as raised:
    compare.check_protocols([first, other], allow_differences=False)
  message = str(raised.value)
  assert "measured.partition: 'official' in A (runs/a), 'random' in C (runs/c)" in message
  assert ("measured.crop_protocol: " + repr(first.evaluation['measured']['crop_protocol'])
          + " in A (runs/a), 'the whole image, center cropped' in C (runs/c)") in message
  assert ('data folder: /data/df (lists SHA-256 000000000000) in A (runs/a), /data/df '
          '(lists SHA-256 111111111111) in C (runs/c)') in message
  assert ("images (the examples' files): 2 in A (runs/a), 3 in C (runs/c); 1 only in A's, 2 "
          "only in C's") in message
  assert 'measured.split' not in message and '--allow_protocol_differences' in message
  with caplog.at_level(logging.WARNING):
    lines = compare.check_protocols([first, other], allow_differences=True)
  assert len(lines) == 4 and all(line in caplog.text for line in lines)


def test_workdirs_are_two_or_more_distinct_folders(tmp_path):
  (tmp_path / 'a').mkdir()
  (tmp_path / 'b').mkdir()
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  assert compare.parse_workdirs(f'{a}, {b},') == [a, b]
  for text, expected in ((a, 'expected two to 26'), (f'{a},{tmp_path}/c', 'is not a folder'),
                         (f'{a},{b},{a}/../a', f'names {a}/../a twice')):
    with pytest.raises(compare.errors.ConfigError, match=re.escape(expected)):
      compare.parse_workdirs(text)


# --------------------------------------------------- a comparison of saved evaluations


def _write_evaluation(workdir: str, folder: str, step: int, predicted: np.ndarray,
                      paths: np.ndarray, headline: dict):
  """An evaluation as --mode=evaluate writes it, of a model predicting `predicted` (with
  probability near 1) for the images at `paths` of the folder's index."""
  os.makedirs(workdir, exist_ok=True)
  index = annotations.read_deepfashion(folder)
  rows = np.flatnonzero(np.isin(index.image_paths, paths))
  truth = index.category[rows]
  logits = np.full((len(rows), vocabulary.NUM_CATEGORIES), -5, np.float32)
  logits[np.arange(len(rows)), predicted] = 5
  boxes = np.tile(np.array([[0.1, 0.1, 0.9, 0.9]], np.float32), (len(rows), 1))
  examples = dict(index=rows.astype(np.int32), valid=np.ones(len(rows), bool),
                  category=truth.astype(np.int32), category_logits=logits,
                  region=np.tile(np.array([[0, 0, 60, 80]], np.float32), (len(rows), 1)),
                  true_box=boxes, box_valid=np.ones(len(rows), bool), predicted_box=boxes * 0.9,
                  image=index.image_paths[rows].astype(str),
                  correct=predicted == truth)
  np.savez(os.path.join(workdir, f'examples_val_{step}.npz'), **examples)
  per_category = [dict(name=name, images=int(np.sum(truth == i)),
                       top1=float(np.mean(predicted[truth == i] == i)) if np.any(truth == i)
                       else None) for i, name in enumerate(index.category_names)]
  measured = evaluate.measured_facts(_tiny_data_config(), 'val', step, 'raw',
                                     os.path.abspath(folder), len(rows), 0)
  data = dict(path=os.path.abspath(folder), lists_sha256=trained_on.lists_sha256(folder),
              trained_on_these_lists=True)
  evaluate.write_json(workdir, 'val', step, dict(headline), dict(
      per_category=per_category, measured=measured, data=data))
  return truth


def _check_numbers_are_the_evaluations(written: dict, workdirs: list, steps: list):
  """Every run's headline and per-category figure in the comparison is its evaluation's."""
  evaluations = []
  for workdir, step in zip(workdirs, steps):
    with open(os.path.join(workdir, f'eval_val_{step}.json')) as f:
      evaluations.append(json.load(f))
  assert written['headline'], 'no headline metric'
  for metric, entry in written['headline'].items():
    assert entry['values'] == [e.get(metric) for e in evaluations], metric
    first = entry['values'][0]
    assert entry['differences_to_first'] == [
        None if v is None or first is None else v - first for v in entry['values']]
  top1 = {row['name']: row['top1'] for row in written['per_category']}
  for i, evaluation in enumerate(evaluations):
    assert {c['name']: c['top1'] for c in evaluation['per_category']} == {
        name: values[i] for name, values in top1.items()}
  changes = [row['differences_to_first'][1] for row in written['per_category']
             if row['differences_to_first'][1] is not None]
  assert changes == sorted(changes, reverse=True)


def _galleries(page: str) -> dict:
  """heading -> the number of cards under it, of the page's galleries."""
  found = re.findall(r'<h3>([^<]*)</h3><div class="gallery">(.*?)</div>\s*(?=<h3>|<script>)',
                     page, re.S)
  return {heading: body.count('class="card wide"') for heading, body in found}


@pytest.fixture(scope='module')
def saved_runs(synthetic_folder, tmp_path_factory) -> tuple:
  """(A's workdir, B's, the validation split's files): two runs' evaluations of the
  synthetic folder's validation split written as --mode=evaluate writes them (A's of steps
  2 and 4, B's of step 6), no model in either. A is right on all but the first three
  images, B on all but the first and the last two."""
  folder = synthetic_folder[0]
  index = annotations.read_deepfashion(folder)
  rows = index.split_indices('val')
  assert len(rows) >= 8 and np.all(np.diff(rows) > 0)
  paths, truth = index.image_paths[rows], index.category[rows]
  position = np.arange(len(truth))
  predicted_a = np.where(position < 3, (truth + 1) % 50, truth)
  predicted_b = np.where((position >= len(truth) - 2) | (position == 0), (truth + 2) % 50,
                         truth)
  root = tmp_path_factory.mktemp('saved_runs')
  a, b = str(root / 'a'), str(root / 'b')
  _write_evaluation(a, folder, 4, predicted_a, paths,
                    dict(category_top1=0.5, category_top3=0.75, bbox_iou=0.4))
  _write_evaluation(a, folder, 2, predicted_a, paths, dict(category_top1=0.1))  # older
  _write_evaluation(b, folder, 6, predicted_b, paths, dict(category_top1=0.625, bbox_iou=0.5))
  return a, b, paths


def _compare_config(folder: str):
  config = helpers.tiny_config(folder)
  config.eval.report_examples = 3
  return config


def test_a_comparison_of_saved_evaluations(saved_runs, synthetic_folder, tmp_path, capsys):
  """Two runs' saved evaluations (nothing evaluated): the JSON's figures are theirs,
  McNemar's counts the paired images, both galleries hold their images as both runs saw
  them; runs of another partition are refused, and shown under a banner when allowed."""
  a, b, paths = saved_runs
  config = _compare_config(synthetic_folder[0])
  out = str(tmp_path / 'out')
  page_path = compare.compare_runs(config, out, [a, b])
  assert page_path == os.path.join(out, 'compare_val.html')
  with open(os.path.join(out, 'compare_val.json')) as f:
    written = json.load(f)
  _check_numbers_are_the_evaluations(written, [a, b], [4, 6])
  assert written['headline']['category_top3']['values'] == [0.75, None]
  assert written['images_compared'] == len(paths) and written['protocol_differences'] == []
  [pair] = written['pairs']
  assert (pair['first_right_second_wrong'], pair['first_wrong_second_right']) == (2, 2)
  assert pair['exact_p_value'] == pytest.approx(1.0)
  assert pair['shown_first_right'] == paths[-2:].tolist()
  assert pair['shown_second_right'] == paths[1:3].tolist()
  with open(page_path, encoding='utf-8') as f:
    page = f.read()
  assert _galleries(page) == {'A right, B wrong: 2 of 2': 2, 'B right, A wrong: 2 of 2': 2}
  assert page.count('<figcaption>A</figcaption>') == 4 and 'not readable' not in page
  assert f'{len(paths):,} images compared' in page and 'class="banner"' not in page
  assert 'McNemar A vs B: 2 only A right, 2 only B right' in capsys.readouterr().out
  # Another partition: refused, naming it; allowed, a banner.
  other = str(tmp_path / 'other')
  shutil.copytree(b, other)
  with open(os.path.join(other, 'eval_val_6.json')) as f:
    evaluation = json.load(f)
  evaluation['measured']['partition'] = 'random'
  with open(os.path.join(other, 'eval_val_6.json'), 'w') as f:
    json.dump(evaluation, f)
  with pytest.raises(compare.ProtocolError, match="measured.partition: 'official' in A"):
    compare.compare_runs(config, out, [a, other])
  compare.compare_runs(config, out, [a, other], allow_protocol_differences=True)
  with open(page_path, encoding='utf-8') as f:
    assert f.read().count('class="banner"') == 1


def test_a_newer_checkpoint_than_the_evaluation_is_said(saved_runs, synthetic_folder,
                                                        tmp_path, caplog):
  """A run evaluated at step 6 that has since saved step 8: compared at 6, with a warning
  naming both steps; a run without checkpoints (A) gets none."""
  from deepfashion_jax import checkpoints  # pylint: disable=g-import-not-at-top
  a, b, _ = saved_runs
  run = str(tmp_path / 'b')
  shutil.copytree(b, run)
  manager = checkpoints.create_manager(run)
  checkpoints.save(manager, 8, {'weights': np.zeros(2, np.float32)})
  manager.wait_until_finished()
  with caplog.at_level(logging.WARNING):
    compare.compare_runs(_compare_config(synthetic_folder[0]), str(tmp_path), [a, run])
  assert (f'{run}: comparing its evaluation of step 6; its newest checkpoint is of step 8'
          in caplog.text) and f'{a}:' not in caplog.text


def _sortable_cells(browser, column: int) -> list:
  """The texts of a column of the page's sortable table, top to bottom."""
  return browser.execute_script(
      'var column = arguments[0];'
      'return Array.from(document.querySelector("table.sortable").tBodies[0].rows)'
      '.map(function (r) { return r.cells[column].textContent; });', column)


def test_the_comparison_opens_in_a_browser(saved_runs, synthetic_folder, tmp_path,
                                           monkeypatch):
  """In a real browser: every image loaded, the per-category table sorted by B - A, and
  sorted the other way by a click on its header."""
  a, b, _ = saved_runs
  page_path = compare.compare_runs(_compare_config(synthetic_folder[0]), str(tmp_path),
                                   [a, b])
  monkeypatch.setenv('SE_OFFLINE', 'true')
  browser = helpers.chromium_driver()
  try:
    browser.get('file://' + page_path)
    assert browser.title == 'Comparison: val split, A vs B'
    loaded = browser.execute_script('return Array.from(document.images).map(function (i) {'
                                    ' return i.complete && i.naturalWidth > 0; });')
    assert len(loaded) == 8 and all(loaded)
    categories = browser.find_elements('css selector', 'table.sortable')[0]
    header = categories.find_elements('css selector', 'th')[4]
    assert header.text == 'B − A'
    changes = lambda: [float(text.split()[0]) for text in _sortable_cells(browser, 4)
                       if text != '–']
    assert changes() == sorted(changes(), reverse=True) and changes()[0] > 0
    header.click()  # largest first: as it was
    header.click()
    assert changes() == sorted(changes()) and changes()[0] < 0
  finally:
    browser.quit()


# --------------------------------------------- a trained run against a converted baseline


def test_the_config_to_evaluate_a_run_with_is_the_one_it_saved(tmp_path, caplog):
  """The model and data fields of the newest checkpoint's config, the comparison's eval
  section, its data folder when it names one (else the run's); a field this version lacks
  is left out, named in a warning."""
  from deepfashion_jax import checkpoints  # pylint: disable=g-import-not-at-top
  saved = helpers.tiny_config('/trained/on/this')
  saved.model.roi_pool, saved.data.crop, saved.data.crop_size = 'baseline_max', 'gt_box', 96
  saved.eval.split, saved.profile_steps = 'test', (1, 2)
  saved.unlock()
  saved.model.option_of_old = 3
  workdir = str(tmp_path / 'run')
  manager = checkpoints.create_manager(workdir)
  for step in (2, 4):
    saved.seed = step
    checkpoints.save(manager, step, {'weights': np.zeros(2, np.float32)}, config=saved)
  manager.wait_until_finished()
  here = helpers.tiny_config('')
  here.eval.report_examples = 5
  with caplog.at_level(logging.WARNING):
    config = compare.run_config(here, workdir)
  assert (config.model.roi_pool, config.data.crop, config.data.crop_size) == (
      'baseline_max', 'gt_box', 96)
  assert (config.seed, config.profile_steps, config.data.data_dir) == (4, (1, 2),
                                                                       '/trained/on/this')
  assert config.eval.to_dict() == here.eval.to_dict() and 'option_of_old' not in config.model
  assert 'model.option_of_old' in caplog.text and here.model.roi_pool == 'align'
  here.data.data_dir = '/compared/on/this'
  assert compare.run_config(here, workdir).data.data_dir == '/compared/on/this'



def _converted_baseline(folder: str, workdir: str, tmp_path) -> str:
  """--mode=convert's workdir of a baseline-format checkpoint ({'model', 'optim', 'epoch'},
  the baseline's ResNet-18 at 72 px), converted on `folder`."""
  torch = pytest.importorskip('torch')
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  from deepfashion_jax import convert_torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  reference = torch_reference.FashionResnet(18, feature_size=3)
  path = str(tmp_path / 'epoch_3.pth')
  torch.save({'model': reference.state_dict(), 'optim': {}, 'epoch': 3}, path)
  assert convert_torch.convert(helpers.tiny_config(folder), workdir, path) == 0
  return workdir


@pytest.mark.slow
def test_a_trained_run_against_a_converted_baseline(trained_workdir, synthetic_folder,
                                                    tmp_path):
  """--mode=compare of a trained run and a converted baseline checkpoint, neither evaluated
  before: each evaluated with its own saved config (the baseline's pooling and
  normalisation), then compared; the JSON's figures are the evaluations'. (The pieces
  without evaluating: test_a_comparison_of_saved_evaluations, test_the_config_to_evaluate_
  a_run_with_is_the_one_it_saved.)"""
  folder = synthetic_folder[0]
  baseline = _converted_baseline(folder, str(tmp_path / 'baseline'), tmp_path)
  trained = str(tmp_path / 'trained')
  shutil.copytree(trained_workdir, trained, ignore=shutil.ignore_patterns('eval_*', 'examples_*'))
  config = helpers.tiny_config(folder)
  config.eval.report, config.eval.report_examples = False, 4
  out = str(tmp_path / 'compared')
  page_path = compare.compare_runs(config, out, [trained, baseline])
  trained_step = max(int(name) for name in os.listdir(os.path.join(trained, 'checkpoints'))
                     if name.isdigit())
  with open(os.path.join(out, 'compare_val.json')) as f:
    written = json.load(f)
  _check_numbers_are_the_evaluations(written, [trained, baseline], [trained_step, 0])
  measured = [run['measured'] for run in written['runs']]
  assert measured[0]['crop_protocol'] == measured[1]['crop_protocol']
  index = annotations.read_deepfashion(folder)
  assert written['images_compared'] == len(index.split_indices('val'))
  [pair] = written['pairs']
  with open(page_path, encoding='utf-8') as f:
    galleries = _galleries(f.read())
  assert list(galleries.values()) == [
      min(4, pair['first_right_second_wrong']), min(4, pair['first_wrong_second_right'])]
  assert [heading.split(':')[0] for heading in galleries] == ['A right, B wrong',
                                                              'B right, A wrong']
