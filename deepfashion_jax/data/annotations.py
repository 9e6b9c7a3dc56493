"""Reads DeepFashion's seven annotation lists into one in-memory index of NumPy arrays.

The benchmark's lists (see docs/dataset.md) are plain text: line 1 the number of
rows, line 2 the column names, then one row per image, columns separated by runs of
spaces. `list_attr_img.txt` is the big one (289,222 x 1,000 values, ~870 MB), so it has a
vectorised parser of its own; the others are small enough for `str.split`.

Every format error (a missing column, a word where a number belongs, a number too large
for its array, bytes that are not UTF-8, a header count the file is too small to hold)
raises `AnnotationError`, whose message names the file, the line (1-based, as an editor
shows it) and what was expected, quoting at most `_QUOTED_CHARS` characters of what it
found. Numbers are range-checked as int64 before they are narrowed, so that none wraps.

An image path that could lead outside the image folder (absolute, with a '..' part, a
control character, longer than `MAX_PATH_BYTES`) makes its row odd: it is left out of the
index at parse time, so that no image is ever opened by it, and `check_paths` reports it
as `check_geometry` reports odd boxes.

Geometry that is merely odd (a box that is empty or has a negative corner, a landmark at a
negative coordinate) is data, as a bad JPEG is: one row of 289,222 must not refuse the
dataset. `check_geometry` counts such rows, warns once naming the first lines, and refuses
them only when asked to be strict (config.data.strict); the pipeline clips boxes to their
image and masks the box loss of an image left without one.

Parsing is slow enough (tens of seconds on the real files) that `load_deepfashion` caches
the index as an `.npz` keyed by the lists' sizes and modification times.
"""

import dataclasses
import hashlib
import json
import os
import posixpath
import re
import tempfile
import zipfile
from typing import Optional

from absl import logging
import numpy as np

from deepfashion_jax import errors
from deepfashion_jax.data import vocabulary

CATEGORY_CLOTH = 'Anno/list_category_cloth.txt'
CATEGORY_IMG = 'Anno/list_category_img.txt'
ATTR_CLOTH = 'Anno/list_attr_cloth.txt'
ATTR_IMG = 'Anno/list_attr_img.txt'
BBOX = 'Anno/list_bbox.txt'
LANDMARKS = 'Anno/list_landmarks.txt'
PARTITION = 'Eval/list_eval_partition.txt'
REQUIRED_FILES = (CATEGORY_CLOTH, CATEGORY_IMG, ATTR_CLOTH, ATTR_IMG, BBOX, PARTITION)
ALL_FILES = REQUIRED_FILES + (LANDMARKS,)

# How the images are cut into train / val / test (config.data.partition).
PARTITIONS = ('official', 'baseline')
# Bump when the cached arrays change meaning, so that old caches are parsed anew.
_CACHE_FORMAT = 2
_ATTR_CHUNK_BYTES = 32 << 20
# How many odd rows a warning names by line (the real lists could have thousands).
_ODD_ROWS_SHOWN = 5
# The longest image path a list may name, in UTF-8 bytes. DeepFashion's are under 100; the
# index keeps paths in fixed-width arrays, so the longest path sets every row's width.
MAX_PATH_BYTES = 1024
# The longest part of a path (Linux's NAME_MAX): a longer one names no file.
MAX_PATH_PART_BYTES = 255
# The longest category or attribute name (DeepFashion's are under 30 characters).
MAX_NAME_CHARS = 256
# How much of a found value an error message quotes (a token may be megabytes long).
_QUOTED_CHARS = 200


class AnnotationError(errors.DeepFashionError, ValueError):
  """A DeepFashion list file is missing or does not have the documented format."""


@dataclasses.dataclass(frozen=True)
class AttributeFacts:
  """What the loss and the metrics need to know of a dataset's attributes."""
  types: np.ndarray  # (A,) int8: 0 texture, 1 fabric, 2 shape, 3 part, 4 style
  train_positives: np.ndarray  # (A,) int64: training images with the attribute positive
  train_images: int  # images in the training split


