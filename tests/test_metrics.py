"""Metrics against an independent NumPy implementation and hand-made cases."""

import jax
import jax.numpy as jnp
import numpy as np

from deepfashion_jax import metrics

TYPE_NAMES = ('a', 'b')


def _compute(outputs, batch, attribute_types, names=TYPE_NAMES, batches=1):
  """Runs the metrics over `batches` equal slices of the batch, merged."""
  losses = {name: jnp.float32(0.0) for name in metrics.LOSS_NAMES}
  collection = metrics.collection_class(metrics.metric_names(names))
  total = None
  size = len(batch['valid']) // batches
  for i in range(batches):
    part = lambda tree: jax.tree.map(lambda x: x[i * size:(i + 1) * size], tree)
    values = metrics.metric_values(part(outputs), part(batch), losses,
                                   jnp.asarray(attribute_types), names)
    m = collection.single_from_model_output(**values)
    total = m if total is None else total.merge(m)
  return {k: float(v) for k, v in total.compute().items()}


def _numpy_recall(scores, positive, valid, k, of_type=None):
  """Published protocol: hits in the top k, summed over images, over positives summed."""
  hits = positives = 0
  for s, p, v in zip(scores, positive, valid):
    if not v:
      continue
    columns = np.arange(len(s)) if of_type is None else np.flatnonzero(of_type)
    top = columns[np.argsort(-s[columns], kind='stable')[:k]]
    hits += p[top].sum()
    positives += p[columns].sum()
  return hits / positives


def _numpy_baseline_recall(scores, positive, valid, k, of_type):
  ratios = []
  columns = np.flatnonzero(of_type)
  for s, p, v in zip(scores, positive, valid):
    n = p[columns].sum()
    if v and n:
      top = columns[np.argsort(-s[columns], kind='stable')[:k]]
      ratios.append(p[top].sum() / min(k, n))
  return np.mean(ratios)


def _case(seed=0, batch=12, attributes=30):
  rng = np.random.default_rng(seed)
  types = np.array([0] * 12 + [1] * 18)
  outputs = dict(category_logits=rng.normal(size=(batch, 50)).astype(np.float32),
                 attribute_logits=rng.normal(size=(batch, attributes)).astype(np.float32),
                 box=rng.uniform(0, 1, (batch, 4)).astype(np.float32))
  batch_ = dict(category=rng.integers(0, 50, batch), valid=np.arange(batch) < batch - 2,
                box_valid=np.ones(batch, bool),
                attribute_positive=rng.random((batch, attributes)) < 0.2,
                bbox=rng.uniform(0, 1, (batch, 4)).astype(np.float32))
  return outputs, batch_, types


def test_category_top_k_by_hand():
  logits = np.zeros((3, 50), np.float32)
  logits[:, :6] = [6, 5, 4, 3, 2, 1]  # category 0 ranks first, 2 third, 4 fifth
  outputs = dict(category_logits=logits, attribute_logits=np.zeros((3, 30), np.float32),
                 box=np.zeros((3, 4), np.float32))
  batch = dict(category=np.array([0, 2, 4]), valid=np.ones(3, bool), box_valid=np.ones(3, bool),
               attribute_positive=np.zeros((3, 30), bool), bbox=np.zeros((3, 4), np.float32))
  result = _compute(outputs, batch, np.zeros(30, int))
  np.testing.assert_allclose([result['category_top1'], result['category_top3'],
                              result['category_top5']], [1 / 3, 2 / 3, 1.0], rtol=1e-6)


def test_attribute_recall_by_hand():
  """Two types; the top 3 over all attributes differ from the top 3 within a type."""
  scores = np.array([[9, 8, 7, 6, 1, 2, 3, 0.5]], np.float32)
  types = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  positive = np.array([[False, False, False, True, True, False, False, True]])
  outputs = dict(category_logits=np.zeros((1, 50), np.float32), attribute_logits=scores,
                 box=np.zeros((1, 4), np.float32))
  batch = dict(category=np.array([0]), valid=np.array([True]), box_valid=np.array([True]),
               attribute_positive=positive,
               bbox=np.zeros((1, 4), np.float32))
  result = _compute(outputs, batch, types)
  assert result['attr_recall_top3'] == 0.0  # top 3 overall: 0, 1, 2; none positive
  assert result['attr_recall_top3_a'] == 0.0  # type a's top 3: 0, 1, 2
  assert result['attr_recall_top3_b'] == 0.5  # type b's top 3: 6, 5, 4: finds 4 of {4, 7}
  assert result['attr_recall_top5_a'] == 1.0  # all four of type a: finds 3
  assert result['baseline_attr_recall_top3_b'] == 0.5  # 1 / min(3, 2)
  assert result['baseline_attr_recall_top3_a'] == 0.0


