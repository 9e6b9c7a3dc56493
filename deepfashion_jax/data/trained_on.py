"""What a run was trained on, remembered in its workdir: `WORKDIR/trained_on.json`.

A model's outputs are numbers: its category output 17 is whatever line 17 of the training
folder's `list_category_cloth.txt` named. So training writes, before its first step, a
record of
- the vocabulary that names the outputs: category names and their garment types,
  attribute names and their types, the names of those types, the landmark slots;
- the data folder it reads: its absolute path, whether it is the synthetic stand-in written
  into the workdir (config.data.data_dir empty), and the SHA-256 of its seven lists.
Then:
- predict and export name the outputs from the record, needing no data folder at all
  (`photos.load_output_names`);
- evaluate never scores a model trained on a real folder on the synthetic stand-in: with
  config.data.data_dir empty it stops before writing a single image, naming the folder
  the run was trained on (`refuse_synthetic_stand_in`); on lists other than the training
  folder's it warns loudly, naming both folders and fingerprints (`warn_if_other_data`);
- resuming training on other lists is refused, before anything is restored
  (`check_and_record_training_data`): the data iterator's saved position, the class
  statistics of the loss and the split all belong to the lists the run started on. The same
  lists at another path (a moved or copied folder) are accepted, with a log line, and the
  record names the new path. To go on training on edited lists on purpose, delete the
  record: the run then records the lists it reads.

Why one JSON file in the workdir, not metadata in each checkpoint: a workdir holds one run
(training refuses another configuration, and with this record other lists), so one record
describes every checkpoint in it; it exists from the start of the run, before any
checkpoint; it is plain JSON that a serving stack or a person reads without orbax; and the
checkpoint format stays as it is (older checkpoints read as before). It is written
atomically (a temporary file, then a rename) by process 0; every process checks it.

A workdir without a record (trained before runs kept one, or converted from PyTorch
without config.data.data_dir) works as before where that is right: names come from
config.data.data_dir or the synthetic folder in the workdir, and predict refuses, saying
what to pass, rather than invent names.

The fingerprint is the SHA-256 of the seven lists' bytes (each preceded by its name and
size, in `annotations.ALL_FILES` order): content, not sizes and times, so that a copy of
the folder on another disk or host matches. Hashing the real lists (~930 MB) takes seconds,
so the digest is kept in the annotation cache folder under the cache's own key (the lists'
sizes and modification times): a folder's lists are hashed again only after they change.
"""

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Optional

from absl import logging
import jax

from deepfashion_jax import errors
from deepfashion_jax.data import annotations
from deepfashion_jax.data import folder
from deepfashion_jax.data import landmark_slots
from deepfashion_jax.data import vocabulary

RECORD_NAME = 'trained_on.json'
_RECORD_VERSION = 1
_MAX_RECORD_BYTES = 16 << 20  # the real vocabulary takes ~40 KB
_HASH_CHUNK_BYTES = 1 << 20


class TrainedOnError(errors.DeepFashionError, ValueError):
  """A run's record is unreadable, or the data does not fit what the run was trained on."""


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """What the model's outputs are called, in output order (types 0-based)."""
  category_names: tuple
  category_types: tuple  # garment type of each category
  attribute_names: tuple
  attribute_types: tuple
  garment_type_names: tuple = vocabulary.GARMENT_TYPE_NAMES
  attribute_type_names: tuple = vocabulary.ATTRIBUTE_TYPE_NAMES
  landmark_slots: tuple = landmark_slots.SLOT_NAMES


@dataclasses.dataclass(frozen=True)
class DataFolder:
  """A data folder's identity."""
  path: str  # absolute
  synthetic: bool  # the stand-in written into the workdir (config.data.data_dir empty)
  lists_sha256: str


@dataclasses.dataclass(frozen=True)
class Record:
  """What `RECORD_NAME` holds."""
  vocabulary: Vocabulary
  data: Optional[DataFolder]  # None: converted from PyTorch, not trained in this workdir
  converted_from: str = ''  # --mode=convert's --torch_checkpoint


# ------------------------------------------------------------------- the folder's facts


def read_vocabulary(root: str) -> Vocabulary:
  """The names that a folder's list_category_cloth.txt and list_attr_cloth.txt give."""
  categories, category_types = annotations.read_category_cloth(root)
  attributes, attribute_types = annotations.read_attr_cloth(root)
  return Vocabulary(tuple(str(n) for n in categories), tuple(int(t) for t in category_types),
                    tuple(str(n) for n in attributes), tuple(int(t) for t in attribute_types))


