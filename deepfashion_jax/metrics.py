"""Evaluation metrics: the published protocol and the baseline's formulas (docs/protocols.md).

Every metric is an average accumulated with clu (`metrics.Average`: a total and a count),
so batches merge exactly and a split is summarised once, whatever its batching:
- category_top{1,3,5}: share of valid images whose category is among the top k logits;
- attr_recall_top{3,5}[_<type>]: positives found in the top k, summed over images, over
  positives summed over images; over all 1,000 attributes, or per type with the top k
  taken among that type's attributes only (Liu & Lu 2018);
- baseline_attr_recall_top{3,5}_<type>: the baseline's per-image |top-k of the type ∩
  positives of the type| / min(k, positives of the type), averaged over the images that
  have a positive of that type (without the baseline's masking bug);
- bbox_iou, bbox_l1: mean IoU and mean absolute error of the predicted box, over the
  valid examples that have a box (`losses.box_mask`);
- loss and its parts (box_loss weighted, like the box metrics, by the examples with a box);
- with a landmark branch, Liu & Lu 2018's landmark metrics, over the visible landmarks
  (`landmark_visible`), the distance being the Euclidean one between the predicted and the
  true point in [0, 1] coordinates of the input (x by its width, y by its height):
  landmark_error_<slot> the mean distance of each slot's landmarks (`SLOT_NAMES`, e.g.
  landmark_error_left_collar); landmark_error the mean of those per-slot errors over the
  slots that have a visible landmark (their `lm_dist`, not the mean over all landmarks);
  landmark_detection_rate the share of all visible landmarks found within
  DETECTION_DISTANCE (0.1) of their true point.
A model without a box branch (heads='liu_lu') has no box metrics and no box_loss.
Training adds grad_norm, param_norm and update_norm (global L2 norms of the gradient, of
the parameters after the update and of the update, averaged over the finite steps: the
first figures to look at when a run diverges), loss_scale (float16's dynamic loss scale at
the last step; 1 otherwise) and nonfinite_steps (steps skipped for a non-finite loss or gradient), with the first such
step and the longest run of them, which the training loop acts on.
"""

import functools

import flax
from clu import metrics
import jax
import jax.numpy as jnp
import numpy as np

from deepfashion_jax import losses as losses_lib
from deepfashion_jax.data import landmark_slots
from deepfashion_jax.data import vocabulary

TOP_K_CATEGORY = (1, 3, 5)
TOP_K_ATTRIBUTE = (3, 5)
LOSS_NAMES = ('loss', 'attribute_loss', 'category_loss', 'box_loss')
LANDMARK_LOSS = 'landmark_loss'
DETECTION_DISTANCE = 0.1  # Liu & Lu's VAL_LM_RELATIVE_DIS
LANDMARK_METRICS = (('landmark_error', 'landmark_detection_rate')
                    + tuple(f'landmark_error_{slot}' for slot in landmark_slots.SLOT_NAMES))


def metric_names(type_names=vocabulary.ATTRIBUTE_TYPE_NAMES, *, box: bool = True,
                 landmarks: bool = False) -> tuple:
  """The metrics of a model with a box branch (`box`) and a landmark branch (`landmarks`)."""
  names = [f'category_top{k}' for k in TOP_K_CATEGORY]
  for k in TOP_K_ATTRIBUTE:
    names.append(f'attr_recall_top{k}')
    names += [f'attr_recall_top{k}_{t}' for t in type_names]
    names += [f'baseline_attr_recall_top{k}_{t}' for t in type_names]
  if box:
    names += ['bbox_iou', 'bbox_l1']
  names += [n for n in LOSS_NAMES if box or n != 'box_loss']
  if landmarks:
    names += list(LANDMARK_METRICS) + [LANDMARK_LOSS]
  return tuple(names)


def landmark_distances(predicted, true):
  """(B, S) Euclidean distances between (B, S, 2) points in [0, 1] coordinates."""
  difference = predicted.astype(jnp.float32) - true.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(difference * difference, axis=-1))


