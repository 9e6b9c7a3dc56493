"""DeepFashion's Category and Attribute Prediction benchmark as a TFDS dataset (ArrayRecord).

Reading 289,222 small files from a network filesystem is slow and fragile; prepared once,
the dataset is a few large ArrayRecord files that grain reads with random access
(`sources.TfdsSource`). The builder reads the lists with this project's annotation reader
(the same index as the folder source) and stores each image's JPEG bytes as they are on
disk (no re-encoding: the pipeline decodes them exactly as it decodes the files), in the
official partition's order (no shuffling: position p of a split is row p of
`index.split_indices(split)`), so both sources give the same examples in the same order.

  python main.py --mode=prepare --config=configs/default.py --workdir=DIR \\
      --config.data.data_dir=/path/to/DeepFashion [--config.data.tfds_dir=OUT]
"""

import contextlib
import os
import time

from absl import logging
import numpy as np
import simplejpeg
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle

from deepfashion_jax.data import annotations
from deepfashion_jax.data import image_files
from deepfashion_jax.data import vocabulary

NUM_ATTRIBUTES = vocabulary.NUM_ATTRIBUTES  # the benchmark's; stored bit-packed
_ATTRIBUTE_BYTES = -(-NUM_ATTRIBUTES // 8)
# TFDS buffers examples in memory up to this size before it spills them to disk; its
# default (1 GB) would hold a sixth of the real images (memory figures in
# benchmarks/RESULTS.md).
_WRITER_MEMORY_BYTES = 128 << 20
_LOG_EVERY_SECONDS = 30


class DeepFashionCategoryAttribute(tfds.core.GeneratorBasedBuilder):
  """DeepFashion: Category and Attribute Prediction (50 categories, 1,000 attributes)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'The official partition; JPEG bytes as released.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  DeepFashion cannot be downloaded automatically. Ask for it on
  https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion.html (Category and Attribute
  Prediction Benchmark), then lay the files out in one folder, which is the manual dir
  (main.py's --config.data.data_dir):

    Anno/list_category_cloth.txt  Anno/list_category_img.txt  Anno/list_attr_cloth.txt
    Anno/list_attr_img.txt        Anno/list_bbox.txt          Anno/list_landmarks.txt
    Eval/list_eval_partition.txt
    Img/img/<Product_Name>/img_00000001.jpg ...   (img.zip unpacked; Img/ or img/)
  """

  def __init__(self, *, index: annotations.DeepFashionIndex = None,
               max_image_bytes: int = image_files.DEFAULT_MAX_BYTES, **kwargs):
    """index: the annotation index to write (default: read from the manual dir);
    max_image_bytes: larger files are stored as missing (`image_files.read`)."""
    self._index, self._max_image_bytes = index, max_image_bytes
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    bits = lambda: tfds.features.Tensor(shape=(_ATTRIBUTE_BYTES,), dtype=np.uint8,
                                        encoding=tfds.features.Encoding.BYTES)
    return self.dataset_info_from_configs(
        description=('Category and Attribute Prediction: each image with its category, '
                     'garment type, 1,000 attribute flags (bit-packed, np.packbits order) '
                     'and their unknown mask, bounding box and landmarks.'),
        features=tfds.features.FeaturesDict({
            'image_bytes': tfds.features.Tensor(shape=(), dtype=np.object_),  # b'' if missing
            'file_name': tfds.features.Text(),  # as in the lists: img/<Product>/img_N.jpg
            'index': tfds.features.Tensor(shape=(), dtype=np.int64),  # row of the lists
            'category': tfds.features.Tensor(shape=(), dtype=np.int32),  # 0-based
            'category_type': tfds.features.Tensor(shape=(), dtype=np.int32),
            'attribute_positive_bits': bits(),
            'attribute_unknown_bits': bits(),
            'bbox': tfds.features.Tensor(shape=(4,), dtype=np.int32),  # x1, y1, x2, y2 px
            'image_size': tfds.features.Tensor(shape=(2,), dtype=np.int32),  # h, w; 0 if bad
            'landmark_visibility': tfds.features.Tensor(shape=(8,), dtype=np.int8),
            'landmark_xy': tfds.features.Tensor(shape=(8, 2), dtype=np.int16),
            'landmark_garment_type': tfds.features.Tensor(shape=(), dtype=np.int8),
        }),
        disable_shuffling=True,
        homepage='https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion.html',
    )

  def _split_generators(self, dl_manager):
    index = self._index
    if index is None:
      index = annotations.load_deepfashion(os.fspath(dl_manager.manual_dir))
    return {split: self._generate_examples(index, split) for split in vocabulary.SPLIT_NAMES}

  def _generate_examples(self, index: annotations.DeepFashionIndex, split: str):
    rows = index.split_indices(split)
    image_dir = index.image_dir()
    inside = image_files.resolved_folders(image_dir, os.path.join(image_dir, 'img'))
    progress = _Progress(split, len(rows))
    for position, row in enumerate(rows):
      # Keys spread over TFDS's 128-bit key space in order: without shuffling they set the
      # order, and spread they fill all of its temporary buckets instead of one.
      key = (position << 128) // max(len(rows), 1)
      yield key, _example(index, int(row), image_dir, inside, self._max_image_bytes)
      progress.update(position + 1)


def _example(index: annotations.DeepFashionIndex, row: int, image_dir: str, inside: tuple,
             max_image_bytes: int) -> dict:
  """One image's example; a missing, unreadable or refused file (`image_files.read`) is
  stored as b'', which the pipeline treats as the folder source treats a missing file."""
  path = str(index.image_paths[row])
  try:
    image_bytes = image_files.read(os.path.join(image_dir, path), max_image_bytes, inside)
  except image_files.ImageFileError as e:
    logging.warning('Storing %s as missing: %s', path, e)
    image_bytes = b''
  landmarks = index.landmark_visibility is not None
  return {
      'image_bytes': image_bytes, 'file_name': path, 'index': row,
      'category': index.category[row], 'category_type': index.category_type[row],
      'attribute_positive_bits': np.packbits(index.attribute_positive[row]),
      'attribute_unknown_bits': np.packbits(index.attribute_unknown[row]),
      'bbox': index.bbox[row], 'image_size': _image_size(image_bytes),
      'landmark_visibility': (index.landmark_visibility[row] if landmarks
                              else np.full(8, -1, np.int8)),
      'landmark_xy': index.landmark_xy[row] if landmarks else np.zeros((8, 2), np.int16),
      'landmark_garment_type': index.landmark_garment_type[row] if landmarks else -1,
  }


def _image_size(image_bytes: bytes) -> np.ndarray:
  """(height, width) from the JPEG header; (0, 0) when it is not a readable JPEG."""
  try:
    height, width, _, _ = simplejpeg.decode_jpeg_header(image_bytes)
  except (ValueError, RuntimeError):
    return np.zeros(2, np.int32)
  return np.array([height, width], np.int32)


class _Progress:
  """Logs examples written, the rate and the time left, every _LOG_EVERY_SECONDS."""

  def __init__(self, split: str, total: int):
    self.split, self.total = split, total
    self.start = self.last_log = time.perf_counter()

  def update(self, done: int):
    now = time.perf_counter()
    if now - self.last_log < _LOG_EVERY_SECONDS and done < self.total:
      return
    self.last_log = now
    rate = done / max(now - self.start, 1e-9)
    left = (self.total - done) / max(rate, 1e-9)
    logging.info('Preparing %s: %d / %d images (%.0f%%), %.0f images/s, about %s left',
                 self.split, done, self.total, 100 * done / max(self.total, 1), rate,
                 _duration(left))


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours} h {minutes} min' if hours else f'{minutes} min {seconds} s'