def test_metrics_match_numpy_and_merge_across_batches():
  outputs, batch, types = _case()
  one = _compute(outputs, batch, types)
  merged = _compute(outputs, batch, types, batches=3)
  for name, value in one.items():
    np.testing.assert_allclose(merged[name], value, rtol=1e-5, err_msg=name)
  scores, positive, valid = outputs['attribute_logits'], batch['attribute_positive'], batch['valid']
  for k in (3, 5):
    np.testing.assert_allclose(one[f'attr_recall_top{k}'],
                               _numpy_recall(scores, positive, valid, k), rtol=1e-5)
    for t, name in enumerate(TYPE_NAMES):
      np.testing.assert_allclose(one[f'attr_recall_top{k}_{name}'],
                                 _numpy_recall(scores, positive, valid, k, types == t),
                                 rtol=1e-5)
      np.testing.assert_allclose(one[f'baseline_attr_recall_top{k}_{name}'],
                                 _numpy_baseline_recall(scores, positive, valid, k, types == t),
                                 rtol=1e-5)
  rank = (outputs['category_logits'] > np.take_along_axis(
      outputs['category_logits'], batch['category'][:, None], 1)).sum(1)
  for k in (1, 3, 5):
    np.testing.assert_allclose(one[f'category_top{k}'], (rank[valid] < k).mean(), rtol=1e-5)


def test_box_iou_and_l1_by_hand():
  predicted = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0.5, 1], [0, 0, 1, 1]], np.float32)
  target = np.array([[0, 0, 1, 1], [1, 1, 2, 2], [0, 0, 1, 1], [5, 5, 6, 6]], np.float32)
  np.testing.assert_allclose(metrics.box_iou(jnp.asarray(predicted), jnp.asarray(target)),
                             [1.0, 0.0, 0.5, 0.0], atol=1e-6)
  outputs = dict(category_logits=np.zeros((4, 50), np.float32),
                 attribute_logits=np.zeros((4, 30), np.float32), box=predicted)
  batch = dict(category=np.zeros(4, int), valid=np.array([True, True, True, False]),
               box_valid=np.ones(4, bool),
               attribute_positive=np.ones((4, 30), bool), bbox=target)
  result = _compute(outputs, batch, np.zeros(30, int))
  np.testing.assert_allclose(result['bbox_iou'], 0.5, rtol=1e-6)  # the padded row ignored
  np.testing.assert_allclose(result['bbox_l1'], (0 + 1 + 0.125) / 3, rtol=1e-6)


def test_box_metrics_leave_out_examples_without_a_box():
  """bbox_iou and bbox_l1 equal those of the batch without its box-less examples; the
  other metrics still count them. Merged over 3 batches, as an evaluation does."""
  outputs, batch, types = _case(seed=4)
  rng = np.random.default_rng(4)
  for tree, key in ((outputs, 'box'), (batch, 'bbox')):  # ordered boxes that overlap
    corner = rng.uniform(0, 0.5, (12, 2))
    tree[key] = np.concatenate([corner, corner + rng.uniform(0.3, 0.5, (12, 2))], 1)
  box_valid = np.arange(12) % 3 != 0
  masked = _compute(outputs, dict(batch, box_valid=box_valid), types, batches=3)
  subset = lambda tree: {k: v[box_valid] for k, v in tree.items()}
  without = _compute(subset(outputs), subset(batch), types)
  everything = _compute(outputs, batch, types, batches=3)
  for name in ('bbox_iou', 'bbox_l1'):
    np.testing.assert_allclose(masked[name], without[name], rtol=1e-6, err_msg=name)
    assert not np.isclose(masked[name], everything[name]), name
  for name in ('category_top1', 'category_top5', 'attr_recall_top3', 'attr_recall_top5_b'):
    np.testing.assert_allclose(masked[name], everything[name], rtol=1e-6, err_msg=name)


def test_box_loss_is_weighted_by_the_examples_with_a_box():
  """Merged over batches, box_loss is the mean over the examples with a box: a batch
  where none has one (box_loss 0) weighs nothing."""
  outputs, batch, types = _case(seed=5, batch=4)
  collection = metrics.collection_class(metrics.metric_names(TYPE_NAMES))
  merged = None
  for box_loss, box_valid in ((0.0, [False] * 4), (2.0, [True, False, True, True])):
    losses = {name: jnp.float32(1.0) for name in metrics.LOSS_NAMES}
    losses['box_loss'] = jnp.float32(box_loss)
    values = metrics.metric_values(outputs, dict(batch, box_valid=np.array(box_valid)), losses,
                                   jnp.asarray(types), TYPE_NAMES)
    m = collection.single_from_model_output(**values)
    merged = m if merged is None else merged.merge(m)
  result = merged.compute()
  assert float(result['box_loss']) == 2.0 and float(result['category_loss']) == 1.0
