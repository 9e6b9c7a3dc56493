"""Random-access sources of DeepFashion examples, for grain.

A source's record is what the transforms need and nothing decoded: the image file's bytes
as stored (None when the file is missing or refused, `image_files.read`, and then
image_error says why), its path for messages, the example's row in the
annotation index, its position in the source, the labels (the 1,000 attribute flags
bit-packed, `np.packbits` order), the box in pixels and the landmarks in slot order
(`landmark_slots`: xy (8, 2) float32 pixels, visibility (8,) int8, -1 where the garment
type has no such landmark or the folder no landmark list). Any source
that yields these records plugs into `pipeline.py` unchanged: the folder itself
(`FolderSource`) or the prepared TFDS dataset (`TfdsSource`, see tfds_builder.py), chosen
by config.data.source (`make_source`).
"""

import os

import numpy as np

from deepfashion_jax.data import annotations
from deepfashion_jax.data import image_files
from deepfashion_jax.data import landmark_slots

SOURCES = ('folder', 'tfds')  # config.data.source


class FolderSource:
  """The images of chosen rows of a DeepFashion folder, read from disk on demand.

  Attribute arrays are held bit-packed (1,000 bools -> 125 bytes per image) because grain
  copies the source into every worker process.
  """

  def __init__(self, index: annotations.DeepFashionIndex, rows: np.ndarray,
               max_image_bytes: int = image_files.DEFAULT_MAX_BYTES):
    self.image_dir = index.image_dir()
    # The listed paths are 'img/...': img/ may be a link to another disk, its files not.
    self.inside = image_files.resolved_folders(self.image_dir,
                                               os.path.join(self.image_dir, 'img'))
    self.max_image_bytes = max_image_bytes
    self.rows = np.asarray(rows, np.int64)
    self.paths = index.image_paths[self.rows]
    self.category = index.category[self.rows].astype(np.int32)
    self.category_type = index.category_type[self.rows].astype(np.int32)
    self.attribute_positive = np.packbits(index.attribute_positive[self.rows], axis=1)
    self.attribute_unknown = np.packbits(index.attribute_unknown[self.rows], axis=1)
    self.num_attributes = index.num_attributes
    self.bbox = index.bbox[self.rows].astype(np.float32)
    self.landmark_visibility, self.landmark_xy = _landmarks_in_slots(index, self.rows)

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, position: int) -> dict:
    path = str(self.paths[position])
    image_bytes, image_error = None, ''
    try:
      image_bytes = image_files.read(os.path.join(self.image_dir, path), self.max_image_bytes,
                                     self.inside)
    except image_files.ImageFileError as e:
      image_error = str(e)
    return dict(image_bytes=image_bytes, image_error=image_error, path=path,
                index=int(self.rows[position]),
                position=position, category=self.category[position],
                category_type=self.category_type[position],
                attribute_positive_bits=self.attribute_positive[position],
                attribute_unknown_bits=self.attribute_unknown[position],
                bbox=self.bbox[position],
                landmark_visibility=self.landmark_visibility[position],
                landmark_xy=self.landmark_xy[position])

  def __repr__(self):
    return f'FolderSource({self.image_dir}, {len(self)} images)'


def _landmarks_in_slots(index: annotations.DeepFashionIndex, rows: np.ndarray):
  """The rows' landmark visibility (N, 8) and xy (N, 8, 2) in slot order; all absent
  when the folder has no landmark list."""
  if index.landmark_xy is None:
    return (np.full((len(rows), landmark_slots.NUM_SLOTS), landmark_slots.ABSENT, np.int8),
            np.zeros((len(rows), landmark_slots.NUM_SLOTS, 2), np.float32))
  return landmark_slots.to_slots(index.landmark_garment_type[rows],
                                 index.landmark_visibility[rows], index.landmark_xy[rows])


class TfdsSource:
  """A split of the prepared TFDS dataset (ArrayRecord files, random access); position p is
  the folder source's position p of the same split.

  Records are read as raw bytes and only the fields the pipeline uses are parsed, with
  TFDS's own tf.train.Example proto: TFDS's full deserialisation of every field holds the
  GIL against the decoding threads (figures in benchmarks/RESULTS.md).
  """

  def __init__(self, tfds_dir: str, split: str):
    # TFDS is imported here, not for every folder-source user.
    from deepfashion_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
    self._parse = tf_example_pb2.Example.FromString
    self.tfds_dir, self.split = tfds_dir, split
    self.records = tfds_builder.load_builder(tfds_dir).as_data_source(
        split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    self.num_attributes = tfds_builder.NUM_ATTRIBUTES

  def __len__(self):
    return len(self.records)

  def __getitem__(self, position: int) -> dict:
    feature = self._parse(self.records[position]).features.feature
    first_bytes = lambda name: feature[name].bytes_list.value[0]
    first_int = lambda name: feature[name].int64_list.value[0]
    bits = lambda name: np.frombuffer(first_bytes(name), np.uint8)
    ints = lambda name: np.array(feature[name].int64_list.value, np.int64)
    landmark_visibility, landmark_xy = landmark_slots.to_slots(  # TFDS keeps the file's order
        ints('landmark_garment_type'), ints('landmark_visibility')[None],
        ints('landmark_xy').reshape(1, -1, 2))
    image_bytes = first_bytes('image_bytes') or None
    return dict(image_bytes=image_bytes,
                image_error='' if image_bytes else 'not in the prepared dataset (unreadable '
                'or refused when it was prepared)',
                path=first_bytes('file_name').decode(), index=int(first_int('index')),
                position=position, category=np.int32(first_int('category')),
                category_type=np.int32(first_int('category_type')),
                attribute_positive_bits=bits('attribute_positive_bits'),
                attribute_unknown_bits=bits('attribute_unknown_bits'),
                bbox=ints('bbox').astype(np.float32),
                landmark_visibility=landmark_visibility[0], landmark_xy=landmark_xy[0])

  def __repr__(self):
    return f'TfdsSource({self.tfds_dir}, {self.split}, {len(self)} images)'


def make_source(data_config, index: annotations.DeepFashionIndex, split: str, tfds_dir: str):
  """The configured source of one split: the folder's files or the prepared TFDS dataset.

  The TFDS dataset holds the official partition (config_checks refuses another); its split
  must have the index's rows.
  """
  if data_config.source == 'folder':
    return FolderSource(index, index.split_indices(split), data_config.max_image_bytes)
  source = TfdsSource(tfds_dir, split)
  if len(source) != len(index.split_indices(split)):
    raise ValueError(
        f'The TFDS dataset in {tfds_dir} has {len(source)} {split} images, the annotation '
        f'index of {index.root} {len(index.split_indices(split))}: prepare it again from this '
        'folder (--mode=prepare).')
  return source
