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
    predict uses, and turned upright by its EXIF orientation as predict turns it; a PNG's
    16-bit levels scaled, its transparency on white, as predict does; GIF: its first
    frame) and run one photo at a time. A file that does not decode fails the whole
    call (predict instead answers it with an `error` line). serving_default takes pixels as
    they are: turn them upright first (PIL.ImageOps.exif_transpose).
Outputs, float32:
  category_probabilities (B, 50): softmax of the crops' mean logits / config.predict.temperature;
  attribute_probabilities (B, 1000): sigmoid of the crops' mean logits;
  box (B, 4): x1, y1, x2, y2 in the photo's pixels, clipped to it (models with a box
    branch: not config.model.heads='liu_lu');
  landmarks (B, 8, 2) (x, y) in the photo's pixels and landmark_peaks (B, 8) (each
    heatmap's highest value), in `landmark_slots.SLOT_NAMES` order (a landmark branch);
  garment_type_probabilities (B, 3) (config.model.category_head='per_garment_type').
What each entry is called (the names the run recorded: `data/trained_on.py`) goes beside
the SavedModel in OUTPUT_DIR/assets.extra/output_names.json: a list per output
(`category_probabilities`, `attribute_probabilities` and their `attribute_types`,
`garment_type_probabilities`, `landmarks`).

The preprocessing, the crops and the averaging are predict's: a photo larger than
config.data.canvas_size is shrunk into the canvas with PIL's bilinear weights
(`device_transforms.fit_to_canvas`, the in-graph counterpart of the host's
`transforms.fit_to_canvas` that predict uses; the shrunk size is computed in float64 in the
TF graph, as Python computes it), then `predict.photo_outputs`, the very function predict
runs, cuts the crops, runs the model and averages its outputs (`data/ten_crop.py`). One
centre crop, or with config.export.ten_crop the baseline's ten crops
(config.predict.ten_crop's).
"""

import dataclasses
import functools
import json
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
from deepfashion_jax.data import photos as photos_lib
from deepfashion_jax.data import ten_crop
from deepfashion_jax.data import trained_on
from deepfashion_jax.data import transforms

PLATFORMS = ('cpu', 'cuda')  # what the SavedModel runs on
ENCODED_SIGNATURE = 'encoded'
# Beside the SavedModel, where TF Serving keeps extra files: each output's entries' names.
OUTPUT_NAMES = os.path.join('assets.extra', 'output_names.json')


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """The static part of the preprocessing: the canvas, and predict's crops and averaging."""
  canvas_size: int
  crops: ten_crop.Options

  @classmethod
  def from_config(cls, config) -> 'Preprocessing':
    return cls(config.data.canvas_size,
               ten_crop.Options.from_config(config, config.export.ten_crop))


# ------------------------------------------------------------------- in JAX, traced once


def serve(step_config, preprocessing: Preprocessing, weights, images, fitted) -> dict:
  """The signature's outputs (module docstring) for (B, H, W, 3) uint8 `images`, given
  their size in the canvas, `fitted` (2,) int32 (height, width: `fitted_size`);
  `weights`: (params, batch_stats)."""
  params, batch_stats = weights
  state = steps.TrainState(step=None, params=params, batch_stats=batch_stats,
                           opt_state=None, rng=None, nonfinite_in_a_row=None,
                           dynamic_scale=None)
  count, height, width = images.shape[:3]
  canvas = device_transforms.fit_to_canvas(images, fitted, preprocessing.canvas_size)
  size = jnp.stack([jnp.asarray(height, jnp.int32), jnp.asarray(width, jnp.int32)])
  photos = dict(canvas=canvas, fitted=jnp.broadcast_to(fitted, (count, 2)),
                size=jnp.broadcast_to(size, (count, 2)))
  return predict.photo_outputs(preprocessing.crops,
                               functools.partial(steps.predict_step, step_config), state,
                               photos)


# ------------------------------------------------------------------ in TensorFlow


def fitted_size(height, width, canvas_size: int):
  """(2,) int32: a photo's (height, width) in the canvas, in float64 as
  `transforms.fit_to_canvas` computes it in Python (rounding half to even)."""
  longest = tf.cast(tf.maximum(height, width), tf.float64)
  scale = tf.constant(canvas_size, tf.float64) / longest
  shrunk = [tf.maximum(1, tf.cast(tf.round(tf.cast(n, tf.float64) * scale), tf.int32))
            for n in (height, width)]
  return tf.where(scale >= 1, tf.stack([height, width]), tf.stack(shrunk))


# A JPEG's EXIF segment (APP1) comes first after its start marker, and a segment is at
# most 64 KiB: the orientation is looked for in the first _EXIF_SCAN_BYTES.
_EXIF_SCAN_BYTES = 1 << 16
_IFD_ENTRIES_READ = 64  # entries of the first IFD searched for the orientation tag
_EXIF_HEADER = b'Exif\x00\x00'
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _unsigned(data, positions, size: int, little_endian):
  """The `size`-byte unsigned integers at `positions` of `data` (int64 bytes, zero-padded
  past its end), in the TIFF's byte order."""
  values = [tf.gather(data, positions + k) for k in range(size)]
  if_little = sum(v * 256**k for k, v in enumerate(values))
  if_big = sum(v * 256**(size - 1 - k) for k, v in enumerate(values))
  return tf.where(little_endian, if_little, if_big)


def exif_orientation(data):
  """The EXIF orientation (1 to 8) of one JPEG file's bytes, in TensorFlow ops; 1 without
  one, or when the EXIF is damaged (offsets past the bytes, another value). As PIL reads it:
  the APP1 segment that starts 'Exif\\0\\0', its TIFF header's byte order and first IFD,
  that IFD's entry 0x0112."""
  head = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 0, _EXIF_SCAN_BYTES), tf.uint8),
                 tf.int64)
  size = tf.size(head, out_type=tf.int64)
  padded = tf.concat([head, tf.zeros([16], tf.int64)], 0)
  # Each start of the header that fits, and one more (never empty; its end in the padding
  # is not readable below): after an APP1 marker and the segment's length.
  starts = tf.range(tf.maximum(size - len(_EXIF_HEADER) + 1, 0) + 1)
  found = ((starts >= 4) & (tf.gather(padded, tf.maximum(starts - 4, 0)) == 0xFF)
           & (tf.gather(padded, tf.maximum(starts - 3, 0)) == 0xE1))
  for k, byte in enumerate(_EXIF_HEADER):
    found &= tf.gather(padded, starts + k) == byte
  tiff = tf.argmax(tf.cast(found, tf.int32), output_type=tf.int64) + len(_EXIF_HEADER)
  little = tf.gather(padded, tiff) == ord('I')
  readable = lambda position, length: (position >= 0) & (position + length <= size)
  at = lambda position: tf.clip_by_value(position, 0, size)  # inside `padded`
  ifd = tiff + _unsigned(padded, at(tiff + 4)[None], 4, little)[0]
  count = _unsigned(padded, at(ifd)[None], 2, little)[0]
  entries = ifd + 2 + 12 * tf.range(_IFD_ENTRIES_READ, dtype=tf.int64)
  tags = _unsigned(padded, at(entries), 2, little)
  values = _unsigned(padded, at(entries + 8), 2, little)  # a SHORT: the field's first 2 bytes
  wanted = ((tags == 0x0112) & readable(entries, 12)
            & (tf.range(_IFD_ENTRIES_READ, dtype=tf.int64) < count))
  orientation = tf.gather(values, tf.argmax(tf.cast(wanted, tf.int32)))
  valid = (tf.reduce_any(found) & readable(tiff, 8) & readable(ifd, 2) & tf.reduce_any(wanted)
           & (orientation >= 1) & (orientation <= 8))
  return tf.where(valid, tf.cast(orientation, tf.int32), 1)


