"""torch.save's files read without PyTorch, and without running any code they hold.

`read_pth` reads both formats torch.save writes: the zip archive (PyTorch >= 1.6: a pickle
plus one file per tensor storage) and the legacy stream (PyTorch < 1.6: a few pickles, then
the raw storages). One unpickler with an allow-list of the few classes a checkpoint needs
reads both, so that no code in the file runs. Tensors unpickle as placeholders, since the
legacy format stores their bytes after the pickle; `_resolve` then turns them into arrays.

What a file can make is bounded by its size, whatever its numbers say:
- Every length the file states is checked against the bytes it holds before anything is
  allocated for it. Each pickle is walked opcode by opcode (pickletools) before it is
  unpickled, since the unpickler allocates what a length field or a memo index claims
  before it reads a byte (BINBYTES8 can claim 2^40 bytes), and a tuple may have at most
  `MAX_TUPLE_NODES` nodes counting each reference (hashing a dict key walks them all, and
  pairs of pairs nested 40 deep take 2^40 steps); the storages' declared sizes
  must add up to at most the file's size; a zip member is read only up to the bytes its
  tensors declare, and must hold exactly those, stored uncompressed as torch.save writes it.
- Each storage is read once, into one buffer. Every tensor is a read-only NumPy view into
  its storage's buffer, as torch's tensors are views into storages: a tensor referenced a
  thousand times, or a broadcast (stride 0, as `torch.zeros(1).expand(n, n)` saves), costs
  no more than its storage. A tensor that reaches past its storage is refused; one larger
  than the part of the storage it spans (a broadcast) is kept as a view up to
  `MAX_BROADCAST_BYTES`, and refused beyond. A lazily negated or conjugated tensor is a view
  into a negated or conjugated copy of its storage, made once per storage.
So the arrays cost at most 4 times the file's size (a storage, and at most its negated,
conjugated and negated-conjugated copies; a plain checkpoint's cost once its size), and the
pickle's own objects (dicts, keys, numbers) what any unpickler's do: a few hundred bytes per
opcode at most.

What the file means (a baseline checkpoint, a torchvision state dict, ...) is the families'
business, not this module's: it imports nothing from the project but its error type.
"""

import collections
import dataclasses
import functools
import io
import math
import os
import pickle
import pickletools
import reprlib
import struct
import sys
import types
import warnings
import zipfile

import ml_dtypes
import numpy as np

from deepfashion_jax.torch_io.errors import CheckpointError

# The largest broadcast kept as a view: torch.zeros(1).expand(16384, 16384) is 1 GiB.
MAX_BROADCAST_BYTES = 2**32
# The most nodes a tuple may have as a tree (each reference counted anew), which hashing it
# walks: a checkpoint's tuples (sizes, strides, arguments) have a handful.
MAX_TUPLE_NODES = 2**20
_MAX_COUNT = 2**62  # sizes, strides, offsets and element counts: int64 with room to add
_MAX_DIMENSIONS = 32  # NumPy's limit (1.x; 2.x allows 64)
_CHUNK = 2**20  # bytes read at a time from a zip member
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
# What torch.load accepts in a zip archive's `byteorder` member.
_BYTE_ORDERS = {b'little': 'little', b'big': 'big'}


class _OutsideTheFile(OSError):
  """A seek before the file's start (an OSError: zipfile catches those where it probes)."""


# What a malformed file can raise while it is parsed: each means "not a usable checkpoint".
_MALFORMED = (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
              AttributeError, OverflowError, RecursionError, struct.error, zipfile.BadZipFile,
              NotImplementedError, _OutsideTheFile)


def _shown(value) -> str:
  """A value from the file for a message: short, whatever its size or depth."""
  if isinstance(value, int) and abs(value) >= 2**64:
    return f'<an integer of {value.bit_length()} bits>'
  return reprlib.repr(value)


def _count(value, what: str) -> int:
  """`value` (from the file) as a size, stride, offset or element count."""
  if not isinstance(value, int) or not 0 <= value <= _MAX_COUNT:
    raise pickle.UnpicklingError(f'{what} is {_shown(value)}, not an integer in [0, 2^62]')
  return value


