"""Users' own photos, for --mode=predict: found, decoded and cut into the model's crops.

Each photo is decoded into the canvas on the host (as in training); its crops are regions
the jitted predict step resizes and crops on the device. Ten crops (the baseline's: the
four corners and the centre of the image resized to img_size, and their mirror images) or
one centre crop, of the whole photo (the crops' window, see transforms.py). Every batch
has the same number of crops (the last one padded), so that the predict step compiles
once. An unreadable or non-image file is kept, with its error.
"""

import concurrent.futures
import dataclasses
import os
from typing import Iterator, Optional

import numpy as np

from deepfashion_jax.data import annotations
from deepfashion_jax.data import folder
from deepfashion_jax.data import transforms
from deepfashion_jax.data import vocabulary

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


@dataclasses.dataclass(frozen=True)
class OutputNames:
  """What the model's outputs are called."""
  category_names: tuple
  attribute_names: tuple
  attribute_groups: tuple  # ((type name, attribute indices), ...)
  garment_type_names: tuple = vocabulary.GARMENT_TYPE_NAMES


def find_images(paths: str) -> list:
  """The files of a comma-separated list of files and folders (recursed, image suffixes
  only, sorted by path). A named file is taken whatever its suffix (a bad one is reported
  later)."""
  found = []
  for path in (p.strip() for p in paths.split(',')):
    if not path:
      continue
    if os.path.isdir(path):
      found += sorted(os.path.join(parent, f) for parent, _, files in os.walk(path)
                      for f in files if f.lower().endswith(IMAGE_SUFFIXES))
    else:
      found.append(path)
  if not found:
    raise ValueError(f'--images={paths!r} names no image: give image files and/or folders '
                     'that hold some, separated by commas')
  return found


def _labelled_folder(data_config, workdir: str) -> Optional[str]:
  """The DeepFashion folder whose lists name the outputs: config.data.data_dir, or the
  workdir's synthetic folder if training wrote one (never written here)."""
  if data_config.data_dir:
    return folder.data_root(data_config, workdir)
  synthetic = os.path.join(workdir, folder.SYNTHETIC_FOLDER)
  return synthetic if os.path.isfile(os.path.join(synthetic, annotations.ATTR_CLOTH)) else None


def load_output_names(data_config, workdir: str) -> OutputNames:
  """Names from the data folder's list_category_cloth.txt and list_attr_cloth.txt; without
  one, the built-in category names and numbered attributes in one group (their types are
  only known from the list)."""
  root = _labelled_folder(data_config, workdir)
  if root is None:
    count = vocabulary.NUM_ATTRIBUTES
    return OutputNames(vocabulary.CATEGORY_NAMES,
                       tuple(f'attribute {i}' for i in range(count)),
                       (('attributes', np.arange(count)),))
  categories, _ = annotations.read_category_cloth(root)
  attributes, types = annotations.read_attr_cloth(root)
  groups = tuple((name, np.flatnonzero(types == t))
                 for t, name in enumerate(vocabulary.ATTRIBUTE_TYPE_NAMES))
  return OutputNames(tuple(categories), tuple(attributes), groups)


def crops(height: int, width: int, img_size: int, crop_size: int, ten_crop: bool) -> list:
  """The crops of one image: ten (corners, centre and their mirrors of the image resized
  to img_size) or the centre one, as regions of the image."""
  centre = transforms.eval_crop(height, width, img_size, crop_size, 'center_crop')
  if not ten_crop:
    return [centre]
  scale = np.array([width / img_size, height / img_size] * 2, np.float32)
  far = img_size - crop_size
  corners = [transforms.Crop(np.array([x, y, x + crop_size, y + crop_size], np.float32) * scale,
                             False) for x, y in ((0, 0), (far, 0), (0, far), (far, far))]
  unflipped = corners + [centre]
  return unflipped + [dataclasses.replace(c, flip=True) for c in unflipped]


