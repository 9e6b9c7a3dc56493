"""Hostile list files: DeepFashion folders whose lists lead outside the image folder, hold
numbers too large for their arrays, header counts no file could hold, bytes that are not
UTF-8, megabyte-long tokens, or random damage (lines dropped or repeated, fields changed,
bytes flipped, files cut short).

`tries(folder)` yields (description, thunk); each thunk loads one such folder through
`data.folder.load_index`, the call every mode makes (annotation cache and all), and its
`summary()` (what `--mode=describe` prints): it returns when the folder is accepted and
raises `DeepFashionError` when it is refused. Every outcome should be one of the two.
`tests/test_hostile_lists.py` draws the same mutations with hypothesis.

  python -m benchmarks.hostile_input --surfaces list_files --each   # each try's outcome
"""

import dataclasses
import os
import pathlib
import shutil

import numpy as np

from deepfashion_jax.data import annotations
from deepfashion_jax.data import synthetic
from deepfashion_jax.data import vocabulary

SURFACE = 'list files'

# The lists whose first column is an image path (they list the images in one order).
PATH_LISTS = (annotations.CATEGORY_IMG, annotations.ATTR_IMG, annotations.BBOX,
              annotations.PARTITION, annotations.LANDMARKS)

# Values a mutation writes into a field, a header or the image path of every list.
HOSTILE_VALUES = (
    b'2147483648', b'1099511627876', b'4294967297', b'18446744073709551616',
    b'-9223372036854775809', b'-1', b'0', b'1', b'3', b'-0', b'+7', b'1e3', b'x', b'',
    b'\xff\xfe', b'\xc3', b'\x00', b'\t', b'9' * 5000, b'img/' + b'a' * 5000 + b'.jpg',
)
HOSTILE_PATHS = (
    b'../../../../etc/passwd', b'/etc/passwd', b'/dev/zero', b'img/a\x00b.jpg', b'img/../../x.jpg',
    b'.', b'img/a\x1b.jpg', b'img/\xff.jpg', b'img/' + b'a' * 2000 + b'.jpg',
    b'img/' + b'p' * (1 << 20),
)
HEADER_COUNTS = (b'1099511627776', b'-1', b'18446744073709551616', b'9' * 5000, b'many', b'',
                 b'0', b'\xff')
MUTATIONS = ('drop_line', 'duplicate_line', 'replace_field', 'header_count', 'flip_byte',
             'truncate', 'insert_bytes', 'plant_path', 'empty_lists')


@dataclasses.dataclass(frozen=True)
class Mutation:
  """One change to one list of a valid folder; numbers wrap around the file's lines,
  fields and bytes, so any drawn value names a place in it."""
  kind: str  # one of MUTATIONS
  # One of annotations.ALL_FILES; 'plant_path' changes every list of PATH_LISTS instead,
  # 'empty_lists' empties them and this one.
  file_name: str
  line: int = 0  # 0-based line
  field: int = 0  # whitespace-separated field of the line
  value: bytes = b''
  position: int = 0  # byte offset (flip_byte, truncate, insert_bytes)

  def describe(self) -> str:
    value = self.value if len(self.value) <= 40 else self.value[:40] + b'...'
    where = {'drop_line': f'line {self.line + 1}', 'duplicate_line': f'line {self.line + 1}',
             'replace_field': f'line {self.line + 1} field {self.field + 1} = {value!r}',
             'header_count': f'line 1 = {value!r}', 'flip_byte': f'byte {self.position} ^ '
             f'{self.field & 0xff:#04x}', 'truncate': f'cut at byte {self.position}',
             'insert_bytes': f'{value!r} at byte {self.position}',
             'plant_path': f'path {value!r} on line {self.line + 1} of every list',
             'empty_lists': 'no rows in the image lists'}[self.kind]
    file_name = 'every list' if self.kind == 'plant_path' else self.file_name
    return f'{self.kind} in {file_name}: {where}'


def _lines(data: bytes) -> list:
  return data.split(b'\n')


