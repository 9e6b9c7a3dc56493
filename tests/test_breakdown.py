"""The breakdowns of --mode=evaluate against NumPy references written independently, on
hand-made cases: empty categories, ties, an attribute without positive, padding rows."""

import jax.numpy as jnp
import numpy as np
import pytest

from deepfashion_jax import breakdown
from deepfashion_jax import metrics

NAMES = ('Anorak', 'Blazer', 'Jeans', 'Dress')


def _reference_in_top_k(scores, label, k) -> bool:
  """The label among the k highest, equal scores taken lower index first."""
  ranked = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
  return label in ranked[:k]


def _reference_in_top_k_index(scores) -> int:
  """The index of the highest score, the lowest index on a tie."""
  return max(range(len(scores)), key=lambda j: (scores[j], -j))


def _reference_average_precision(scores, positive) -> float:
  """scikit-learn's definition: sum over thresholds t (the distinct scores, highest first)
  of (recall at t - recall at the threshold before) x precision at t, where everything
  scored >= t is predicted positive."""
  scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
  total, previous_recall = 0.0, 0.0
  for threshold in sorted(set(scores.tolist()), reverse=True):
    predicted = scores >= threshold
    recall = (predicted & positive).sum() / positive.sum()
    total += (recall - previous_recall) * (predicted & positive).sum() / predicted.sum()
    previous_recall = recall
  return total


# Four categories; 1 and 3 are never the true one. Row 4 is padding: it would count for
# category 0 (and be a hit) if it counted.
CATEGORY_LOGITS = np.array([[3., 1., 2., 0.],   # true 0: top1
                            [1., 1., 5., 0.],   # true 0: a tie with 1, lower index first: top3
                            [2., 2., 1., 3.],   # true 2: fourth, predicted 3: no top3
                            [0., 0., 9., 0.],   # true 2: top1
                            [9., 0., 0., 0.]])  # padding
CATEGORY = np.array([0, 0, 2, 2, 0])
VALID = np.array([True, True, True, True, False])


def test_category_hits_follow_the_top_k_with_ties_by_lower_index():
  for k in (1, 2, 3):
    expected = [_reference_in_top_k(s, c, k) for s, c in zip(CATEGORY_LOGITS, CATEGORY)]
    np.testing.assert_array_equal(breakdown.category_hits(CATEGORY_LOGITS, CATEGORY, k),
                                  expected)


def test_per_category_counts_valid_images_and_gives_null_to_empty_categories():
  rows = breakdown.per_category(CATEGORY_LOGITS, CATEGORY, VALID, NAMES)
  assert [r['name'] for r in rows] == list(NAMES)
  assert [r['images'] for r in rows] == [2, 0, 2, 0]
  assert rows[0] == dict(name='Anorak', images=2, top1=0.5, top3=1.0, top5=1.0)
  assert rows[2] == dict(name='Jeans', images=2, top1=0.5, top3=0.5, top5=1.0)
  for empty in (rows[1], rows[3]):
    assert empty['top1'] is None and empty['top3'] is None and empty['top5'] is None


def test_per_garment_type_pools_the_categories_of_each_type():
  rows = breakdown.per_garment_type(CATEGORY_LOGITS, CATEGORY, VALID,
                                    category_types=(0, 0, 1, 2), names=('up', 'low', 'full'))
  assert rows[0] == dict(name='up', images=2, top1=0.5, top3=1.0, top5=1.0)
  assert rows[1] == dict(name='low', images=2, top1=0.5, top3=0.5, top5=1.0)
  assert rows[2] == dict(name='full', images=0, top1=None, top3=None, top5=None)


def test_confusion_matrix_rows_are_true_categories_and_empty_rows_stay_zero():
  counts = breakdown.confusion_counts(CATEGORY_LOGITS, CATEGORY, VALID)
  expected = np.zeros((4, 4), int)
  for logits, true, valid in zip(CATEGORY_LOGITS, CATEGORY, VALID):
    if valid:
      expected[true, _reference_in_top_k_index(logits)] += 1
  np.testing.assert_array_equal(counts, expected)
  np.testing.assert_array_equal(counts, [[1, 0, 1, 0], [0] * 4, [0, 0, 1, 1], [0] * 4])
  np.testing.assert_allclose(breakdown.row_shares(counts),
                             [[.5, 0, .5, 0], [0] * 4, [0, 0, .5, .5], [0] * 4])


