"""What the families of PyTorch files share: the account of a load, PyTorch's layouts and
parameter names turned into Flax's, and writing arrays into an nnx model by path."""

import dataclasses
import reprlib

from flax import nnx
import jax.numpy as jnp
import numpy as np

from deepfashion_jax.torch_io.errors import CheckpointError

# The bias of a category the file has no logit for, so that it never wins: the baseline's
# last category, Liu & Lu's last two.
NO_LOGIT_BIAS = -1e4
# A torch module's parameter names -> Flax's: a convolution's or linear layer's, and a
# batch norm's (whose running statistics are buffers in torch, BatchStats here).
LEAVES = {'weight': 'kernel', 'bias': 'bias'}
NORM_LEAVES = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}


@dataclasses.dataclass(frozen=True)
class Loaded:
  """What `load_into` did: which family the file is ('baseline', 'liu_lu', 'torchvision'),
  which part of the model it filled ('model' or 'backbone'), and the baseline's epoch or
  Liu & Lu's training step the file was saved at (None when it records none)."""
  family: str
  part: str
  saved_at: int | None = None


def without_module_prefix(state: dict) -> dict:
  """`state` with keys as the module had them: nn.DataParallel and DistributedDataParallel
  save every key prefixed 'module.', which is dropped when all have it."""
  prefix = 'module.'
  if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
    return {k[len(prefix):]: v for k, v in state.items()}
  return state


def only_tensors(state: dict, path: str) -> dict:
  """`state`, a dict that must map parameter names (strings) to tensors (arrays), as a
  state dict does: a file whose dict holds anything else is refused here, before a family
  reads its keys."""
  for key, value in state.items():
    if not isinstance(key, str):
      raise CheckpointError(f'{path}: a state dict key is {reprlib.repr(key)} '
                            f'({type(key).__name__}), expected a parameter name (a string)')
    if not isinstance(value, np.ndarray):
      raise CheckpointError(f'{path}: {reprlib.repr(key)} holds {type(value).__name__}, '
                            'expected a tensor')
  return state


def state_dict(obj, path: str) -> dict:
  """The state dict `obj` (`only_tensors`), keys as the module had them
  (`without_module_prefix`)."""
  if not isinstance(obj, dict):
    raise CheckpointError(f'{path}: expected a state dict, found {type(obj).__name__}')
  return without_module_prefix(only_tensors(obj, path))


def integer(value, what: str, path: str) -> int:
  """`value`, a number the file records beside its weights (the baseline's epoch, Liu &
  Lu's step: a Python number or a one-element tensor), as an int."""
  if isinstance(value, int):
    return int(value)
  number = value
  if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in 'biuf':
    number = value.item()
  if isinstance(number, int) or (isinstance(number, float) and number.is_integer()):
    return int(number)
  raise CheckpointError(f'{path}: its {what} is {reprlib.repr(value)}, expected an integer')


def norm_modules(names) -> frozenset:
  """The batch norms among the modules that torch keys name: those with running
  statistics (ResNet's `bn1`, `downsample.1`; VGG-16-BN's `features.1`, whose name alone
  does not tell)."""
  return frozenset(n.rsplit('.', 1)[0] for n in names if n.endswith('.running_mean'))


def to_flax_layout(array: np.ndarray, transposed: bool = False) -> np.ndarray:
  """A torch weight in Flax's layout; `transposed`: an nn.ConvTranspose2d's."""
  if array.ndim == 4 and transposed:  # ConvTranspose2d: (in, out, kh, kw) -> (kh, kw, in, out)
    return array.transpose(2, 3, 0, 1)
  if array.ndim == 4:  # conv: (out, in, kh, kw) -> (kh, kw, in, out)
    return array.transpose(2, 3, 1, 0)
  if array.ndim == 2:  # linear: (out, in) -> (in, out)
    return array.T
  return array


def load_variables(model: nnx.Module, named_arrays: dict, path: str, only_prefix: tuple = (),
                   *, transposed: frozenset = frozenset(), key_of=None):
  """Writes arrays into the model's variables by path; lists missing and unexpected keys,
  and refuses a shape that differs before anything is written.

  named_arrays: {key in the file: (variable path, array in PyTorch's layout)};
  only_prefix: the part of the model the file fills (('backbone',)), all of it by default;
  transposed: the keys whose 4-D arrays are nn.ConvTranspose2d weights (in, out, kh, kw);
  key_of: a missing variable's path -> the key the file lacks (default: the path, dotted)."""
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  flat = dict(nnx.to_flat_state(state))
  targets = {p: v for p, v in flat.items() if p[:len(only_prefix)] == only_prefix}
  unexpected = sorted(k for k, p in named_arrays.items() if p[0] not in targets)
  key_of = key_of or (lambda p: '.'.join(map(str, p)))
  missing = sorted(key_of(p) for p in set(targets) - {p for p, _ in named_arrays.values()})
  if unexpected or missing:
    raise CheckpointError(f'{path}: keys do not match the model: unexpected '
                          f'{unexpected or "none"}; missing {missing or "none"}')
  converted = {}
  for key, (target, array) in named_arrays.items():
    flax_array = to_flax_layout(array, key in transposed)
    expected = tuple(targets[target].shape)
    if flax_array.shape != expected:
      raise CheckpointError(f'{path}: {key} has shape {array.shape} ({flax_array.shape} in '
                            f'Flax layout), the model expects {expected} in Flax layout '
                            f'({".".join(map(str, target))})')
    converted[target] = flax_array
  for target, array in converted.items():
    variable = targets[target]
    variable[...] = jnp.asarray(array, variable.dtype)
  nnx.update(model, nnx.from_flat_state(flat))
