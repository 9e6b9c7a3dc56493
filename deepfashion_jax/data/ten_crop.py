"""The crops of a photo that predict and export read, and the photo's outputs averaged
over them: one implementation in jnp, which predict runs jitted (`predict.photo_outputs`)
and export traces into its SavedModel (jax2tf).

Ten crops (the baseline's: the four corners and the centre of the photo resized to
img_size, and their mirror images) or the centre one, as regions of the photo in the
canvas (see transforms.py for regions and windows: here the window is the whole photo).
The crops' logits are averaged, then turned into probabilities; their boxes and landmarks
are mapped back to the photo's pixels first (a mirrored crop's mirrored back, its left and
right slots swapped) and then averaged, and so are the landmarks' heatmap peaks.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from deepfashion_jax.data import landmark_slots


@dataclasses.dataclass(frozen=True)
class Options:
  """What the crops and the averaging need to know (static under jit)."""
  img_size: int  # the photo is resized to img_size x img_size ...
  crop_size: int  # ... and cut into crops of crop_size
  ten_crop: bool  # the ten crops, else the centre one
  temperature: float  # the category softmax's

  @classmethod
  def from_config(cls, config, ten_crop: bool) -> 'Options':
    return cls(config.data.img_size, config.data.crop_size, ten_crop,
               config.predict.temperature)


def crop_regions(fitted, options: Options):
  """(B, N, 4) float32 regions (x0, y0, x1, y1) of each photo's N crops in canvas pixels,
  and their (N,) flips (NumPy: the same for every photo); `fitted`: (B, 2) int each
  photo's (height, width) in the canvas."""
  img, crop = options.img_size, options.crop_size
  centre, far = (img - crop) / 2, img - crop
  corners = ((0, 0), (far, 0), (0, far), (far, far)) if options.ten_crop else ()
  # The crops in pixels of the photo resized to img_size, then scaled to the photo's.
  in_resized = np.array([[x, y, x + crop, y + crop]
                         for x, y in corners + ((centre, centre),)], np.float32)
  height = fitted[:, 0].astype(jnp.float32)
  width = fitted[:, 1].astype(jnp.float32)
  scale = jnp.stack([width / img, height / img] * 2, axis=-1)[:, None]  # (B, 1, 4)
  regions = in_resized * scale
  if not options.ten_crop:
    return regions, np.zeros(1, bool)
  return jnp.concatenate([regions, regions], axis=1), np.repeat([False, True], 5)


def crop_batch(canvas, fitted, regions, flips) -> dict:
  """The predict step's batch (`device_transforms.batch_images`) of B photos' N crops,
  photo-major: canvas (B, S, S, 3) uint8 with each photo at the top left."""
  crops = len(flips)
  window = jnp.stack([jnp.zeros_like(fitted[:, 0]), jnp.zeros_like(fitted[:, 0]),
                      fitted[:, 1], fitted[:, 0]], axis=-1).astype(jnp.int32)
  return dict(canvas=jnp.repeat(canvas, crops, axis=0),
              window=jnp.repeat(window, crops, axis=0),
              region=regions.reshape(-1, 4),
              flip=jnp.broadcast_to(jnp.asarray(flips), regions.shape[:2]).reshape(-1))


def boxes_in_photo(boxes, regions, flips, to_photo):
  """(B, N, 4) boxes in [0, 1] units of the crops -> pixels of the photos
  (`transforms.crop_box`'s inverse, times each photo's `to_photo`: (B,) file pixels per
  canvas pixel)."""
  x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
  x1, x2 = jnp.where(flips, 1 - x2, x1), jnp.where(flips, 1 - x1, x2)
  x0, y0, x_end, y_end = (regions[..., i] for i in range(4))
  width, height = x_end - x0, y_end - y0
  in_canvas = jnp.stack([x0 + x1 * width, y0 + y1 * height, x0 + x2 * width,
                         y0 + y2 * height], axis=-1)
  return in_canvas * to_photo[:, None, None]


def landmarks_in_photo(points, regions, flips, to_photo):
  """(B, N, 8, 2) points in [0, 1] units of the crops, in slot order -> (x, y) pixels of
  the photos, as list_landmarks.txt counts them (the pixel's column and row):
  `transforms.crop_landmarks`' inverse, a mirrored crop's slots swapped back."""
  mirrored = points[:, :, landmark_slots.FLIP_ORDER]
  mirrored = jnp.stack([1 - mirrored[..., 0], mirrored[..., 1]], axis=-1)
  points = jnp.where(flips[:, None, None], mirrored, points)
  origin = regions[:, :, None, :2]
  size = regions[:, :, None, 2:] - origin
  # A landmark sits at its pixel's centre: + 0.5 in pixels, in the canvas's and the file's.
  return (points * size + origin) * to_photo[:, None, None, None] - 0.5


_PER_CROP = ('category_logits', 'attribute_logits', 'box', 'landmarks', 'landmark_peaks',
             'garment_type_logits')  # the predict step's outputs that are averaged


def average(outputs: dict, regions, flips, fitted, photo_size, temperature: float) -> dict:
  """The predict step's outputs of B photos' N crops (photo-major rows) -> each photo's:
  category_probabilities, attribute_probabilities, and those of the model's other
  branches: box (clipped to the photo), landmarks and landmark_peaks,
  garment_type_probabilities. `fitted` and `photo_size`: (B, 2) (height, width) of each
  photo in the canvas and in its file."""
  flips = jnp.asarray(flips)
  rows = {k: v.reshape((-1, len(flips)) + v.shape[1:]) for k, v in outputs.items()
          if k in _PER_CROP}
  photo_size = photo_size.astype(jnp.float32)
  to_photo = photo_size.max(axis=-1) / fitted.max(axis=-1).astype(jnp.float32)
  results = dict(
      category_probabilities=jax.nn.softmax(rows['category_logits'].mean(axis=1)
                                            / temperature),
      attribute_probabilities=jax.nn.sigmoid(rows['attribute_logits'].mean(axis=1)))
  if 'box' in rows:
    box = boxes_in_photo(rows['box'], regions, flips, to_photo).mean(axis=1)
    height, width = photo_size[:, 0:1], photo_size[:, 1:2]
    results['box'] = jnp.clip(box, 0, jnp.concatenate([width, height] * 2, axis=-1))
  if 'landmarks' in rows:
    results['landmarks'] = landmarks_in_photo(rows['landmarks'], regions, flips,
                                              to_photo).mean(axis=1)
    peaks = rows['landmark_peaks']
    results['landmark_peaks'] = jnp.where(
        flips[:, None], peaks[:, :, landmark_slots.FLIP_ORDER], peaks).mean(axis=1)
  if 'garment_type_logits' in rows:
    results['garment_type_probabilities'] = jax.nn.softmax(
        rows['garment_type_logits'].mean(axis=1))
  return results