def mutated(data: bytes, mutation: Mutation) -> bytes:
  """The bytes of one list after `mutation` (`plant_path` changes a data line's path)."""
  lines = _lines(data)
  line = mutation.line % len(lines)
  if mutation.kind == 'drop_line':
    return b'\n'.join(lines[:line] + lines[line + 1:])
  if mutation.kind == 'duplicate_line':
    return b'\n'.join(lines[:line + 1] + lines[line:])
  if mutation.kind in ('replace_field', 'plant_path'):
    if mutation.kind == 'plant_path':
      line = 2 + mutation.line % max(len(lines) - 3, 1)  # a data line, not the last (empty)
    tokens = lines[line].split() or [b'']
    field = 0 if mutation.kind == 'plant_path' else mutation.field % len(tokens)
    tokens[field] = mutation.value
    return b'\n'.join(lines[:line] + [b' '.join(tokens)] + lines[line + 1:])
  if mutation.kind == 'empty_lists':
    return b'0\n' + lines[1] + b'\n'
  if mutation.kind == 'header_count':
    return b'\n'.join([mutation.value] + lines[1:])
  position = mutation.position % (len(data) + 1)
  if mutation.kind == 'flip_byte':
    position = min(position, len(data) - 1)
    return data[:position] + bytes([data[position] ^ (mutation.field & 0xff or 0x80)]) + \
        data[position + 1:]
  if mutation.kind == 'truncate':
    return data[:position]
  if mutation.kind == 'insert_bytes':
    return data[:position] + mutation.value + data[position:]
  raise ValueError(f'unknown mutation {mutation.kind!r}')


def write_valid_folder(root: str, num_images: int = 12, seed: int = 0) -> dict:
  """A small valid DeepFashion folder (lists and an empty image folder) in `root`; returns
  each list's bytes, from which every mutation starts."""
  rng = np.random.default_rng(seed)
  category = rng.integers(0, 50, num_images)
  paths = [f'img/Hostile_Title_{vocabulary.CATEGORY_NAMES[c]}/img_{i + 1:08d}.jpg'
           for i, c in enumerate(category)]
  x1, y1 = rng.integers(0, 100, num_images), rng.integers(0, 100, num_images)
  bbox = np.stack([x1, y1, x1 + rng.integers(1, 150, num_images),
                   y1 + rng.integers(1, 150, num_images)], 1)
  landmarks = []
  for c in category:
    k = vocabulary.LANDMARKS_PER_GARMENT_TYPE[vocabulary.CATEGORY_TYPES[c]]
    landmarks.append(np.column_stack([rng.integers(0, 3, k), rng.integers(0, 300, (k, 2))]))
  contents = synthetic.ListContents(
      image_paths=paths, category=category,
      attribute_values=rng.choice(np.array([1, -1, 0], np.int8), (num_images, 1000)),
      bbox=bbox, split=rng.integers(0, 3, num_images).astype(np.int8), landmarks=landmarks)
  names, types = synthetic.attribute_vocabulary()
  synthetic.write_lists(root, contents, names, types)
  os.makedirs(os.path.join(root, 'Img', 'img'), exist_ok=True)
  return {name: pathlib.Path(root, name).read_bytes() for name in annotations.ALL_FILES}


def apply(root: str, valid: dict, mutation: Mutation):
  """Restores the valid lists in `root`, then applies `mutation`."""
  for name, data in valid.items():
    pathlib.Path(root, name).write_bytes(data)
  names = {'plant_path': PATH_LISTS, 'empty_lists': PATH_LISTS + (mutation.file_name,)}.get(
      mutation.kind, (mutation.file_name,))
  for name in names:
    pathlib.Path(root, name).write_bytes(mutated(valid[name], mutation))


