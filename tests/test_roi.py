"""ROI pooling against NumPy references written from torchvision's and the baseline's rules."""

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepfashion_jax.models import fashion_net
from deepfashion_jax.models import roi


def _bilinear(feature_map, y, x):
  """torchvision's bilinear_interpolate, one sample, all channels."""
  height, width = feature_map.shape[:2]
  if y < -1.0 or y > height or x < -1.0 or x > width:
    return np.zeros(feature_map.shape[2])
  y, x = max(y, 0.0), max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= height - 1:
    y_high = y_low = height - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= width - 1:
    x_high = x_low = width - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1 - ly, 1 - lx
  return (hy * hx * feature_map[y_low, x_low] + hy * lx * feature_map[y_low, x_high]
          + ly * hx * feature_map[y_high, x_low] + ly * lx * feature_map[y_high, x_high])


def reference_roi_align(feature_map, box, output_size, spatial_scale, sampling_ratio, aligned):
  """torchvision's roi_align forward for one box, written loop by loop."""
  offset = 0.5 if aligned else 0.0
  x1, y1, x2, y2 = (v * spatial_scale - offset for v in box)
  roi_w, roi_h = x2 - x1, y2 - y1
  if not aligned:
    roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
  bin_h, bin_w = roi_h / output_size, roi_w / output_size
  grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / output_size)
  grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / output_size)
  count = max(grid_h * grid_w, 1)
  out = np.zeros((output_size, output_size, feature_map.shape[2]))
  for ph in range(output_size):
    for pw in range(output_size):
      total = np.zeros(feature_map.shape[2])
      for iy in range(grid_h):
        y = y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
        for ix in range(grid_w):
          x = x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
          total += _bilinear(feature_map, y, x)
      out[ph, pw] = total / count
  return out


def _random_case(seed, batch=6, size=7, channels=5):
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(batch, size, size, channels)).astype(np.float32)
  x1, y1 = rng.uniform(-1.5, size, batch), rng.uniform(-1.5, size, batch)
  boxes = np.stack([x1, y1, x1 + rng.uniform(0, 1.5 * size, batch),
                    y1 + rng.uniform(0, 1.5 * size, batch)], 1).astype(np.float32)
  boxes[0] = [2.0, 3.0, 2.0, 3.0]  # empty box
  boxes[1] = [0.2, 0.1, 2 * size, 2 * size]  # reaches twice the map, as the baseline's may
  return features, boxes


@pytest.mark.parametrize('sampling_ratio', [2, 1, -1])
@pytest.mark.parametrize('aligned', [True, False])
def test_roi_align_matches_torchvision_semantics(sampling_ratio, aligned):
  features, boxes = _random_case(seed=sampling_ratio + 1 + 10 * aligned)
  scale = 0.5  # boxes given in input pixels at twice the map's resolution
  got = roi.roi_align(jnp.asarray(features), jnp.asarray(boxes / scale), output_size=3,
                      spatial_scale=scale, sampling_ratio=sampling_ratio, aligned=aligned)
  for i in range(len(boxes)):
    expected = reference_roi_align(features[i], boxes[i] / scale, 3, scale, sampling_ratio,
                                   aligned)
    np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-5, err_msg=f'box {i}')


def test_roi_align_is_differentiable_in_features_and_box():
  features, boxes = _random_case(seed=3)
  features, boxes = jnp.asarray(features), jnp.asarray(boxes[2:])
  features = features[2:]
  loss = lambda f, b: jnp.sum(roi.roi_align(f, b, sampling_ratio=2) ** 2)
  grad_features, grad_boxes = jax.grad(loss, argnums=(0, 1))(features, boxes)
  assert jnp.abs(grad_features).sum() > 0 and jnp.abs(grad_boxes).sum() > 0
  # Finite differences agree with the box gradient (the map is piecewise linear in it).
  direction = jax.random.normal(jax.random.PRNGKey(0), boxes.shape)
  epsilon = 1e-3
  numeric = (loss(features, boxes + epsilon * direction)
             - loss(features, boxes - epsilon * direction)) / (2 * epsilon)
  np.testing.assert_allclose(jnp.vdot(grad_boxes, direction), numeric, rtol=2e-2)


