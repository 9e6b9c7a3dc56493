"""The safetensors reader, and `torch_io.read`'s choice of reader by a file's first bytes."""

import json
import pickle
import re
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from deepfashion_jax import torch_io
from deepfashion_jax.torch_io import safetensors_file


def _arrays():
  rng = np.random.default_rng(0)
  return {'blocks.0.weight': rng.normal(size=(3, 4)).astype(np.float32),
          'position': rng.normal(size=(1, 5, 2)).astype(np.float64),
          'count': np.arange(4, dtype=np.int64)}


def _safetensors_bytes(tensors: dict) -> bytes:
  """A safetensors file by hand: {name: (dtype code, shape, bytes)}, in order."""
  header, offset = {}, 0
  for name, (dtype, shape, data) in tensors.items():
    header[name] = {'dtype': dtype, 'shape': list(shape),
                    'data_offsets': [offset, offset + len(data)]}
    offset += len(data)
  text = json.dumps(header).encode()
  return struct.pack('<Q', len(text)) + text + b''.join(d for _, _, d in tensors.values())


def test_a_file_saved_by_safetensors_reads_back_whatever_its_name(tmp_path):
  """Read by its first bytes: a safetensors file named .pth is still read as one."""
  path = str(tmp_path / 'weights.pth')
  safetensors_numpy.save_file(_arrays(), path, metadata={'format': 'pt'})
  got = torch_io.read(path)
  assert sorted(got) == sorted(_arrays())
  for name, expected in _arrays().items():
    assert got[name].dtype == expected.dtype, name
    np.testing.assert_array_equal(got[name], expected)


def test_a_torch_file_named_safetensors_is_read_as_a_torch_file(tmp_path):
  path = tmp_path / 'model.safetensors'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', pickle.dumps({'epoch': 3}, protocol=2))
  assert torch_io.read(str(path)) == {'epoch': 3}


def test_half_precision_tensors_come_back_as_their_float32_values(tmp_path):
  """BF16 and F16 values, chosen exactly representable in each, widen exactly."""
  values = np.array([1.5, -2.25, 3.140625, 65280.0, -1e-3, 0.0], np.float32)
  bf16 = values.astype(ml_dtypes.bfloat16)
  f16 = values[:3].astype(np.float16)
  path = tmp_path / 'half.safetensors'
  path.write_bytes(_safetensors_bytes({'b': ('BF16', (2, 3), bf16.tobytes()),
                                       'h': ('F16', (3,), f16.tobytes())}))
  got = torch_io.read(str(path))
  assert got['b'].dtype == got['h'].dtype == np.float32
  np.testing.assert_array_equal(got['b'], bf16.astype(np.float32).reshape(2, 3))
  np.testing.assert_array_equal(got['b'][0], values[:3])  # these three are exact in bf16
  np.testing.assert_array_equal(got['h'], values[:3])


def _good_bytes(tmp_path) -> bytes:
  path = str(tmp_path / 'good.safetensors')
  safetensors_numpy.save_file(_arrays(), path)
  with open(path, 'rb') as f:
    return f.read()


def _lying_header() -> bytes:
  """A header promising 100 float32 (400 bytes) in a file that holds 40."""
  return _safetensors_bytes({'x': ('F32', (100,), bytes(400))})[:-360]


def _wrong_shape() -> bytes:
  """A range of 8 bytes for a shape of 3 float32 (12 bytes)."""
  return _safetensors_bytes({'x': ('F32', (3,), bytes(8))})


@pytest.mark.parametrize('damage', ['truncated', 'lying-header', 'wrong-shape', 'empty', 'text',
                                    'header-only', 'huge-header-length', 'float8'])
def test_a_damaged_or_foreign_file_is_refused_naming_it(tmp_path, damage):
  """Whichever reader its first bytes pick, the error is a CheckpointError naming the file;
  the safetensors reader alone refuses each one too."""
  good = _good_bytes(tmp_path)
  content = {
      'truncated': good[:-7],
      'lying-header': _lying_header(),
      'wrong-shape': _wrong_shape(),
      'empty': b'',
      'text': b'{"weights": "not here"}\nthis is a text file\n' * 4,
      'header-only': good[:12],
      'huge-header-length': struct.pack('<Q', 2**60) + good[8:],
      'float8': _safetensors_bytes({'x': ('F8_E4M3', (2,), bytes(2))}),
  }[damage]
  path = tmp_path / f'{damage}.safetensors'
  path.write_bytes(content)
  for read in (torch_io.read, safetensors_file.read_safetensors):
    with pytest.raises(torch_io.CheckpointError, match=f'^{re.escape(str(path))}: '):
      read(str(path))


@pytest.mark.parametrize('damage, message', [
    ('truncated', 'not a readable safetensors file: .*not fully covered'),
    ('lying-header', 'not a readable safetensors file: .*not fully covered'),
    ('wrong-shape', 'not a readable safetensors file: .*invalid shape'),
    ('float8', "tensor 'x' is stored as F8_E4M3; expected one of F64, F32, F16, BF16"),
])
def test_the_refusal_says_what_is_wrong(tmp_path, damage, message):
  content = {'truncated': _good_bytes(tmp_path)[:-7], 'lying-header': _lying_header(),
             'wrong-shape': _wrong_shape(),
             'float8': _safetensors_bytes({'x': ('F8_E4M3', (2,), bytes(2))})}[damage]
  path = tmp_path / 'w.safetensors'
  path.write_bytes(content)
  with pytest.raises(torch_io.CheckpointError, match=f'{re.escape(str(path))}: {message}'):
    torch_io.read(str(path))


def test_a_missing_file_or_a_folder_is_refused_naming_it(tmp_path):
  for path in (str(tmp_path / 'absent.safetensors'), str(tmp_path)):
    with pytest.raises(torch_io.CheckpointError,
                       match=f'{re.escape(path)}: cannot open the safetensors file'):
      safetensors_file.read_safetensors(path)
    with pytest.raises(torch_io.CheckpointError, match=re.escape(path)):
      torch_io.read(path)


def test_every_truncation_and_byte_change_reads_or_is_refused_cleanly(tmp_path):
  """Whatever is cut or changed (each truncation point; 300 random bytes changed, in the
  header mostly), torch_io.read returns tensors or raises a CheckpointError naming the
  file: no other exception escapes."""
  good = _good_bytes(tmp_path)
  header_end = 8 + struct.unpack('<Q', good[:8])[0]
  rng = np.random.default_rng(0)
  variants = [good[:end] for end in range(len(good))]
  for _ in range(300):
    changed = bytearray(good)
    position = int(rng.integers(0, header_end if rng.random() < 0.8 else len(good)))
    changed[position] = int(rng.integers(0, 256))
    variants.append(bytes(changed))
  path = tmp_path / 'mutated.safetensors'
  refused = 0
  for data in variants:
    path.write_bytes(data)
    try:
      content = torch_io.read(str(path))
    except torch_io.CheckpointError as e:
      assert str(e).startswith(f'{path}: '), str(e)
      refused += 1
      continue
    assert isinstance(content, dict)
  assert refused >= len(good)  # every truncation at least
