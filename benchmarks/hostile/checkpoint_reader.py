"""Hostile torch.save files for the checkpoint reader, written by hand (no PyTorch needed).

`tries(folder)` yields (description, thunk) pairs: each thunk writes one hostile file and
loads it through `torch_io.load_into`, what --config.init_from and --mode=convert call; it
returns when the file is accepted and raises otherwise. The files: the named cases the
reader refuses (or keeps small: broadcasts, shared storages) and a fixed, seeded sample of
the mutations that tests/test_hostile_checkpoints.py draws with hypothesis (bytes flipped,
cut, inserted or deleted; pickle opcodes inserted; tensor numbers replaced; zip members
resized, compressed, renamed or dropped; the byte order changed), in both of torch.save's
formats. The functions that write the files are the tests' too.
"""

import dataclasses
import functools
import pathlib
import pickle
import struct
import zlib

import numpy as np

SURFACE = 'checkpoint reader'

FORMATS = ('zip', 'legacy')
_LEGACY_HEADER = b''.join(pickle.dumps(x, protocol=2) for x in (
    0x1950a86a20f9469cfc6c, 1001,
    {'protocol_version': 1001, 'little_endian': True,
     'type_sizes': {'short': 2, 'int': 4, 'long': 8}}))
# Numbers a hostile file puts where sizes, strides, offsets and element counts go.
INTERESTING_NUMBERS = (0, 1, 3, 7, 16384, 2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**62, 2**63, -1)
# Opcodes that claim lengths or memo slots, and a few that change the stack.
INTERESTING_OPCODES = (
    b'\x8e' + struct.pack('<Q', 2**40),  # BINBYTES8
    b'\x8d' + struct.pack('<Q', 2**40),  # BINUNICODE8
    b'\x96' + struct.pack('<Q', 2**40),  # BYTEARRAY8
    b'\x95' + struct.pack('<Q', 2**40),  # FRAME
    b'B' + struct.pack('<I', 2**31),  # BINBYTES
    b'T' + struct.pack('<i', 2**31 - 1),  # BINSTRING
    b'r' + struct.pack('<I', 2**31),  # LONG_BINPUT
    b'j' + struct.pack('<I', 2**31),  # LONG_BINGET
    b'\x8b' + struct.pack('<i', 2**30),  # LONG4
    b'p4294967296\n',  # PUT
    b'(', b']', b'}', b')', b'N', b'.', b'R', b'b', b's', b'u', b'e', b't', b'0', b'2', b'\x94',
    b'ctorch._utils\n_rebuild_tensor_v2\n', b'cos\nsystem\n',
)


# ----------------------------------------------------------------- torch.save's formats


def ops(obj) -> bytes:
  """The opcodes that push `obj` (pickle protocol 2, without PROTO and STOP)."""
  return pickle.dumps(obj, protocol=2)[2:-1]


def tensor_ops(key: str, numel: int, offset: int, size: tuple, stride: tuple, *,
               storage: str = 'FloatStorage', legacy: bool = False) -> bytes:
  """The opcodes that push one tensor as torch.save pickles it: _rebuild_tensor_v2 on a
  persistent storage id (5 items in the zip format, 6 in the legacy one)."""
  persistent_id = (b'(' + ops('storage') + f'ctorch\n{storage}\n'.encode() + ops(key)
                   + ops('cpu') + ops(numel) + (b'N' if legacy else b'') + b'tQ')
  return (b'ctorch._utils\n_rebuild_tensor_v2\n(' + persistent_id + ops(offset)
          + ops(tuple(size)) + ops(tuple(stride)) + b'\x89ccollections\nOrderedDict\n)RtR')


def dict_ops(items) -> bytes:
  """The opcodes that push a dict of (key, opcodes of its value) items."""
  return b'}(' + b''.join(ops(key) + value for key, value in items) + b'u'


def pickle_of(body: bytes) -> bytes:
  return b'\x80\x02' + body + b'.'


@dataclasses.dataclass(frozen=True)
class Member:
  """A zip member as the archive's headers describe it: `data` as stored (compressed when
  `method` is 8, deflate), `size` and `crc` those of the uncompressed bytes (by default:
  `data`'s)."""
  name: str
  data: bytes
  method: int = 0
  size: int | None = None
  crc: int | None = None