@dataclasses.dataclass(frozen=True)
class DeepFashionIndex:
  """Everything the lists say, one row per image, in `list_category_img.txt` order.

  All label-like values are 0-based (the files count from 1). Landmark arrays are None
  when the folder has no `list_landmarks.txt`.
  """
  root: str  # the DeepFashion folder the lists came from
  image_paths: np.ndarray  # (N,) str, as written in the lists: 'img/<Product>/img_XXXXXXXX.jpg'
  category: np.ndarray  # (N,) int32 in [0, num_categories)
  category_type: np.ndarray  # (N,) int8: 0 upper-body, 1 lower-body, 2 full-body
  attribute_positive: np.ndarray  # (N, A) bool: the file's 1
  attribute_unknown: np.ndarray  # (N, A) bool: the file's 0 (neither 1 nor -1)
  bbox: np.ndarray  # (N, 4) int32 pixels: x1, y1, x2, y2
  split: np.ndarray  # (N,) int8: 0 train, 1 val, 2 test
  category_names: np.ndarray  # (C,) str
  category_types: np.ndarray  # (C,) int8, garment type of each category
  attribute_names: np.ndarray  # (A,) str
  attribute_types: np.ndarray  # (A,) int8: 0 texture, 1 fabric, 2 shape, 3 part, 4 style
  landmark_visibility: Optional[np.ndarray] = None  # (N, 8) int8: 0 visible, 1 occluded, 2 truncated, -1 absent
  landmark_xy: Optional[np.ndarray] = None  # (N, 8, 2) int16 pixels; 0 where absent
  landmark_garment_type: Optional[np.ndarray] = None  # (N,) int8, the landmark file's clothes type
  dropped_images: tuple = ()  # listed images left out because they are known to be unreadable
  # Rows left out for their image path (`path_problem`), per list: (file name, rows, the
  # first few as (line, problem)).
  odd_paths: tuple = ()

  def __len__(self):
    return len(self.image_paths)

  @property
  def num_categories(self):
    return len(self.category_names)

  @property
  def num_attributes(self):
    return len(self.attribute_names)

  def split_indices(self, name: str) -> np.ndarray:
    """Row indices of split 'train', 'val' or 'test', in list order."""
    if name not in vocabulary.SPLIT_NAMES:
      raise ValueError(f'split must be one of {vocabulary.SPLIT_NAMES}, got {name!r}')
    return np.flatnonzero(self.split == vocabulary.SPLIT_NAMES.index(name))

  def attribute_facts(self) -> AttributeFacts:
    """The attributes' types and their positives in the training split."""
    train = self.split_indices('train')
    positives = np.zeros(self.num_attributes, np.int64)
    for start in range(0, len(train), 8192):  # a few MB at a time, not a copy of the split
      positives += self.attribute_positive[train[start:start + 8192]].sum(axis=0)
    return AttributeFacts(self.attribute_types, positives, len(train))

  def image_dir(self) -> str:
    """The folder that the lists' 'img/...' paths are relative to."""
    return find_image_dir(self.root)

  def summary(self) -> str:
    """A few human-readable lines: sizes of the splits, classes and attributes."""
    splits = ', '.join(f'{name} {len(self.split_indices(name)):,}'
                       for name in vocabulary.SPLIT_NAMES)
    per_category = np.bincount(self.category, minlength=self.num_categories)
    empty = [str(n) for n, count in zip(self.category_names, per_category) if count == 0]
    positives = self.attribute_positive.sum(axis=1)
    lines = [
        f'DeepFashion index of {self.root}: {len(self):,} images ({splits})',
        f'  categories: {self.num_categories}, images per category '
        f'min {per_category.min()} / median {int(np.median(per_category))} / max {per_category.max()}'
        + (f'; without images: {", ".join(empty)}' if empty else ''),
        '  garment types: ' + ', '.join(
            f'{name} {np.sum(self.category_type == t):,}'
            for t, name in enumerate(vocabulary.GARMENT_TYPE_NAMES)),
        f'  attributes: {self.num_attributes}, positives per image mean {positives.mean():.2f}, '
        f'unknown values {self.attribute_unknown.mean():.2%}',
        f'  boxes empty or outside their image: {odd_boxes(self.bbox).sum():,} '
        '(clipped to the image; box loss and box metrics masked where no box is left)',
        f'  landmarks: {self._landmark_summary()}; '
        f'dropped as unreadable: {len(self.dropped_images)}',
        f'  rows left out for an unsafe image path: {self._odd_path_summary()}',
    ]
    return '\n'.join(lines)

  def _landmark_summary(self) -> str:
    if self.landmark_xy is None:
      return 'absent'
    odd = odd_landmarks(self.landmark_visibility, self.landmark_xy).sum()
    return f'present, {odd:,} images with a landmark at a negative coordinate'

  def _odd_path_summary(self) -> str:
    if not self.odd_paths:
      return '0'
    per_list = ', '.join(f'{os.path.basename(name)} {rows:,}' for name, rows, _ in self.odd_paths)
    return f'{sum(rows for _, rows, _ in self.odd_paths):,} ({per_list}; never opened)'


def find_image_dir(root: str) -> str:
  """Where 'img/...' paths resolve: `<root>/Img` as released, or `<root>` when unzipped flat."""
  for candidate in (os.path.join(root, 'Img'), root):
    if os.path.isdir(os.path.join(candidate, 'img')):
      return candidate
  raise AnnotationError(
      f'{root}: no image folder; expected {os.path.join(root, "Img", "img")} '
      f'or {os.path.join(root, "img")}')


# ----------------------------------------------------------------------------- text lists


def _quote(text) -> str:
  """`text` as an error message quotes it: repr, cut to `_QUOTED_CHARS` characters."""
  if len(text) <= _QUOTED_CHARS:
    return repr(text)
  return f'{text[:_QUOTED_CHARS]!r}... ({len(text):,} characters)'


def _decode(path: str, data: bytes, first_line: int = 1) -> str:
  """UTF-8 bytes of a list as text; bytes that are not UTF-8 name their line."""
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    line = first_line + data.count(b'\n', 0, e.start)
    raise AnnotationError(f'{path}, line {line}: expected UTF-8 text, found the byte '
                          f'{data[e.start:e.start + 1]!r} ({e.reason})') from None


_CONTROL_CHARACTER = re.compile('[\x00-\x1f\x7f-\x9f]')


def path_problem(path: str) -> Optional[str]:
  """Why a listed image path may not be opened, or None when it may.

  A path must be relative to the image folder and stay inside it whatever the folder's
  symbolic links: no '..' part at all (through a link, 'a/../b' is not where it reads), not
  the folder itself; no control character (a NUL byte ends the path the system sees); at
  most `MAX_PATH_BYTES` bytes, each part at most `MAX_PATH_PART_BYTES`. Lexical only:
  whether it names a regular file is seen when it is read.
  """
  size = len(path) if path.isascii() else len(path.encode('utf-8', 'surrogatepass'))
  if size > MAX_PATH_BYTES:
    return f'a path of {size:,} bytes (at most {MAX_PATH_BYTES:,})'
  control = _CONTROL_CHARACTER.search(path)
  if control:
    return f'the control character {control.group()!r} in {_quote(path)}'
  if path.startswith('/'):
    return f'{_quote(path)}, an absolute path'
  parts = path.split('/')
  if '..' in parts:
    return f'{_quote(path)}, whose ".." leads out of the image folder'
  if all(part in ('', '.') for part in parts) or posixpath.normpath(path) == '.':
    return f'{_quote(path)}, the image folder itself'
  if size > MAX_PATH_PART_BYTES and any(
      len(part.encode('utf-8', 'surrogatepass')) > MAX_PATH_PART_BYTES for part in parts):
    return f'{_quote(path)}, a part of which is longer than {MAX_PATH_PART_BYTES} bytes'
  return None