def upright(image, orientation):
  """(H, W, 3) stored pixels turned by an EXIF orientation, as `transforms.decode_image`
  turns them (PIL.ImageOps.exif_transpose's turns)."""
  transposed = lambda: tf.transpose(image, [1, 0, 2])
  turns = [lambda: image, lambda: image[:, ::-1], lambda: image[::-1, ::-1],
           lambda: image[::-1], transposed, lambda: transposed()[:, ::-1],
           lambda: transposed()[::-1, ::-1], lambda: transposed()[::-1]]
  return tf.switch_case(orientation - 1, turns)


def _png_on_white(data):
  """A PNG's pixels as `transforms.decode_image` gives them: 16-bit levels scaled to 8 bits,
  transparent pixels composited on white (`transforms.ALPHA_BACKGROUND`)."""
  rgba = tf.cast(tf.io.decode_png(data, channels=4, dtype=tf.uint16), tf.float32) / 65535
  rgb, alpha = rgba[..., :3], rgba[..., 3:]
  background = tf.constant(transforms.ALPHA_BACKGROUND, tf.float32) / 255
  return tf.cast(tf.round((rgb * alpha + background * (1 - alpha)) * 255), tf.uint8)


def decode(data):
  """One image file's bytes -> (H, W, 3) uint8 RGB, as predict's reader decodes it: a JPEG
  with the accurate integer DCT (as `transforms.decode_image`'s libjpeg-turbo; TF's default
  DCT is the fast one), turned upright by its EXIF orientation; a PNG's 16-bit levels
  scaled and its transparency on white."""
  image = tf.case(
      [(tf.io.is_jpeg(data),
        lambda: upright(tf.io.decode_jpeg(data, channels=3, dct_method='INTEGER_ACCURATE'),
                        exif_orientation(data))),
       (tf.strings.substr(data, 0, len(_PNG_SIGNATURE)) == _PNG_SIGNATURE,
        lambda: _png_on_white(data))],
      default=lambda: tf.io.decode_image(data, channels=3, dtype=tf.uint8,
                                         expand_animations=False), exclusive=True)
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
  write_output_names(config, workdir, output_dir)
  return output_dir


def write_output_names(config, workdir: str, output_dir: str) -> str:
  """OUTPUT_DIR/assets.extra/output_names.json (`OUTPUT_NAMES`): what each output's
  entries are called, from the names the run recorded (`photos.load_output_names`); returns
  its path, or '' (with a warning saying what to pass) when the workdir names none."""
  try:
    names = photos_lib.load_output_names(config.data, workdir)
  except trained_on.TrainedOnError as e:
    logging.warning('%s The SavedModel is written without %s.', e, OUTPUT_NAMES)
    return ''
  types = np.zeros(len(names.attribute_names), np.int64)
  for t, (_, indices) in enumerate(names.attribute_groups):
    types[indices] = t
  type_names = [name for name, _ in names.attribute_groups]
  contents = dict(category_probabilities=list(names.category_names),
                  attribute_probabilities=list(names.attribute_names),
                  attribute_types=[type_names[t] for t in types],
                  garment_type_probabilities=list(names.garment_type_names),
                  landmarks=list(landmark_slots.SLOT_NAMES))
  path = os.path.join(output_dir, OUTPUT_NAMES)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(contents, f, indent=1)
  return path
