"""torch.save's files read without PyTorch, and without running any code they hold.

`read_pth` reads both formats torch.save writes: the zip archive (PyTorch >= 1.6: a pickle
plus one file per tensor storage) and the legacy stream (PyTorch < 1.6: a few pickles, then
the raw storages). One unpickler with an allow-list of the few classes a checkpoint needs
reads both, so that no code in the file runs. Tensors unpickle as placeholders, since the
legacy format stores their bytes after the pickle; `_resolve` then turns them into arrays.

What the file means (a baseline checkpoint, a torchvision state dict, ...) is the families'
business, not this module's: it imports nothing from the project but its error type.
"""

import collections
import dataclasses
import functools
import io
import os
import pickle
import struct
import sys
import types
import zipfile

import ml_dtypes
import numpy as np

from deepfashion_jax.torch_io.errors import CheckpointError

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_, 'ComplexFloatStorage': np.complex64,
    'ComplexDoubleStorage': np.complex128,
}
# torch.serialization.MAGIC_NUMBER and PROTOCOL_VERSION: the legacy format's first pickles.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
_NEITHER_FORMAT = ("not a PyTorch checkpoint: neither torch.save's zip format (PyTorch >= 1.6) "
                   'nor its legacy format (PyTorch < 1.6)')
# What a malformed file can raise while it is parsed: each means "not a usable checkpoint".
_MALFORMED = (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
              AttributeError, OverflowError, RecursionError, struct.error, zipfile.BadZipFile)


# ------------------------------------------------------------------------------- unpickling


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """What `torch.FloatStorage` and its kin unpickle as: only their element type matters."""
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
  """A storage the pickle refers to, by key; its bytes are read once the pickle is done.
  `view` is (offset, size) in elements for a view into it (old legacy files only; torch
  2.x always writes None there)."""
  key: str
  view: tuple | None = None


@dataclasses.dataclass(frozen=True)
class _PendingTensor:
  """A tensor whose storage is not read yet: `tensor.set_(storage, offset, size, stride)`."""
  storage: _Storage
  offset: int
  size: tuple
  stride: tuple
  negative: bool = False
  conjugate: bool = False


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None,
                    metadata=None):
  """torch._utils._rebuild_tensor (4 args) and _rebuild_tensor_v2 (6 args, or 7 when a
  tensor carries the lazy neg/conj bits of newer PyTorch: applied here)."""
  del requires_grad, hooks
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f'a tensor whose storage is {type(storage).__name__}')
  metadata = metadata or {}
  return _PendingTensor(storage, int(offset), tuple(map(int, size)), tuple(map(int, stride)),
                        bool(metadata.get('neg')), bool(metadata.get('conj')))


def _rebuild_parameter(data, requires_grad, hooks, state=None):
  """torch._utils._rebuild_parameter(_with_state): the parameter's tensor is all we need."""
  del requires_grad, hooks, state
  return data


def _rebuild_from_type_v2(rebuild, tensor_type, args, state):
  """torch._tensor._rebuild_from_type_v2, used for tensors with Python attributes: the
  tensor, without its type (always torch.Tensor or Parameter here) or attributes."""
  del tensor_type, state
  return rebuild(*args)


# (module, name) -> what the unpickler gives for it; nothing else can be named in a file.
# The tensor types are inert tokens: a pickle can pass them to _rebuild_from_type_v2, not call them.
_ALLOWED = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
    ('torch', 'Tensor'): 'torch.Tensor',
    ('torch.nn.parameter', 'Parameter'): 'torch.nn.Parameter',
}
_ALLOWED.update({(module, name): _StorageType(np.dtype(dtype))
                 for module in ('torch', 'torch.cuda')
                 for name, dtype in _STORAGE_DTYPES.items()})


def _fresh(allowed):
  """A private copy of an allowed object: the pickle's BUILD opcode sets attributes on
  whatever it is given (a function's __defaults__, say), and that must not outlive the file.
  A builtin class and a str take no attributes."""
  if isinstance(allowed, _StorageType):
    return _StorageType(allowed.dtype)
  return functools.partial(allowed) if isinstance(allowed, types.FunctionType) else allowed