def test_most_confused_pairs_are_the_largest_off_diagonal_counts():
  counts = np.array([[5, 3, 0, 1],
                     [0, 0, 0, 0],
                     [2, 0, 7, 3],
                     [0, 4, 0, 9]])
  pairs = breakdown.most_confused_pairs(counts, NAMES, top=3)
  assert pairs == [dict(true='Dress', predicted='Blazer', count=4, share=4 / 13),
                   dict(true='Anorak', predicted='Blazer', count=3, share=3 / 9),
                   dict(true='Jeans', predicted='Dress', count=3, share=3 / 12)]
  assert len(breakdown.most_confused_pairs(counts, NAMES)) == 5  # every nonzero pair
  assert breakdown.most_confused_pairs(np.diag([1, 2, 3, 4]), NAMES) == []


@pytest.mark.parametrize('scores, positive, expected', [
    ([.9, .8, .7, .6], [1, 0, 1, 0], (1 + 2 / 3) / 2),
    ([.9, .8, .7, .6], [0, 0, 0, 1], 1 / 4),
    ([.5, .5, .1], [1, 0, 0], 0.5),  # a tie is one threshold: the positive's order in it
    ([.5, .5, .1], [0, 1, 0], 0.5),  # changes nothing
    ([.3, .3, .3, .3], [1, 0, 1, 0], 0.5),
    ([.2, .9, .9, .1, .9], [1, 1, 0, 0, 1], (2 / 3 * 2 + 3 / 4) / 3),
])
def test_average_precision_on_hand_made_rankings(scores, positive, expected):
  scores, positive = np.array(scores, np.float32)[:, None], np.array(positive, bool)[:, None]
  assert breakdown.average_precision(scores, positive)[0] == pytest.approx(expected)
  assert _reference_average_precision(scores[:, 0], positive[:, 0]) == pytest.approx(expected)


def test_average_precision_matches_the_reference_on_many_tied_columns():
  rng = np.random.default_rng(0)
  # 300 columns: more than one chunk of the sort; scores from 5 values: many ties.
  scores = rng.integers(0, 5, (40, 300)).astype(np.float32)
  positive = rng.random((40, 300)) < 0.2
  positive[:, 7] = False
  found = breakdown.average_precision(scores, positive)
  assert np.isnan(found[7])
  expected = [_reference_average_precision(scores[:, a], positive[:, a])
              if positive[:, a].any() else np.nan for a in range(300)]
  np.testing.assert_allclose(found, expected, rtol=1e-6)


# Eight attributes of two types (0: columns 0-3, 1: columns 4-7); attributes 1 and 7 have
# no positive. Row 3 is padding: it would change every figure if it counted.
ATTRIBUTE_TYPES = np.array([0, 0, 0, 0, 1, 1, 1, 1])
ATTRIBUTE_LOGITS = np.array([[5., 4., 3., 1., 1., 1., 0., 2.],
                             [1., 2., 2., 2., 3., 2., 9., 0.],
                             [0., 0., 0., 0., 1., 0., 0., 0.],
                             [0., 9., 0., 0., 0., 0., 0., 9.]], np.float32)
ATTRIBUTE_POSITIVE = np.array([[1, 0, 1, 1, 0, 1, 0, 0],
                               [1, 0, 0, 1, 1, 0, 1, 0],
                               [0, 0, 1, 1, 1, 1, 0, 0],
                               [1, 1, 1, 1, 1, 1, 1, 1]], bool)
ATTRIBUTE_VALID = np.array([True, True, True, False])


def _reference_recall_within_type(scores, positive, valid, types, k) -> list:
  """Per attribute: its positives found among the k highest of its type (lower index first
  on ties), over its positives; None without positives."""
  found, positives = np.zeros(len(types)), np.zeros(len(types))
  for s, p, v in zip(scores, positive, valid):
    if not v:
      continue
    for t in set(types.tolist()):
      columns = [a for a in range(len(types)) if types[a] == t]
      top = sorted(columns, key=lambda a: (-s[a], a))[:k]
      for a in columns:
        positives[a] += p[a]
        found[a] += p[a] and a in top
  return [f / n if n else None for f, n in zip(found, positives)]


