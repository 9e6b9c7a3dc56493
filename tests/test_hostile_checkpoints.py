"""Hostile torch.save files: what the reader refuses, what it keeps small, and what it
costs. Memory is the peak that tracemalloc traces (NumPy's allocations included) while one
file is read. The files are written by hand (benchmarks/hostile/checkpoint_reader.py, which
the "Hostile input" benchmark runs too); test_convert_torch.py reads torch's broadcasts and
shared storages."""

import dataclasses
import functools
import tempfile
import tracemalloc

from flax import nnx
import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from benchmarks import hostile_input
from benchmarks.hostile import checkpoint_reader as hostile
from deepfashion_jax import errors
from deepfashion_jax import torch_io
from deepfashion_jax.torch_io import common
from deepfashion_jax.torch_io import reader

MIB = 2**20


def _read(path):
  """read_pth(path), and the peak traced memory while it ran, in bytes."""
  tracemalloc.start()
  try:
    return reader.read_pth(str(path)), tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def _refused(path, match: str) -> int:
  """Asserts that read_pth refuses `path` with a CheckpointError naming it and matching
  `match`; returns the peak traced memory."""
  tracemalloc.start()
  try:
    with pytest.raises(torch_io.CheckpointError, match=match) as refusal:
      reader.read_pth(str(path))
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert str(refusal.value).startswith(f'{path}: '), refusal.value
  assert isinstance(refusal.value, errors.DeepFashionError)
  return peak


def _file(tmp_path, data: bytes, name='hostile.pth'):
  path = tmp_path / name
  path.write_bytes(data)
  return path


# --------------------------------------------------------------------------- zip members


def test_a_compressed_member_is_refused_before_it_is_inflated(tmp_path):
  """1 MB of deflate that inflates to 1 GiB; its tensor needs 4 bytes."""
  path = _file(tmp_path, hostile.zip_bomb())
  assert path.stat().st_size < 1.1e6
  assert _refused(path, 'member archive/data/0 is compressed') < 4 * MIB


@pytest.mark.parametrize('change', ['grow', 'shrink'])
def test_a_member_of_another_size_than_its_tensors_declare_is_refused(tmp_path, change):
  path = _file(tmp_path, hostile.with_member_changed(change, 2, 4))
  _refused(path, rf'member archive/data/0 holds {24 + (4 if change == "grow" else -4)} bytes; '
           'its tensors declare 24')


def test_a_compressed_pickle_is_refused(tmp_path):
  _refused(_file(tmp_path, hostile.with_member_changed('deflate', 0, 1)),
           'member archive/data.pkl is compressed')


def test_a_member_placed_before_the_files_start_is_refused(tmp_path):
  """zipfile seeks to the offset the archive gives a member: here before byte 0."""
  _refused(_file(tmp_path, hostile.members_before_the_start()), 'a seek to byte -100')


# ----------------------------------------------------------- broadcasts and shared storages


@pytest.mark.parametrize('file_format', hostile.FORMATS)
def test_a_broadcast_stays_a_view_of_its_storage(tmp_path, file_format):
  """One stored float seen as 16384 x 16384 (stride 0): a file of a few hundred bytes whose
  tensor would be 1 GiB copied."""
  path = _file(tmp_path, hostile.broadcast(file_format))
  assert path.stat().st_size < 600
  content, peak = _read(path)
  array = content['model']['x']
  assert array.shape == (16384, 16384) and array.strides == (0, 0) and array.dtype == np.float32
  assert not array.flags.writeable and array[16383, 16383] == 0
  assert peak < MIB


def test_a_storage_referenced_many_times_is_read_once(tmp_path):
  """1,024 tensors (each its own REDUCE in the pickle) over one 1 MiB storage."""
  content, peak = _read(_file(tmp_path, hostile.many_references(1024, 1)))
  arrays = list(content['model'].values())
  assert len(arrays) == 1024 and all(a.shape == (2**18,) for a in arrays)
  assert all(np.shares_memory(arrays[0], a) for a in arrays)
  assert peak < 4 * MIB


