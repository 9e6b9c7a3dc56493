"""Pooling local features from a box: torchvision-style ROI-Align, and the baseline's max-pool.

`roi_align` follows torchvision's `roi_align` semantics (`spatial_scale`, `sampling_ratio`,
`aligned`; bilinear samples averaged per bin) with static shapes. Sampling on a regular grid
is separable, so each box's output is two small interpolation matrices applied to the
feature map, `A_y @ F @ A_x^T`: batched, jit-friendly, and differentiable in both the
features and the box (the weights are piecewise linear in the coordinates).
"""

import math

import jax
import jax.numpy as jnp


def _axis_weights(start, bin_size, size, output_size, samples, max_samples):
  """(output_size, size) weights that average the bilinear samples of each bin on one axis.

  `samples` is the number of samples per bin (traced in adaptive mode, where it may be 0
  for an empty box: the output is then 0, as torchvision's), at most `max_samples`.
  torchvision's border rules: a sample outside [-1, size] counts as zero, one in [-1, 0)
  is read at 0, one past size - 1 is read at size - 1.
  """
  bins = jnp.arange(output_size, dtype=jnp.float32)[:, None]
  steps = jnp.arange(max_samples, dtype=jnp.float32)[None, :]
  used = steps < samples
  samples = jnp.maximum(samples, 1.0)
  coords = start + bins * bin_size + (steps + 0.5) * bin_size / samples
  inside = (coords >= -1.0) & (coords <= size)
  coords = jnp.maximum(coords, 0.0)
  low = jnp.floor(coords)
  at_edge = low >= size - 1
  low = jnp.where(at_edge, size - 1, low)
  coords = jnp.where(at_edge, low, coords)
  high = jnp.where(at_edge, low, low + 1)
  frac = coords - low
  grid = jnp.arange(size, dtype=jnp.float32)
  weights = ((1 - frac)[..., None] * (grid == low[..., None])
             + frac[..., None] * (grid == high[..., None]))
  weights = weights * (inside & used)[..., None]
  return weights.sum(axis=1) / samples


def _roi_align_one(features, box, output_size, spatial_scale, sampling_ratio, aligned,
                   max_samples):
  height, width = features.shape[:2]
  offset = 0.5 if aligned else 0.0
  x1, y1, x2, y2 = [box[i] * spatial_scale - offset for i in range(4)]
  roi_w, roi_h = x2 - x1, y2 - y1
  if not aligned:  # torchvision forces malformed boxes to 1x1 in the legacy mode
    roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
  bin_w, bin_h = roi_w / output_size, roi_h / output_size
  if sampling_ratio > 0:
    samples_w = samples_h = jnp.float32(sampling_ratio)
  else:  # torchvision's adaptive count: ceil(roi / output_size) samples per bin
    samples_w = jnp.clip(jnp.ceil(bin_w), 0, max_samples)
    samples_h = jnp.clip(jnp.ceil(bin_h), 0, max_samples)
  weights_y = _axis_weights(y1, bin_h, height, output_size, samples_h, max_samples)
  weights_x = _axis_weights(x1, bin_w, width, output_size, samples_w, max_samples)
  return jnp.einsum('ph,hwc,qw->pqc', weights_y.astype(features.dtype), features,
                    weights_x.astype(features.dtype))


def roi_align(features, boxes, output_size: int = 3, spatial_scale: float = 1.0,
              sampling_ratio: int = 2, aligned: bool = True, max_box_extent: float = 2.0):
  """One box per image: (B, H, W, C) features, (B, 4) boxes (x1, y1, x2, y2) -> (B, S, S, C).

  Boxes are in input coordinates; `spatial_scale` maps them onto the feature map.
  `sampling_ratio <= 0` is torchvision's adaptive sampling, computed under a static bound:
  boxes may reach `max_box_extent` times the feature map's side (the baseline's boxes reach
  2), and larger boxes are sampled at that bound.
  """
  height, width = features.shape[1:3]
  if sampling_ratio > 0:
    max_samples = sampling_ratio
  else:
    max_samples = max(1, math.ceil(max_box_extent * max(height, width) / output_size) + 1)
  one = lambda f, b: _roi_align_one(f, b, output_size, spatial_scale, sampling_ratio,
                                    aligned, max_samples)
  return jax.vmap(one)(features, boxes)


def _adaptive_bins(start, stop, size, output_size):
  """(output_size, size) masks of PyTorch's adaptive pooling bins over rows start..stop."""
  length = stop - start + 1
  bins = jnp.arange(output_size)
  bin_start = start + (bins * length) // output_size
  bin_stop = start + -((-(bins + 1) * length) // output_size)  # ceil division
  index = jnp.arange(size)
  return (index[None, :] >= bin_start[:, None]) & (index[None, :] < bin_stop[:, None])


def baseline_max_pool(features, boxes, output_size: int = 3):
  """The PyTorch baseline's local pooling, for exact comparisons with converted checkpoints.

  The box (in units of the input side) times (feature side - 1), truncated to integers,
  selects rows y1..y2 and columns x1..x2 inclusive (clipped to the map, as slicing does),
  then adaptive max-pooling gives output_size x output_size. Not differentiable in the box.
  The baseline itself runs only at 224 px (its box layer is fixed at 32 x 7 x 7), where the
  factor is 6; at other sizes this keeps its rule, (side - 1) for a map of side cells,
  which is not ROI-Align's one cell per 32 pixels.
  """
  height, width = features.shape[1:3]

  def one(feature_map, box):
    x1, x2 = (jnp.floor(box[0] * (width - 1)).astype(jnp.int32),
              jnp.floor(box[2] * (width - 1)).astype(jnp.int32))
    y1, y2 = (jnp.floor(box[1] * (height - 1)).astype(jnp.int32),
              jnp.floor(box[3] * (height - 1)).astype(jnp.int32))
    rows = _adaptive_bins(y1, jnp.minimum(y2, height - 1), height, output_size)
    cols = _adaptive_bins(x1, jnp.minimum(x2, width - 1), width, output_size)
    mask = rows[:, None, :, None] & cols[None, :, None, :]  # (S, S, H, W)
    masked = jnp.where(mask[..., None], feature_map[None, None], -jnp.inf)
    return masked.max(axis=(2, 3))

  return jax.vmap(one)(features, jax.lax.stop_gradient(boxes))
