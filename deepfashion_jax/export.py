"""--mode=export: a checkpoint as a TensorFlow SavedModel, for TF Serving (jax2tf).

`export(config, workdir, output_dir)` restores the checkpoint as --mode=predict does
(`checkpoints.restore_for_inference`: config.eval.checkpoint, trained or converted) and
writes OUTPUT_DIR/saved_model.pb and OUTPUT_DIR/variables/ (parameters and batch-norm
statistics as TF variables). The preprocessing and the model run in one XlaCallModule op
(jax2tf's native serialization), lowered for CPU and CUDA GPUs (`PLATFORMS`): TensorFlow
alone runs it, without JAX.

Signatures (the batch dimension B is polymorphic; both return the same dict):
  serving_default(images): (B, H, W, 3) uint8 RGB photos of any size H x W, the same for
    every photo of one call (a call per size, or the `encoded` signature).
  encoded(images): (B,) string, each the bytes of a JPEG, PNG, GIF or BMP file of any
    size, decoded in the graph (a JPEG with libjpeg's accurate integer DCT, the decoder
    predict uses; GIF: its first frame) and run one photo at a time. A file that does not
    decode fails the whole call (predict instead answers it with an `error` line).
Outputs, float32:
  category_probabilities (B, 50): softmax of the crops' mean logits / config.predict.temperature;
  attribute_probabilities (B, 1000): sigmoid of the crops' mean logits;
  box (B, 4): x1, y1, x2, y2 in the photo's pixels, clipped to it (models with a box
    branch: not config.model.heads='liu_lu');
  landmarks (B, 8, 2) (x, y) in the photo's pixels and landmark_peaks (B, 8) (each
    heatmap's highest value), in `landmark_slots.SLOT_NAMES` order (a landmark branch);
  garment_type_probabilities (B, 3) (config.model.category_head='per_garment_type').

The preprocessing is predict's (`data/photos.py`), done on the device from the raw photo:
a photo larger than config.data.canvas_size is shrunk into the canvas with PIL's bilinear
weights (`transforms.fit_to_canvas`; the shrunk size is computed in float64 in the TF
graph, as Python computes it), then cut into its crops by `device_transforms` in the
predict step itself (`steps.predict_step`). One centre crop, or with
config.export.ten_crop the baseline's ten crops (config.predict.ten_crop's), whose outputs
are averaged as predict averages them (mirrored crops' boxes and landmarks mirrored back).
"""

import dataclasses
import functools
import os

from absl import logging
import jax
from jax.experimental import jax2tf
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from deepfashion_jax import checkpoints
from deepfashion_jax import config_checks
from deepfashion_jax import predict
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax.data import device_transforms
from deepfashion_jax.data import landmark_slots

PLATFORMS = ('cpu', 'cuda')  # what the SavedModel runs on
ENCODED_SIGNATURE = 'encoded'


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """The static part of the preprocessing (config.data's sizes, the crops, temperature)."""
  canvas_size: int
  img_size: int
  crop_size: int
  ten_crop: bool
  temperature: float

  @classmethod
  def from_config(cls, config) -> 'Preprocessing':
    return cls(config.data.canvas_size, config.data.img_size, config.data.crop_size,
               config.export.ten_crop, config.predict.temperature)


# ------------------------------------------------------------------- in JAX, traced once


def _shrink_weights(in_size, out_count, out_size: int):
  """(out_size, in_size) PIL bilinear weights resizing an axis of `in_size` pixels (a
  symbolic dimension) to `out_count` (traced, <= out_size); rows from out_count on are 0.
  Equal to the identity when out_count == in_size."""
  in_pixels = jnp.asarray(in_size, jnp.float32)
  scale = in_pixels / out_count.astype(jnp.float32)
  filter_scale = jnp.maximum(scale, 1.0)
  centres = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  pixel_centres = jnp.arange(in_size, dtype=jnp.float32) + 0.5
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(pixel_centres[None, :] - centres[:, None])
                        / filter_scale)
  weights = weights * (jnp.arange(out_size) < out_count)[:, None]
  total = weights.sum(axis=1, keepdims=True)
  return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)


def fit_to_canvas(images, fitted, canvas_size: int):
  """(B, H, W, 3) uint8 photos -> (B, canvas_size, canvas_size, 3) uint8 canvases holding
  each photo resized to `fitted` (height, width) at the top left (`transforms.fit_to_canvas`:
  PIL's bilinear resize, horizontal pass rounded to 8 bits, then vertical), zeros elsewhere."""
  rows = _shrink_weights(images.shape[1], fitted[0], canvas_size)
  cols = _shrink_weights(images.shape[2], fitted[1], canvas_size)
  return jax.vmap(lambda image: device_transforms.resample(image, rows, cols))(images)