# Characters that `path_problem` refuses (but the line break `_odd_paths` joins with).
_CONTROL_CHARACTER_BUT_LINE_BREAK = re.compile('[\x00-\x09\x0b-\x1f\x7f-\x9f]')
# Where a path could start with, end with or hold a '/', an empty part, '.' or '..'.
_SUSPECT_SUBSTRINGS = ('//', '/.', '\n/', '\n.', '/\n', '\n\n')


def _odd_paths(paths: list) -> np.ndarray:
  """(N,) bool: the paths that have a `path_problem`. At once for a list of short, plain
  ASCII paths (the real lists): one call per path would add seconds to their parse."""
  text = '\n'.join(paths)
  plain = (text and text.isascii() and max(map(len, paths), default=0) <= MAX_PATH_PART_BYTES
           and not text.startswith(('/', '.', '\n')) and not text.endswith(('/', '\n'))
           and not any(suspect in text for suspect in _SUSPECT_SUBSTRINGS)
           and not _CONTROL_CHARACTER_BUT_LINE_BREAK.search(text))
  if plain:
    return np.zeros(len(paths), bool)
  return np.array([path_problem(p) is not None for p in paths], bool)


@dataclasses.dataclass
class _OddPaths:
  """The rows of a list left out for their path: how many, and the first few by line (all
  of them could take many times the list's size)."""
  count: int = 0
  first: list = dataclasses.field(default_factory=list)  # (line, problem)

  def add(self, lines, paths):
    """Counts the rows at `lines` whose `paths` are odd."""
    self.count += len(paths)
    for line, path in zip(lines[:_ODD_ROWS_SHOWN - len(self.first)], paths):
      self.first.append((int(line), path_problem(path)))


@dataclasses.dataclass
class _Table:
  """A list file's header count, column names and data rows with their line numbers."""
  path: str
  count: int
  columns: list
  line_numbers: list  # 1-based line number of each row
  rows: list  # each row's whitespace-separated tokens
  odd_paths: _OddPaths = dataclasses.field(default_factory=_OddPaths)  # rows left out

  def where(self, i: int) -> str:
    return f'{self.path}, line {self.line_numbers[i]}'


def _check_exists(path: str):
  if not os.path.isfile(path):
    raise AnnotationError(f'{path}: file not found (see docs/dataset.md for the expected layout)')


def _read_header(path: str, lines: list, data_bytes: int, min_row_bytes: int) -> int:
  """Checks the two header lines; returns the row count that line 1 announces.

  The count must be one the file can hold, `data_bytes` (the bytes after the header) at
  `min_row_bytes` a row at least, before anything is allocated from it.
  """
  if len(lines) < 2:
    raise AnnotationError(f'{path}: expected two header lines (a row count, then column '
                          f'names), found {len(lines)} lines')
  text = lines[0].strip()
  if not (text.isascii() and text.isdigit()):
    raise AnnotationError(f'{path}, line 1: expected the number of rows, found '
                          f'{_quote(text[:60])}')
  most = (data_bytes + 1) // min_row_bytes  # + 1: the last row may lack its line break
  count = int(text) if len(text) <= 20 else None  # int() refuses over 4,300 digits
  if count is None or count > most:
    shown = text if len(text) <= 60 else f'{text[:60]}... ({len(text):,} digits)'
    raise AnnotationError(f'{path}, line 1: says {shown} rows, but its {data_bytes:,} bytes '
                          f'of rows hold at most {most:,}')
  if not lines[1].split():
    raise AnnotationError(f'{path}, line 2: expected column names, found an empty line')
  return count


def _read_table(path: str, min_columns: int, max_columns: Optional[int] = None,
                paths: bool = True) -> _Table:
  """Reads a small list file; checks its header, its row count and each row's width.

  With `paths`, the first column is an image path and rows whose path has a
  `path_problem` are left out (kept in `odd_paths`); they count towards line 1's count.
  """
  _check_exists(path)
  with open(path, 'rb') as f:
    data = f.read()
  lines = _decode(path, data).split('\n')
  header_bytes = sum(len(line.encode('utf-8')) + 1 for line in lines[:2])
  count = _read_header(path, lines, max(len(data) - header_bytes, 0), 2 * min_columns)
  max_columns = max_columns or min_columns
  table = _Table(path, count, lines[1].split(), [], [])
  for number, line in enumerate(lines[2:], start=3):
    tokens = line.split()
    if not tokens:
      continue  # blank lines (typically a trailing one) carry nothing
    if not min_columns <= len(tokens) <= max_columns:
      expected = (f'{min_columns}' if min_columns == max_columns
                  else f'{min_columns} to {max_columns}')
      raise AnnotationError(f'{path}, line {number}: expected {expected} columns, '
                            f'found {len(tokens)}')
    table.line_numbers.append(number)
    table.rows.append(tokens)
  if paths:
    _leave_out_odd_paths(table)
  found = len(table.rows) + table.odd_paths.count
  if found != count:
    raise AnnotationError(f'{path}: line 1 says {count} rows, found {found}')
  return table


def _leave_out_odd_paths(table: _Table):
  """Leaves out the rows whose path (first column) has a `path_problem`, counting them in
  `table.odd_paths`."""
  odd = _odd_paths([row[0] for row in table.rows])
  if not odd.any():
    return
  rows = np.flatnonzero(odd).tolist()
  table.odd_paths.add([table.line_numbers[i] for i in rows], [table.rows[i][0] for i in rows])
  table.line_numbers = [line for line, o in zip(table.line_numbers, odd.tolist()) if not o]
  table.rows = [row for row, o in zip(table.rows, odd.tolist()) if not o]


def _int64(values) -> Optional[np.ndarray]:
  """Integers as int64, or None when one is not an integer or int64 cannot hold it."""
  try:
    return np.array(values, dtype=np.int64)
  except (ValueError, OverflowError):
    return None


def _is_integer_text(value: str) -> bool:
  digits = value[1:] if value[:1] in ('-', '+') else value
  return digits.isascii() and digits.isdigit() and len(digits) <= 18