def lists_sha256(root: str, cache_dir: str = '') -> str:
  """The SHA-256 of the folder's lists (module docstring), kept in `cache_dir` if given."""
  memo = (annotations.cache_path(root, cache_dir)[:-len('.npz')] + '.sha256'
          if cache_dir else '')
  digest = _kept_digest(memo) if memo else ''
  if digest:
    return digest
  digest = _hash_lists(root)
  if memo:
    try:
      annotations.keep_in_cache(memo, lambda f: f.write(digest.encode('ascii')))
    except OSError as e:  # a read-only cache folder: hashed again next time
      logging.info('Could not keep the lists\' SHA-256 in %s: %s', memo, e)
  return digest


def _kept_digest(memo: str) -> str:
  """The digest kept in `memo`; '' when there is none that reads (then it is computed)."""
  try:
    if not os.path.isfile(memo):
      return ''
    with open(memo, encoding='ascii', errors='replace') as f:
      digest = f.read(65).strip()
  except OSError:
    return ''
  return digest if len(digest) == 64 and set(digest) <= set('0123456789abcdef') else ''


def _hash_lists(root: str) -> str:
  """The SHA-256 of the lists, read through one buffer (memory: the buffer)."""
  digest, buffer = hashlib.sha256(), bytearray(_HASH_CHUNK_BYTES)
  view = memoryview(buffer)
  for name in annotations.ALL_FILES:
    path = os.path.join(root, name)
    if not os.path.isfile(path):
      continue
    digest.update(f'{name}\0{os.path.getsize(path)}\0'.encode())
    with open(path, 'rb') as f:
      while count := f.readinto(buffer):
        digest.update(view[:count])
  return digest.hexdigest()


def data_folder(data_config, workdir: str) -> DataFolder:
  """The identity of the folder the configuration reads (written already: this never
  writes the synthetic one)."""
  synthetic = not data_config.data_dir
  root = (os.path.join(os.path.abspath(workdir), folder.SYNTHETIC_FOLDER) if synthetic
          else folder.data_root(data_config, workdir))
  return DataFolder(root, synthetic,
                    lists_sha256(root, folder.annotation_cache_dir(data_config, workdir)))


# ---------------------------------------------------------------- the record, in and out


def record_path(workdir: str) -> str:
  return os.path.join(workdir, RECORD_NAME)


def write(workdir: str, record: Record):
  """Writes the record (process 0 only; the others return)."""
  if jax.process_index() > 0:
    return
  contents = dict(version=_RECORD_VERSION, vocabulary=dataclasses.asdict(record.vocabulary),
                  data=dataclasses.asdict(record.data) if record.data else None,
                  converted_from=record.converted_from)
  _write_atomically(record_path(workdir), json.dumps(contents, indent=1) + '\n')


def _write_atomically(path: str, text: str):
  with tempfile.NamedTemporaryFile('w', dir=os.path.dirname(path) or '.', suffix='.tmp',
                                   delete=False, encoding='utf-8') as f:
    f.write(text)
  os.replace(f.name, path)


def read(workdir: str) -> Optional[Record]:
  """The workdir's record; None when it has none. A damaged one raises TrainedOnError
  naming the file and what is wrong."""
  path = record_path(workdir)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, 'rb') as f:
      # Read as large as the file says (read(n) allocates n bytes), never past the limit.
      text = f.read(min(os.fstat(f.fileno()).st_size, _MAX_RECORD_BYTES) + 1)
    if len(text) > _MAX_RECORD_BYTES:
      raise ValueError(f'larger than {_MAX_RECORD_BYTES} bytes')
    return _parse(json.loads(text.decode('utf-8')))
  except (OSError, ValueError, TypeError, KeyError, RecursionError) as e:
    raise TrainedOnError(
        f'{path}: not a record of what the run was trained on ({type(e).__name__}: '
        f'{str(e)[:200]}). Delete it (the next training run writes it again) and pass '
        '--config.data.data_dir=<the folder it was trained on>.') from None


def _strings(value, what: str) -> tuple:
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
    raise ValueError(f'{what}: expected a list of strings')
  return tuple(value)