def crop_regions(fitted, preprocessing: Preprocessing):
  """(N, 4) float32 regions (x0, y0, x1, y1) of the fitted photo and (N,) flips: the crops
  of `photos.crops`, in its order, from the traced (height, width)."""
  img, crop = preprocessing.img_size, preprocessing.crop_size
  height, width = fitted[0].astype(jnp.float32), fitted[1].astype(jnp.float32)
  offset = (img - crop) / 2
  centre = jnp.stack([offset * width / img, offset * height / img,
                      (offset + crop) * width / img, (offset + crop) * height / img])
  if not preprocessing.ten_crop:
    return centre[None], np.zeros(1, bool)
  far = img - crop
  corners = np.array([[x, y, x + crop, y + crop] for x, y in ((0, 0), (far, 0), (0, far),
                                                              (far, far))], np.float32)
  scale = jnp.stack([width / img, height / img] * 2)
  unflipped = jnp.concatenate([corners * scale, centre[None]])
  return jnp.concatenate([unflipped, unflipped]), np.repeat([False, True], 5)


def _box_in_photo(boxes, regions, flips, to_photo):
  """(B, N, 4) boxes in [0, 1] units of the crops -> pixels of the photo (`Crop.box_in_image`
  times the canvas-to-photo scale)."""
  x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
  x1, x2 = jnp.where(flips, 1 - x2, x1), jnp.where(flips, 1 - x1, x2)
  x0, y0, x_end, y_end = (regions[:, i] for i in range(4))
  width, height = x_end - x0, y_end - y0
  return jnp.stack([x0 + x1 * width, y0 + y1 * height, x0 + x2 * width, y0 + y2 * height],
                   axis=-1) * to_photo


def _landmarks_in_photo(points, regions, flips, to_photo):
  """(B, N, 8, 2) points in [0, 1] units of the crops -> (x, y) pixels of the photo
  (`Crop.landmarks_in_image`, then as `LoadedImage.landmarks_in_pixels`)."""
  mirrored = points[:, :, landmark_slots.FLIP_ORDER]
  mirrored = jnp.stack([1 - mirrored[..., 0], mirrored[..., 1]], axis=-1)
  points = jnp.where(flips[:, None, None], mirrored, points)
  origin, size = regions[:, None, :2], regions[:, None, 2:] - regions[:, None, :2]
  # Crop.landmarks_in_image is (points * size + origin - 0.5), in canvas pixels, and
  # LoadedImage.landmarks_in_pixels ((that + 0.5) * to_photo - 0.5).
  return (points * size + origin) * to_photo - 0.5


def _per_photo(outputs: dict, regions, flips, photo_size, to_photo, temperature):
  """The predict step's outputs (B N rows, N crops per photo) -> the signature's outputs."""
  crops = len(flips)
  rows = {k: v.reshape((-1, crops) + v.shape[1:]) for k, v in outputs.items()}
  results = dict(
      category_probabilities=jax.nn.softmax(rows['category_logits'].mean(axis=1)
                                            / temperature),
      attribute_probabilities=jax.nn.sigmoid(rows['attribute_logits'].mean(axis=1)))
  if 'box' in rows:
    box = _box_in_photo(rows['box'], regions, flips, to_photo).mean(axis=1)
    height, width = photo_size
    results['box'] = jnp.clip(box, 0, jnp.stack([width, height, width, height]))
  if 'landmarks' in rows:
    results['landmarks'] = _landmarks_in_photo(rows['landmarks'], regions, flips,
                                               to_photo).mean(axis=1)
    peaks = rows['landmark_peaks']
    results['landmark_peaks'] = jnp.where(
        flips[:, None], peaks[:, :, landmark_slots.FLIP_ORDER], peaks).mean(axis=1)
  if 'garment_type_logits' in rows:
    results['garment_type_probabilities'] = jax.nn.softmax(
        rows['garment_type_logits'].mean(axis=1))
  return results