def landmark_values(predicted, batch: dict) -> dict:
  """name -> (values, mask) of the landmark metrics of one batch (see the docstring)."""
  visible = batch['landmark_visible'] & batch['valid'][:, None]
  distances = landmark_distances(predicted, batch['landmarks'])
  values = {'landmark_error': (distances, visible),
            'landmark_detection_rate': (
                (distances <= DETECTION_DISTANCE).astype(jnp.float32), visible)}
  for s, slot in enumerate(landmark_slots.SLOT_NAMES):
    values[f'landmark_error_{slot}'] = (distances[:, s], visible[:, s])
  return values


def _in_top_k(scores, k):
  """(B, N) bool: which entries are among the k highest of their row."""
  _, indices = jax.lax.top_k(scores, k)
  return jnp.zeros(scores.shape, bool).at[jnp.arange(scores.shape[0])[:, None], indices].set(True)


def box_iou(a, b):
  """(B,) IoU of boxes (x1, y1, x2, y2); 0 where the union is empty."""
  width = jnp.maximum(jnp.minimum(a[:, 2], b[:, 2]) - jnp.maximum(a[:, 0], b[:, 0]), 0)
  height = jnp.maximum(jnp.minimum(a[:, 3], b[:, 3]) - jnp.maximum(a[:, 1], b[:, 1]), 0)
  intersection = width * height
  area = lambda box: jnp.maximum(box[:, 2] - box[:, 0], 0) * jnp.maximum(box[:, 3] - box[:, 1], 0)
  union = area(a) + area(b) - intersection
  return jnp.where(union > 0, intersection / jnp.where(union > 0, union, 1), 0.0)


def metric_values(outputs: dict, batch: dict, losses: dict, attribute_types,
                  type_names=vocabulary.ATTRIBUTE_TYPE_NAMES) -> dict:
  """name -> (values, mask) of one batch; every metric is the masked mean of its values."""
  valid = batch['valid']
  values = {}
  category_logits = outputs['category_logits'].astype(jnp.float32)
  for k in TOP_K_CATEGORY:
    hit = jnp.take_along_axis(_in_top_k(category_logits, k), batch['category'][:, None], 1)
    values[f'category_top{k}'] = (hit[:, 0].astype(jnp.float32), valid)
  scores = outputs['attribute_logits'].astype(jnp.float32)
  positive = batch['attribute_positive'] & valid[:, None]
  for k in TOP_K_ATTRIBUTE:
    values[f'attr_recall_top{k}'] = (_in_top_k(scores, k).astype(jnp.float32), positive)
    for t, name in enumerate(type_names):
      of_type = attribute_types == t
      top = _in_top_k(jnp.where(of_type[None, :], scores, -jnp.inf), k) & of_type[None, :]
      positive_of_type = positive & of_type[None, :]
      values[f'attr_recall_top{k}_{name}'] = (top.astype(jnp.float32), positive_of_type)
      count = positive_of_type.sum(axis=1)
      hits = (top & positive_of_type).sum(axis=1)
      values[f'baseline_attr_recall_top{k}_{name}'] = (
          hits / jnp.maximum(jnp.minimum(count, k), 1), count > 0)
  has_box = losses_lib.box_mask(batch)
  if 'box' in outputs:
    values['bbox_iou'] = (box_iou(outputs['box'], batch['bbox']), has_box)
    values['bbox_l1'] = (jnp.abs(outputs['box'] - batch['bbox']).mean(axis=1), has_box)
  if 'landmarks' in outputs:
    values.update(landmark_values(outputs['landmarks'], batch))
  for name in (*LOSS_NAMES, LANDMARK_LOSS):  # batch means: weighted by what they averaged
    if name in losses:
      values[name] = (jnp.full(valid.shape, losses[name], jnp.float32),
                      has_box if name == 'box_loss' else valid)
  return values


def _named_average(name: str):
  """A clu Average that reads its (values, mask) from the model output called `name`."""

  @flax.struct.dataclass
  class NamedAverage(metrics.Average):

    @classmethod
    def from_model_output(cls, **outputs):
      values, mask = outputs[name]
      return metrics.Average.from_model_output(values, mask)

  return NamedAverage


