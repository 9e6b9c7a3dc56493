"""Host-side transforms: pure NumPy functions of one example.

The expensive pixel work is split so that a CPU core does as little as possible per image:
the host decodes the JPEG and copies it into a fixed-size canvas; it also draws the random
crop and flip and moves the box accordingly. The resize, crop and flip of the pixels happen
on the device, in the jitted step (`device_transforms.py`), as two small matrix products per
image. `resize_crop_flip` here is the same resampling done by PIL on the host: the
baseline's own operation, used as the reference in the tests.

A crop is described by its *region*: the rectangle (x0, y0, x1, y1) of the original image,
in pixels, that lands on the output square. Resizing to img_size x img_size and then
cropping crop_size at (left, top) is the region
(left * w / img_size, top * h / img_size, (left + crop_size) * w / img_size, ...);
PIL's bilinear resampling of that region equals resize-then-crop bit for bit.
"""

import dataclasses
import io

import numpy as np
from PIL import Image
import simplejpeg


class ImageDecodeError(ValueError):
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


@dataclasses.dataclass(frozen=True)
class Crop:
  region: np.ndarray  # (4,) float32: x0, y0, x1, y1 in original-image pixels
  flip: bool  # mirror horizontally after cropping

  def box_in_image(self, box: np.ndarray) -> np.ndarray:
    """A box in [0, 1] units of the crop -> pixels of the image: `crop_box`'s inverse."""
    x1, y1, x2, y2 = box
    if self.flip:
      x1, x2 = 1 - x2, 1 - x1
    x0, y0, x_end, y_end = self.region
    width, height = x_end - x0, y_end - y0
    return np.array([x0 + x1 * width, y0 + y1 * height, x0 + x2 * width, y0 + y2 * height],
                    np.float64)


def random_train_crop(rng: np.random.Generator, height: int, width: int, img_size: int,
                      crop_size: int) -> Crop:
  """The baseline's training augmentation: resize to img_size, random crop_size, flip p 0.5."""
  left = int(rng.integers(0, img_size - crop_size + 1))
  top = int(rng.integers(0, img_size - crop_size + 1))
  flip = bool(rng.random() < 0.5)
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


def resize_crop_flip(image: np.ndarray, crop: Crop, out_size: int) -> np.ndarray:
  """The crop's pixels by PIL's bilinear resampling: the baseline's resize, crop and flip."""
  resized = Image.fromarray(image).resize((out_size, out_size), Image.BILINEAR,
                                          box=tuple(float(v) for v in crop.region))
  pixels = np.asarray(resized)
  return pixels[:, ::-1] if crop.flip else pixels