def zip_bytes(members) -> bytes:
  """A zip archive of `members`, headers written as they say (zipfile would not write lies)."""
  local, central = bytearray(), bytearray()
  for m in members:
    name = m.name.encode()
    size = len(m.data) if m.size is None else m.size
    crc = zlib.crc32(m.data) if m.crc is None else m.crc
    fields = struct.pack('<HHHHHIII', 20, 0, m.method, 0, 0x21, crc, len(m.data), size)
    central += (b'PK\x01\x02' + struct.pack('<H', 20) + fields
                + struct.pack('<HHHHHII', len(name), 0, 0, 0, 0, 0, len(local)) + name)
    local += b'PK\x03\x04' + fields + struct.pack('<HH', len(name), 0) + name + m.data
  end = struct.pack('<4sHHHHIIH', b'PK\x05\x06', 0, 0, len(members), len(members),
                    len(central), len(local), 0)
  return bytes(local + central + end)


def zip_members(pickled: bytes, storages: dict, byteorder: bytes | None = b'little') -> list:
  """The members torch.save writes: archive/data.pkl, archive/byteorder, archive/data/<key>."""
  members = [Member('archive/data.pkl', pickled)]
  if byteorder is not None:
    members.append(Member('archive/byteorder', byteorder))
  return members + [Member(f'archive/data/{key}', data) for key, data in storages.items()]