def _types(value, what: str, count: int, names: tuple) -> tuple:
  if (not isinstance(value, list) or len(value) != count
      or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(names)
                 for v in value)):
    raise ValueError(f'{what}: expected {count} integers in 0..{len(names) - 1}')
  return tuple(value)


def _parse(contents) -> Record:
  """The Record of the JSON's contents; ValueError (or KeyError, TypeError) naming what is
  wrong."""
  if not isinstance(contents, dict) or contents.get('version') != _RECORD_VERSION:
    raise ValueError(f'expected an object with "version": {_RECORD_VERSION}')
  words = contents['vocabulary']
  garment_types = _strings(words['garment_type_names'], 'garment_type_names')
  attribute_types = _strings(words['attribute_type_names'], 'attribute_type_names')
  categories = _strings(words['category_names'], 'category_names')
  attributes = _strings(words['attribute_names'], 'attribute_names')
  vocab = Vocabulary(
      categories, _types(words['category_types'], 'category_types', len(categories),
                         garment_types),
      attributes, _types(words['attribute_types'], 'attribute_types', len(attributes),
                         attribute_types),
      garment_types, attribute_types, _strings(words['landmark_slots'], 'landmark_slots'))
  data = contents['data']
  if data is not None:
    if not (isinstance(data, dict) and isinstance(data.get('path'), str)
            and isinstance(data.get('synthetic'), bool)
            and isinstance(data.get('lists_sha256'), str)):
      raise ValueError('data: expected {"path": str, "synthetic": bool, "lists_sha256": str}')
    data = DataFolder(data['path'], data['synthetic'], data['lists_sha256'])
  converted_from = contents.get('converted_from', '')
  if not isinstance(converted_from, str):
    raise ValueError('converted_from: expected a string')
  return Record(vocab, data, converted_from)


# ------------------------------------------------------------------------- the checks


def _has_trained_checkpoints(workdir: str) -> bool:
  """Whether the workdir holds a checkpoint of a trained step (not step 0, converted):
  `checkpoints.py` writes step N into WORKDIR/checkpoints/N (named here, not imported:
  data code does not import the model's)."""
  checkpoints = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(checkpoints) and any(
      name.isdigit() and int(name) > 0 for name in os.listdir(checkpoints))


def _synthetic_folder_written(workdir: str) -> bool:
  root = os.path.join(workdir, folder.SYNTHETIC_FOLDER)
  return os.path.isfile(os.path.join(root, annotations.ATTR_CLOTH))


def refuse_synthetic_stand_in(data_config, workdir: str, training: bool):
  """Before any data is read: raises TrainedOnError when config.data.data_dir is empty for
  a model not trained on the synthetic folder, which would then be written and read.

  Training (resuming) refuses it for a run recorded as trained on a real folder.
  Evaluation accepts it only for a run recorded as trained on the synthetic folder, or an
  unrecorded one whose workdir holds a synthetic folder already (training wrote it)."""
  if data_config.data_dir:
    return
  record = read(workdir)
  trained_folder = record.data if record else None
  if trained_folder is not None and trained_folder.synthetic:
    return
  if training and (trained_folder is None or not _has_trained_checkpoints(workdir)):
    return
  if not training and trained_folder is None and (_synthetic_folder_written(workdir)
                                              or data_config.synthetic_images <= 0):
    return  # the synthetic folder training wrote, or none at all (folder.data_root says so)
  stand_in = ('a synthetic stand-in written into the workdir' if data_config.synthetic_images > 0
              else 'no data folder at all')
  doing = (f'resuming would go on training on {stand_in}' if training else
           f'--mode=evaluate would score the model on {stand_in}')
  if trained_folder is not None:
    raise TrainedOnError(
        f'config.data.data_dir is empty: {doing}, but the model in {workdir} was trained on '
        f'{trained_folder.path}. Set --config.data.data_dir={trained_folder.path} (or where that '
        'folder is now).')
  what = (f'its model was converted from {record.converted_from}' if record else
          f'it has no {RECORD_NAME}: trained before runs recorded their data, or converted '
          'from PyTorch')
  raise TrainedOnError(
      f'config.data.data_dir is empty: {doing}, but {workdir} holds no synthetic folder and '
      f'does not say what its model was trained on ({what}). Set '
      '--config.data.data_dir=<the DeepFashion folder to evaluate on>.')