def _int_column(table: _Table, values: list, what: str, low: int, high: int) -> np.ndarray:
  """Converts strings to int32, checking each lies in [low, high]; errors name the line."""
  array = _int64(values)
  bad = (np.flatnonzero((array < low) | (array > high)) if array is not None
         else [i for i, v in enumerate(values) if not _is_integer_text(v)])
  if len(bad):
    i = bad[0]
    raise AnnotationError(f'{table.where(i)}: {what} must be an integer in {low}..{high}, '
                          f'found {_quote(values[i])}')
  return array.astype(np.int32)


def _int_matrix(table: _Table, columns: slice, what: str, low: int, high: int) -> np.ndarray:
  """The integer columns of every row as an (N, k) int64 array, each value checked to lie
  in [low, high] before the caller narrows it; errors name the line."""
  cells = [row[columns] for row in table.rows]
  array = _int64(cells)
  if array is None:
    for i, row in enumerate(cells):
      for value in row:
        if not _is_integer_text(value):
          raise AnnotationError(f'{table.where(i)}: {what} must be integers, '
                                f'found {_quote(value)}')
    array = np.array(cells, dtype=np.int64)  # raises only if the loop above missed a case
  outside = (array < low) | (array > high)
  bad = np.flatnonzero(outside.any(axis=1)) if array.ndim == 2 else []
  if len(bad):
    value = array[bad[0]][outside[bad[0]]][0]
    raise AnnotationError(f'{table.where(bad[0])}: {what} must be integers in {low}..{high}, '
                          f'found {value}')
  return array


def _names(table: _Table, names: list, what: str) -> np.ndarray:
  """Category or attribute names as an array, each at most `MAX_NAME_CHARS` characters."""
  long = [i for i, name in enumerate(names) if len(name) > MAX_NAME_CHARS]
  if long:
    raise AnnotationError(f'{table.where(long[0])}: {what} must be at most {MAX_NAME_CHARS} '
                          f'characters, found {_quote(names[long[0]])}')
  return np.array(names, dtype=str)


def _check_not_empty(table: _Table, what: str):
  """A vocabulary or an image list without a row describes no dataset (and the summary's
  and the model's sizes would be 0)."""
  if not table.rows:
    left_out = (f' ({table.odd_paths.count} rows left out for their image path)'
                if table.odd_paths.count else '')
    raise AnnotationError(f'{table.path}: expected at least one {what}, found none{left_out}')


def read_category_cloth(root: str):
  table = _read_table(os.path.join(root, CATEGORY_CLOTH), 2, paths=False)
  _check_not_empty(table, 'category')
  names = _names(table, [row[0] for row in table.rows], 'a category name')
  types = _int_column(table, [row[1] for row in table.rows], 'category type', 1, 3) - 1
  return names, types.astype(np.int8)


def read_attr_cloth(root: str):
  """Attribute names contain spaces ('abstract chevron print'): the type is the last token."""
  table = _read_table(os.path.join(root, ATTR_CLOTH), 2, 64, paths=False)
  _check_not_empty(table, 'attribute')
  names = _names(table, [' '.join(row[:-1]) for row in table.rows], 'an attribute name')
  num_types = len(vocabulary.ATTRIBUTE_TYPE_NAMES)
  types = _int_column(table, [row[-1] for row in table.rows], 'attribute type', 1, num_types) - 1
  return names, types.astype(np.int8)


def _read_category_img(root: str, num_categories: int):
  table = _read_table(os.path.join(root, CATEGORY_IMG), 2)
  _check_not_empty(table, 'image')
  paths = np.array([row[0] for row in table.rows], dtype=str)
  labels = _int_column(table, [row[1] for row in table.rows], 'category label', 1,
                       num_categories) - 1
  if len(np.unique(paths)) != len(paths):
    seen = set()
    for i, p in enumerate(paths.tolist()):
      if p in seen:
        raise AnnotationError(f'{table.where(i)}: image {p} is listed twice')
      seen.add(p)
  return table, paths, labels


def _read_bbox(root: str):
  """Reads the boxes; only format errors raise here (odd boxes: `check_geometry`)."""
  table = _read_table(os.path.join(root, BBOX), 5)
  limits = np.iinfo(np.int32)
  boxes = _int_matrix(table, slice(1, 5), 'box coordinates x_1 y_1 x_2 y_2', limits.min,
                      limits.max)
  return table, boxes.reshape(-1, 4).astype(np.int32)


def _read_partition(root: str):
  table = _read_table(os.path.join(root, PARTITION), 2)
  lookup = {name: i for i, name in enumerate(vocabulary.SPLIT_NAMES)}
  split = np.empty(len(table.rows), np.int8)
  for i, row in enumerate(table.rows):
    if row[1] not in lookup:
      raise AnnotationError(f'{table.where(i)}: expected train, val or test, '
                            f'found {_quote(row[1])}')
    split[i] = lookup[row[1]]
  return table, split


