"""The pixel half of the augmentation, on the device: resize, crop and flip from the canvas.

The host sends each image as decoded, at the top-left of a fixed canvas, with the crop's
window, region and flip (`transforms.py`). Here each output row and column is a weighted
sum of canvas rows and columns with PIL's bilinear weights (a triangle filter widened by
the downscaling factor, clipped to the window and renormalised), a horizontal pass rounded to
8 bits and then a vertical one. The result is the baseline's PIL resize bit for bit for
most crops; the installed Pillow does some crops vertical pass first, and those differ by
one grey level on a few percent of pixels. Two small matrix products per image.
"""

import jax
import jax.numpy as jnp


def pil_bilinear_weights(start, end, window_start, window_end, out_size: int,
                         canvas_size: int, out_count=None):
  """(out_size, canvas_size) weights resampling [start, end) of an axis from the pixels
  [window_start, window_end) of it; with `out_count` (traced, <= out_size), to its first
  out_count pixels, the rows after them zero."""
  scale = (end - start) / (out_size if out_count is None else out_count)
  filter_scale = jnp.maximum(scale, 1.0)
  centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  pixel_centres = jnp.arange(canvas_size, dtype=jnp.float32) + 0.5
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(pixel_centres[None, :] - centres[:, None])
                        / filter_scale)
  pixels = jnp.arange(canvas_size)
  weights = weights * ((pixels >= window_start) & (pixels < window_end))[None, :]
  if out_count is not None:
    weights = weights * (jnp.arange(out_size) < out_count)[:, None]
  total = weights.sum(axis=1, keepdims=True)
  return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)


def _one_image(canvas, window, region, flip, out_size):
  canvas_size = canvas.shape[0]
  rows = pil_bilinear_weights(region[1], region[3], window[1], window[3], out_size,
                              canvas_size)
  cols = pil_bilinear_weights(region[0], region[2], window[0], window[2], out_size,
                              canvas_size)
  cols = jnp.where(flip, cols[::-1], cols)
  return resample(canvas, rows, cols)


def resample(image, rows, cols):
  """(H, W, C) uint8 -> (P, Q, C) uint8 through (P, H) row and (Q, W) column weights, like
  PIL: the horizontal pass first, rounded to 8 bits, then the vertical pass."""
  to_8_bits = lambda x: jnp.clip(jnp.floor(x + 0.5), 0, 255)
  highest = jax.lax.Precision.HIGHEST
  horizontal = to_8_bits(jnp.einsum('hwc,qw->hqc', image.astype(jnp.float32), cols,
                                    precision=highest))
  return to_8_bits(jnp.einsum('ph,hqc->pqc', rows, horizontal,
                              precision=highest)).astype(jnp.uint8)


def fit_to_canvas(images, fitted, canvas_size: int):
  """(B, H, W, 3) uint8 photos -> (B, canvas_size, canvas_size, 3) uint8 canvases holding
  each photo resized to `fitted` (2,) (height, width) at the top left, zeros elsewhere: the
  device's `transforms.fit_to_canvas` (for export, whose graph cannot call PIL). Equal to
  the photo where it is not shrunk; shrunk, PIL's but for rounding (PIL's fixed-point
  weights and, for some sizes, its vertical pass first): a grey level off on a few percent
  of the values, rarely two."""
  def weights(axis: int):
    in_size = jnp.asarray(images.shape[axis], jnp.float32)
    return pil_bilinear_weights(0.0, in_size, 0, images.shape[axis], canvas_size,
                                images.shape[axis], fitted[axis - 1].astype(jnp.float32))
  rows, cols = weights(1), weights(2)
  return jax.vmap(lambda image: resample(image, rows, cols))(images)


def crop_resize_flip(canvas, window, region, flip, out_size: int):
  """(B, S, S, 3) uint8 canvases -> (B, out_size, out_size, 3) uint8 crops.

  window: (B, 4) int (x0, y0, x1, y1), the canvas pixels each crop may read (its image, or
  a box of it); region: (B, 4) float (x0, y0, x1, y1) pixels of the image to resample;
  flip: (B,) bool.
  """
  return jax.vmap(lambda c, w, r, f: _one_image(c, w, r, f, out_size))(
      canvas, window, region, flip)


def batch_images(batch: dict, out_size: int):
  """The model's input images of a pipeline batch (see pipeline.py)."""
  return crop_resize_flip(batch['canvas'], batch['window'], batch['region'],
                          batch['flip'], out_size)