class _BoundedFile:
  """A binary file whose reads never ask for more than it holds: BufferedReader.read(n)
  allocates n bytes before it reads, however few the file has."""

  def __init__(self, file):
    self._file = file
    self.size = os.fstat(file.fileno()).st_size

  def remaining(self) -> int:
    return max(0, self.size - self._file.tell())

  def _bound(self, n) -> int:
    return self.remaining() if n is None or n < 0 else min(n, self.remaining())

  def read(self, n=-1) -> bytes:
    return self._file.read(self._bound(n))

  def readline(self, limit=-1) -> bytes:
    return self._file.readline(self._bound(limit))

  def readinto(self, buffer) -> int:
    return self._file.readinto(buffer)

  def seek(self, offset: int, whence: int = 0) -> int:
    position = offset + {0: 0, 1: self._file.tell(), 2: self.size}[whence]
    if position < 0:
      raise _OutsideTheFile(f'a seek to byte {position}')
    return self._file.seek(position)

  def tell(self) -> int:
    return self._file.tell()

  def seekable(self) -> bool:
    return True


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


def _shape(value, what: str) -> tuple:
  """A tensor's size or stride from the file, each number checked."""
  if not isinstance(value, (tuple, list)) or len(value) > _MAX_DIMENSIONS:
    raise pickle.UnpicklingError(f'a tensor {what} of {_shown(value)}')
  return tuple(_count(n, f'a tensor {what}') for n in value)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None,
                    metadata=None):
  """torch._utils._rebuild_tensor (4 args) and _rebuild_tensor_v2 (6 args, or 7 when a
  tensor carries the lazy neg/conj bits of newer PyTorch: applied here)."""
  del requires_grad, hooks
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f'a tensor whose storage is {type(storage).__name__}')
  size, stride = _shape(size, 'size'), _shape(stride, 'stride')
  if len(size) != len(stride):
    raise pickle.UnpicklingError(f'a tensor of size {size} has stride {stride}')
  metadata = metadata if isinstance(metadata, dict) else {}
  return _PendingTensor(storage, _count(offset, 'a tensor offset'), size, stride,
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
      raise pickle.UnpicklingError(f'unknown persistent id {_shown(pid)}')
    storage_type, key, _, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f'storage type {_shown(storage_type)}')
    if not isinstance(key, str):
      raise pickle.UnpicklingError(f'storage key {_shown(key)}, not a string')
    declared = (storage_type.dtype, _count(numel, f'the element count of storage {key}'))
    known = self.storages.setdefault(key, declared)
    if known != declared:
      raise pickle.UnpicklingError(f'storage {key} is declared both {known[1]} x {known[0]} '
                                   f'and {declared[1]} x {declared[0]}')
    view = pid[5] if len(pid) == 6 else None
    if view is None:
      return _Storage(key)
    if not isinstance(view, tuple) or len(view) != 3:
      raise pickle.UnpicklingError(f'storage {key} has a view {_shown(view)}')
    return _Storage(key, (_count(view[1], 'a view offset'), _count(view[2], 'a view size')))


class _PickleWalk:
  """The pickle machine's stack, marks and memo, opcode by opcode, holding for each object only
  its size as a tree (every reference counted anew) when it is a tuple, 1 otherwise.
  Hashing a tuple walks that tree, and a few hundred bytes of pickle can nest pairs of one
  pair 40 deep: a dict key or set element of 2^40 nodes. Tuples are the only hashable
  containers that hash their items each time, so bounding their size bounds every hash."""

  _RETURNS_FIRST = frozenset(
      ['SETITEM', 'SETITEMS', 'APPEND', 'APPENDS', 'ADDITEMS', 'BUILD', 'MEMOIZE'])

  def __init__(self):
    self.stack, self.marks, self.memo, self.opcodes = [], [], {}, 0

  def _above_mark(self) -> int:
    return len(self.stack) - (self.marks[-1] if self.marks else 0)

  def _pop(self, count: int) -> list:
    if count > self._above_mark():
      raise ValueError(f'stack underflow at opcode {self.opcodes}')
    popped = self.stack[len(self.stack) - count:]
    del self.stack[len(self.stack) - count:]
    return popped

  def _pop_to_mark(self, below: int) -> list:
    if not self.marks:
      raise ValueError(f'no MARK before opcode {self.opcodes}')
    mark = self.marks.pop()
    items = self.stack[mark:]
    del self.stack[mark:]
    return self._pop(below) + items

  def step(self, opcode, arg):
    """Applies one opcode; raises ValueError where the unpickler would allocate what the
    pickle claims, or build a tuple past MAX_TUPLE_NODES."""
    self.opcodes += 1
    name, before = opcode.name, opcode.stack_before
    if pickletools.markobject in before:
      popped = self._pop_to_mark(before.index(pickletools.markobject))
    elif name == 'POP' and self.marks and not self._above_mark():
      popped = self._pop_to_mark(0)
    else:
      popped = self._pop(len(before))
    if name in ('PUT', 'BINPUT', 'LONG_BINPUT'):
      # Picklers number memo slots from 0; the unpickler sizes its memo by the index.
      if arg >= self.opcodes or not self._above_mark():
        raise ValueError(f'memo index {arg} at opcode {self.opcodes}')
      self.memo[arg] = self.stack[-1]
    elif name in ('GET', 'BINGET', 'LONG_BINGET'):
      if arg not in self.memo:
        raise ValueError(f'memo index {arg} is empty at opcode {self.opcodes}')
      self.stack.append(self.memo[arg])
    elif name == 'MARK':
      self.marks.append(len(self.stack))
    elif name.startswith(('TUPLE', 'EMPTY_TUPLE')):
      nodes = 1 + sum(popped)
      if nodes > MAX_TUPLE_NODES:
        raise ValueError(f'a tuple of {nodes} nodes (counting each reference) at opcode '
                         f'{self.opcodes}, more than {MAX_TUPLE_NODES}')
      self.stack.append(nodes)
    elif name == 'MEMOIZE':
      self.memo[len(self.memo)] = popped[0]
      self.stack.append(popped[0])
    elif name == 'DUP':
      self.stack += popped * 2
    elif name in self._RETURNS_FIRST:
      self.stack.append(popped[0])
    else:
      self.stack += [1] * len(opcode.stack_after)