def test_nested_references_are_resolved_once(tmp_path):
  """Lists nested 20 deep, each holding the one below twice: 2^20 paths to one tensor."""
  content, peak = _read(_file(tmp_path, hostile.nested_references(20)))
  nested = content['nested']
  assert nested[0] is nested[1]
  assert peak < MIB


# ---------------------------------------------------------------------------- absurd claims


def _absurd_files() -> dict:
  huge = 2**40
  files = {
      'broadcast of 4 TiB': hostile.one_tensor('zip', 1, 0, (2**21, 2**19), (0, 0), bytes(4)),
      'offset 2^62': hostile.one_tensor('zip', 6, 2**62, (1,), (1,), bytes(24)),
      'storage of 2^40 floats, zip': hostile.one_tensor('zip', huge, 0, (1,), (1,), bytes(4)),
      'storage of 2^40 floats, legacy': hostile.one_tensor('legacy', huge, 0, (1,), (1,),
                                                           bytes(4)),
      'dict key of 2^40 nodes': hostile.hash_bomb(40),
  }
  for file_format in hostile.FORMATS:
    for name, opcode in zip(['BINBYTES8', 'BINUNICODE8', 'BYTEARRAY8', 'FRAME', 'BINBYTES',
                             'BINSTRING', 'LONG_BINPUT'], hostile.INTERESTING_OPCODES):
      files[f'{name}, {file_format}'] = hostile.pickle_claiming(opcode, file_format)
  return files


_ABSURD_MESSAGES = {
    'broadcast of 4 TiB': 'more than the 4294967296 bytes a broadcast may have',
    'offset 2^62': 'reaches element 4611686018427387905 of storage 0, which holds 6',
    'storage of 2^40 floats': 'declare storages of 43980465111',
    'dict key of 2^40 nodes': 'a tuple of 2097151 nodes',
    'LONG_BINPUT': 'memo index 2147483648',
}


@pytest.mark.parametrize('name', sorted(_absurd_files()))
def test_absurd_claims_are_refused_before_anything_is_allocated(tmp_path, name):
  """Sizes, lengths and memo slots that would allocate terabytes (or hash for ever)."""
  message = next((m for k, m in _ABSURD_MESSAGES.items() if name.startswith(k)),
                 'truncated or malformed')
  assert _refused(_file(tmp_path, _absurd_files()[name]), message) < MIB


def test_a_tensor_reaching_past_its_storage_is_refused(tmp_path):
  path = _file(tmp_path, hostile.one_tensor('zip', 6, 4, (2, 3), (3, 1), bytes(24)))
  _refused(path, r'a tensor of size \(2, 3\), stride \(3, 1\) from element 4 reaches element '
           '10 of storage 0, which holds 6')


# ------------------------------------------------------------------------------- byte order


@pytest.mark.parametrize('spelling', [b'Little', b'garbage', b'', b'little\n', b'\xff' * 9])
def test_a_byteorder_torch_load_refuses_is_refused(tmp_path, spelling):
  members = hostile.zip_members(hostile.state_pickle('zip'), hostile.SMALL_STORAGES, spelling)
  _refused(_file(tmp_path, hostile.zip_bytes(members)), 'member archive/byteorder says the '
           'byte order is')


def test_a_big_endian_file_reads_in_the_hosts_order(tmp_path):
  storages = {k: np.frombuffer(v, '<f4').astype('>f4').tobytes()
              for k, v in hostile.SMALL_STORAGES.items()}
  members = hostile.zip_members(hostile.state_pickle('zip'), storages, b'big')
  content, _ = _read(_file(tmp_path, hostile.zip_bytes(members)))
  np.testing.assert_array_equal(content['model']['conv.weight'], [[0, 1, 2], [3, 4, 5]])


# ---------------------------------------------------------------------------- the families


@dataclasses.dataclass(frozen=True)
class _Layer:
  in_features: int
  out_features: int


class _Model(nnx.Module):
  """What the families read of a FashionNet, without building one: its configuration, the
  sizes of its backbone's output and category head, and one parameter."""

  def __init__(self, **configuration):
    for name, value in configuration.items():
      setattr(self, name, value)
    self.category_classifier = _Layer(8, 50)
    self.backbone = _Layer(1, 8)
    self.head = _Head()


