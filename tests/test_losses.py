"""Losses against PyTorch's own (the baseline's) and hand computations."""

import jax.numpy as jnp
import numpy as np
import pytest

from deepfashion_jax import losses
from deepfashion_jax.data import vocabulary

torch = pytest.importorskip('torch')


def _random(seed, batch=6, attributes=40):
  rng = np.random.default_rng(seed)
  return (rng.normal(0, 2, (batch, attributes)).astype(np.float32),
          rng.random((batch, attributes)) < 0.2)


@pytest.mark.parametrize('reduce_sum', [False, True])
@pytest.mark.parametrize('weighted', [False, True])
def test_bce_is_torchs(reduce_sum, weighted):
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


def test_single_head_category_loss_is_torchs_cross_entropy():
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
               valid=jnp.array([True, False]))
  loss, parts = losses.total_loss(outputs, batch, beta=0.5)
  np.testing.assert_allclose(parts['attribute_loss'], np.log(2), rtol=1e-6)
  np.testing.assert_allclose(parts['category_loss'], np.log(50), rtol=1e-6)
  np.testing.assert_allclose(parts['box_loss'], 0.25, rtol=1e-6)  # the padded row ignored
  np.testing.assert_allclose(loss, np.log(2) + np.log(50) + 0.5 * 0.25, rtol=1e-6)