@contextlib.contextmanager
def _writer_memory(limit_bytes: int):
  """Lowers TFDS's in-memory example buffer for the duration (a module constant there)."""
  previous = tfds_shuffle.MAX_MEM_BUFFER_SIZE
  tfds_shuffle.MAX_MEM_BUFFER_SIZE = limit_bytes
  try:
    yield
  finally:
    tfds_shuffle.MAX_MEM_BUFFER_SIZE = previous


def prepare(index: annotations.DeepFashionIndex, tfds_dir: str,
            max_image_bytes: int = image_files.DEFAULT_MAX_BYTES) -> str:
  """Writes the dataset of `index` (its official partition) as ArrayRecord files under
  tfds_dir; returns the dataset's folder. Already prepared: nothing to do. Image files are
  read by `image_files.read` (at most max_image_bytes, regular files in the image folder)."""
  if index.num_attributes != NUM_ATTRIBUTES:
    raise ValueError(f'{index.root} lists {index.num_attributes} attributes; the TFDS dataset '
                     f'stores the benchmark\'s {NUM_ATTRIBUTES}')
  if not all(len(index.split_indices(split)) for split in vocabulary.SPLIT_NAMES):
    raise ValueError('The TFDS dataset needs the official train/val/test partition '
                     '(config.data.partition=official) with images in every split.')
  builder = DeepFashionCategoryAttribute(data_dir=tfds_dir, index=index,
                                         max_image_bytes=max_image_bytes,
                                         file_format='array_record')
  total = len(index)
  logging.info('Preparing the TFDS dataset of %s (%d images) in %s', index.root, total,
               builder.data_dir)
  with _writer_memory(_WRITER_MEMORY_BYTES):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=index.root))
  logging.info('TFDS dataset ready: %s', builder.data_dir)
  return builder.data_dir


def load_builder(tfds_dir: str) -> DeepFashionCategoryAttribute:
  """The prepared dataset in tfds_dir, or a clear error naming the command that makes it."""
  builder = DeepFashionCategoryAttribute(data_dir=tfds_dir, file_format='array_record')
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'No prepared DeepFashion TFDS dataset in {tfds_dir} (looked for {builder.data_dir}). '
        'Write it once with: python main.py --mode=prepare --config=... '
        f'--config.data.data_dir=DIR --config.data.tfds_dir={tfds_dir}')
  return builder