def check_and_record_training_data(data_config, workdir: str):
  """At the start of training, the folder written or found: raises TrainedOnError when the
  workdir's trained checkpoints were trained on other lists; otherwise (re)writes the
  record with this folder and its vocabulary."""
  here = data_folder(data_config, workdir)
  record = read(workdir)
  before = record.data if record else None
  if before is not None and _has_trained_checkpoints(workdir):
    if before.lists_sha256 != here.lists_sha256:
      raise TrainedOnError(
          f'{workdir} was trained on the lists of {before.path} (SHA-256 '
          f'{before.lists_sha256[:16]}...), and config.data points at {here.path}, whose '
          f'lists differ (SHA-256 {here.lists_sha256[:16]}...): the run does not resume on '
          'other data. Set --config.data.data_dir to the folder it was trained on, or train '
          f'in a new --workdir (to go on with edited lists on purpose, delete {RECORD_NAME} '
          'in the workdir).')
    if before.path != here.path:
      logging.info('%s was trained on %s; the same lists are now at %s: resuming there.',
                   workdir, before.path, here.path)
  if record is None or record.data != here:
    write(workdir, Record(read_vocabulary(here.path), here))


def warn_if_other_data(data_config, workdir: str) -> dict:
  """At the start of --mode=evaluate, the folder written or found: a loud warning naming
  both folders and fingerprints when its lists are not the ones the run was trained on,
  and whether they name the outputs differently. Returns what evaluate's JSON says of its
  data: {path, lists_sha256, trained_on_these_lists: true, false, or null when the workdir
  does not record the lists it was trained on}."""
  here = data_folder(data_config, workdir)
  record = read(workdir)
  before = record.data if record else None
  said = dict(path=here.path, lists_sha256=here.lists_sha256,
              trained_on_these_lists=None if before is None
              else here.lists_sha256 == before.lists_sha256)
  if before is None:
    return said
  if said['trained_on_these_lists']:
    if here.path != before.path:
      logging.info('Evaluating on %s: the same lists as %s, which the run was trained on.',
                   here.path, before.path)
    return said
  renamed = _first_renamed_output(record.vocabulary, read_vocabulary(here.path))
  logging.warning(
      'NOT THE DATA THIS MODEL WAS TRAINED ON: evaluating on %s (lists SHA-256 %s), but '
      '%s was trained on %s (lists SHA-256 %s).%s The figures below measure the model on '
      'other data; if that is not what you meant, set --config.data.data_dir=%s.',
      here.path, here.lists_sha256, workdir, before.path, before.lists_sha256,
      f' Their lists also name the outputs differently: {renamed}.' if renamed else '',
      before.path)
  return said


def _first_renamed_output(trained: Vocabulary, here: Vocabulary) -> str:
  """'attribute 12 is 'x' in training, 'y' here' for the first output named otherwise."""
  for what, a, b in (('category', trained.category_names, here.category_names),
                     ('attribute', trained.attribute_names, here.attribute_names)):
    if len(a) != len(b):
      return f'{len(a)} {what} names in training, {len(b)} here'
    for i, (x, y) in enumerate(zip(a, b)):
      if x != y:
        return f'{what} {i} is {x!r} in training, {y!r} here'
  return ''


def conversion_record(data_config, torch_checkpoint: str) -> Optional[Record]:
  """--mode=convert, before converting: the record of a converted model, named by
  config.data.data_dir's lists (a baseline's outputs are the benchmark's, in its lists'
  order); None without a data folder (predict will then ask for one)."""
  if not data_config.data_dir:
    logging.info('No config.data.data_dir: the converted model\'s outputs stay unnamed; '
                 '--mode=predict on it will need --config.data.data_dir=<your DeepFashion '
                 'folder> (its Anno/list_*_cloth.txt files name the outputs).')
    return None
  root = folder.data_root(data_config, '')
  return Record(read_vocabulary(root), None, os.path.abspath(torch_checkpoint))


def record_conversion(workdir: str, record: Optional[Record]):
  """--mode=convert, after writing the step-0 checkpoint: writes `conversion_record`'s
  record, unless the workdir records a training run already (its checkpoints stay)."""
  if record is None:
    return
  try:
    before = read(workdir)
  except TrainedOnError:
    before = None  # a damaged record: replaced
  if before is not None and before.data is not None and _has_trained_checkpoints(workdir):
    return
  write(workdir, record)
