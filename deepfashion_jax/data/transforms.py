"""Host-side transforms: pure NumPy functions of one example.

The expensive pixel work is split so that a CPU core does as little as possible per image:
the host decodes the JPEG and copies it into a fixed-size canvas; it also draws the random
crop and flip and moves the box and the landmarks accordingly. The resize, crop and flip of
the pixels happen on the device, in the jitted step (`device_transforms.py`), as two small
matrix products per image. `resize_crop_flip` here is the same resampling done by PIL on
the host: the baseline's own operation, used as the reference in the tests.

A crop is described by its *region*: the rectangle (x0, y0, x1, y1) of the original image,
in pixels, that lands on the output square. Resizing to img_size x img_size and then
cropping crop_size at (left, top) is the region
(left * w / img_size, top * h / img_size, (left + crop_size) * w / img_size, ...);
PIL's bilinear resampling of that region equals resize-then-crop bit for bit.

A crop reads the pixels of a *window* of the image: the whole image (config.data.crop
'none', the baseline's), or the ground-truth box enlarged by config.data.crop_margin
pixels on each side ('gt_box', the published protocol), out to whole pixels and clipped to
the image. A crop of a window is drawn as if the window were the image (`random_train_crop`
and `eval_crop` of its size), then shifted by the window's top-left corner (`in_window`);
the resampling never reads outside the window, so that the result is PIL's crop to the
window followed by the usual resize, crop and flip (`resize_crop_flip`, the reference).
"""

import dataclasses
import io

import numpy as np
from PIL import Image
import simplejpeg

from deepfashion_jax import errors
from deepfashion_jax.data import landmark_slots


class ImageDecodeError(errors.DeepFashionError, ValueError):
  """An image file that cannot be decoded (truncated, not an image, unsupported)."""


def decode_image(data: bytes) -> np.ndarray:
  """JPEG (or anything PIL reads, e.g. PNG under a .jpg name) -> (H, W, 3) uint8 RGB.

  libjpeg-turbo (simplejpeg) first: about twice as fast as PIL; it converts grayscale and
  CMYK to RGB and, in strict mode, refuses truncated files instead of padding them with grey.
  """
  try:
    return simplejpeg.decode_jpeg(data, colorspace='RGB', strict=True)
  except ValueError as jpeg_error:
    if data[:2] == b'\xff\xd8':  # a JPEG that libjpeg-turbo refused: truncated or broken
      raise ImageDecodeError(str(jpeg_error)) from None
  try:
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert('RGB'))
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ImageDecodeError(str(e)) from None


def clip_box_to_image(bbox: np.ndarray, height: int, width: int) -> np.ndarray:
  """A pixel box (x1, y1, x2, y2) clipped to the image (0, 0, width, height), as float32.

  The lists' boxes are data, and a few may be empty or run past their image (the
  annotation reader warns about them); what is left is ordered (x2 >= x1, y2 >= y1), so
  an empty box stays empty through the crop and the flip (`box_area` 0).
  """
  x1, x2 = np.clip(np.asarray(bbox, np.float32)[[0, 2]], 0, width)
  y1, y2 = np.clip(np.asarray(bbox, np.float32)[[1, 3]], 0, height)
  return np.array([x1, y1, max(x1, x2), max(y1, y2)], np.float32)


def box_area(bbox: np.ndarray) -> float:
  """The area of a box (x1, y1, x2, y2); 0 when it is empty or inverted."""
  return float(max(bbox[2] - bbox[0], 0) * max(bbox[3] - bbox[1], 0))


def fit_to_canvas(image: np.ndarray, bbox: np.ndarray, canvas_size: int):
  """Shrinks an image larger than the canvas (aspect kept) and its box; others pass as is.

  DeepFashion's images are at most 300 x 300, the default canvas; users' own may be larger.
  """
  height, width = image.shape[:2]
  scale = canvas_size / max(height, width)
  if scale >= 1:
    return image, bbox
  size = (max(1, round(width * scale)), max(1, round(height * scale)))
  resized = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
  factors = np.array([size[0] / width, size[1] / height] * 2, np.float32)
  return resized, bbox * factors


EVAL_CROPS = ('resize', 'center_crop')  # config.data.eval_crop
CROPS = ('none', 'gt_box')  # config.data.crop: the window a crop is drawn from


def whole_image(height: int, width: int) -> np.ndarray:
  """The window (x0, y0, x1, y1) of a whole image, int32."""
  return np.array([0, 0, width, height], np.int32)


def box_window(bbox: np.ndarray, margin: float, height: int, width: int) -> np.ndarray:
  """A 'gt_box' window: the box enlarged by `margin` pixels on each side, out to whole
  pixels, clipped to the image; the whole image when the box is empty (no box to cut to)."""
  if box_area(bbox) <= 0:
    return whole_image(height, width)
  x1, y1 = np.floor(np.asarray(bbox[:2], np.float64) - margin)
  x2, y2 = np.ceil(np.asarray(bbox[2:], np.float64) + margin)
  return np.array([max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)], np.int32)


def window_size(window: np.ndarray) -> tuple:
  """(height, width) of a window."""
  return int(window[3] - window[1]), int(window[2] - window[0])