def _read_landmarks(root: str):
  """Reads landmarks; rows hold up to 8 (visibility, x, y) triples after the clothes type.

  Some releases add a `variation_type` column after `clothes_type`; line 2 says which.
  """
  table = _read_table(os.path.join(root, LANDMARKS), 2, 3 + 3 * vocabulary.MAX_LANDMARKS)
  lead = 3 if 'variation_type' in table.columns else 2
  n = len(table.rows)
  garment_type = _int_column(table, [row[1] for row in table.rows], 'clothes type', 1, 3) - 1
  visibility = np.full((n, vocabulary.MAX_LANDMARKS), -1, np.int8)
  xy = np.zeros((n, vocabulary.MAX_LANDMARKS, 2), np.int16)
  widths = np.array([len(row) for row in table.rows], dtype=np.int64) - lead
  odd = np.flatnonzero((widths % 3) | (widths < 0))
  if len(odd):
    raise AnnotationError(f'{table.where(odd[0])}: expected (visibility, x, y) triples after '
                          f'the clothes type, found {widths[odd[0]]} values')
  for width in np.unique(widths).tolist():  # rows of one width convert as one array
    if width == 0:
      continue  # a row without landmarks: all absent
    rows = np.flatnonzero(widths == width)
    subtable = dataclasses.replace(table, line_numbers=[table.line_numbers[i] for i in rows],
                                   rows=[table.rows[i] for i in rows])
    limits = np.iinfo(np.int64)
    triples = _int_matrix(subtable, slice(lead, None), 'landmark values', limits.min,
                          limits.max).reshape(len(rows), -1, 3)
    _check_landmark_triples(subtable, triples)
    visibility[rows, :width // 3] = triples[:, :, 0]
    xy[rows, :width // 3] = triples[:, :, 1:]
  return table, garment_type.astype(np.int8), visibility, xy


def _check_landmark_triples(table: _Table, triples: np.ndarray):
  """Format errors of (visibility, x, y) int64 triples, before they are narrowed: a
  visibility other than 0, 1 or 2, or a coordinate that int16 cannot hold (it would wrap
  silently). A negative coordinate is data, not a format error (`check_geometry`)."""
  bad = np.flatnonzero(~np.isin(triples[:, :, 0], (0, 1, 2)).all(axis=1))
  if len(bad):
    raise AnnotationError(f'{table.where(bad[0])}: landmark visibility must be 0, 1 or 2')
  limits = np.iinfo(np.int16)
  coordinates = triples[:, :, 1:].reshape(len(triples), -1)
  outside = (coordinates < limits.min) | (coordinates > limits.max)
  bad = np.flatnonzero(outside.any(axis=1))
  if len(bad):
    value = coordinates[bad[0]][outside[bad[0]]][0]
    raise AnnotationError(f'{table.where(bad[0])}: landmark coordinates must be integers in '
                          f'{limits.min}..{limits.max}, found {value}')


# ----------------------------------------------------------------------------- list_attr_img

# One row: optional blanks, the image path, then the rest of the line (the values).
_ATTR_ROW = re.compile(rb'[ \t\r]*([^ \t\r\n]*)[^\n]*\n')

# Classes of the bytes of a values region, and which class may follow which: a value is
# '1', '-1' or '0' with blanks around it, and the line ends after a blank or a digit.
_OTHER, _BLANK, _MINUS, _ZERO, _ONE, _END = range(6)
_BYTE_CLASS = np.full(256, _OTHER, np.uint8)
_BYTE_CLASS[list(b' \t\r')] = _BLANK
_BYTE_CLASS[list(b'-01\n')] = (_MINUS, _ZERO, _ONE, _END)
_MAY_FOLLOW = np.zeros((6, 6), bool)
_MAY_FOLLOW[_BLANK, [_BLANK, _MINUS, _ZERO, _ONE, _END]] = True
_MAY_FOLLOW[_MINUS, _ONE] = True
_MAY_FOLLOW[np.ix_([_ZERO, _ONE], [_BLANK, _END])] = True
_MAY_FOLLOW = _MAY_FOLLOW.ravel()


def _parse_attr_chunk(path: str, chunk: bytes, first_line: int, num_attributes: int):
  """Parses whole lines of list_attr_img.txt; returns the rows' paths, their line numbers
  and their (rows, A) int8 values.

  Works on the chunk's bytes at once rather than token by token, which would cost about
  a microsecond per value (289 M values): each byte of a line's values region (after its
  path) is classed, and each pair of neighbouring bytes must be a pair that well-formed
  values allow.
  """
  data = np.frombuffer(chunk, np.uint8)
  paths, value_starts, line_ends = [], [], []
  for match in _ATTR_ROW.finditer(chunk):
    paths.append(match.group(1))
    value_starts.append(match.end(1))
    line_ends.append(match.end() - 1)
  in_values = np.zeros(len(data) + 1, np.int8)
  in_values[value_starts] += 1
  in_values[line_ends] -= 1
  in_values = np.cumsum(in_values[:-1], dtype=np.int8).view(bool)

  byte_class = _BYTE_CLASS[data]
  pairs = byte_class[:-1] * np.uint8(6) + byte_class[1:]
  bad = np.flatnonzero(in_values[:-1] & ~_MAY_FOLLOW[pairs])
  if len(bad):
    position = bad[0] + (byte_class[bad[0]] != _OTHER)
    found = chr(data[position]) if byte_class[position] == _OTHER else ''
    line = first_line + chunk.count(b'\n', 0, bad[0])
    raise AnnotationError(f'{path}, line {line}: expected values 1, -1 or 0 separated by '
                          'blanks' + (f', found {found!r}' if found else ''))

  positions = np.flatnonzero(in_values & ((byte_class == _ZERO) | (byte_class == _ONE)))
  values = np.where(byte_class[positions - 1] == _MINUS, -1,
                    byte_class[positions] == _ONE).astype(np.int8)
  line_starts = np.concatenate([[0], np.asarray(line_ends[:-1]) + 1, [len(data)]])
  counts = np.diff(np.searchsorted(positions, line_starts))
  nonblank = np.array([len(p) > 0 for p in paths], bool)
  wrong = np.flatnonzero(nonblank & (counts != num_attributes))
  if len(wrong):
    raise AnnotationError(f'{path}, line {first_line + wrong[0]}: expected the image path and '
                          f'{num_attributes} values, found {counts[wrong[0]]} values')
  lines = np.flatnonzero(nonblank) + first_line
  paths = [_decode(path, p, line) for p, line in zip(
      (p for p, keep in zip(paths, nonblank) if keep), lines.tolist())]
  return paths, lines, values.reshape(-1, num_attributes)


def _read_attr_img(root: str, num_attributes: int):
  """Reads list_attr_img.txt in 32 MB chunks of whole lines into two (N, A) bool arrays.

  Returns the rows' paths, their line numbers, the two arrays, and the `_OddPaths` of the
  rows left out for a `path_problem`.
  """
  path = os.path.join(root, ATTR_IMG)
  _check_exists(path)
  with open(path, 'rb') as f:
    header = [f.readline(), f.readline()]
    header_text = [_decode(path, line, number) for number, line in enumerate(header, start=1)]
    data_bytes = max(os.fstat(f.fileno()).st_size - len(header[0]) - len(header[1]), 0)
    # A row is at least a one-byte path, a blank and a digit per value, and a line break.
    count = _read_header(path, header_text, data_bytes, 2 * num_attributes + 2)
    positive = np.zeros((count, num_attributes), bool)
    unknown = np.zeros((count, num_attributes), bool)
    paths, path_lines, odd_paths, rows, next_line, carry = [], [], _OddPaths(), 0, 3, b''
    while True:
      # No bigger than what is left: read(n) allocates n bytes first, 32 MB for a small file.
      block = f.read(max(min(_ATTR_CHUNK_BYTES, os.fstat(f.fileno()).st_size - f.tell()), 1))
      chunk = carry + block
      cut = chunk.rfind(b'\n') + 1 if block else len(chunk)
      chunk, carry = chunk[:cut], chunk[cut:]
      if not chunk:
        break
      if not chunk.endswith(b'\n'):
        chunk += b'\n'
      chunk_paths, lines, values = _parse_attr_chunk(path, chunk, next_line, num_attributes)
      if rows + odd_paths.count + len(values) > count:
        raise AnnotationError(f'{path}: line 1 says {count} rows, found more')
      odd = _odd_paths(chunk_paths)
      odd_paths.add(lines[odd], [p for p, o in zip(chunk_paths, odd.tolist()) if o])
      values = values[~odd]
      positive[rows:rows + len(values)] = values == 1
      unknown[rows:rows + len(values)] = values == 0
      paths += [p for p, o in zip(chunk_paths, odd.tolist()) if not o]
      path_lines.append(lines[~odd])
      rows += len(values)
      next_line += chunk.count(b'\n')
  if rows + odd_paths.count != count:
    raise AnnotationError(f'{path}: line 1 says {count} rows, found {rows + odd_paths.count}')
  lines = np.concatenate(path_lines) if path_lines else np.zeros(0, np.int64)
  return np.array(paths, dtype=str), lines, positive[:rows], unknown[:rows], odd_paths


# ----------------------------------------------------------------------------- joining


def _align(master: _Table, master_paths: np.ndarray, paths: np.ndarray, file_name: str,
           line_numbers=None) -> Optional[np.ndarray]:
  """Row order that maps a list onto the master list; None when it already matches.

  Every image must appear exactly once in both lists: an image in one list and not in the
  other is an error that names the file and line where it is listed.
  """
  if len(master_paths) == len(paths) and np.array_equal(master_paths, paths):
    return None
  where = lambda i: f'line {line_numbers[i]}' if line_numbers is not None else f'row {i + 1}'
  position = {p: i for i, p in enumerate(master_paths.tolist())}
  order = np.full(len(master_paths), -1, np.int64)
  for i, p in enumerate(paths.tolist()):
    j = position.get(p)
    if j is None:
      raise AnnotationError(f'{file_name}, {where(i)}: image {p} is absent from {master.path}')
    if order[j] >= 0:
      raise AnnotationError(f'{file_name}, {where(i)}: image {p} is listed twice')
    order[j] = i
  missing = np.flatnonzero(order < 0)
  if len(missing):
    j = missing[0]
    raise AnnotationError(f'{master.where(j)}: image {master_paths[j]} is absent from {file_name}')
  return order


def _aligned(array, order):
  return array if order is None else array[order]


def read_deepfashion(root: str, strict: bool = False) -> DeepFashionIndex:
  """Parses the lists of a DeepFashion folder (no cache), reports the rows left out for
  their image path (`check_paths`) and checks their geometry (`check_geometry`); see
  `load_deepfashion`."""
  index = _parse_lists(root)
  check_paths(index, strict)
  check_geometry(index, strict)
  return index


def _parse_lists(root: str) -> DeepFashionIndex:
  """The index of a folder's lists as parsed, format checked, geometry unchecked."""
  root = os.path.abspath(root)
  for name in REQUIRED_FILES:
    _check_exists(os.path.join(root, name))
  category_names, category_types = read_category_cloth(root)
  attribute_names, attribute_types = read_attr_cloth(root)
  master, paths, category = _read_category_img(root, len(category_names))
  fields = dict(root=root, image_paths=paths, category=category,
                category_type=category_types[category], category_names=category_names,
                category_types=category_types, attribute_names=attribute_names,
                attribute_types=attribute_types)

  def join(file_name, other_paths, line_numbers=None):
    return _align(master, paths, other_paths, os.path.join(root, file_name), line_numbers)

  odd_paths = {CATEGORY_IMG: master.odd_paths}
  attr_paths, lines, positive, unknown, odd_paths[ATTR_IMG] = _read_attr_img(
      root, len(attribute_names))
  order = join(ATTR_IMG, attr_paths, lines)
  fields.update(attribute_positive=_aligned(positive, order),
                attribute_unknown=_aligned(unknown, order))
  del positive, unknown
  table, boxes = _read_bbox(root)
  fields['bbox'] = _aligned(boxes, join(BBOX, _first_column(table), table.line_numbers))
  odd_paths[BBOX] = table.odd_paths
  table, split = _read_partition(root)
  fields['split'] = _aligned(split, join(PARTITION, _first_column(table), table.line_numbers))
  odd_paths[PARTITION] = table.odd_paths
  if os.path.isfile(os.path.join(root, LANDMARKS)):
    table, garment_type, visibility, xy = _read_landmarks(root)
    order = join(LANDMARKS, _first_column(table), table.line_numbers)
    fields.update(landmark_garment_type=_aligned(garment_type, order),
                  landmark_visibility=_aligned(visibility, order),
                  landmark_xy=_aligned(xy, order))
    odd_paths[LANDMARKS] = table.odd_paths
  fields['odd_paths'] = tuple((name, odd.count, tuple(odd.first))
                              for name, odd in odd_paths.items() if odd.count)
  return _drop_known_unreadable(DeepFashionIndex(**fields))


def _first_column(table: _Table) -> np.ndarray:
  return np.array([row[0] for row in table.rows], dtype=str)


def _drop_known_unreadable(index: DeepFashionIndex) -> DeepFashionIndex:
  """Leaves out the release's three undecodable images, saying so."""
  unreadable = np.isin(index.image_paths, vocabulary.KNOWN_UNREADABLE_IMAGES)
  if not unreadable.any():
    return index
  dropped = tuple(index.image_paths[unreadable].tolist())
  logging.warning('Dropping %d image(s) known to be unreadable: %s', len(dropped),
                  ', '.join(dropped))
  return _select_rows(index, np.flatnonzero(~unreadable), dropped_images=dropped)


def _per_image_fields():
  return [f.name for f in dataclasses.fields(DeepFashionIndex)
          if f.name not in ('root', 'category_names', 'category_types', 'attribute_names',
                            'attribute_types', 'dropped_images', 'odd_paths')]


def _select_rows(index: DeepFashionIndex, rows: np.ndarray, **changes) -> DeepFashionIndex:
  for name in _per_image_fields():
    value = getattr(index, name)
    if value is not None:
      changes.setdefault(name, value[rows])
  return dataclasses.replace(index, **changes)


# ----------------------------------------------------------------------------- odd rows


def check_paths(index: DeepFashionIndex, strict: bool = False):
  """Warns once per list about the rows left out for their image path (`path_problem`),
  naming the first few lines; refuses the first (AnnotationError naming file and line)
  when `strict`. The index keeps what it needs to say so, read from the cache or parsed."""
  for file_name, count, rows in index.odd_paths:
    path = os.path.join(index.root, file_name)
    if strict:
      line, problem = rows[0]
      raise AnnotationError(
          f'{path}, line {line}: expected a relative image path inside the image folder, found '
          f'{problem} ({count} such rows; config.data.strict refuses them, without it they are '
          'left out of the index and never opened)')
    where = '; '.join(f'line {line}: {problem}' for line, problem in rows)
    more = f'; {count - len(rows):,} more' if count > len(rows) else ''
    logging.warning('%s: %d rows left out for their image path (%s%s): an image path must be '
                    'relative, inside the image folder (no ".." part), at most %d bytes, '
                    'without control characters; these are never opened', path, count, where,
                    more, MAX_PATH_BYTES)


# ----------------------------------------------------------------------------- geometry


def odd_boxes(bbox: np.ndarray) -> np.ndarray:
  """(N,) bool: boxes that are empty (x_2 <= x_1 or y_2 <= y_1) or have a negative corner.

  Whether a box also runs past its image's right or bottom edge needs the image's size,
  which only the pipeline knows (it clips every box to its decoded image).
  """
  return (bbox[:, 2] <= bbox[:, 0]) | (bbox[:, 3] <= bbox[:, 1]) | (bbox < 0).any(axis=1)


def odd_landmarks(visibility: np.ndarray, xy: np.ndarray) -> np.ndarray:
  """(N,) bool: images with a visible or occluded landmark at a negative coordinate.

  Truncated landmarks (visibility 2) are outside the image by definition, and absent
  ones (-1) are 0: neither is odd.
  """
  placed = (visibility == 0) | (visibility == 1)
  return (placed & (xy < 0).any(axis=-1)).any(axis=1)


def check_geometry(index: DeepFashionIndex, strict: bool = False):
  """Warns once per list about boxes and landmarks outside their image; refuses them
  (AnnotationError naming file and line) when `strict`.

  Works on the index's arrays, so that an index read from the cache is checked as a
  parsed one is; the lines are looked up in the list only when there is something to say.
  """
  rows = np.flatnonzero(odd_boxes(index.bbox))
  _report_odd_rows(
      index, BBOX, rows, [' '.join(map(str, index.bbox[i])) for i in rows[:_ODD_ROWS_SHOWN]],
      'boxes are empty or outside their image',
      'expected a box with 0 <= x_1 < x_2 and 0 <= y_1 < y_2',
      'they are clipped to the image, and an image left with no box has its box loss and '
      'box metrics masked', strict)
  if index.landmark_xy is None:
    return
  rows = np.flatnonzero(odd_landmarks(index.landmark_visibility, index.landmark_xy))
  _report_odd_rows(
      index, LANDMARKS, rows, [_odd_landmarks_text(index, i) for i in rows[:_ODD_ROWS_SHOWN]],
      'images have a visible or occluded landmark at a negative coordinate',
      'expected visible and occluded landmarks at coordinates >= 0',
      'they are kept as they are (outside every crop: the pipeline marks them not visible)',
      strict)


def _odd_landmarks_text(index: DeepFashionIndex, row: int) -> str:
  """'landmark 2 at (-4, 120)': the odd landmarks of one image, 1-based as in the file."""
  placed = (index.landmark_visibility[row] == 0) | (index.landmark_visibility[row] == 1)
  odd = np.flatnonzero(placed & (index.landmark_xy[row] < 0).any(axis=-1))
  return ', '.join(f'landmark {k + 1} at ({index.landmark_xy[row, k, 0]}, '
                   f'{index.landmark_xy[row, k, 1]})' for k in odd)


def _report_odd_rows(index: DeepFashionIndex, file_name: str, rows: np.ndarray, texts: list,
                     problem: str, expected: str, handling: str, strict: bool):
  """One warning for all the odd rows of a list, naming the first few by line; or, when
  strict, an AnnotationError at the first."""
  if not len(rows):
    return
  path = os.path.join(index.root, file_name)
  lines = _line_numbers(path, index.image_paths[rows[:len(texts)]].tolist())
  if strict:
    raise AnnotationError(f'{path}, line {lines[0]}: {expected}, found {texts[0]} ({len(rows)} '
                          f'such rows; config.data.strict refuses them, without it {handling})')
  where = '; '.join(f'line {line}: {text}' for line, text in zip(lines, texts))
  more = f'; {len(rows) - len(texts):,} more' if len(rows) > len(texts) else ''
  logging.warning('%s: %d %s (%s%s): %s', path, len(rows), problem, where, more, handling)


def _line_numbers(path: str, image_paths: list) -> list:
  """The 1-based line of each image in a list file ('?' if absent).

  The index keeps no line numbers (it may come from the cache), so the few lines that a
  message names are found by reading the list again, stopping once all are found.
  """
  found = dict.fromkeys(image_paths)
  remaining = len(found)
  with open(path, encoding='utf-8', errors='replace') as f:  # it may have changed since
    for number, line in enumerate(f, start=1):
      first = line.split(None, 1)[:1]
      if number > 2 and first and first[0] in found and found[first[0]] is None:
        found[first[0]] = number
        remaining -= 1
        if not remaining:
          break
  return [found[p] or '?' for p in image_paths]


# ----------------------------------------------------------------------------- splits


def baseline_split(num_images: int, seed: int = 0) -> np.ndarray:
  """The PyTorch baseline's random 90/5/5 train/val/test split, exactly, without its leak.

  The baseline (train.py) shuffles `list(range(N))` with `np.random.RandomState(0)` over
  the images of list_attr_img.txt minus the three unreadable ones, in file order (the
  index's order: the release lists every file in the same order), and cuts at
  `int(0.9 N)` and `int(0.95 N)`. Its dataset then ignores the cut (docs/baseline.md); here
  the three subsets are really disjoint.
  """
  order = np.random.RandomState(seed).permutation(num_images)
  split = np.full(num_images, 2, np.int8)
  split[order[:int(0.9 * num_images)]] = 0
  split[order[int(0.9 * num_images):int(0.95 * num_images)]] = 1
  return split


def with_partition(index: DeepFashionIndex, partition: str) -> DeepFashionIndex:
  """The index with its `split` field set by the partition `official` or `baseline`."""
  if partition == 'official':
    return index
  if partition == 'baseline':
    return dataclasses.replace(index, split=baseline_split(len(index)))
  raise ValueError(f'partition must be one of {PARTITIONS}, got {partition!r}')


# ----------------------------------------------------------------------------- cache


def _fingerprint(root: str) -> str:
  """Identifies the lists' current contents by their sizes and modification times."""
  stats = []
  for name in ALL_FILES:
    path = os.path.join(root, name)
    if os.path.isfile(path):
      st = os.stat(path)
      stats.append([name, st.st_size, st.st_mtime_ns])
  return hashlib.sha1(json.dumps([_CACHE_FORMAT, stats]).encode()).hexdigest()[:16]


def cache_path(root: str, cache_dir: str) -> str:
  """The cache file for this folder's lists as they are now."""
  root = os.path.abspath(root)
  folder = hashlib.sha1(root.encode()).hexdigest()[:8]
  return os.path.join(cache_dir, f'deepfashion_{folder}_{_fingerprint(root)}.npz')


def _save_cache(index: DeepFashionIndex, path: str):
  """Writes the index atomically (temporary file, then rename) and removes stale caches."""
  arrays = {}
  for field in dataclasses.fields(index):
    value = getattr(index, field.name)
    if value is None:
      continue
    if field.name == 'odd_paths':
      arrays[field.name] = np.asarray(json.dumps(value))
    elif field.name.startswith('attribute_') and value.dtype == bool:
      arrays[field.name + '_bits'] = np.packbits(value, axis=1)
    else:
      arrays[field.name] = np.asarray(value)
  arrays['num_attributes'] = np.asarray(index.num_attributes)
  keep_in_cache(path, lambda f: np.savez(f, **arrays))


def keep_in_cache(path: str, write):
  """Writes a cache file (`cache_path`'s name, any extension) atomically, `write(binary
  file)`, and removes what the cache kept under that name for the lists as they were before
  (the same folder's files of the same extension under another key)."""
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=folder, suffix='.tmp', delete=False) as f:
    write(f)
  os.replace(f.name, path)
  prefix = os.path.basename(path).rsplit('_', 1)[0] + '_'
  extension = os.path.splitext(path)[1]
  for name in os.listdir(folder):
    if name.startswith(prefix) and name.endswith(extension) and name != os.path.basename(path):
      os.remove(os.path.join(folder, name))


def _load_cache(path: str) -> DeepFashionIndex:
  with np.load(path, allow_pickle=False) as data:
    arrays = {name: data[name] for name in data.files}
  num_attributes = int(arrays.pop('num_attributes'))
  fields = {}
  for name, value in arrays.items():
    if name.endswith('_bits'):
      fields[name[:-5]] = np.unpackbits(value, axis=1, count=num_attributes).view(bool)
    else:
      fields[name] = value
  fields['root'] = str(fields['root'])
  fields['dropped_images'] = tuple(fields.get('dropped_images', np.array([])).tolist())
  fields['odd_paths'] = tuple((name, count, tuple(map(tuple, rows))) for name, count, rows
                              in json.loads(str(fields['odd_paths'])))
  return DeepFashionIndex(**fields)


def load_deepfashion(root: str, cache_dir: Optional[str] = None, partition: str = 'official',
                     strict: bool = False) -> DeepFashionIndex:
  """The index of a DeepFashion folder, parsed once and then read from `cache_dir`.

  The cache is keyed by the folder and by each list's size and modification time: editing
  a list parses anew. A cache that cannot be read is parsed anew too, with a warning.
  Cached or parsed, the rows left out for their image path are reported (`check_paths`) and
  the index's geometry is checked (`check_geometry`); `strict` refuses either.
  """
  if partition not in PARTITIONS:
    raise ValueError(f'partition must be one of {PARTITIONS}, got {partition!r}')
  root = os.path.abspath(root)
  index = _cached_or_parsed(root, cache_dir) if cache_dir else _parse_lists(root)
  check_paths(index, strict)
  check_geometry(index, strict)
  return with_partition(index, partition)


def _cached_or_parsed(root: str, cache_dir: str) -> DeepFashionIndex:
  """The cached index of the lists as they are now; parsed and cached when there is none."""
  path = cache_path(root, cache_dir)
  if os.path.isfile(path):
    try:
      index = _load_cache(path)
      logging.info('Loaded the DeepFashion index from the cache %s', path)
      return index
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
      logging.warning('Could not read the annotation cache %s (%s); parsing the lists again',
                      path, e)
  index = _parse_lists(root)
  _save_cache(index, path)
  logging.info('Cached the DeepFashion index in %s', path)
  return index
