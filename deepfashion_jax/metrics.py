"""Evaluation metrics: the published protocol and the baseline's formulas (DEEPFASHION.md).

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
- loss and its parts (box_loss weighted, like the box metrics, by the examples with a box).
Training adds grad_norm, param_norm and update_norm (global L2 norms of the gradient, of
the parameters after the update and of the update, averaged over the finite steps: the
first figures to look at when a run diverges), loss_scale (float16's dynamic loss scale at
the last step; 1 otherwise) and nonfinite_steps (steps skipped for a non-finite loss or gradient), with the first such
step and the longest run of them, which the training loop acts on.
"""

import flax
from clu import metrics
import jax
import jax.numpy as jnp
import numpy as np

from deepfashion_jax import losses as losses_lib
from deepfashion_jax.data import vocabulary

TOP_K_CATEGORY = (1, 3, 5)
TOP_K_ATTRIBUTE = (3, 5)
LOSS_NAMES = ('loss', 'attribute_loss', 'category_loss', 'box_loss')


def metric_names(type_names=vocabulary.ATTRIBUTE_TYPE_NAMES) -> tuple:
  names = [f'category_top{k}' for k in TOP_K_CATEGORY]
  for k in TOP_K_ATTRIBUTE:
    names.append(f'attr_recall_top{k}')
    names += [f'attr_recall_top{k}_{t}' for t in type_names]
    names += [f'baseline_attr_recall_top{k}_{t}' for t in type_names]
  return tuple(names + ['bbox_iou', 'bbox_l1'] + list(LOSS_NAMES))


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
  values['bbox_iou'] = (box_iou(outputs['box'], batch['bbox']), has_box)
  values['bbox_l1'] = (jnp.abs(outputs['box'] - batch['bbox']).mean(axis=1), has_box)
  for name in LOSS_NAMES:  # batch means already: weighted by the examples they averaged
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


def collection_class(names=None, **other_metrics):
  """The clu Collection of every metric of `metric_names()` (and `other_metrics`)."""
  return metrics.Collection.create(**{n: _named_average(n) for n in names or metric_names()},
                                   **other_metrics)


EvalMetrics = collection_class()


def batch_metrics(outputs, batch, losses, attribute_types) -> metrics.Collection:
  """One batch's metrics, to `merge` with the others and `compute` at log time."""
  return EvalMetrics.single_from_model_output(
      **metric_values(outputs, batch, losses, attribute_types))



def _reduced(name: str, reduce):
  """A clu Metric holding one value per step, merged by `reduce` (a sum, min or max)."""

  @flax.struct.dataclass
  class Reduced(metrics.Metric):
    value: jnp.ndarray

    @classmethod
    def from_model_output(cls, **outputs):
      return cls(value=jnp.asarray(outputs[name]))

    def merge(self, other):
      return type(self)(value=reduce(self.value, other.value))

    def compute(self):
      return self.value

  return Reduced


NO_STEP = np.iinfo(np.int32).max  # first_nonfinite_step when every step was finite

NORM_NAMES = ('grad_norm', 'param_norm', 'update_norm')

TrainMetrics = collection_class(
    **{name: _named_average(name) for name in NORM_NAMES},
    loss_scale=metrics.LastValue.from_output('loss_scale'),
    nonfinite_steps=_reduced('nonfinite_steps', jnp.add),
    first_nonfinite_step=_reduced('first_nonfinite_step', jnp.minimum),
    nonfinite_in_a_row=_reduced('nonfinite_in_a_row', jnp.maximum))


def train_batch_metrics(outputs, batch, losses, attribute_types, *, norms, step, nonfinite,
                        nonfinite_in_a_row, loss_scale) -> metrics.Collection:
  """One training step's metrics: those of `batch_metrics`, the norms ({name in
  NORM_NAMES: scalar}; a skipped step's count nowhere), the loss scale, and whether the
  step was skipped for a non-finite loss or gradient (merged: how many were, the first,
  and the longest run of them in a row)."""
  finite = ~nonfinite[None]
  return TrainMetrics.single_from_model_output(
      **metric_values(outputs, batch, losses, attribute_types),
      **{name: (jnp.where(finite, norms[name], 0.0), finite) for name in NORM_NAMES},
      loss_scale=jnp.asarray(loss_scale, jnp.float32),
      nonfinite_steps=nonfinite.astype(jnp.int32),
      first_nonfinite_step=jnp.where(nonfinite, step, NO_STEP).astype(jnp.int32),
      nonfinite_in_a_row=nonfinite_in_a_row)