def load(root: str, workdir: str, strict: bool = False):
  """What a run does with the folder: `folder.load_index` (parsing it, since the annotation
  cache is emptied first, then caching it) and the summary that `--mode=describe` prints.
  Loads it a second time, from the cache, which must agree."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from deepfashion_jax.data import folder  # pylint: disable=g-import-not-at-top
  data_config = default.get_config().data
  data_config.data_dir = root
  data_config.cache_dir = os.path.join(workdir, 'annotation_cache')
  data_config.strict = strict
  shutil.rmtree(data_config.cache_dir, ignore_errors=True)
  index = folder.load_index(data_config, workdir)
  cached = folder.load_index(data_config, workdir)
  if cached.image_paths.tolist() != index.image_paths.tolist() or \
      cached.odd_paths != index.odd_paths:
    raise AssertionError(f'{root}: the cached index differs from the parsed one')
  unsafe = [p for p in index.image_paths.tolist() if annotations.path_problem(p)]
  if unsafe:  # accepted, but a run would open it: not a clean outcome
    raise AssertionError(f'{root}: the index lists the unsafe path {unsafe[0][:200]!r}')
  return index, index.summary()


def sample_mutations(count: int, seed: int = 0) -> list:
  """A fixed sample of `count` random mutations (the property test draws them at large)."""
  rng = np.random.default_rng(seed)
  mutations = []
  for _ in range(count):
    kind = MUTATIONS[rng.integers(len(MUTATIONS))]
    value = (HOSTILE_PATHS[rng.integers(len(HOSTILE_PATHS))] if kind == 'plant_path' else
             HEADER_COUNTS[rng.integers(len(HEADER_COUNTS))] if kind == 'header_count' else
             HOSTILE_VALUES[rng.integers(len(HOSTILE_VALUES))])
    mutations.append(Mutation(kind, annotations.ALL_FILES[rng.integers(len(
        annotations.ALL_FILES))], line=int(rng.integers(40)), field=int(rng.integers(1, 256)),
        value=value, position=int(rng.integers(1 << 20))))
  return mutations


def named_mutations() -> list:
  """One mutation per hostile case of the reader's contract (docs/dataset.md)."""
  named = [Mutation('plant_path', annotations.CATEGORY_IMG, line=3, value=path)
           for path in HOSTILE_PATHS]
  named += [Mutation('header_count', name, value=count) for name in
            (annotations.ATTR_IMG, annotations.BBOX, annotations.LANDMARKS)
            for count in HEADER_COUNTS[:4]]
  numbers = {annotations.BBOX: (1, 3), annotations.LANDMARKS: (2, 3, 4),
             annotations.CATEGORY_IMG: (1,), annotations.CATEGORY_CLOTH: (1,),
             annotations.ATTR_CLOTH: (-1,), annotations.ATTR_IMG: (5,)}
  for name, fields in numbers.items():
    for field in fields:
      for value in (b'2147483648', b'1099511627876', b'4294967297', b'18446744073709551616'):
        named.append(Mutation('replace_field', name, line=4, field=field, value=value))
  for name in annotations.ALL_FILES:
    named.append(Mutation('insert_bytes', name, value=b'\xff\xfe', position=200))
    named.append(Mutation('replace_field', name, line=5, field=0, value=b'y' * (10 << 20)))
  named.append(Mutation('plant_path', annotations.CATEGORY_IMG, line=6,
                        value=b'img/' + b'q' * (10 << 20)))
  named += [Mutation('empty_lists', name) for name in
            (annotations.CATEGORY_IMG, annotations.CATEGORY_CLOTH, annotations.ATTR_CLOTH)]
  return named


def tries(folder: pathlib.Path):
  """Yields (description, thunk): each thunk loads one hostile folder (see the module's
  docstring); half of the random mutations are loaded with config.data.strict."""
  root, workdir = str(folder / 'DeepFashion'), str(folder / 'run')
  valid = write_valid_folder(root)
  mutations = [(m, False) for m in named_mutations()]
  mutations += [(m, i % 2 == 1) for i, m in enumerate(sample_mutations(100))]
  for mutation, strict in mutations:
    def thunk(mutation=mutation, strict=strict):
      apply(root, valid, mutation)
      load(root, workdir, strict)
    yield mutation.describe() + (' (strict)' if strict else ''), thunk
