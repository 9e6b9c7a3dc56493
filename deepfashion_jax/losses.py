"""The baseline's losses, in float32 whatever the activation dtype (BASELINE.md, Training).

total = attribute loss + category loss + beta * box loss, each averaged over the valid
examples of the batch (evaluation batches carry padding); the box loss only over those
that also have a box (`box_mask`: a list's box may be empty or outside its image).
"""

import jax
import jax.numpy as jnp
import numpy as np

ATTRIBUTE_LOSSES = ('bce', 'hinge')


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


def total_loss(outputs: dict, batch: dict, *, beta: float, attribute_kind: str = 'bce',
               reduce_sum: bool = False, pos_weight=None):
  """attribute + category + beta * box loss, and its parts: each part the mean over the
  valid examples, the box loss over those with a box (`box_mask`; 0 when none has)."""
  attributes = attribute_loss(outputs['attribute_logits'], batch['attribute_positive'],
                              attribute_kind, reduce_sum, pos_weight)
  categories = category_loss(outputs, batch['category'], batch['category_type'])
  boxes = box_loss(outputs['box'], batch['bbox'])
  means = dict(attribute_loss=_masked_mean(attributes, batch['valid']),
               category_loss=_masked_mean(categories, batch['valid']),
               box_loss=_masked_mean(boxes, box_mask(batch)))
  loss = means['attribute_loss'] + means['category_loss'] + beta * means['box_loss']
  return loss, means
