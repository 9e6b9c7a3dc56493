"""Random-access sources of DeepFashion examples, for grain.

A source's record is what the transforms need and nothing decoded: the image file's bytes
as stored (None when the file is missing), its path for messages, the example's row in the
annotation index, its position in the source, the labels (the 1,000 attribute flags
bit-packed, `np.packbits` order) and the box in pixels. Any source
that yields these records (the TFDS ArrayRecord source of a later issue, say) plugs into
`pipeline.py` unchanged.
"""

import os

import numpy as np

from deepfashion_jax.data import annotations


class FolderSource:
  """The images of chosen rows of a DeepFashion folder, read from disk on demand.

  Attribute arrays are held bit-packed (1,000 bools -> 125 bytes per image) because grain
  copies the source into every worker process.
  """

  def __init__(self, index: annotations.DeepFashionIndex, rows: np.ndarray):
    self.image_dir = index.image_dir()
    self.rows = np.asarray(rows, np.int64)
    self.paths = index.image_paths[self.rows]
    self.category = index.category[self.rows].astype(np.int32)
    self.category_type = index.category_type[self.rows].astype(np.int32)
    self.attribute_positive = np.packbits(index.attribute_positive[self.rows], axis=1)
    self.attribute_unknown = np.packbits(index.attribute_unknown[self.rows], axis=1)
    self.num_attributes = index.num_attributes
    self.bbox = index.bbox[self.rows].astype(np.float32)

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, position: int) -> dict:
    path = str(self.paths[position])
    try:
      with open(os.path.join(self.image_dir, path), 'rb') as f:
        image_bytes = f.read()
    except OSError:
      image_bytes = None
    return dict(image_bytes=image_bytes, path=path, index=int(self.rows[position]),
                position=position, category=self.category[position],
                category_type=self.category_type[position],
                attribute_positive_bits=self.attribute_positive[position],
                attribute_unknown_bits=self.attribute_unknown[position],
                bbox=self.bbox[position])

  def __repr__(self):
    return f'FolderSource({self.image_dir}, {len(self)} images)'