def reference_baseline_max_pool(feature_map, box, output_size=3):
  """The baseline: box x (side - 1) truncated, inclusive slice, adaptive max-pool."""
  height, width = feature_map.shape[:2]
  x1, y1 = int(box[0] * (width - 1)), int(box[1] * (height - 1))
  x2, y2 = int(box[2] * (width - 1)), int(box[3] * (height - 1))
  crop = feature_map[y1:y2 + 1, x1:x2 + 1]
  rows, cols = crop.shape[:2]
  out = np.zeros((output_size, output_size, feature_map.shape[2]), feature_map.dtype)
  for i in range(output_size):
    for j in range(output_size):
      r0, r1 = (i * rows) // output_size, -((-(i + 1) * rows) // output_size)
      c0, c1 = (j * cols) // output_size, -((-(j + 1) * cols) // output_size)
      out[i, j] = crop[r0:r1, c0:c1].max(axis=(0, 1))
  return out


def test_baseline_max_pool_matches_the_baseline():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(8, 7, 7, 4)).astype(np.float32)
  xy = rng.uniform(0, 1, (8, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(0, 1, (8, 2))], 1).astype(np.float32)
  boxes[0] = [0.5, 0.5, 0.52, 0.55]  # a one-cell crop
  boxes[1] = [0.9, 0.1, 1.9, 1.8]  # past the map: clipped like a slice
  got = roi.baseline_max_pool(jnp.asarray(features), jnp.asarray(boxes))
  for i in range(len(boxes)):
    np.testing.assert_array_equal(got[i], reference_baseline_max_pool(features[i], boxes[i]))


@pytest.mark.parametrize('image_size', [72, 96, 100, 224])
@pytest.mark.parametrize('sampling_ratio', [2, -1])
def test_fashion_net_pools_the_box_at_one_cell_per_32_pixels(image_size, sampling_ratio):
  """The model's [0, 1] box covers box x image_size pixels, i.e. spatial_scale 1/32 on a
  map of ceil(image_size / 32) cells (torchvision's rule), at sides that are not multiples
  of 32 too."""
  model = fashion_net.FashionNet(backbone='resnet18', image_size=image_size,
                                 roi_sampling_ratio=sampling_ratio, rngs=nnx.Rngs(0))
  assert model.feature_size == -(-image_size // 32)
  _assert_pools_at_stride(model, image_size, 32, sampling_ratio)


@pytest.mark.parametrize('image_size', [72, 100, 224])
def test_fashion_net_on_vgg16_pools_the_box_at_one_cell_per_16_pixels(image_size):
  """VGG-16's conv5_3: spatial_scale 1/16 on a map of floor(image_size / 16) cells (the
  pools floor), which can end short of the image."""
  model = nnx.eval_shape(lambda: fashion_net.FashionNet(
      backbone='vgg16', image_size=image_size, rngs=nnx.Rngs(0)))
  assert model.feature_size == image_size // 16
  _assert_pools_at_stride(model, image_size, 16, model.roi_sampling_ratio)


def _assert_pools_at_stride(model, image_size, stride, sampling_ratio):
  """model.local_features is torchvision's ROI-Align at spatial_scale 1 / stride of the
  box in input pixels, on random maps of the model's side."""
  side = model.feature_size
  rng = np.random.default_rng(image_size)
  features = rng.normal(size=(5, side, side, 512)).astype(np.float32)
  xy = rng.uniform(0, 1, (5, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(0.05, 1, (5, 2))], 1).astype(np.float32)
  boxes[0] = [0.0, 0.0, 1.0, 1.0]  # the whole input: image_size / stride cells, not `side`
  got = np.asarray(model.local_features(jnp.asarray(features), jnp.asarray(boxes)))
  for i, box in enumerate(boxes):
    expected = reference_roi_align(features[i], box * image_size, 3, 1 / stride,
                                   sampling_ratio, True)
    np.testing.assert_allclose(got[i], expected.transpose(2, 0, 1).ravel(), rtol=1e-5,
                               atol=1e-5, err_msg=f'box {i}')