def _pickle_end(file, size: int) -> int:
  """Walks the pickle that starts at `file`'s position (which holds `size` bytes) opcode by
  opcode (`_PickleWalk`), building nothing, and returns where it ends. pickletools reads
  each argument through `file.read`, which returns only what the file holds; the unpickler
  would first allocate whatever a length claims."""
  start = file.tell()
  walk = _PickleWalk()
  try:
    for opcode, arg, _ in pickletools.genops(file):
      if opcode.name == 'FRAME' and arg > size - file.tell():
        raise ValueError(f'a frame of {arg} bytes, {size - file.tell()} left')
      walk.step(opcode, arg)
  except ValueError as e:
    raise CheckpointError(f'the pickle at byte {start} is truncated or malformed: {e}') from None
  return file.tell()


def _unpickle(file, size: int):
  """The pickle at `file`'s position (which holds `size` bytes), checked first
  (`_pickle_end`), and the storages {key: (dtype, numel)} it names."""
  start = file.tell()
  # A protocol-0 string with an unknown escape warns (DeprecationWarning) in both readers:
  # the file's business, not the caller's, and an error where warnings are errors.
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    end = _pickle_end(file, size)
    file.seek(start)
    unpickler = _Unpickler(io.BytesIO(file.read(end - start)))
    return unpickler.load(), unpickler.storages


# ---------------------------------------------------------------------- storages -> arrays


def _storage_array(buffer: np.ndarray, dtype: np.dtype, byteorder: str) -> np.ndarray:
  """A storage's bytes (`buffer`, uint8, its own) as read-only elements in the host's order."""
  array = buffer.view(dtype)
  if byteorder != sys.byteorder and dtype.itemsize > 1:
    array.byteswap(inplace=True)
  array.flags.writeable = False
  return array


class _Storages:
  """The storages' arrays by key, and the negated or conjugated copies that lazily negated
  or conjugated tensors read, each made once."""

  def __init__(self, arrays: dict):
    self._arrays = {(key, False, False): array for key, array in arrays.items()}

  def get(self, key: str, negative: bool, conjugate: bool) -> np.ndarray:
    if (key, negative, conjugate) not in self._arrays:
      array = self._arrays[key, False, False]
      array = np.conj(array) if conjugate else array
      array = np.negative(array) if negative else array
      array.flags.writeable = False
      self._arrays[key, negative, conjugate] = array
    return self._arrays[key, negative, conjugate]