class _Unpickler(pickle.Unpickler):
  """Unpickles a checkpoint of either format with tensors as `_PendingTensor`s; refuses
  every class outside `_ALLOWED`. `storages` collects {key: (dtype, numel)} of the storages
  the pickle names."""

  def __init__(self, file):
    super().__init__(file)
    self.storages = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _fresh(_ALLOWED[module, name])
    raise pickle.UnpicklingError(f'{module}.{name} is not allowed in a checkpoint')

  def persistent_load(self, pid):
    """('storage', type, key, location, numel[, view]): zip (5 items) or legacy (6).
    The location ('cpu', 'cuda:0', ...) is not used: every array lands on the host."""
    if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != 'storage':
      raise pickle.UnpicklingError(f'unknown persistent id {str(pid)[:80]}')
    storage_type, key, _, numel = pid[1:5]
    view = pid[5] if len(pid) == 6 else None
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f'storage type {storage_type!r}')
    known = self.storages.setdefault(key, (storage_type.dtype, int(numel)))
    if known[0] != storage_type.dtype:
      raise pickle.UnpicklingError(f'storage {key} is read as both {known[0]} and '
                                   f'{storage_type.dtype}')
    return _Storage(key, None if view is None else (int(view[1]), int(view[2])))


def _unpickle(file):
  """The next pickle in `file`, and the storages {key: (dtype, numel)} it names."""
  unpickler = _Unpickler(file)
  return unpickler.load(), unpickler.storages


# ---------------------------------------------------------------------- storages -> arrays


def _array(data: bytes, dtype: np.dtype, numel: int, byteorder: str) -> np.ndarray:
  """A storage's first `numel` elements, in the host's byte order."""
  if len(data) < numel * dtype.itemsize:
    raise CheckpointError(f'a storage holds {len(data)} bytes, not the {numel} x '
                          f'{dtype.itemsize} its tensors need')
  array = np.frombuffer(data, dtype, count=numel)
  return array if byteorder == sys.byteorder or dtype.itemsize == 1 else array.byteswap()


def _strided_copy(storage: np.ndarray, offset: int, size: tuple, stride: tuple):
  """`torch.empty(0).set_(storage, offset, size, stride)` in NumPy, copied. The numbers come
  from the file and as_strided checks nothing, so a reach past the storage is refused."""
  if len(size) != len(stride) or min((offset, *size, *stride)) < 0:
    raise CheckpointError(f'a tensor has offset {offset}, size {size}, stride {stride}')
  if 0 in size:
    return np.zeros(size, storage.dtype)
  end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
  if end > storage.size:
    raise CheckpointError(f'a tensor of size {size} reaches element {end} of a storage of '
                          f'{storage.size}')
  itemsize = storage.dtype.itemsize
  return np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                         strides=tuple(s * itemsize for s in stride)).copy()


def _materialise(tensor: _PendingTensor, storages: dict) -> np.ndarray:
  storage = storages[tensor.storage.key]
  if tensor.storage.view is not None:
    view_offset, view_size = tensor.storage.view
    storage = storage[view_offset:view_offset + view_size]
  array = _strided_copy(storage, tensor.offset, tensor.size, tensor.stride)
  array = np.conj(array) if tensor.conjugate else array
  return np.negative(array) if tensor.negative else array


def _resolve(obj, storages: dict):
  """`obj` with every `_PendingTensor` in its dicts, lists and tuples made a NumPy array."""
  if isinstance(obj, _PendingTensor):
    return _materialise(obj, storages)
  if isinstance(obj, dict):
    return {key: _resolve(value, storages) for key, value in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(value, storages) for value in obj)
  return obj


# ---------------------------------------------------------------------------- the formats


