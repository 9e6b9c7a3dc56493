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
import struct

import numpy as np
from PIL import Image
import simplejpeg

from deepfashion_jax import errors
from deepfashion_jax.data import image_files
from deepfashion_jax.data import landmark_slots


class ImageDecodeError(errors.DeepFashionError, ValueError):
  """An image file that cannot be decoded (truncated, not an image, unsupported, or more
  pixels than config.data.max_image_pixels)."""


# What PIL raises on a damaged or hostile file, besides OSError (its plug-ins parse headers
# with struct and index into tables the file describes).
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError,
               ZeroDivisionError, struct.error, Image.DecompressionBombError)
_EXIF_ORIENTATION = 0x0112
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white


def decode_image(data: bytes, max_pixels: int = image_files.DEFAULT_MAX_PIXELS,
                 upright: bool = False) -> np.ndarray:
  """JPEG (or anything PIL reads, e.g. PNG under a .jpg name) -> (H, W, 3) uint8 RGB.

  libjpeg-turbo (simplejpeg) first: about twice as fast as PIL; it converts grayscale and
  CMYK to RGB and, in strict mode, refuses truncated files instead of padding them with grey.
  An image of more than `max_pixels` pixels (height x width, from its header) is refused
  before any pixel is decoded. 16-bit grayscale is scaled to 8 bits; transparent pixels
  are composited on white (ALPHA_BACKGROUND).

  upright: turn the image by its EXIF orientation, as a photo viewer shows it (users'
  photos, `photos.py`). The dataset's reader leaves it off: the lists' boxes and landmarks
  are in the stored pixels (DeepFashion's images carry no orientation).
  """
  try:
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
  except ValueError as jpeg_error:
    if data[:2] == b'\xff\xd8':  # a JPEG whose header libjpeg-turbo refused
      raise ImageDecodeError(str(jpeg_error)) from None
    return _decode_with_pil(data, max_pixels, upright)
  _check_pixels(height, width, max_pixels)
  try:
    image = simplejpeg.decode_jpeg(data, colorspace='RGB', strict=True)
  except ValueError as jpeg_error:  # truncated or broken
    raise ImageDecodeError(str(jpeg_error)) from None
  return _turned(image, _orientation(data)) if upright else image


def _check_pixels(height: int, width: int, max_pixels: int):
  if height * width > max_pixels:
    raise ImageDecodeError(f'{width} x {height} pixels, more than '
                           f'config.data.max_image_pixels={max_pixels:,}: not decoded')


def _decode_with_pil(data: bytes, max_pixels: int, upright: bool) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(data)) as image:
      _check_pixels(image.height, image.width, max_pixels)  # before .load() decodes
      image.load()  # here, where a damaged file raises (a PNG's getexif loads it otherwise)
      orientation = _exif_orientation(image) if upright else 1
      return _turned(_to_rgb(image), orientation)
  except ImageDecodeError:
    raise
  except Image.UnidentifiedImageError:
    raise ImageDecodeError('not an image: neither a JPEG nor a format PIL reads') from None
  except _PIL_ERRORS as e:
    raise ImageDecodeError(f'{type(e).__name__}: {e}') from None


def _to_rgb(image: Image.Image) -> np.ndarray:
  """(H, W, 3) uint8: 16-bit (and 32-bit integer) grayscale scaled from 0..65535 to 0..255
  (PIL's convert would saturate it), alpha composited on ALPHA_BACKGROUND."""
  if image.mode.startswith('I'):
    levels = np.asarray(image).clip(0, 65535).astype(np.uint32)  # 65535 * 255 fits
    levels *= 255
    levels += 32767
    levels //= 65535  # rounded to the nearest 8-bit level
    return np.repeat(levels.astype(np.uint8)[..., None], 3, axis=2)
  if image.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in image.info:
    background = Image.new('RGBA', image.size, ALPHA_BACKGROUND + (255,))
    return np.asarray(Image.alpha_composite(background, image.convert('RGBA')).convert('RGB'))
  return np.asarray(image.convert('RGB'))


def _exif_orientation(image: Image.Image) -> int:
  """The EXIF orientation (1 to 8) of an opened image; 1 when it has none or it is damaged."""
  try:
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
  except _PIL_ERRORS:
    return 1
  return orientation if orientation in range(1, 9) else 1


def _orientation(data: bytes) -> int:
  """The EXIF orientation of a JPEG file (its header only)."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      return _exif_orientation(image)
  except _PIL_ERRORS:
    return 1


def _turned(image: np.ndarray, orientation: int) -> np.ndarray:
  """The stored pixels turned upright by an EXIF orientation, as PIL.ImageOps.exif_transpose
  turns them: 2 mirrored, 3 upside down, 4 flipped, 5 transposed, 6 turned a quarter
  clockwise, 7 transversed, 8 turned a quarter anticlockwise."""
  if orientation in (5, 6, 7, 8):
    image = image.transpose(1, 0, 2)  # 5: the transpose; 6, 7 and 8 are it mirrored
  if orientation in (2, 3, 6, 7):
    image = image[:, ::-1]
  if orientation in (3, 4, 7, 8):
    image = image[::-1]
  return np.ascontiguousarray(image)


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


def crop_boxes(bboxes: np.ndarray, regions: np.ndarray, flips: np.ndarray) -> np.ndarray:
  """`crop_box` of a batch at once, the same float32 operations: (B, 4) pixel boxes, (B, 4)
  crop regions and (B,) flips -> (B, 4) boxes in [0, 1] coordinates of their crops.

  The pipeline converts a batch's boxes and landmarks here, in its collation, rather than
  per example: a dozen NumPy calls per batch instead of per image (benchmarks/RESULTS.md).
  """
  regions = np.asarray(regions, np.float32)
  x0, y0, x1, y1 = (regions[:, i:i + 1] for i in range(4))
  scale = np.concatenate([x1 - x0, y1 - y0] * 2, axis=1)
  boxes = (np.asarray(bboxes, np.float32) - np.concatenate([x0, y0, x0, y0], axis=1)) / scale
  boxes = np.clip(boxes, 0.0, 1.0)
  mirrored = np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], axis=1)
  return np.where(np.asarray(flips, bool)[:, None], mirrored, boxes)


def crop_landmarks_batch(xy: np.ndarray, visibility: np.ndarray, regions: np.ndarray,
                         flips: np.ndarray, scales: np.ndarray):
  """`crop_landmarks` of a batch at once, the same float64 operations: xy (B, 8, 2),
  visibility (B, 8), regions (B, 4), flips (B,), scales (B, 2) -> landmarks (B, 8, 2)
  float32 and landmark_visible (B, 8) bool."""
  visibility = np.asarray(visibility)
  regions = np.asarray(regions, np.float64)
  corner, size = regions[:, None, :2], regions[:, None, 2:] - regions[:, None, :2]
  centres = (np.asarray(xy, np.float64) + 0.5) * np.asarray(scales, np.float64)[:, None, :]
  points = (centres - corner) / size
  inside = ((points >= 0) & (points <= 1)).all(axis=2)
  visible = (visibility == landmark_slots.VISIBLE) & inside
  absent = visibility == landmark_slots.ABSENT
  points = np.clip(points, 0.0, 1.0)
  order = list(landmark_slots.FLIP_ORDER)
  flips = np.asarray(flips, bool)
  mirrored = np.stack([1 - points[:, order, 0], points[:, order, 1]], axis=2)
  points = np.where(flips[:, None, None], mirrored, points)
  visible = np.where(flips[:, None], visible[:, order], visible)
  absent = np.where(flips[:, None], absent[:, order], absent)
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