def _view(tensor: _PendingTensor, storages: _Storages) -> np.ndarray:
  """`torch.empty(0).set_(storage, offset, size, stride)` in NumPy: a read-only view. The
  numbers come from the file and as_strided checks nothing, so a reach past the storage,
  and a broadcast beyond MAX_BROADCAST_BYTES, are refused."""
  storage = storages.get(tensor.storage.key, tensor.negative, tensor.conjugate)
  if tensor.storage.view is not None:
    view_offset, view_size = tensor.storage.view
    if view_offset + view_size > storage.size:
      raise CheckpointError(f'a view of {view_size} elements from element {view_offset} of '
                            f'storage {tensor.storage.key}, which holds {storage.size}')
    storage = storage[view_offset:view_offset + view_size]
  offset, size, stride = tensor.offset, tensor.size, tensor.stride
  if 0 in size:
    array = np.zeros(size, storage.dtype)
    array.flags.writeable = False
    return array
  end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
  if end > storage.size:
    raise CheckpointError(f'a tensor of size {size}, stride {stride} from element {offset} '
                          f'reaches element {end} of storage {tensor.storage.key}, which '
                          f'holds {storage.size}')
  itemsize = storage.dtype.itemsize
  nbytes = math.prod(size) * itemsize
  if nbytes > max((end - offset) * itemsize, MAX_BROADCAST_BYTES):
    raise CheckpointError(f'a tensor of size {size}, stride {stride} ({nbytes} bytes) '
                          f'repeats the {end - offset} elements it spans of storage '
                          f'{tensor.storage.key}: more than the {MAX_BROADCAST_BYTES} bytes '
                          'a broadcast may have')
  return np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                         strides=tuple(s * itemsize for s in stride),
                                         writeable=False)


def _resolve(obj, storages: _Storages, done: dict):
  """`obj` with every `_PendingTensor` in its dicts, lists and tuples a NumPy array. `done`
  maps what is resolved already to its result (containers by identity, tensors by value):
  a pickle can refer to one list from many places, and each level of such nesting would
  double the copies."""
  key = obj if isinstance(obj, _PendingTensor) else id(obj)
  if key in done:
    return done[key]
  if isinstance(obj, _PendingTensor):
    result = _view(obj, storages)
  elif isinstance(obj, dict):
    result = {k: _resolve(value, storages, done) for k, value in obj.items()}
  elif isinstance(obj, (list, tuple)):
    result = type(obj)(_resolve(value, storages, done) for value in obj)
  else:
    return obj
  done[key] = result
  return result


def _check_total(named: dict, available: int, where: str, overhead: int = 0):
  """Refuses storages whose declared sizes (and `overhead` bytes each) add up to more than
  `available` bytes, before any is read."""
  total = sum(numel * dtype.itemsize + overhead for dtype, numel in named.values())
  if total > available:
    raise CheckpointError(f'its tensors declare storages of {total} bytes in all, more than '
                          f'the {available} bytes {where}')


# ---------------------------------------------------------------------------- the formats


def _member(archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
  """The zip member `name`, which must be stored as torch.save stores every member:
  uncompressed, unencrypted."""
  try:
    info = archive.getinfo(name)
  except KeyError:
    raise CheckpointError(f'the archive has no member {name}') from None
  if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
    raise CheckpointError(f'member {name} is compressed or encrypted (method '
                          f'{info.compress_type}); torch.save stores every member as it is')
  if info.compress_size != info.file_size:
    raise CheckpointError(f'member {name} is stored, yet says it holds {info.file_size} bytes '
                          f'in {info.compress_size}')
  return info


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, size: int) -> np.ndarray:
  """A member's `size` bytes (which must be all it holds) in a buffer of their own, read
  a chunk at a time."""
  if info.file_size != size:
    raise CheckpointError(f'member {info.filename} holds {info.file_size} bytes; its '
                          f'tensors declare {size}')
  buffer = np.empty(size, np.uint8)
  filled = 0
  with archive.open(info) as member:
    while filled < size and (chunk := member.read(min(_CHUNK, size - filled))):
      buffer[filled:filled + len(chunk)] = np.frombuffer(chunk, np.uint8)
      filled += len(chunk)
  if filled < size:
    raise CheckpointError(f'member {info.filename} is truncated: {filled} of {size} bytes')
  return buffer


def _byteorder(archive: zipfile.ZipFile, name: str) -> str:
  """The writer's byte order, which newer files record in the member `name`: 'little' or
  'big', as torch.load accepts; older files, which do not, are taken as little-endian, as
  every common writer is."""
  if name not in archive.namelist():
    return 'little'
  info = _member(archive, name)
  recorded = bytes(_read_member(archive, info, info.file_size)) if info.file_size <= 8 else b''
  if recorded not in _BYTE_ORDERS:
    raise CheckpointError(f'member {name} says the byte order is {recorded or info.file_size}'
                          f'; torch.save writes b"little" or b"big"')
  return _BYTE_ORDERS[recorded]


