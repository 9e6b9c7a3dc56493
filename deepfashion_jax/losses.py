"""The losses, in float32 whatever the activation dtype: the baseline's (docs/baseline.md,
Training) and Liu & Lu 2018's.

total = attribute_weight * attribute loss + category_weight * category loss
        + beta * box loss + landmark_weight * landmark loss,
each averaged over the valid examples of the batch (evaluation batches carry padding); the
box loss only over those that also have a box (`box_mask`: a list's box may be empty or
outside its image). The baseline's weights are 1, 1, beta and no landmarks; Liu & Lu's
20, 1, no box and 100. A model without a box branch (heads='liu_lu') has no box loss, one
without landmarks no landmark loss: those parts are 0.
"""

import typing
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

# The choices of total_loss's options: config_checks reads them from its annotations.
AttributeLoss = Literal['bce', 'hinge', 'two_way']
LandmarkHeatmap = Literal['gaussian', 'liu_lu']
ATTRIBUTE_LOSSES = typing.get_args(AttributeLoss)
LANDMARK_HEATMAPS = typing.get_args(LandmarkHeatmap)


def attribute_pos_weight(positive_counts: np.ndarray, num_images: int,
                         scale: float) -> np.ndarray:
  """The baseline's per-attribute pos_weight: negatives / positives, scaled so that its
  maximum equals `scale` (attributes never positive get the maximum)."""
  positives = np.maximum(positive_counts.astype(np.float64), 1.0)
  ratio = (num_images - positives) / positives
  return (ratio * scale / ratio.max()).astype(np.float32)


def attribute_loss(logits, positive, kind: str = 'bce', reduce_sum: bool = False,
                   pos_weight=None):
  """(B,) per-example attribute loss; the file's unknowns count as not positive.

  'bce': binary cross-entropy with logits, positives weighted by `pos_weight` (A,);
  'hinge': relu(1 - t * s) with t = +1 / -1. Per example: the mean over attributes, or
  with `reduce_sum` the sum (the baseline's `--reduce_sum`).
  """
  logits = logits.astype(jnp.float32)
  target = positive.astype(jnp.float32)
  if kind == 'bce':
    weight = 1.0 if pos_weight is None else pos_weight
    per_attribute = -(weight * target * jax.nn.log_sigmoid(logits)
                      + (1 - target) * jax.nn.log_sigmoid(-logits))
  elif kind == 'hinge':
    per_attribute = jax.nn.relu(1 - (2 * target - 1) * logits)
  else:
    raise ValueError(f'attribute loss must be one of {ATTRIBUTE_LOSSES}, got {kind!r}')
  return per_attribute.sum(axis=-1) if reduce_sum else per_attribute.mean(axis=-1)


def two_way_attribute_loss(two_way_logits, positive, valid, negative_weight: float):
  """Liu & Lu's attribute loss: a two-way cross-entropy (negative, positive) per attribute,
  each term weighted by its target class's weight (negatives `negative_weight`, positives
  1) and their sum divided by the sum of the weights, over every attribute of every valid
  example: PyTorch's CrossEntropyLoss(weight=...) with its 'mean' reduction on the batch.

  two_way_logits (B, 2, A); positive (B, A) bool; valid (B,) bool. Returns a scalar.
  """
  log_p = jax.nn.log_softmax(two_way_logits.astype(jnp.float32), axis=1)
  nll = -jnp.where(positive, log_p[:, 1], log_p[:, 0])
  weight = jnp.where(positive, 1.0, negative_weight) * valid[:, None]
  return jnp.sum(weight * nll) / jnp.maximum(jnp.sum(weight), 1e-12)


def landmark_heatmaps(landmarks, visible, height: int, width: int, radius: float,
                      shape: str = 'gaussian'):
  """(B, H, W, S) target heatmaps: for each visible landmark a peak of 1 at its point,
  falling with the distance d (in pixels of the H x W input) as exp(-d^2 / (2 r^2))
  ('gaussian') or as Liu & Lu's exp(-d / (2 r)) ('liu_lu', r = 16 at 224 px); 0 for
  landmarks not visible.

  landmarks (B, S, 2) (x, y) in [0, 1] coordinates; pixel (row i, column j) sits at
  ((j + 0.5) / W, (i + 0.5) / H), the batches' convention (`transforms.crop_landmarks`).
  """
  cols = jnp.arange(width, dtype=jnp.float32) + 0.5
  rows = jnp.arange(height, dtype=jnp.float32) + 0.5
  dx = cols[None, None, :, None] - landmarks[:, None, None, :, 0] * width  # (B, 1, W, S)
  dy = rows[None, :, None, None] - landmarks[:, None, None, :, 1] * height  # (B, H, 1, S)
  squared = dx * dx + dy * dy
  if shape == 'gaussian':
    peaks = jnp.exp(-squared / (2.0 * radius * radius))
  elif shape == 'liu_lu':
    peaks = jnp.exp(-jnp.sqrt(squared) / (2.0 * radius))
  else:
    raise ValueError(f'landmark heatmap must be one of {LANDMARK_HEATMAPS}, got {shape!r}')
  return jnp.where(visible[:, None, None, :], peaks, 0.0)


