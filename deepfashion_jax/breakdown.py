"""Where a model fails: the split's figures per category, garment type and attribute.

Pure NumPy on the examples of a whole split: the per-example logits and labels that
`steps.eval_step(..., with_examples=True)` returns, batches joined by `concatenate`. Rows
with `valid` False (padding, unreadable images) count nowhere. A figure over no example
(a category without images: DeepFashion has four; an attribute without positives) is None,
JSON's null. What --mode=evaluate adds to eval_<split>_<step>.json (`breakdown`):

- per_category: 50 objects {name, images, top1, top3, top5}: of the category's images,
  the share whose category is among the k highest logits;
- per_garment_type: the same over the images of each garment type's categories;
- confusion_matrix: counts, rows the true category, columns the predicted one (the highest
  logit); `row_shares` divides each row by its images (an empty row stays zero);
- most_confused_pairs: the ten largest off-diagonal counts {true, predicted, count, share},
  share being count over the true category's images;
- per_attribute: 1,000 objects {name, type, positives, recall_top3, recall_top5,
  average_precision}: recall within the attribute's type as the published protocol
  counts it (Liu & Lu 2018; metrics.py), per attribute: of its positives, summed over
  images, the share found among the k highest scores of its type; average precision of
  the ranking of the split's images by its score;
- mean_attribute_average_precision: the mean over attributes with at least one positive.

Ties. The top k breaks them by the lower index, as jax.lax.top_k does, so that these
figures add up to metrics.py's. Average precision gives tied scores one threshold, as
scikit-learn's average_precision_score: the sum over distinct scores, highest first, of
(recall gained at that score) x (precision of everything scored at or above it); the
order of the images within a tie changes nothing.
"""

import numpy as np

from deepfashion_jax import metrics
from deepfashion_jax.data import vocabulary

MOST_CONFUSED = 10
_AP_COLUMNS_AT_ONCE = 128  # bounds the sort's memory: a 40,000-image split, 40 MB arrays


def concatenate(batches: list) -> dict:
  """The examples of every batch (dicts of arrays, one row per example) as one dict."""
  return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}


def category_hits(category_logits: np.ndarray, category: np.ndarray, k: int) -> np.ndarray:
  """(N,) bool: whether each example's true category is among its k highest logits.

  A logit ahead of the true one is higher, or equal at a lower index (lax.top_k's order).
  """
  true_logit = np.take_along_axis(category_logits, category[:, None], axis=1)
  columns = np.arange(category_logits.shape[1])
  ahead = (category_logits > true_logit) | ((category_logits == true_logit)
                                            & (columns < category[:, None]))
  return ahead.sum(axis=1) < k


def _accuracies(hits: dict, members: np.ndarray) -> dict:
  """{images, top1, top3, top5} over the examples marked in `members`."""
  images = int(members.sum())
  return dict(images=images, **{f'top{k}': float(hit[members].mean()) if images else None
                                for k, hit in hits.items()})


def per_category(category_logits, category, valid, names=vocabulary.CATEGORY_NAMES) -> list:
  """One {name, images, top1, top3, top5} per category, in label order."""
  category = category[valid]
  hits = {k: category_hits(category_logits[valid], category, k)
          for k in metrics.TOP_K_CATEGORY}
  return [dict(name=name, **_accuracies(hits, category == c)) for c, name in enumerate(names)]


def per_garment_type(category_logits, category, valid,
                     category_types=vocabulary.CATEGORY_TYPES,
                     names=vocabulary.GARMENT_TYPE_NAMES) -> list:
  """One {name, images, top1, top3, top5} per garment type, over its categories' images
  (a hit is still the exact category among all 50)."""
  category = category[valid]
  hits = {k: category_hits(category_logits[valid], category, k)
          for k in metrics.TOP_K_CATEGORY}
  type_of_example = np.asarray(category_types)[category]
  return [dict(name=name, **_accuracies(hits, type_of_example == t))
          for t, name in enumerate(names)]


def confusion_counts(category_logits, category, valid) -> np.ndarray:
  """(C, C) int64: images of true category i (row) predicted as j (the highest logit, the
  lower index on a tie)."""
  num_categories = category_logits.shape[1]
  predicted = np.argmax(category_logits[valid], axis=1)
  counts = np.zeros((num_categories, num_categories), np.int64)
  np.add.at(counts, (category[valid], predicted), 1)
  return counts


def row_shares(counts: np.ndarray) -> np.ndarray:
  """Each row divided by its total: the share of a category's images given each
  prediction; a row without images stays zero."""
  totals = counts.sum(axis=1, keepdims=True)
  return np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)