def _read_zip(archive: zipfile.ZipFile):
  """torch.save's zip format: `<name>/data.pkl`, `<name>/data/<key>` per storage in the
  writer's byte order, which newer files record in `<name>/byteorder`; older files, which do
  not, are taken as little-endian, as every common writer is."""
  names = archive.namelist()
  pickles = [n for n in names if n.endswith('/data.pkl')]
  if not pickles:
    raise CheckpointError('a zip archive, but not a PyTorch checkpoint (no data.pkl inside)')
  prefix = pickles[0][:-len('data.pkl')]
  with archive.open(pickles[0]) as f:
    obj, named = _unpickle(f)
  byteorder = 'little'
  if f'{prefix}byteorder' in names:
    byteorder = archive.read(f'{prefix}byteorder').decode()
  storages = {key: _array(archive.read(f'{prefix}data/{key}'), dtype, numel, byteorder)
              for key, (dtype, numel) in named.items()}
  return _resolve(obj, storages)


def _legacy_start(head: bytes) -> int | None:
  """Where the legacy format's magic-number pickle ends, or None if `head` (the file's first
  bytes) does not start with one. Only the head is read, whatever lengths a foreign file holds."""
  head = io.BytesIO(head)
  try:
    is_legacy = _unpickle(head)[0] == _LEGACY_MAGIC
  except (*_MALFORMED, MemoryError):  # a foreign file's length fields can be anything
    return None
  return head.tell() if is_legacy else None


def _read_exactly(file, size: int, total: int) -> bytes:
  """`size` bytes, or a CheckpointError when the file (of `total` bytes) ends before."""
  if size > total - file.tell():
    raise CheckpointError(f'truncated: the file ends at byte {total}, {size} bytes of storage '
                          f'were due from byte {file.tell()}')
  return file.read(size)


def _read_legacy(file):
  """torch.save's legacy format (`_legacy_save`), read from just after the magic number:
  pickles of the protocol version, a sys-info dict, the object and the sorted storage keys;
  then per key the storage as `_write_file` writes it: an int64 element count and the
  elements, both little-endian whatever the writer's byte order."""
  if (version := _unpickle(file)[0]) != _LEGACY_PROTOCOL:
    raise CheckpointError(f'legacy PyTorch format version {version!r}, expected '
                          f'{_LEGACY_PROTOCOL}')
  _unpickle(file)  # sys info: sizes of C types and byte order, neither used by the data
  obj, named = _unpickle(file)
  keys, _ = _unpickle(file)
  if set(keys) != set(named):
    raise CheckpointError(f'the stored storages {sorted(keys)[:3]}... are not the ones its '
                          f'tensors use {sorted(named)[:3]}...')
  total = os.fstat(file.fileno()).st_size
  storages = {}
  for key in keys:
    dtype, numel = named[key]
    (count,) = struct.unpack('<q', _read_exactly(file, 8, total))
    if count != numel:
      raise CheckpointError(f'storage {key} holds {count} elements, its tensors say {numel}')
    storages[key] = _array(_read_exactly(file, count * dtype.itemsize, total), dtype, count,
                           'little')
  return _resolve(obj, storages)


def _read(path: str):
  """`read_pth` without the file's name in its errors."""
  with open(path, 'rb') as file:
    head = file.read(64)
    if head.startswith(b'PK\x03\x04'):  # a zip archive's first local header, as torch.load checks
      file.seek(0)
      with zipfile.ZipFile(file) as archive:
        return _read_zip(archive)
    start = _legacy_start(head)
    if start is None:
      raise CheckpointError(_NEITHER_FORMAT)
    file.seek(start)
    return _read_legacy(file)


def read_pth(path: str):
  """The object torch.save wrote to `path`, in either of its formats, with every tensor a
  NumPy array; refuses any class outside a small allow-list, so no code in the file runs."""
  try:
    return _read(path)
  except CheckpointError as e:
    raise CheckpointError(f'{path}: {e}') from None
  except _MALFORMED as e:
    raise CheckpointError(f'{path}: cannot read the checkpoint: {e}') from None
