""".safetensors files read without PyTorch, through safetensors' NumPy API.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the bytes. Nothing in it runs; the library checks
that the header's ranges tile the bytes the file holds. Hugging Face's `save_pretrained`,
timm and open_clip publish their weights this way.

`read_safetensors` returns {name: array}, as a state dict read by `reader.read_pth` is, with
half-precision tensors (F16, and BF16, which NumPy has no type of its own for: safetensors
hands it over as ml_dtypes' bfloat16) widened to float32, exactly, so that the families can
compute on them (split, resample) in float32. Like `reader`, it imports nothing from the
project but its error type.
"""

import numpy as np
import safetensors

from deepfashion_jax.torch_io.errors import CheckpointError

# A safetensors header is a JSON object: its length (8 bytes), then '{'.
_HEADER_LENGTH_BYTES = 8
# The dtypes a weight file holds, as the header names them; NumPy reads them all. Others
# (float8, float4, complex) are refused: no weight of ours is stored that way.
_HALF = ('F16', 'BF16')  # widened to float32
_READABLE = ('F64', 'F32', *_HALF, 'I64', 'I32', 'I16', 'I8', 'U64', 'U32', 'U16', 'U8',
             'BOOL')


def is_safetensors(path: str) -> bool:
  """Whether the file at `path` starts as a safetensors file does (a header length, then
  the header's '{'); False also when it cannot be opened (the reader chosen then says why)."""
  try:
    with open(path, 'rb') as f:
      head = f.read(_HEADER_LENGTH_BYTES + 1)
  except OSError:
    return False
  return len(head) == _HEADER_LENGTH_BYTES + 1 and head[-1:] == b'{'


def _read(path: str) -> dict:
  """`read_safetensors` without the file's name in its errors."""
  arrays = {}
  with safetensors.safe_open(path, framework='np') as f:
    dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    for name, dtype in dtypes.items():
      if dtype not in _READABLE:
        raise CheckpointError(f'tensor {name!r} is stored as {dtype}; expected one of '
                              f'{", ".join(_READABLE)}')
    for name, dtype in dtypes.items():
      array = f.get_tensor(name)
      arrays[name] = array.astype(np.float32) if dtype in _HALF else array
  return arrays


def read_safetensors(path: str) -> dict:
  """{tensor name: NumPy array} of the safetensors file at `path`, F16 and BF16 tensors as
  float32; any file that is not a well-formed safetensors file (truncated, a header whose
  ranges do not fit the file, not one at all) is refused with a CheckpointError naming it."""
  try:
    return _read(path)
  except CheckpointError as e:
    raise CheckpointError(f'{path}: {e}') from None
  except safetensors.SafetensorError as e:
    raise CheckpointError(f'{path}: not a readable safetensors file: {e}') from None
  except OSError as e:  # missing, a folder, unreadable: the user named the wrong file
    raise CheckpointError(f'{path}: cannot open the safetensors file: '
                          f'{e.strerror or e}') from None
