"""Users' own photos, for --mode=predict: found, decoded and fitted into the canvas.

Each photo is decoded and fitted into the canvas on the host (as in training: a photo
larger than the canvas is shrunk into it by `transforms.fit_to_canvas`); its crops are cut
and their outputs averaged on the device (`ten_crop.py`). Every batch holds the same number
of photos (the last one padded), so that the jitted step compiles once. An unreadable or
non-image file is kept, with its error; so is a file that is not a regular file (a FIFO, a
device such as /dev/zero, a folder: never opened for reading) or is over the byte or pixel
cap (config.data.max_image_bytes, max_image_pixels). A photo is read upright: its EXIF
orientation applied, as a photo viewer shows it (`transforms.decode_image`).
"""

import concurrent.futures
import dataclasses
import functools
import os
from typing import Iterator, Optional

import numpy as np

from deepfashion_jax.data import annotations
from deepfashion_jax.data import folder
from deepfashion_jax.data import image_files
from deepfashion_jax.data import trained_on
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


def names_of(words: trained_on.Vocabulary) -> OutputNames:
  """The OutputNames of a vocabulary: attributes grouped by their type."""
  types = np.asarray(words.attribute_types, np.int64)
  groups = tuple((name, np.flatnonzero(types == t))
                 for t, name in enumerate(words.attribute_type_names))
  return OutputNames(tuple(words.category_names), tuple(words.attribute_names), groups,
                     tuple(words.garment_type_names))


def load_output_names(data_config, workdir: str) -> OutputNames:
  """The names the run recorded in the workdir (`trained_on.py`: no data folder needed);
  without a record, those of config.data.data_dir's or the workdir's synthetic folder's
  list_category_cloth.txt and list_attr_cloth.txt. Without either, TrainedOnError saying
  what to pass: numbered names would look like an answer."""
  record = trained_on.read(workdir)
  if record is not None:
    return names_of(record.vocabulary)
  root = _labelled_folder(data_config, workdir)
  if root is None:
    raise trained_on.TrainedOnError(
        f'{workdir} does not say what its model\'s outputs are called (it has no '
        f'{trained_on.RECORD_NAME}: trained before runs recorded it, or converted from PyTorch '
        'without config.data.data_dir). Set --config.data.data_dir=<the DeepFashion folder it '
        'was trained on>: its Anno/list_category_cloth.txt and Anno/list_attr_cloth.txt name '
        'the outputs.')
  return names_of(trained_on.read_vocabulary(root))


@dataclasses.dataclass
class LoadedImage:
  path: str
  canvas_image: Optional[np.ndarray] = None  # the image as it fits in the canvas
  original_size: tuple = (0, 0)  # height, width of the file's image
  error: str = ''


def read_photo(path: str, canvas_size: int, max_bytes: int = image_files.DEFAULT_MAX_BYTES,
               max_pixels: int = image_files.DEFAULT_MAX_PIXELS) -> tuple:
  """(the photo fitted into the canvas, (height, width) of the photo), read upright: its
  EXIF orientation applied, so that its size and the outputs' pixels are the upright
  photo's. Raises ImageFileError (not a regular file: a FIFO, a device, a folder; more than
  max_bytes; unreadable) or ImageDecodeError (not an image, more than max_pixels pixels)."""
  image = transforms.decode_image(image_files.read(path, max_bytes), max_pixels, upright=True)
  fitted, _ = transforms.fit_to_canvas(image, np.zeros(4, np.float32), canvas_size)
  return fitted, image.shape[:2]


def load_image(path: str, canvas_size: int, max_bytes: int = image_files.DEFAULT_MAX_BYTES,
               max_pixels: int = image_files.DEFAULT_MAX_PIXELS) -> LoadedImage:
  """`read_photo`'s photo, or its error: one photo never ends the run."""
  try:
    fitted, size = read_photo(path, canvas_size, max_bytes, max_pixels)
  except (image_files.ImageFileError, transforms.ImageDecodeError) as e:
    return LoadedImage(path, error=f'{type(e).__name__}: {e}')
  return LoadedImage(path, fitted, size)


@dataclasses.dataclass
class PhotoBatch:
  images: list  # LoadedImage, in order, unreadable ones included
  batch: Optional[dict]  # `predict.photo_outputs`' input; None when no image was readable


class Photos:
  """The photos to predict on, in batches of `images_per_batch` (the last one shorter);
  every batch's arrays hold the same number of photos, a multiple of `device_count`."""

  def __init__(self, paths: list, names: OutputNames, data_config, images_per_batch: int,
               device_count: int):
    self.paths, self.names = paths, names
    self.images_per_batch = images_per_batch
    self.rows_per_batch = -(-images_per_batch // device_count) * device_count
    self._data = data_config

  def __len__(self):
    return len(self.paths)

  def batches(self) -> Iterator[PhotoBatch]:
    load = functools.partial(load_image, canvas_size=self._data.canvas_size,
                             max_bytes=self._data.max_image_bytes,
                             max_pixels=self._data.max_image_pixels)
    with concurrent.futures.ThreadPoolExecutor(self._data.threads) as pool:
      for start in range(0, len(self.paths), self.images_per_batch):
        images = list(pool.map(load,
                               self.paths[start:start + self.images_per_batch]))
        readable = [image for image in images if not image.error]
        yield PhotoBatch(images, self._batch(readable) if readable else None)

  def _batch(self, images: list) -> dict:
    """`predict.photo_outputs`' batch: the readable images, then padding (1-pixel black
    photos); canvas (rows, S, S, 3) uint8, fitted and size (rows, 2) int32, each photo's
    (height, width) in the canvas and in its file."""
    count, canvas_size = self.rows_per_batch, self._data.canvas_size
    canvas = np.zeros((count, canvas_size, canvas_size, 3), np.uint8)
    fitted, size = np.ones((count, 2), np.int32), np.ones((count, 2), np.int32)
    for row, image in enumerate(images):
      height, width = image.canvas_image.shape[:2]
      canvas[row, :height, :width] = image.canvas_image
      fitted[row], size[row] = (height, width), image.original_size
    return dict(canvas=canvas, fitted=fitted, size=size)