class _Head(nnx.Module):

  def __init__(self):
    self.kernel = nnx.Param(np.zeros((8, 50), np.float32))


_BASELINE_MODEL = dict(backbone_name='resnet18', roi_pool='baseline_max', feature_size=2,
                       feature_stride=32, normalization='baseline', heads='fashionnet',
                       landmarks='none')
_LIU_LU_MODEL = dict(backbone_name='vgg16', roi_pool='align', feature_size=14,
                     feature_stride=16, normalization='imagenet', heads='liu_lu',
                     landmarks='attention')
_RESNET18 = {f'basemodel.{3 + stage}.{block}.conv1.weight': np.zeros(1, np.float32)
             for stage in range(1, 5) for block in range(2)}
_LIU_LU = {'lm_branch.conv1.weight': np.zeros(1, np.float32),
           'attention_pred_net.model.model.0.weight': np.zeros(1, np.float32)}
_SCALAR = np.zeros((), np.float32)


@pytest.mark.parametrize('content, model, match', [
    ({1: _SCALAR}, _BASELINE_MODEL, 'a state dict key is 1 .int.'),
    ({('conv1', 'weight'): _SCALAR}, _BASELINE_MODEL, 'a state dict key is .*tuple'),
    ({'model': {1: _SCALAR}, 'epoch': 1}, _BASELINE_MODEL, 'a state dict key is 1'),
    ({'model': {'conv1.weight': 'text'}}, _BASELINE_MODEL, "'conv1.weight' holds str"),
    ({'model': {**_RESNET18, 'fc_cls.weight': _SCALAR}}, _BASELINE_MODEL, 'keys do not match'),
    ({'model': {**_RESNET18, 'fc_cls.weight': np.zeros((50, 8), np.float32)}},
     _BASELINE_MODEL, 'keys do not match'),
    ({'model': {**_RESNET18, 'fc_bbox_xy.weight': _SCALAR}}, _BASELINE_MODEL,
     'keys do not match'),
    ({**_LIU_LU, '__step': np.zeros(3)}, _LIU_LU_MODEL, r'training step \(__step\) is'),
    ({**_LIU_LU, 'category_fc2.weight': _SCALAR}, _LIU_LU_MODEL, 'keys do not match'),
], ids=['int-key', 'tuple-key', 'baseline-int-key', 'str-value', 'scalar-category-head',
        'category-head-without-bias', 'scalar-box-head', 'step-of-three', 'liu-lu-scalar-head'])
def test_odd_state_dicts_are_refused_by_the_families(monkeypatch, content, model, match):
  """What the reader returns (any dict at all) reaches the families through load_into:
  each refuses what is not a state dict of tensors it can use with a CheckpointError."""
  monkeypatch.setattr(reader, 'read_pth', lambda path: content)
  with pytest.raises(torch_io.CheckpointError, match=f'odd.pth: .*{match}'):
    torch_io.load_into(_Model(**model), 'odd.pth')


@pytest.mark.parametrize('value, expected', [
    (7, 7), (np.array(7), 7), (np.array([3.0]), 3), (7.0, 7), (np.array([True]), 1),
    ('seven', None), (None, None), (float('nan'), None), (float('inf'), None), (7.5, None),
    (np.zeros(3), None), ({'epoch': 7}, None), (np.array(['7']), None)])
def test_the_numbers_a_file_records_beside_its_weights_are_integers(value, expected):
  if expected is None:
    with pytest.raises(torch_io.CheckpointError, match="f.pth: its epoch is .*expected an int"):
      common.integer(value, 'epoch', 'f.pth')
  else:
    assert common.integer(value, 'epoch', 'f.pth') == expected


# --------------------------------------------------------------------------- property tests


@functools.cache
def _small(file_format: str) -> bytes:
  return hostile.small_checkpoint(file_format)