def test_per_attribute_recall_and_average_precision():
  rows = breakdown.per_attribute(ATTRIBUTE_LOGITS, ATTRIBUTE_POSITIVE, ATTRIBUTE_VALID,
                                 ATTRIBUTE_TYPES, [f'a{i}' for i in range(8)],
                                 type_names=('t0', 't1'))
  assert [r['name'] for r in rows] == [f'a{i}' for i in range(8)]
  assert [r['type'] for r in rows] == ['t0'] * 4 + ['t1'] * 4
  assert [r['positives'] for r in rows] == [2, 0, 2, 3, 2, 2, 1, 0]
  hits = breakdown.attribute_hits_within_type(ATTRIBUTE_LOGITS[:3], ATTRIBUTE_TYPES, ks=(1,))
  np.testing.assert_array_equal(hits[1], [[1, 0, 0, 0, 0, 0, 0, 1],
                                          [0, 1, 0, 0, 0, 0, 1, 0],   # 1, 2, 3 tie: 1
                                          [1, 0, 0, 0, 1, 0, 0, 0]])  # 0..3 tie: 0
  for k in (3, 5):
    expected = _reference_recall_within_type(ATTRIBUTE_LOGITS, ATTRIBUTE_POSITIVE,
                                             ATTRIBUTE_VALID, ATTRIBUTE_TYPES, k)
    assert [r[f'recall_top{k}'] for r in rows] == pytest.approx(expected)
  # Attribute 3 is missed in row 0 (fourth) and row 2 (last of a four-way tie).
  assert [r['recall_top3'] for r in rows] == pytest.approx(
      [1 / 2, None, 1, 1 / 3, 1, 1, 1, None])
  assert [r['recall_top5'] for r in rows] == [1, None, 1, 1, 1, 1, 1, None]
  for a in range(8):
    expected = (_reference_average_precision(ATTRIBUTE_LOGITS[:3, a],
                                             ATTRIBUTE_POSITIVE[:3, a])
                if rows[a]['positives'] else None)
    assert rows[a]['average_precision'] == pytest.approx(expected)
  assert rows[2]['average_precision'] == pytest.approx((1 + 2 / 3) / 2)
  assert rows[3]['average_precision'] == 1.0  # every valid image is a positive
  assert rows[4]['average_precision'] == pytest.approx((1 + 2 / 3) / 2)  # a tie at 1
  assert rows[5]['average_precision'] == pytest.approx((1 / 2 + 2 / 3) / 2)
  mean = breakdown.mean_average_precision(rows)
  assert mean == pytest.approx(np.mean([rows[a]['average_precision']
                                        for a in (0, 2, 3, 4, 5, 6)]))
  assert np.isnan(breakdown.mean_average_precision([dict(positives=0, average_precision=None)]))


def test_breakdown_adds_up_to_the_clu_metrics_with_ties_and_padding():
  """Per-category and per-attribute counts, pooled, give metrics.py's figures."""
  rng = np.random.default_rng(1)
  n, types = 24, np.repeat(np.arange(5), 4)
  examples = dict(category_logits=rng.integers(0, 4, (n, 50)).astype(np.float32),
                  attribute_logits=rng.integers(0, 3, (n, 20)).astype(np.float32),
                  category=rng.integers(0, 50, n), attribute_positive=rng.random((n, 20)) < .3,
                  valid=np.arange(n) < n - 5)
  names = metrics.metric_names()
  losses = {name: jnp.float32(0) for name in metrics.LOSS_NAMES}
  outputs = dict(category_logits=examples['category_logits'],
                 attribute_logits=examples['attribute_logits'], box=np.zeros((n, 4)))
  batch = dict(examples, bbox=np.zeros((n, 4)), box_valid=np.ones(n, bool))
  values = metrics.metric_values(outputs, batch, losses, jnp.asarray(types))
  clu = {k: float(v) for k, v in metrics.collection_class(names).single_from_model_output(
      **values).compute().items()}
  details = breakdown.breakdown(examples, [f'c{i}' for i in range(50)],
                                [f'a{i}' for i in range(20)], types)
  images = np.array([c['images'] for c in details['per_category']])
  assert images.sum() == n - 5
  for k in (1, 3, 5):
    pooled = sum(c['images'] * c[f'top{k}'] for c in details['per_category'] if c['images'])
    assert pooled / images.sum() == pytest.approx(clu[f'category_top{k}'])
  assert np.trace(np.array(details['confusion_matrix'])) / (n - 5) == pytest.approx(
      clu['category_top1'])
  for k in (3, 5):
    for t, type_name in enumerate(('texture', 'fabric', 'shape', 'part', 'style')):
      rows = [a for a in details['per_attribute'] if a['type'] == type_name and a['positives']]
      found = sum(a[f'recall_top{k}'] * a['positives'] for a in rows)
      assert found / sum(a['positives'] for a in rows) == pytest.approx(
          clu[f'attr_recall_top{k}_{type_name}'])