def serve(step_config, preprocessing: Preprocessing, weights, images, fitted) -> dict:
  """The signature's outputs (module docstring) for (B, H, W, 3) uint8 `images`, given
  their size in the canvas, `fitted` (2,) int32 (height, width: `fitted_size`);
  `weights`: (params, batch_stats)."""
  params, batch_stats = weights
  state = steps.TrainState(step=None, params=params, batch_stats=batch_stats,
                           opt_state=None, rng=None, nonfinite_in_a_row=None,
                           dynamic_scale=None)
  canvas = fit_to_canvas(images, fitted, preprocessing.canvas_size)
  regions, flips = crop_regions(fitted, preprocessing)
  crops = len(flips)
  count = images.shape[0] * crops
  window = jnp.stack([0, 0, fitted[1], fitted[0]]).astype(jnp.int32)
  batch = dict(canvas=jnp.repeat(canvas, crops, axis=0),
               window=jnp.broadcast_to(window, (count, 4)),
               region=jnp.tile(regions, (images.shape[0], 1)),
               flip=jnp.tile(jnp.asarray(flips), images.shape[0]))
  outputs = steps.predict_step(step_config, state, batch)
  outputs = {k: v for k, v in outputs.items()
             if k in ('category_logits', 'attribute_logits', 'box', 'landmarks',
                      'landmark_peaks', 'garment_type_logits')}
  photo_size = (jnp.asarray(images.shape[1], jnp.float32),
                jnp.asarray(images.shape[2], jnp.float32))
  to_photo = jnp.maximum(*photo_size) / jnp.max(fitted).astype(jnp.float32)
  return _per_photo(outputs, regions, jnp.asarray(flips), photo_size, to_photo,
                    preprocessing.temperature)


# ------------------------------------------------------------------ in TensorFlow


def fitted_size(height, width, canvas_size: int):
  """(2,) int32: a photo's (height, width) in the canvas, in float64 as
  `transforms.fit_to_canvas` computes it in Python (rounding half to even)."""
  longest = tf.cast(tf.maximum(height, width), tf.float64)
  scale = tf.constant(canvas_size, tf.float64) / longest
  shrunk = [tf.maximum(1, tf.cast(tf.round(tf.cast(n, tf.float64) * scale), tf.int32))
            for n in (height, width)]
  return tf.where(scale >= 1, tf.stack([height, width]), tf.stack(shrunk))


def decode(data):
  """One image file's bytes -> (H, W, 3) uint8 RGB (a JPEG with the accurate integer DCT,
  as `transforms.decode_image`'s libjpeg-turbo; TF's default DCT is the fast one)."""
  image = tf.cond(
      tf.io.is_jpeg(data),
      lambda: tf.io.decode_jpeg(data, channels=3, dct_method='INTEGER_ACCURATE'),
      lambda: tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False))
  image.set_shape([None, None, 3])
  return image


class ServingModule(tf.Module):
  """The SavedModel's contents: the weights as variables and the two signatures."""

  def __init__(self, step_config, preprocessing: Preprocessing, weights):
    super().__init__()
    leaves, treedef = jax.tree.flatten(weights)
    self.weights = [tf.Variable(np.asarray(leaf), trainable=False) for leaf in leaves]
    function = jax2tf.convert(
        lambda leaves, images, fitted: serve(step_config, preprocessing,
                                             jax.tree.unflatten(treedef, leaves), images,
                                             fitted),
        polymorphic_shapes=[None, '(b, h, w, 3)', None], with_gradient=False,
        native_serialization_platforms=PLATFORMS)
    output_shapes = jax.eval_shape(
        functools.partial(serve, step_config, preprocessing, weights),
        jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.uint8), jax.ShapeDtypeStruct((2,), jnp.int32))
    self._output_specs = {k: tf.TensorSpec(v.shape[1:], tf.float32)
                          for k, v in output_shapes.items()}
    self._function, self._canvas_size = function, preprocessing.canvas_size

  # autograph=False: plain TF, and JAX's Python stays untouched by autograph.
  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8,
                                              name='images')], autograph=False)
  def serve_images(self, images):
    shape = tf.shape(images)
    return self._function(self.weights, images,
                          fitted_size(shape[1], shape[2], self._canvas_size))

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='images')],
               autograph=False)
  def serve_encoded(self, images):
    def one(data):
      outputs = self.serve_images(decode(data)[None])
      return {k: v[0] for k, v in outputs.items()}
    return tf.map_fn(one, images, fn_output_signature=self._output_specs)


def export(config, workdir: str, output_dir: str) -> str:
  """Writes the SavedModel of config.eval.checkpoint into output_dir; returns output_dir."""
  config_checks.check(config)
  mesh = sharding.make_mesh()
  config, step, step_config, state = checkpoints.restore_for_inference(config, workdir, mesh)
  logging.info('Exporting the checkpoint of step %d in %s', step, workdir)
  predict.warn_if_trained_on_box_cuts(config)
  weights = jax.device_get((state.params, state.batch_stats))
  module = ServingModule(step_config, Preprocessing.from_config(config), weights)
  signatures = {
      tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY: module.serve_images.get_concrete_function(),
      ENCODED_SIGNATURE: module.serve_encoded.get_concrete_function()}
  os.makedirs(output_dir, exist_ok=True)
  tf.saved_model.save(module, output_dir, signatures=signatures,
                      options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))
  return output_dir
