"""Hostile run records: a workdir's `trained_on.json` (data/trained_on.py) damaged by hand
or by accident: cut short, not UTF-8, nested without end, numbers of 10,000 digits, types
out of range or of the wrong kind, larger than any record, or not a file at all (a folder,
a FIFO, a link to /dev/zero), and random damage (bytes flipped, cut, repeated).

`tries(folder)` yields (description, thunk); each thunk writes one such record into a
workdir of its own and asks for the outputs' names through `photos.load_output_names`,
what --mode=predict and --mode=export call (with no data folder: the record alone names
the outputs): it returns when the record is accepted and raises `DeepFashionError` when it
is refused. `mutated(data, draw)` is the random damage, which tests/test_trained_on.py
also draws with hypothesis.

  python -m benchmarks.hostile_input --surfaces run_record --each   # each try's outcome
"""

import json
import os
import pathlib
import random
import tempfile

from configs import test as test_config
from deepfashion_jax.data import photos
from deepfashion_jax.data import trained_on
from deepfashion_jax.data import vocabulary

SURFACE = 'run record (trained_on.json)'
RANDOM_TRIES = 80


def valid_record() -> dict:
  """A record as training writes one: the benchmark's names, a real folder."""
  types = [t for t, count in enumerate(vocabulary.ATTRIBUTE_TYPE_COUNTS) for _ in range(count)]
  words = trained_on.Vocabulary(vocabulary.CATEGORY_NAMES, vocabulary.CATEGORY_TYPES,
                                tuple(f'attribute {i}' for i in range(len(types))),
                                tuple(types))
  folder = trained_on.DataFolder('/data/DeepFashion', False, '0' * 64)
  with tempfile.TemporaryDirectory() as workdir:
    trained_on.write(workdir, trained_on.Record(words, folder))
    with open(trained_on.record_path(workdir)) as f:
      return json.load(f)


def names_of_record(workdir: str):
  """What predict does with the workdir's record, with no data folder configured."""
  config = test_config.get_config()
  config.data.data_dir, config.data.synthetic_images = '', 0
  return photos.load_output_names(config.data, workdir)


def mutated(data: bytes, draw) -> bytes:
  """`data` with one random damage; `draw(n)` is a random integer in [0, n)."""
  where = draw(len(data) + 1)
  kind = draw(4)
  if kind == 0:  # cut short
    return data[:where]
  if kind == 1:  # a byte flipped
    if where == len(data):
      return data + b'\x00'
    return data[:where] + bytes([data[where] ^ (1 << draw(8))]) + data[where + 1:]
  if kind == 2:  # a stretch repeated
    end = min(len(data), where + 1 + draw(64))
    return data[:end] + data[where:end] + data[end:]
  return data[:where] + data[min(len(data), where + 1 + draw(64)):]  # a stretch removed


def _edited(change) -> bytes:
  record = valid_record()
  change(record)
  return json.dumps(record).encode()


def _set(path: tuple, value):
  def change(record):
    target = record
    for key in path[:-1]:
      target = target[key]
    target[path[-1]] = value
  return change


def _hand_made() -> list:
  """(description, bytes of trained_on.json)."""
  valid = json.dumps(valid_record()).encode()
  cases = [
      ('a valid record', valid),
      ('an empty file', b''),
      ('cut in the middle', valid[:len(valid) // 2]),
      ('not UTF-8', valid[:100] + b'\xff\xfe\xc3' + valid[100:]),
      ('a NUL byte', valid[:50] + b'\x00' + valid[50:]),
      ('100,000 nested lists', b'[' * 100_000 + b']' * 100_000),
      ('a 10,000-digit version', b'{"version": ' + b'9' * 10_000 + b'}'),
      ('17 MB of spaces', b' ' * (17 << 20)),
      ('a list, not an object', b'[]'),
      ('null', b'null'),
      ('version 2', _edited(_set(('version',), 2))),
      ('version "1"', _edited(_set(('version',), '1'))),
      ('no vocabulary', _edited(lambda r: r.pop('vocabulary'))),
      ('vocabulary a string', _edited(_set(('vocabulary',), 'names'))),
      ('category names numbers', _edited(_set(('vocabulary', 'category_names'),
                                             list(range(50))))),
      ('category types booleans', _edited(_set(('vocabulary', 'category_types'), [True] * 50))),
      ('category type 3', _edited(_set(('vocabulary', 'category_types'), [3] * 50))),
      ('category type -1', _edited(_set(('vocabulary', 'category_types'), [-1] * 50))),
      ('category type 1.0', _edited(_set(('vocabulary', 'category_types'), [1.0] * 50))),
      ('category type 2^64', _edited(_set(('vocabulary', 'category_types'), [2**64] * 50))),
      ('one type short', _edited(lambda r: r['vocabulary']['attribute_types'].pop())),
      ('attribute type 5', _edited(lambda r: r['vocabulary']['attribute_types'].__setitem__(
          0, 5))),
      ('no garment type names', _edited(_set(('vocabulary', 'garment_type_names'), []))),
      ('a 1 MB name', _edited(lambda r: r['vocabulary']['attribute_names'].__setitem__(
          0, 'x' * (1 << 20)))),
      ('names nested', _edited(_set(('vocabulary', 'attribute_names'), [['a']] * 1000))),
      ('landmark slots null', _edited(_set(('vocabulary', 'landmark_slots'), None))),
      ('data a string', _edited(_set(('data',), '/data'))),
      ('data path a number', _edited(_set(('data', 'path'), 7))),
      ('data synthetic "no"', _edited(_set(('data', 'synthetic'), 'no'))),
      ('data null (converted)', _edited(_set(('data',), None))),
      ('converted_from a list', _edited(_set(('converted_from',), ['a.pth']))),
      ('NaN where a type belongs', valid.replace(b'"category_types": [0', b'"category_types": [NaN',
                                                 1)),
      ('duplicate keys', b'{"version": 1, "version": 2}'),
  ]
  return cases


def _write_try(folder: pathlib.Path, number: int, data: bytes):
  workdir = folder / f'run_{number}'
  workdir.mkdir()
  (workdir / trained_on.RECORD_NAME).write_bytes(data)
  return lambda: names_of_record(str(workdir))


def tries(folder: pathlib.Path):
  """Yields (description, thunk): hand-made records, records that are not files, and
  RANDOM_TRIES randomly damaged ones (a fixed seed)."""
  cases = _hand_made()
  for number, (description, data) in enumerate(cases):
    yield description, _write_try(folder, number, data)
  number = len(cases)
  for description, make in (('a folder named trained_on.json', os.mkdir),
                            ('a FIFO named trained_on.json', os.mkfifo),
                            ('a link to /dev/zero', lambda p: os.symlink('/dev/zero', p))):
    workdir = folder / f'run_{number}'
    workdir.mkdir()
    make(str(workdir / trained_on.RECORD_NAME))
    yield description, lambda w=str(workdir): names_of_record(w)
    number += 1
  valid = json.dumps(valid_record()).encode()
  rng = random.Random(0)
  for i in range(RANDOM_TRIES):
    yield f'random damage {i}', _write_try(folder, number + i,
                                           mutated(valid, rng.randrange))