@st.composite
def _mutated_checkpoints(draw):
  """The small checkpoint (a state dict under 'model', and an epoch) in either format,
  mutated once: bytes flipped, inserted, deleted or cut; an opcode inserted or a byte
  flipped in its pickle (zip CRCs and legacy headers kept, so that the pickle is read);
  a tensor's number replaced; a zip member resized, compressed, renamed or dropped, or its
  byte order changed."""
  file_format = draw(st.sampled_from(hostile.FORMATS))
  base = _small(file_format)
  position = draw(st.integers(0, 2 * len(base)))
  kind = draw(st.sampled_from(['flip', 'insert', 'delete', 'truncate', 'opcode', 'pickle_flip',
                               'number', 'member']))
  if kind == 'flip':
    data = base
    for xor in draw(st.lists(st.integers(1, 255), min_size=1, max_size=4)):
      data = hostile.flip(data, position, xor)
      position = draw(st.integers(0, len(base)))
    return data
  if kind == 'insert':
    return hostile.insert(base, position, draw(st.binary(min_size=1, max_size=16)))
  if kind == 'delete':
    return hostile.delete(base, position, draw(st.integers(1, 64)))
  if kind == 'truncate':
    return hostile.truncate(base, position)
  if kind == 'opcode':
    opcode = draw(st.sampled_from(hostile.INTERESTING_OPCODES) | st.binary(min_size=1, max_size=9))
    return hostile.with_pickle_mutated(file_format,
                                       lambda p: hostile.insert(p, position % len(p), opcode))
  if kind == 'pickle_flip':
    xor = draw(st.integers(1, 255))
    return hostile.with_pickle_mutated(file_format, lambda p: hostile.flip(p, position, xor))
  if kind == 'number' or file_format == 'legacy':
    value = draw(st.sampled_from(hostile.INTERESTING_NUMBERS) | st.integers(-2**70, 2**70))
    return hostile.with_numbers(file_format, draw(st.integers(0, 2)),
                                draw(st.sampled_from(['offset', 'size', 'stride', 'numel'])),
                                value)
  return hostile.with_member_changed(draw(st.sampled_from(hostile.MEMBER_CHANGES)),
                                     draw(st.integers(0, 4)), draw(st.integers(0, 64)))


def _loads_or_is_refused_cleanly(data: bytes, folder: str):
  """The property: read_pth returns or raises CheckpointError, its traced memory under 16
  times the file's size plus 1 MiB; what it returns, load_into takes or refuses the same way."""
  path = f'{folder}/mutated.pth'
  with open(path, 'wb') as f:
    f.write(data)
  try:
    content, peak = _read(path)
  except torch_io.CheckpointError as e:
    assert str(e).startswith(f'{path}: ')
    return
  assert peak < 16 * len(data) + MIB, (peak, len(data))
  try:
    torch_io.load_into(_Model(**_BASELINE_MODEL), path)
  except torch_io.CheckpointError:
    pass
  del content


@hypothesis.settings(max_examples=100, deadline=None, derandomize=True)
@hypothesis.given(data=_mutated_checkpoints())
def test_a_mutated_checkpoint_loads_or_is_refused_cleanly(data):
  with tempfile.TemporaryDirectory() as folder:
    _loads_or_is_refused_cleanly(data, folder)


@pytest.mark.slow
@hypothesis.settings(max_examples=5000, deadline=None)
@hypothesis.given(data=_mutated_checkpoints())
def test_many_mutated_checkpoints_load_or_are_refused_cleanly(data):
  with tempfile.TemporaryDirectory() as folder:
    _loads_or_is_refused_cleanly(data, folder)


def test_the_benchmarks_tries_come_out_clean(tmp_path, monkeypatch):
  """Every try of benchmarks/hostile/checkpoint_reader.py returns or raises a
  DeepFashionError (here with the families' stand-in model, not a FashionNet)."""
  monkeypatch.setattr(hostile, '_model', lambda: _Model(**_BASELINE_MODEL))
  outcomes = [hostile_input.run_try(description, thunk).outcome
              for description, thunk in hostile.tries(tmp_path, mutations_per_format=10)]
  assert 'not clean' not in outcomes
  assert outcomes.count('refused cleanly') > len(outcomes) / 2