def landmark_loss(heatmaps, landmarks, visible, radius: float, shape: str = 'gaussian'):
  """(B,) per-example landmark loss: the squared difference between the predicted and the
  target heatmaps (`landmark_heatmaps`) over the visible landmarks' maps, averaged over
  every pixel of every slot (the others count as 0), as Liu & Lu's masked MSE does."""
  heatmaps = heatmaps.astype(jnp.float32)
  target = landmark_heatmaps(landmarks, visible, heatmaps.shape[1], heatmaps.shape[2],
                             radius, shape)
  squared = jnp.where(visible[:, None, None, :], (heatmaps - target) ** 2, 0.0)
  return squared.mean(axis=(1, 2, 3))


def category_loss(outputs: dict, category, category_type):
  """(B,) softmax cross-entropy of the 0-based category.

  With the per-garment-type head: cross-entropy of the garment type plus that of the
  category among its type's categories (the other types' classifiers get no gradient).
  """
  if 'garment_type_logits' not in outputs:
    log_p = jax.nn.log_softmax(outputs['category_logits'].astype(jnp.float32))
    return -jnp.take_along_axis(log_p, category[:, None], axis=-1)[:, 0]
  log_type = jax.nn.log_softmax(outputs['garment_type_logits'].astype(jnp.float32))
  within = outputs['category_logits_within_type'].astype(jnp.float32)
  # Other types' columns are -inf: a log-softmax over all 50 is one over the type's own.
  log_within = jax.nn.log_softmax(within)
  return -(jnp.take_along_axis(log_type, category_type[:, None], axis=-1)[:, 0]
           + jnp.take_along_axis(log_within, category[:, None], axis=-1)[:, 0])


def box_loss(predicted, target):
  """(B,) mean absolute error over the four coordinates."""
  return jnp.abs(predicted.astype(jnp.float32) - target.astype(jnp.float32)).mean(axis=-1)


def box_mask(batch: dict):
  """(B,) bool: the examples whose box counts, `valid & box_valid` (pipeline.py)."""
  return batch['valid'] & batch['box_valid']


def _masked_mean(values, mask):
  """The mean of values where mask; 0 when nothing is. Masked-out values cannot leak in,
  not even as NaN."""
  total = jnp.where(mask, values, 0.0).sum()
  return total / jnp.maximum(mask.astype(jnp.float32).sum(), 1.0)


def total_loss(outputs: dict, batch: dict, *, pos_weight=None,
               attribute: AttributeLoss = 'bce', reduce_sum: bool = False,
               pos_weights_scale: float = 0.0, beta: float, category_weight: float = 1.0,
               attribute_weight: float = 1.0, two_way_negative_weight: float = 0.1,
               landmark_weight: float = 0.0, landmark_heatmap: LandmarkHeatmap = 'gaussian',
               landmark_radius: float = 16.0):
  """The weighted sum of the parts (see the module's docstring), and the parts, unweighted:
  each the mean over the valid examples, the box loss over those with a box (`box_mask`;
  0 when none has), Liu & Lu's two-way attribute loss their weighted mean.

  The keyword arguments after pos_weight are config.loss's fields, one for one. pos_weight
  (A,) weighs the BCE's positives when pos_weights_scale > 0: the caller computes it from
  the training split (`attribute_pos_weight`, its largest pos_weights_scale), which the
  loss does not see.
  """
  if not pos_weights_scale:
    pos_weight = None
  valid = batch['valid']
  if attribute == 'two_way':
    if 'attribute_two_way_logits' not in outputs:
      raise ValueError("attribute loss 'two_way' needs a model with two logits per "
                       "attribute (config.model.heads='liu_lu')")
    attribute_mean = two_way_attribute_loss(outputs['attribute_two_way_logits'],
                                            batch['attribute_positive'], valid,
                                            two_way_negative_weight)
  else:
    attribute_mean = _masked_mean(
        attribute_loss(outputs['attribute_logits'], batch['attribute_positive'],
                       attribute, reduce_sum, pos_weight), valid)
  categories = category_loss(outputs, batch['category'], batch['category_type'])
  means = dict(attribute_loss=attribute_mean, category_loss=_masked_mean(categories, valid))
  loss = attribute_weight * attribute_mean + category_weight * means['category_loss']
  if 'box' in outputs:
    means['box_loss'] = _masked_mean(box_loss(outputs['box'], batch['bbox']), box_mask(batch))
    loss += beta * means['box_loss']
  if 'landmark_heatmaps' in outputs:
    per_example = landmark_loss(outputs['landmark_heatmaps'], batch['landmarks'],
                                batch['landmark_visible'], landmark_radius, landmark_heatmap)
    means['landmark_loss'] = _masked_mean(per_example, valid)
    loss += landmark_weight * means['landmark_loss']
  return loss, means