@dataclasses.dataclass(frozen=True)
class Crop:
  region: np.ndarray  # (4,) float32: x0, y0, x1, y1 in original-image pixels
  flip: bool  # mirror horizontally after cropping


def random_train_crop(rng: np.random.Generator, height: int, width: int, img_size: int,
                      crop_size: int, random_flip: bool = True) -> Crop:
  """The baseline's training augmentation: resize to img_size, random crop_size, flip p 0.5
  (unless not `random_flip`: the flip is drawn all the same, so the crops stay the same)."""
  left = int(rng.integers(0, img_size - crop_size + 1))
  top = int(rng.integers(0, img_size - crop_size + 1))
  flip = bool(rng.random() < 0.5) and random_flip
  scale_x, scale_y = width / img_size, height / img_size
  region = np.array([left * scale_x, top * scale_y, (left + crop_size) * scale_x,
                     (top + crop_size) * scale_y], np.float32)
  return Crop(region, flip)


def eval_crop(height: int, width: int, img_size: int, crop_size: int, mode: str) -> Crop:
  """'resize': the whole image to crop_size (the baseline); 'center_crop': resize to
  img_size, then the centre crop_size."""
  if mode == 'resize':
    return Crop(np.array([0, 0, width, height], np.float32), False)
  if mode == 'center_crop':
    offset = (img_size - crop_size) / 2
    scale_x, scale_y = width / img_size, height / img_size
    return Crop(np.array([offset * scale_x, offset * scale_y, (offset + crop_size) * scale_x,
                          (offset + crop_size) * scale_y], np.float32), False)
  raise ValueError(f'eval crop mode must be one of {EVAL_CROPS}, got {mode!r}')


def in_window(crop: Crop, window: np.ndarray) -> Crop:
  """A crop drawn on a window's own pixels -> the same crop in pixels of the image."""
  x0, y0 = np.asarray(window[:2], np.float32)
  return Crop(crop.region + np.array([x0, y0, x0, y0], np.float32), crop.flip)


def crop_box(bbox: np.ndarray, crop: Crop) -> np.ndarray:
  """A pixel box (x1, y1, x2, y2) of the original -> [0, 1] coordinates of the crop.

  Clipped to the crop (the baseline did not clip: its x2, y2 could leave [0, 1]).
  """
  x0, y0, x1, y1 = crop.region
  scale = np.array([x1 - x0, y1 - y0] * 2, np.float32)
  box = (np.asarray(bbox, np.float32) - np.array([x0, y0, x0, y0], np.float32)) / scale
  box = np.clip(box, 0.0, 1.0)
  if crop.flip:
    box = np.array([1 - box[2], box[1], 1 - box[0], box[3]], np.float32)
  return box


def crop_landmarks(xy: np.ndarray, visibility: np.ndarray, crop: Crop,
                   scale=(1.0, 1.0)):
  """Landmarks in the file's pixels -> [0, 1] coordinates of the crop, and which are seen.

  xy (8, 2) and visibility (8,) are in slot order (`landmark_slots`). A landmark (x, y)
  names the pixel at column x, row y: it sits at that pixel's centre, so that a flip
  takes it to the mirrored pixel. `scale` is (x, y) canvas pixels per file pixel
  (`fit_to_canvas` shrinks large images), the crop's region is in canvas pixels. A flip
  mirrors x and swaps each left/right pair of slots.

  Returns landmarks (8, 2) float32, clipped to [0, 1] (absent slots 0), and
  landmark_visible (8,) bool: present, visible in the file (not occluded or truncated)
  and inside the crop.
  """
  visibility = np.asarray(visibility)
  x0, y0, x1, y1 = np.asarray(crop.region, np.float64)
  centres = (np.asarray(xy, np.float64) + 0.5) * np.asarray(scale, np.float64)
  points = (centres - (x0, y0)) / (x1 - x0, y1 - y0)
  inside = ((points >= 0) & (points <= 1)).all(axis=1)
  visible = (visibility == landmark_slots.VISIBLE) & inside
  absent = visibility == landmark_slots.ABSENT
  points = np.clip(points, 0.0, 1.0)
  if crop.flip:
    order = list(landmark_slots.FLIP_ORDER)
    points = np.column_stack([1 - points[order, 0], points[order, 1]])
    visible, absent = visible[order], absent[order]
  points[absent] = 0.0
  return points.astype(np.float32), visible


def resize_crop_flip(image: np.ndarray, crop: Crop, out_size: int,
                     window: np.ndarray | None = None) -> np.ndarray:
  """The crop's pixels by PIL's bilinear resampling: the baseline's resize, crop and flip,
  after PIL's crop to the window (default: the whole image)."""
  if window is None:
    window = whole_image(*image.shape[:2])
  x0, y0, x1, y1 = (int(v) for v in window)
  region = crop.region - np.array([x0, y0, x0, y0], np.float32)
  resized = Image.fromarray(image[y0:y1, x0:x1]).resize(
      (out_size, out_size), Image.BILINEAR, box=tuple(float(v) for v in region))
  pixels = np.asarray(resized)
  return pixels[:, ::-1] if crop.flip else pixels
