"""report.py's pure parts: the selections, the grouping, the tables and the drawing. The
page of a real evaluation, opened in a browser: tests/test_evaluate.py."""

import numpy as np
from PIL import Image

from deepfashion_jax import report


def _logits(rows: list) -> np.ndarray:
  """Each row: (predicted class, its logit) among 4 classes, the others 0."""
  logits = np.zeros((len(rows), 4), np.float32)
  for i, (predicted, value) in enumerate(rows):
    logits[i, predicted] = value
  return logits


def test_the_worst_are_the_most_confidently_wrong_valid_ones():
  logits = _logits([(1, 5.0), (2, 1.0), (0, 9.0), (3, 7.0), (1, 3.0), (2, 8.0)])
  category = np.array([0, 0, 0, 0, 0, 2])
  valid = np.array([True, True, True, False, True, True])
  # Wrong: rows 0 (p of 5.0), 1 (1.0), 4 (3.0); row 3 is wrong but not valid.
  assert report.confidently_wrong(logits, category, valid, 2).tolist() == [0, 4]
  assert report.confidently_wrong(logits, category, valid, 10).tolist() == [0, 4, 1]
  assert report.confidently_right(logits, category, valid, 10).tolist() == [2, 5]
  assert report.confidently_wrong(logits, category, valid, 0).tolist() == []


def test_equal_confidences_keep_the_row_order():
  logits = _logits([(1, 2.0), (1, 2.0), (1, 2.0)])
  assert report.confidently_wrong(logits, np.zeros(3, int), np.ones(3, bool),
                                  3).tolist() == [0, 1, 2]


def test_most_confused_with_leaves_out_the_diagonal_and_what_never_happened():
  counts = np.array([[5, 2, 0], [1, 0, 1], [0, 0, 9]])
  assert report.most_confused_with(counts, ['a', 'b', 'c']) == [
      [('b', 2)], [('a', 1), ('c', 1)], []]


def _attribute(name, kind, ap):
  return dict(name=name, type=kind, positives=0 if ap is None else 1, recall_top3=None,
              recall_top5=None, average_precision=ap)


def test_best_and_worst_attributes_by_average_precision_do_not_overlap():
  attributes = [_attribute(f'a{i}', 'texture', ap) for i, ap in
                enumerate([0.5, 0.9, None, 0.1, 0.7, 0.3])] + [_attribute('s', 'shape', 1.0)]
  best, worst = report.attribute_extremes(attributes, 'texture', n=2)
  assert [a['name'] for a in best] == ['a1', 'a4']
  assert [a['name'] for a in worst] == ['a3', 'a5']
  best, worst = report.attribute_extremes(attributes, 'texture', n=4)
  assert [a['name'] for a in best] == ['a1', 'a4', 'a0', 'a5'] and [
      a['name'] for a in worst] == ['a3']


def test_metrics_are_grouped_and_the_baseline_formulas_apart():
  results = dict(loss=1.0, category_top1=0.5, attr_recall_top3=0.2,
                 attr_recall_top3_texture=0.3, baseline_attr_recall_top3_texture=0.4,
                 bbox_iou=0.6, landmark_error=0.1, landmark_loss=2.0, category_loss=3.0,
                 mean_attribute_average_precision=0.2, skipped_images_eval=0)
  groups = dict(report.metric_groups(results))
  assert list(groups) == ['category', 'attributes, over all 1,000 (published protocol)',
                          'attributes per type (top k within the type)',
                          'attributes, ranking', 'box', 'landmarks', "the baseline's formulas",
                          'losses', 'other']
  assert [name for name, _ in groups['losses']] == ['loss', 'landmark_loss', 'category_loss']
  assert groups["the baseline's formulas"] == [('baseline_attr_recall_top3_texture', 0.4)]


def test_published_figures_only_beside_a_run_measured_that_way():
  published_way = dict(partition='official', split='test', crop='gt_box')
  assert report.comparable_published(published_way) is report.PUBLISHED
  for change in (dict(split='val'), dict(crop='none'), dict(partition='baseline')):
    assert report.comparable_published({**published_way, **change}) == {}


def test_a_table_sorts_figures_by_value_and_shows_missing_ones_as_a_dash():
  html = report.table(['name', 'top-1'], [['<b>x</b>', report.Figure(0.25)],
                                          ['y', report.Figure(None)]])
  assert 'class="sortable"' in html and '<th data-numeric="1">top-1</th>' in html
  assert '<td class="n" data-value="0.25">25.0%</td>' in html
  assert '<td class="n" data-value="">–</td>' in html


def test_boxes_are_drawn_where_the_crop_puts_them():
  """A 200 x 100 image, the crop its right half: the box (0.5, 0.5, 1, 1) of the crop is
  its lower right quarter, at half the scale in a 100-pixel thumbnail."""
  image = np.full((100, 200, 3), 255, np.uint8)
  picture = np.asarray(report.draw_example(image, [100, 0, 200, 100],
                                           true_box=[0.5, 0.5, 1, 1], side=100))
  assert picture.shape == (50, 100, 3)
  assert tuple(picture[40, 75]) == report.TRUE_COLOUR  # the box's left edge: x = 150 / 2
  assert tuple(picture[10, 75]) == (255, 255, 255)  # above the box
  assert tuple(picture[10, 50]) == report.CROP_COLOUR  # the crop's left edge: x = 100 / 2
  assert tuple(picture[10, 20]) == (255, 255, 255)  # left of the crop: nothing drawn


def test_an_unreadable_file_is_a_placeholder_not_a_broken_image(tmp_path):
  (tmp_path / 'img').mkdir()
  Image.new('RGB', (40, 30), 'white').save(tmp_path / 'img' / 'a.jpg')
  shown = report.thumbnail(str(tmp_path), 'img/a.jpg', 300, [0, 0, 40, 30],
                           predicted_box=[0.1, 0.1, 0.5, 0.5])
  assert shown.startswith('<img src="data:image/jpeg;base64,')
  missing = report.thumbnail(str(tmp_path), 'img/gone.jpg', 300, [0, 0, 40, 30])
  assert 'class="missing"' in missing and '<img' not in missing


def test_visible_true_landmarks_and_every_predicted_one_are_dots_where_the_crop_puts_them():
  image = np.full((100, 200, 3), 255, np.uint8)
  true = np.array([[0.5, 0.5], [0.2, 0.2]])
  picture = np.asarray(report.draw_example(
      image, [100, 0, 200, 100], true_landmarks=true, landmark_visible=[True, False],
      predicted_landmarks=np.array([[0.9, 0.1]]), side=100))
  assert tuple(picture[25, 75]) == report.TRUE_COLOUR  # (150, 50) in the image
  assert tuple(picture[10, 60]) == (255, 255, 255)  # the hidden one: (120, 20), not drawn
  assert tuple(picture[5, 95]) == report.PREDICTED_COLOUR  # (190, 10)