@dataclasses.dataclass
class LoadedImage:
  path: str
  canvas_image: Optional[np.ndarray] = None  # the image as it fits in the canvas
  original_size: tuple = (0, 0)  # height, width of the file's image
  error: str = ''
  crops: list = dataclasses.field(default_factory=list)  # its transforms.Crop, in the batch

  def box_in_pixels(self, crop: transforms.Crop, box: np.ndarray) -> np.ndarray:
    """A box predicted in [0, 1] units of one of its crops -> pixels of the file's image."""
    return crop.box_in_image(box) * self._canvas_to_file()

  def landmarks_in_pixels(self, crop: transforms.Crop, points: np.ndarray) -> np.ndarray:
    """Landmarks (8, 2) predicted in [0, 1] units of one of its crops -> (x, y) pixels of
    the file's image."""
    return (crop.landmarks_in_image(points) + 0.5) * self._canvas_to_file() - 0.5

  def _canvas_to_file(self) -> float:
    """File pixels per canvas pixel (`fit_to_canvas` may have shrunk the image)."""
    return max(self.original_size) / max(self.canvas_image.shape[:2])


def load_image(path: str, canvas_size: int) -> LoadedImage:
  try:
    with open(path, 'rb') as f:
      image = transforms.decode_image(f.read())
  except (OSError, transforms.ImageDecodeError) as e:
    return LoadedImage(path, error=f'{type(e).__name__}: {e}')
  fitted, _ = transforms.fit_to_canvas(image, np.zeros(4, np.float32), canvas_size)
  return LoadedImage(path, fitted, image.shape[:2])


@dataclasses.dataclass
class PhotoBatch:
  images: list  # LoadedImage, in order, unreadable ones included
  batch: Optional[dict]  # the predict step's input; None when no image was readable


class Photos:
  """The photos to predict on, in batches of `images_per_batch` (the last one shorter);
  every batch holds the same number of crops, a multiple of `device_count`."""

  def __init__(self, paths: list, names: OutputNames, data_config, ten_crop: bool,
               images_per_batch: int, device_count: int):
    self.paths, self.names = paths, names
    crop_count = images_per_batch * (10 if ten_crop else 1)
    self.images_per_batch = images_per_batch
    self.crops_per_batch = -(-crop_count // device_count) * device_count
    self._data, self._ten_crop = data_config, ten_crop

  def __len__(self):
    return len(self.paths)

  def batches(self) -> Iterator[PhotoBatch]:
    canvas_size = self._data.canvas_size
    with concurrent.futures.ThreadPoolExecutor(self._data.threads) as pool:
      for start in range(0, len(self.paths), self.images_per_batch):
        images = list(pool.map(lambda p: load_image(p, canvas_size),
                               self.paths[start:start + self.images_per_batch]))
        readable = [image for image in images if not image.error]
        yield PhotoBatch(images, self._batch(readable) if readable else None)

  def _batch(self, images: list) -> dict:
    """The predict step's batch of crops_per_batch crops (the images' crops, then
    padding); sets each image's crops."""
    count, canvas_size = self.crops_per_batch, self._data.canvas_size
    canvas = np.zeros((count, canvas_size, canvas_size, 3), np.uint8)
    window = np.tile(transforms.whole_image(1, 1), (count, 1))
    region = np.tile(np.array([0, 0, 1, 1], np.float32), (count, 1))
    flip = np.zeros(count, bool)
    row = 0
    for image in images:
      height, width = image.canvas_image.shape[:2]
      image.crops = crops(height, width, self._data.img_size, self._data.crop_size,
                          self._ten_crop)
      for crop in image.crops:
        canvas[row, :height, :width] = image.canvas_image
        window[row] = transforms.whole_image(height, width)
        region[row], flip[row] = crop.region, crop.flip
        row += 1
    return dict(canvas=canvas, window=window, region=region, flip=flip)