@flax.struct.dataclass
class MeanOfSlotMeans(metrics.Metric):
  """landmark_error: per slot a total and a count of distances, merged by sums; computed
  as the mean over the slots with a count of their mean distance (nan without any)."""
  total: jnp.ndarray  # (S,)
  count: jnp.ndarray  # (S,)

  @classmethod
  def from_model_output(cls, **outputs):
    distances, visible = outputs['landmark_error']
    visible = visible.astype(jnp.float32)
    return cls(total=jnp.sum(distances * visible, axis=0), count=jnp.sum(visible, axis=0))

  def merge(self, other):
    return type(self)(total=self.total + other.total, count=self.count + other.count)

  def compute(self):
    seen = self.count > 0
    per_slot = self.total / jnp.where(seen, self.count, 1.0)
    return jnp.sum(jnp.where(seen, per_slot, 0.0)) / jnp.sum(seen)


def _metric_class(name: str):
  return MeanOfSlotMeans if name == 'landmark_error' else _named_average(name)


@functools.cache
def collection_class(names=None, **other_metrics):
  """The clu Collection of the metrics `names` (default `metric_names()`, and
  `other_metrics`); one class per set of names."""
  return metrics.Collection.create(
      **{n: _metric_class(n) for n in names or metric_names()}, **other_metrics)


def batch_metrics(outputs, batch, losses, attribute_types) -> metrics.Collection:
  """One batch's metrics, to `merge` with the others and `compute` at log time: those the
  model's outputs allow (`metric_names`)."""
  values = metric_values(outputs, batch, losses, attribute_types)
  return collection_class(tuple(values)).single_from_model_output(**values)



def _reduced(name: str, reduce: str):
  """A clu Metric holding one value per step, merged by the ufunc named `reduce` (add,
  minimum, maximum, logical_or): jax.numpy's on device arrays, as the training loop merges
  the steps in a jitted function (`steps.merge_train_metrics`); NumPy's on host copies."""

  @flax.struct.dataclass
  class Reduced(metrics.Metric):
    value: jnp.ndarray

    @classmethod
    def from_model_output(cls, **outputs):
      return cls(value=jnp.asarray(outputs[name]))

    def merge(self, other):
      on_host = isinstance(self.value, np.ndarray) and isinstance(other.value, np.ndarray)
      return type(self)(value=getattr(np if on_host else jnp, reduce)(self.value, other.value))

    def compute(self):
      return self.value

  return Reduced


NO_STEP = np.iinfo(np.int32).max  # first_nonfinite_step when every step was finite

NORM_NAMES = ('grad_norm', 'param_norm', 'update_norm')

_TRAINING_ONLY = dict(
    **{name: _named_average(name) for name in NORM_NAMES},
    loss_scale=metrics.LastValue.from_output('loss_scale'),
    nonfinite_steps=_reduced('nonfinite_steps', 'add'),
    first_nonfinite_step=_reduced('first_nonfinite_step', 'minimum'),
    nonfinite_in_a_row=_reduced('nonfinite_in_a_row', 'maximum'),
    stop_requested=_reduced('stop_requested', 'logical_or'))


def train_collection_class(names=None):
  """The clu Collection of a training step: the metrics `names` and the training-only
  ones."""
  return collection_class(names, **_TRAINING_ONLY)


def train_batch_metrics(outputs, batch, losses, attribute_types, *, norms, step, nonfinite,
                        nonfinite_in_a_row, loss_scale, stop_requested) -> metrics.Collection:
  """One training step's metrics: those of `batch_metrics`, the norms ({name in
  NORM_NAMES: scalar}; a skipped step's count nowhere), the loss scale, whether the
  step was skipped for a non-finite loss or gradient (merged: how many were, the first,
  and the longest run of them in a row), and whether any process had asked to stop
  (train.py's stop signals, agreed through the step)."""
  finite = ~nonfinite[None]
  values = metric_values(outputs, batch, losses, attribute_types)
  return train_collection_class(tuple(values)).single_from_model_output(
      **values,
      **{name: (jnp.where(finite, norms[name], 0.0), finite) for name in NORM_NAMES},
      loss_scale=jnp.asarray(loss_scale, jnp.float32),
      nonfinite_steps=nonfinite.astype(jnp.int32),
      first_nonfinite_step=jnp.where(nonfinite, step, NO_STEP).astype(jnp.int32),
      nonfinite_in_a_row=nonfinite_in_a_row,
      stop_requested=jnp.asarray(stop_requested, bool))