def legacy_bytes(pickled: bytes, storages: dict, counts: dict | None = None) -> bytes:
  """torch.save's legacy format: magic number, protocol, sys info, the object's pickle, the
  storage keys, then each storage's element count (int64) and bytes."""
  counts = counts or {}
  keys = sorted(storages)
  return (_LEGACY_HEADER + pickled + pickle.dumps(keys, protocol=2)
          + b''.join(struct.pack('<q', counts.get(k, len(storages[k]) // 4)) + storages[k]
                     for k in keys))


# A small state dict, in a baseline-like {'model': ..., 'epoch': 3}: two tensors sharing a
# float storage (one a view into it), one more; what the mutations start from.
SMALL_STORAGES = {'0': np.arange(6, dtype='<f4').tobytes(), '1': np.ones(3, '<f4').tobytes()}
SMALL_TENSORS = (('conv.weight', '0', 0, (2, 3), (3, 1)), ('conv.bias', '0', 3, (3,), (1,)),
                 ('bn.running_var', '1', 0, (3,), (1,)))


def state_pickle(file_format: str, tensors=SMALL_TENSORS, numel=None) -> bytes:
  """The pickle of {'model': {name: tensor}, 'epoch': 3}; `tensors` as (name, storage key,
  offset, size, stride); `numel`: {storage key: declared element count} (default: what
  SMALL_STORAGES holds)."""
  numel = numel or {k: len(v) // 4 for k, v in SMALL_STORAGES.items()}
  model = dict_ops([(name, tensor_ops(key, numel[key], offset, size, stride,
                                      legacy=file_format == 'legacy'))
                    for name, key, offset, size, stride in tensors])
  return pickle_of(dict_ops([('model', model), ('epoch', ops(3))]))


def small_checkpoint(file_format: str, pickled: bytes | None = None) -> bytes:
  """The small state dict in `file_format`, with its pickle replaced by `pickled`."""
  pickled = pickled or state_pickle(file_format)
  if file_format == 'zip':
    return zip_bytes(zip_members(pickled, SMALL_STORAGES))
  return legacy_bytes(pickled, SMALL_STORAGES)


def one_tensor(file_format: str, numel: int, offset: int, size: tuple, stride: tuple,
               data: bytes, key: str = '0') -> bytes:
  """A file of {'model': {'x': one float tensor}, 'epoch': 3} over storage `key` (`data`)."""
  pickled = state_pickle(file_format, (('x', key, offset, size, stride),), {key: numel})
  if file_format == 'zip':
    return zip_bytes(zip_members(pickled, {key: data}))
  return legacy_bytes(pickled, {key: data}, {key: numel})


# ---------------------------------------------------------------------------- mutations


def flip(data: bytes, position: int, xor: int) -> bytes:
  position %= max(len(data), 1)
  return data[:position] + bytes([data[position] ^ (xor or 1)]) + data[position + 1:]


def insert(data: bytes, position: int, extra: bytes) -> bytes:
  position %= len(data) + 1
  return data[:position] + extra + data[position:]


def delete(data: bytes, position: int, length: int) -> bytes:
  position %= max(len(data), 1)
  return data[:position] + data[position + length:]


def truncate(data: bytes, position: int) -> bytes:
  return data[:position % max(len(data), 1)]


def with_pickle_mutated(file_format: str, mutate) -> bytes:
  """The small checkpoint whose pickle is `mutate(pickle)`, the rest (zip headers and CRCs,
  legacy headers) intact, so the mutation reaches the pickle's reader."""
  return small_checkpoint(file_format, mutate(state_pickle(file_format)))


def with_numbers(file_format: str, tensor: int, field: str, value) -> bytes:
  """The small checkpoint with one number of one tensor replaced: its `field` ('offset',
  'size', 'stride', or 'numel': its storage's declared element count) set to `value`."""
  tensors = [list(t) for t in SMALL_TENSORS]
  numel = {k: len(v) // 4 for k, v in SMALL_STORAGES.items()}
  name, key, offset, size, stride = tensors[tensor]
  if field == 'numel':
    numel[key] = value
  elif field == 'offset':
    tensors[tensor][2] = value
  else:
    index = 3 if field == 'size' else 4
    tensors[tensor][index] = (value,) + tuple(tensors[tensor][index])[1:]
  return small_checkpoint(file_format, state_pickle(file_format, tensors, numel))


def with_member_changed(change: str, member: int, amount: int) -> bytes:
  """The small zip checkpoint with one member (0 data.pkl, 1 byteorder, 2.. storages)
  changed: 'grow' or 'shrink' its data by `amount` bytes, 'deflate' it, 'rename' or 'drop'
  it, or 'byteorder' (the byteorder member says `amount`'s spelling)."""
  members = zip_members(state_pickle('zip'), SMALL_STORAGES)
  m = members[member % len(members)]
  if change == 'grow':
    members[member % len(members)] = dataclasses.replace(m, data=m.data + bytes(max(1, amount)))
  elif change == 'shrink':
    members[member % len(members)] = dataclasses.replace(m, data=m.data[:-max(1, amount)])
  elif change == 'deflate':
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = compressor.compress(m.data) + compressor.flush()
    members[member % len(members)] = Member(m.name, packed, 8, len(m.data), zlib.crc32(m.data))
  elif change == 'rename':
    members[member % len(members)] = dataclasses.replace(m, name=m.name + 'x')
  elif change == 'drop':
    del members[member % len(members)]
  elif change == 'byteorder':
    spellings = (b'big', b'Little', b'garbage', b'', b'little\n', b'LITTLE', b'\xff' * 9)
    members[1] = Member('archive/byteorder', spellings[amount % len(spellings)])
  return zip_bytes(members)


MEMBER_CHANGES = ('grow', 'shrink', 'deflate', 'rename', 'drop', 'byteorder')


def mutated(rng: np.random.Generator, file_format: str) -> tuple:
  """One random mutation of the small checkpoint: (description, file bytes); what the
  property tests draw, drawn here from a seeded generator."""
  base = small_checkpoint(file_format)
  kind = str(rng.choice(['flip', 'insert', 'delete', 'truncate', 'opcode', 'number', 'member']))
  if kind == 'member' and file_format == 'legacy':  # members are the zip format's
    kind = 'number'
  at = int(rng.integers(0, len(base)))
  if kind == 'flip':
    return f'byte {at} flipped', flip(base, at, int(rng.integers(1, 256)))
  if kind == 'insert':
    extra = rng.integers(0, 256, int(rng.integers(1, 16)), np.uint8).tobytes()
    return f'{len(extra)} bytes inserted at {at}', insert(base, at, extra)
  if kind == 'delete':
    return f'bytes deleted from {at}', delete(base, at, int(rng.integers(1, 32)))
  if kind == 'truncate':
    return f'cut at byte {at}', truncate(base, at)
  if kind == 'opcode':
    opcode = INTERESTING_OPCODES[int(rng.integers(0, len(INTERESTING_OPCODES)))]
    return (f'opcode {opcode[:12]!r} inserted in the pickle',
            with_pickle_mutated(file_format, lambda p: insert(p, at % len(p), opcode)))
  if kind == 'number':
    tensor, value = int(rng.integers(0, len(SMALL_TENSORS))), int(rng.choice(INTERESTING_NUMBERS))
    field = str(rng.choice(['offset', 'size', 'stride', 'numel']))
    return (f'tensor {tensor} {field} = {value}',
            with_numbers(file_format, tensor, field, value))
  change = str(rng.choice(MEMBER_CHANGES))
  return (f'zip member {at % 5}: {change}',
          with_member_changed(change, at, int(rng.integers(1, 64))))


# ------------------------------------------------------------------------ named hostile files


@functools.cache
def zip_bomb() -> bytes:
  """About 1 MB whose one storage member inflates to 1 GiB (deflate, 1,024 copies of a
  fully flushed block of 1 MiB of zeros); its tensor needs 4 bytes of it."""
  compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
  block = compressor.compress(bytes(2**20)) + compressor.flush(zlib.Z_FULL_FLUSH)
  final = zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # an empty last block
  crc = 0x5b64c2b0  # zlib.crc32(bytes(2**30)), which takes a second to compute
  pickled = state_pickle('zip', (('x', '0', 0, (1,), (1,)),), {'0': 1})
  members = zip_members(pickled, {})
  members.append(Member('archive/data/0', block * 1024 + final, 8, 2**30, crc))
  return zip_bytes(members)


def broadcast(file_format: str = 'zip', side: int = 16384) -> bytes:
  """One stored float seen as a side x side tensor (stride 0): 1 GiB at 16384, as
  torch.save(torch.zeros(1).expand(16384, 16384)) writes it."""
  return one_tensor(file_format, 1, 0, (side, side), (0, 0), bytes(4))


def many_references(count: int = 1024, mib: int = 1) -> bytes:
  """`count` tensors (each its own REDUCE) over one storage of `mib` MiB."""
  numel = mib * 2**18
  tensors = [(f'x{i}', '0', 0, (numel,), (1,)) for i in range(count)]
  pickled = state_pickle('zip', tensors, {'0': numel})
  return zip_bytes(zip_members(pickled, {'0': bytes(4 * numel)}))


def nested_references(levels: int = 24) -> bytes:
  """A list holding the list before it twice, `levels` deep, over one tensor: 2^levels
  paths to it in a pickle of a few hundred bytes (memo GETs)."""
  body = tensor_ops('0', 1, 0, (1,), (1,)) + b'q\x000'  # BINPUT 0, POP
  for level in range(1, levels + 1):
    body += b'](h' + bytes([level - 1]) + b'h' + bytes([level - 1]) + b'eq' + bytes([level])
    body += b'0' if level < levels else b''
  pickled = pickle_of(dict_ops([('model', b'}'), ('nested', body)]))
  return zip_bytes(zip_members(pickled, {'0': bytes(4)}))


def hash_bomb(levels: int = 40) -> bytes:
  """A dict whose key is a pair of the pair before it, `levels` deep: hashing it walks
  2^levels nodes, from a pickle of a few hundred bytes."""
  key = b'X\x01\x00\x00\x00aq\x000'  # BINPUT 0, POP
  for level in range(1, levels + 1):
    key += b'h' + bytes([level - 1]) + b'h' + bytes([level - 1]) + b'\x86q' + bytes([level])
    key += b'0' if level < levels else b''
  pickled = pickle_of(dict_ops([('model', b'}')])[:-1] + key + ops(1) + b'u')
  return zip_bytes(zip_members(pickled, {}))


def members_before_the_start(shift: int = 100) -> bytes:
  """The small zip checkpoint whose end record puts the central directory `shift` bytes
  later than it is: zipfile then places every member `shift` bytes earlier, the first
  before the file's start."""
  data = small_checkpoint('zip')
  end = len(data) - 22  # the end record, without a comment
  (offset,) = struct.unpack('<I', data[end + 16:end + 20])
  return data[:end + 16] + struct.pack('<I', offset + shift) + data[end + 20:]


def pickle_claiming(opcode: bytes, file_format: str) -> bytes:
  """The small checkpoint with `opcode` (a length or memo slot claim) first in its pickle."""
  return with_pickle_mutated(file_format, lambda p: p[:2] + opcode + p[2:])


def named_files() -> dict:
  """{description: file bytes} of each hostile case the reader's docstring names."""
  huge = 2**40
  files = {
      'zip member of 1 MB inflating to 1 GiB (deflated)': zip_bomb(),
      'storage member 4 bytes longer than declared': with_member_changed('grow', 2, 4),
      'storage member 4 bytes shorter than declared': with_member_changed('shrink', 2, 4),
      'data.pkl deflated': with_member_changed('deflate', 0, 1),
      'storage member missing': with_member_changed('drop', 2, 1),
      'zip members placed before the start of the file': members_before_the_start(),
      '1 GiB broadcast (stride 0) of one float, zip': broadcast('zip'),
      '1 GiB broadcast (stride 0) of one float, legacy': broadcast('legacy'),
      '4 TiB broadcast (stride 0) of one float': one_tensor('zip', 1, 0, (2**21, 2**19),
                                                            (0, 0), bytes(4)),
      '1,024 references to one 1 MiB storage': many_references(),
      'lists nested 24 levels, each holding the last twice': nested_references(),
      'a dict key of pairs nested 40 levels (2^40 nodes to hash)': hash_bomb(),
      'tensor reaching past its storage': one_tensor('zip', 6, 4, (2, 3), (3, 1), bytes(24)),
      'tensor offset 2^62': one_tensor('zip', 6, 2**62, (1,), (1,), bytes(24)),
      'storage declared 2^40 floats, zip': one_tensor('zip', huge, 0, (1,), (1,), bytes(4)),
      'storage declared 2^40 floats, legacy': one_tensor('legacy', huge, 0, (1,), (1,),
                                                         bytes(4)),
      'byteorder "Little"': with_member_changed('byteorder', 1, 1),
      'byteorder "garbage"': with_member_changed('byteorder', 1, 2),
      'byteorder "big"': with_member_changed('byteorder', 1, 0),
      'state dict with an int key': zip_bytes(zip_members(pickle_of(dict_ops([
          (1, tensor_ops('0', 6, 0, (6,), (1,)))])), {'0': bytes(24)})),
      'baseline file whose model has a tuple key': zip_bytes(zip_members(pickle_of(dict_ops([
          ('model', dict_ops([(('a', 1), tensor_ops('0', 6, 0, (6,), (1,)))])),
          ('epoch', ops(1))])), {'0': bytes(24)})),
  }
  for format_ in FORMATS:
    for name, opcode in (('BINBYTES8 of 2^40 bytes', INTERESTING_OPCODES[0]),
                         ('BINUNICODE8 of 2^40 bytes', INTERESTING_OPCODES[1]),
                         ('FRAME of 2^40 bytes', INTERESTING_OPCODES[3]),
                         ('LONG_BINPUT to memo slot 2^31', INTERESTING_OPCODES[6])):
      files[f'{name}, {format_}'] = pickle_claiming(opcode, format_)
  return files


@functools.cache
def _model():
  """The model the tries load into: the baseline's (ResNet-18 at 64 px), built once."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from deepfashion_jax.models import fashion_net  # pylint: disable=g-import-not-at-top
  return fashion_net.FashionNet(backbone='resnet18', image_size=64, roi_pool='baseline_max',
                                rngs=nnx.Rngs(0))


def _load(path: pathlib.Path, data: bytes):
  from deepfashion_jax import torch_io  # pylint: disable=g-import-not-at-top
  path.write_bytes(data)
  torch_io.load_into(_model(), str(path))


def tries(folder: pathlib.Path, mutations_per_format: int = 60, seed: int = 0):
  """Yields (description, thunk): the named hostile files, then `mutations_per_format`
  seeded mutations of the small checkpoint in each format."""
  for i, (description, data) in enumerate(named_files().items()):
    yield description, functools.partial(_load, folder / f'named_{i}.pth', data)
  rng = np.random.default_rng(seed)
  for file_format in FORMATS:
    for i in range(mutations_per_format):
      description, data = mutated(rng, file_format)
      yield (f'{file_format}: {description}',
             functools.partial(_load, folder / f'{file_format}_{i}.pth', data))