def most_confused_pairs(counts: np.ndarray, names=vocabulary.CATEGORY_NAMES,
                        top: int = MOST_CONFUSED) -> list:
  """The `top` largest off-diagonal counts as {true, predicted, count, share}, largest
  first (equal counts in row-major order); pairs never confused are left out."""
  confused = counts.copy()
  np.fill_diagonal(confused, 0)
  true, predicted = np.nonzero(confused)
  order = np.argsort(-confused[true, predicted], kind='stable')[:top]
  totals = counts.sum(axis=1)
  return [dict(true=names[t], predicted=names[p], count=int(confused[t, p]),
               share=float(confused[t, p] / totals[t]))
          for t, p in zip(true[order], predicted[order])]


def attribute_hits_within_type(attribute_logits, attribute_types,
                               ks=metrics.TOP_K_ATTRIBUTE) -> dict:
  """k -> (N, A) bool: which attributes are among the k highest scores of their own type,
  per example (equal scores: the lower index first, as lax.top_k)."""
  hits = {k: np.zeros(attribute_logits.shape, bool) for k in ks}
  rows = np.arange(attribute_logits.shape[0])[:, None]
  for t in np.unique(attribute_types):
    columns = np.flatnonzero(attribute_types == t)
    order = np.argsort(-attribute_logits[:, columns], axis=1, kind='stable')
    for k, hit in hits.items():
      hit[rows, columns[order[:, :k]]] = True
  return hits


def average_precision(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
  """(A,) average precision of each column's ranking of the rows (tied scores share one
  threshold, see the module's docstring); NaN for a column without positive."""
  return np.concatenate([
      _average_precision(scores[:, start:start + _AP_COLUMNS_AT_ONCE],
                         positive[:, start:start + _AP_COLUMNS_AT_ONCE])
      for start in range(0, scores.shape[1], _AP_COLUMNS_AT_ONCE)] or [np.zeros(0)])


def _average_precision(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
  order = np.argsort(-scores, axis=0, kind='stable')
  ranked = np.take_along_axis(scores, order, axis=0)
  ranked_positive = np.take_along_axis(positive, order, axis=0)
  found = np.cumsum(ranked_positive, axis=0)
  # Each image is counted at the last rank of its run of equal scores: one threshold.
  rank = np.arange(len(scores))[:, None]
  ends_a_tie = np.ones(ranked.shape, bool)
  ends_a_tie[:-1] = ranked[1:] != ranked[:-1]
  tie_end = np.where(ends_a_tie, rank, len(scores))
  tie_end = np.flip(np.minimum.accumulate(np.flip(tie_end, 0), axis=0), 0)
  precision = np.take_along_axis(found, tie_end, axis=0) / (tie_end + 1)
  positives = positive.sum(axis=0)
  return np.divide((ranked_positive * precision).sum(axis=0), positives,
                   out=np.full(positives.shape, np.nan), where=positives > 0)


def per_attribute(attribute_logits, attribute_positive, valid, attribute_types,
                  names, type_names=vocabulary.ATTRIBUTE_TYPE_NAMES) -> list:
  """One {name, type, positives, recall_top3, recall_top5, average_precision} per
  attribute, in index order."""
  scores, positive = attribute_logits[valid], attribute_positive[valid]
  positives = positive.sum(axis=0)
  found = {k: (hit & positive).sum(axis=0)
           for k, hit in attribute_hits_within_type(scores, attribute_types).items()}
  precision = average_precision(scores, positive)
  return [dict(name=name, type=type_names[attribute_types[a]], positives=int(positives[a]),
               **{f'recall_top{k}': float(found[k][a] / positives[a]) if positives[a] else None
                  for k in found},
               average_precision=float(precision[a]) if positives[a] else None)
          for a, name in enumerate(names)]


def mean_average_precision(attributes: list) -> float:
  """The mean of `per_attribute`'s average precisions over the attributes with a
  positive (the balanced figure some papers report); NaN when none has one."""
  values = [a['average_precision'] for a in attributes if a['positives']]
  return float(np.mean(values)) if values else float('nan')


def breakdown(examples: dict, category_names, attribute_names, attribute_types) -> dict:
  """Everything the module's docstring lists, from `concatenate`d examples."""
  category_logits, category, valid = (examples[name] for name in
                                      ('category_logits', 'category', 'valid'))
  valid = valid.astype(bool)
  counts = confusion_counts(category_logits, category, valid)
  attributes = per_attribute(examples['attribute_logits'], examples['attribute_positive'],
                             valid, np.asarray(attribute_types), attribute_names)
  return dict(
      per_category=per_category(category_logits, category, valid, category_names),
      per_garment_type=per_garment_type(category_logits, category, valid),
      confusion_matrix=counts.tolist(),
      most_confused_pairs=most_confused_pairs(counts, category_names),
      per_attribute=attributes,
      mean_attribute_average_precision=mean_average_precision(attributes))
