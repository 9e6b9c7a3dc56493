"""Losses against PyTorch's own (the baseline's) and hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepfashion_jax import losses
from deepfashion_jax.data import vocabulary


@pytest.fixture(name='torch')
def torch_module():
  """PyTorch, for the comparisons (skipped where no CPU build is installed)."""
  return pytest.importorskip('torch')


def _random(seed, batch=6, attributes=40):
  rng = np.random.default_rng(seed)
  return (rng.normal(0, 2, (batch, attributes)).astype(np.float32),
          rng.random((batch, attributes)) < 0.2)


@pytest.mark.parametrize('reduce_sum', [False, True])
@pytest.mark.parametrize('weighted', [False, True])
def test_bce_is_torchs(reduce_sum, weighted, torch):
  logits, positive = _random(0)
  pos_weight = np.linspace(0.5, 3.0, logits.shape[1]).astype(np.float32) if weighted else None
  got = losses.attribute_loss(jnp.asarray(logits), jnp.asarray(positive), 'bce', reduce_sum,
                              None if pos_weight is None else jnp.asarray(pos_weight))
  criterion = torch.nn.BCEWithLogitsLoss(
      reduction='none', pos_weight=None if pos_weight is None else torch.tensor(pos_weight))
  expected = criterion(torch.tensor(logits), torch.tensor(positive, dtype=torch.float32))
  expected = expected.sum(1) if reduce_sum else expected.mean(1)
  np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5)


def test_hinge():
  logits = jnp.array([[2.0, -0.5, 0.3]])
  positive = jnp.array([[True, False, False]])
  # relu(1 - 2) = 0, relu(1 - 0.5) = 0.5, relu(1 + 0.3) = 1.3
  np.testing.assert_allclose(losses.attribute_loss(logits, positive, 'hinge'), [1.8 / 3],
                             rtol=1e-6)
  np.testing.assert_allclose(losses.attribute_loss(logits, positive, 'hinge', True), [1.8],
                             rtol=1e-6)
  with pytest.raises(ValueError, match='attribute loss must be one of'):
    losses.attribute_loss(logits, positive, 'focal')


def test_pos_weight_is_negatives_over_positives_scaled_to_its_maximum():
  weights = losses.attribute_pos_weight(np.array([50, 10, 0]), num_images=100, scale=5.0)
  # ratios 1, 9, 99 (a never-positive attribute counts one positive), scaled to max 5
  np.testing.assert_allclose(weights, np.array([1, 9, 99]) * 5 / 99, rtol=1e-6)


def test_single_head_category_loss_is_torchs_cross_entropy(torch):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 50)).astype(np.float32)
  labels = rng.integers(0, 50, 5)
  got = losses.category_loss({'category_logits': jnp.asarray(logits)}, jnp.asarray(labels),
                             None)
  expected = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels),
                                               reduction='none')
  np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5)


def test_per_garment_type_loss_is_type_plus_within_type():
  types = np.array(vocabulary.CATEGORY_TYPES)
  rng = np.random.default_rng(2)
  type_logits = rng.normal(size=(1, 3)).astype(np.float32)
  within = np.full((1, 50), -np.inf, np.float32)
  upper = np.flatnonzero(types == 0)
  within[0, upper] = rng.normal(size=len(upper))
  label = int(upper[3])  # an upper-body category, so garment type 0
  log_softmax = lambda x: x - np.log(np.exp(x - x.max()).sum()) - x.max()
  expected = -(log_softmax(type_logits[0])[0] + log_softmax(within[0, upper])[3])
  got = losses.category_loss(
      {'garment_type_logits': jnp.asarray(type_logits),
       'category_logits_within_type': jnp.asarray(within), 'category_logits': None},
      jnp.array([label]), jnp.array([0]))
  np.testing.assert_allclose(got, [expected], rtol=1e-5)


def test_total_loss_averages_valid_examples_only():
  outputs = dict(attribute_logits=jnp.zeros((2, 4)), category_logits=jnp.zeros((2, 50)),
                 box=jnp.array([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]]))
  batch = dict(attribute_positive=jnp.zeros((2, 4), bool), category=jnp.array([0, 1]),
               category_type=jnp.array([0, 0]),
               bbox=jnp.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]),
               valid=jnp.array([True, False]), box_valid=jnp.array([True, True]))
  loss, parts = losses.total_loss(outputs, batch, beta=0.5)
  np.testing.assert_allclose(parts['attribute_loss'], np.log(2), rtol=1e-6)
  np.testing.assert_allclose(parts['category_loss'], np.log(50), rtol=1e-6)
  np.testing.assert_allclose(parts['box_loss'], 0.25, rtol=1e-6)  # the padded row ignored
  np.testing.assert_allclose(loss, np.log(2) + np.log(50) + 0.5 * 0.25, rtol=1e-6)


def _boxes_case(seed=3, batch=5):
  rng = np.random.default_rng(seed)
  outputs = dict(attribute_logits=rng.normal(size=(batch, 4)).astype(np.float32),
                 category_logits=rng.normal(size=(batch, 50)).astype(np.float32),
                 box=rng.uniform(size=(batch, 4)).astype(np.float32))
  inputs = dict(attribute_positive=rng.random((batch, 4)) < 0.5,
                category=rng.integers(0, 50, batch), category_type=np.zeros(batch, int),
                bbox=rng.uniform(size=(batch, 4)).astype(np.float32),
                valid=np.array([True] * (batch - 1) + [False]), box_valid=np.ones(batch, bool))
  return outputs, inputs


def test_box_loss_leaves_out_examples_without_a_box():
  outputs, batch = _boxes_case()
  box_valid = np.array([True, False, True, False, True])
  outputs['box'][1] = np.nan  # a masked-out example cannot leak in, not even as NaN
  loss, parts = losses.total_loss(outputs, dict(batch, box_valid=box_valid), beta=0.5)
  keep = box_valid & batch['valid']  # rows 0 and 2; row 4 is padding
  subset = lambda tree: jax.tree.map(lambda x: x[keep], tree)
  _, without = losses.total_loss(subset(outputs), subset(batch), beta=0.5)
  np.testing.assert_allclose(parts['box_loss'], without['box_loss'], rtol=1e-6)
  _, every_box = losses.total_loss(dict(outputs, box=np.zeros((5, 4), np.float32)), batch,
                                   beta=0.5)  # the other parts count every valid example
  for name in ('attribute_loss', 'category_loss'):
    np.testing.assert_allclose(parts[name], every_box[name], rtol=1e-6)
  np.testing.assert_allclose(loss, parts['attribute_loss'] + parts['category_loss']
                             + 0.5 * without['box_loss'], rtol=1e-6)


def test_a_batch_without_any_box_has_a_zero_box_loss():
  outputs, batch = _boxes_case()
  loss, parts = losses.total_loss(outputs, dict(batch, box_valid=np.zeros(5, bool)), beta=1.0)
  assert parts['box_loss'] == 0.0 and np.isfinite(loss)