def _read_zip(archive: zipfile.ZipFile, size: int):
  """torch.save's zip format: `<name>/data.pkl`, `<name>/data/<key>` per storage in the
  writer's byte order (`_byteorder`)."""
  pickles = [n for n in archive.namelist() if n.endswith('/data.pkl')]
  if not pickles:
    raise CheckpointError('a zip archive, but not a PyTorch checkpoint (no data.pkl inside)')
  prefix = pickles[0][:-len('data.pkl')]
  info = _member(archive, pickles[0])
  data = bytes(_read_member(archive, info, info.file_size)) if info.file_size <= size else b''
  if len(data) != info.file_size:
    raise CheckpointError(f'member {info.filename} says it holds {info.file_size} bytes, '
                          f'more than the file ({size})')
  obj, named = _unpickle(io.BytesIO(data), len(data))
  byteorder = _byteorder(archive, f'{prefix}byteorder')
  _check_total(named, size, 'the file holds')
  arrays = {}
  for key, (dtype, numel) in named.items():
    member = _member(archive, f'{prefix}data/{key}')
    arrays[key] = _storage_array(_read_member(archive, member, numel * dtype.itemsize), dtype,
                                 byteorder)
  return _resolve(obj, _Storages(arrays), {})


def _legacy_start(head: bytes) -> int | None:
  """Where the legacy format's magic-number pickle ends, or None if `head` (the file's first
  bytes) does not start with one. Only the head is read, whatever lengths a foreign file holds."""
  head = io.BytesIO(head)
  try:
    is_legacy = _unpickle(head, len(head.getvalue()))[0] == _LEGACY_MAGIC
  except (*_MALFORMED, CheckpointError):  # a foreign file's bytes can be anything
    return None
  return head.tell() if is_legacy else None


def _read_storage(file: _BoundedFile, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
  """One storage as `_write_file` writes it: an int64 element count, then the elements."""
  count_bytes = file.read(8)
  if len(count_bytes) < 8:
    raise CheckpointError(f'truncated: the file ends at byte {file.size}, before storage {key}')
  (count,) = struct.unpack('<q', count_bytes)
  if count != numel:
    raise CheckpointError(f'storage {key} holds {count} elements, its tensors say {numel}')
  buffer = np.empty(numel * dtype.itemsize, np.uint8)
  if file.readinto(buffer) != buffer.size:
    raise CheckpointError(f'truncated: the file ends at byte {file.size}, within storage {key}')
  return _storage_array(buffer, dtype, 'little')


def _read_legacy(file: _BoundedFile):
  """torch.save's legacy format (`_legacy_save`), read from just after the magic number:
  pickles of the protocol version, a sys-info dict, the object and the sorted storage keys;
  then per key the storage as `_write_file` writes it: an int64 element count and the
  elements, both little-endian whatever the writer's byte order."""
  if (version := _unpickle(file, file.size)[0]) != _LEGACY_PROTOCOL:
    raise CheckpointError(f'legacy PyTorch format version {_shown(version)}, expected '
                          f'{_LEGACY_PROTOCOL}')
  _unpickle(file, file.size)  # sys info: sizes of C types and byte order, unused by the data
  obj, named = _unpickle(file, file.size)
  keys, _ = _unpickle(file, file.size)
  if (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)
      or len(set(keys)) != len(keys) or set(keys) != set(named)):
    raise CheckpointError(f'the stored storages {_shown(keys)} are not the ones its tensors '
                          f'use {_shown(sorted(named))}')
  _check_total(named, file.remaining(), 'the file holds after its pickles (truncated?)',
               overhead=8)  # each storage's element count
  arrays = {key: _read_storage(file, key, *named[key]) for key in keys}
  return _resolve(obj, _Storages(arrays), {})


def _read(path: str):
  """`read_pth` without the file's name in its errors."""
  with open(path, 'rb') as raw:
    file = _BoundedFile(raw)
    head = file.read(64)
    if head.startswith(b'PK\x03\x04'):  # a zip archive's first local header, as torch.load checks
      file.seek(0)
      with zipfile.ZipFile(file) as archive:
        return _read_zip(archive, file.size)
    start = _legacy_start(head)
    if start is None:
      raise CheckpointError(_NEITHER_FORMAT)
    file.seek(start)
    return _read_legacy(file)


def read_pth(path: str):
  """The object torch.save wrote to `path`, in either of its formats, with every tensor a
  read-only NumPy array (a view into its storage: copy it to change it); refuses any class
  outside a small allow-list, so no code in the file runs, and any file that would make
  more than the module docstring's bounds allow."""
  try:
    return _read(path)
  except CheckpointError as e:
    raise CheckpointError(f'{path}: {e}') from None
  except _MALFORMED as e:
    raise CheckpointError(f'{path}: cannot read the checkpoint: {e}') from None
  except OSError as e:  # missing, a folder, unreadable: the user named the wrong file
    raise CheckpointError(f'{path}: cannot open the checkpoint: {e.strerror or e}') from None
