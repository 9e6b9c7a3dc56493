"""PyTorch checkpoints into the Flax model, without PyTorch.

Two kinds of file:
- the baseline's `epoch_N.pth`: {'model': state_dict, 'optim': ..., 'epoch': N}, keys
  `basemodel.0.weight`, ..., `reduce_1x1.*`, `fc_bbox_xy.*`, `fc_bbox_offset.*`, `fc_bin.*`,
  `fc_cls.*`: a whole model (`load_baseline_into`);
- a torchvision ResNet state dict (`conv1.weight`, `layer1.0.conv1.weight`, ..., `fc.*`
  dropped): the backbone only (`load_torchvision_backbone_into`), the ImageNet start.

A `.pth` is a zip of a pickle plus one raw file per tensor storage; `read_pth` unpickles it
with an allow-list of the few classes a state dict needs, so that no code in the file runs.
"""

import collections
import pickle
import re
import zipfile

from absl import logging
from flax import nnx
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from deepfashion_jax.models import resnet

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}
# The baseline's `basemodel` is an nn.Sequential: index -> torchvision name.
_BASEMODEL = {'0': 'conv1', '1': 'bn1', '4': 'layer1', '5': 'layer2', '6': 'layer3',
              '7': 'layer4'}
# A converted baseline has no logit for the last category (see `_remap_category_head`).
NO_LOGIT_BIAS = -1e4


class CheckpointError(ValueError):
  """A file is not a usable PyTorch checkpoint for the configured model."""


class _StorageType:

  def __init__(self, name):
    self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *unused):
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride))
  return np.array(view)


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles tensors as NumPy arrays; refuses every class a state dict does not need."""

  def __init__(self, file, archive, prefix):
    super().__init__(file)
    self.archive, self.prefix = archive, prefix

  def find_class(self, module, name):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return _rebuild_tensor
    if (module, name) == ('torch._utils', '_rebuild_parameter'):
      return lambda data, requires_grad, hooks: data
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f'{module}.{name} is not allowed in a checkpoint')

  def persistent_load(self, pid):
    _, storage_type, key, _, _ = pid
    data = self.archive.read(f'{self.prefix}/data/{key}')
    return np.frombuffer(data, storage_type.dtype)


def read_pth(path: str):
  """The object saved in a `.pth` (torch.save's zip format), tensors as NumPy arrays."""
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise CheckpointError(f'{path}: not a PyTorch checkpoint (torch.save zip format): {e}') \
        from None
  with archive:
    pickles = [n for n in archive.namelist() if n.endswith('/data.pkl')]
    if not pickles:
      raise CheckpointError(f'{path}: not a PyTorch checkpoint (no data.pkl inside)')
    prefix = pickles[0][:-len('/data.pkl')]
    with archive.open(pickles[0]) as f:
      try:
        return _StateDictUnpickler(f, archive, prefix).load()
      except (pickle.UnpicklingError, KeyError, EOFError) as e:
        raise CheckpointError(f'{path}: cannot read the checkpoint: {e}') from None


# ----------------------------------------------------------------------------- key mapping


def _torchvision_name(key: str) -> str:
  """A baseline key's torchvision-style name: 'basemodel.4.0.conv1.weight' -> 'layer1.0.conv1.weight'."""
  if key.startswith('basemodel.'):
    index, rest = key[len('basemodel.'):].split('.', 1)
    return f'{_BASEMODEL.get(index, "basemodel." + index)}.{rest}'
  return key


def _flax_path(name: str) -> tuple:
  """A torchvision-style key -> the path of the Flax variable it fills."""
  name = name.replace('downsample.0.', 'downsample_conv.').replace('downsample.1.',
                                                                     'downsample_bn.')
  parts = name.split('.')
  module, leaf = parts[:-1], parts[-1]
  is_norm = re.fullmatch(r'bn\d|downsample_bn', module[-1]) is not None
  leaf = {('weight', True): 'scale', ('weight', False): 'kernel', ('bias', True): 'bias',
          ('bias', False): 'bias', ('running_mean', True): 'mean',
          ('running_var', True): 'var'}.get((leaf, is_norm), leaf)
  return tuple(int(p) if p.isdigit() else p for p in module) + (leaf,)


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:  # conv: (out, in, kh, kw) -> (kh, kw, in, out)
    return array.transpose(2, 3, 1, 0)
  if array.ndim == 2:  # linear: (out, in) -> (in, out)
    return array.T
  return array


def depth_of(names) -> int:
  """The ResNet depth a set of torchvision-style keys describes."""
  blocks = tuple(len({n.split('.')[1] for n in names if n.startswith(f'layer{i}.')})
                 for i in range(1, 5))
  bottleneck = any(n.endswith('conv3.weight') for n in names)
  for depth, architecture in resnet.ARCHITECTURES.items():
    if (architecture.blocks_per_stage == blocks
        and (architecture.block == 'bottleneck') == bottleneck):
      return depth
  raise CheckpointError(f'the checkpoint holds no known ResNet (blocks per stage {blocks})')


def _load(model: nnx.Module, named_arrays: dict, path: str, only_prefix: tuple = ()):
  """Writes arrays into the model's variables by path; lists missing and unexpected keys."""
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  flat = dict(nnx.to_flat_state(state))
  targets = {p: v for p, v in flat.items() if p[:len(only_prefix)] == only_prefix}
  unexpected = sorted(k for k, p in named_arrays.items() if p[0] not in targets)
  missing = sorted('.'.join(map(str, p)) for p in set(targets) - {p for p, _ in
                                                                   named_arrays.values()})
  if unexpected or missing:
    raise CheckpointError(f'{path}: keys do not match the model: unexpected '
                          f'{unexpected or "none"}; missing {missing or "none"}')
  for key, (target, array) in named_arrays.items():
    variable = targets[target]
    array = _to_flax_layout(array)
    current = variable[...]
    if array.shape != current.shape:
      raise CheckpointError(f'{path}: {key} has shape {array.shape} (in Flax layout), the '
                            f'model expects {current.shape}')
    variable[...] = jnp.asarray(array, current.dtype)
  nnx.update(model, nnx.from_flat_state(flat))


def _check_depth(names, model, path):
  depth = depth_of(names)
  if depth != model.backbone.depth:
    raise CheckpointError(f'{path} holds a ResNet-{depth} backbone; the configured model is '
                          f'ResNet-{model.backbone.depth} (config.model.backbone)')


def _remap_category_head(arrays: dict) -> dict:
  """The baseline's logit i is 1-based category i: drop logit 0, add a never-winning last."""
  weight, bias = arrays['fc_cls.weight'], arrays['fc_cls.bias']
  logging.warning('Remapping the baseline category head: its logit i is category i (1-based); '
                  'its logit 0 is dropped and the last category, which it has no logit for, '
                  'gets a bias of %g so that it never wins.', NO_LOGIT_BIAS)
  arrays['fc_cls.weight'] = np.concatenate([weight[1:], np.zeros_like(weight[:1])])
  arrays['fc_cls.bias'] = np.concatenate([bias[1:], np.full_like(bias[:1], NO_LOGIT_BIAS)])
  return arrays


def load_into(model: nnx.Module, path: str) -> str:
  """Loads a baseline checkpoint (the whole model) or a torchvision ResNet state dict (the
  backbone), whichever the file is; returns 'baseline' or 'torchvision'."""
  content = read_pth(path)
  if isinstance(content, dict) and 'model' in content:
    _load_baseline(model, content, path)
    return 'baseline'
  _load_torchvision(model, content, path)
  return 'torchvision'


def load_baseline_into(model: nnx.Module, path: str) -> int:
  """Loads a baseline `epoch_N.pth` into a FashionNet (category_head='single'); returns N."""
  return _load_baseline(model, read_pth(path), path)


def load_torchvision_backbone_into(model: nnx.Module, path: str):
  """Initialises the backbone from a torchvision ResNet state dict (its fc is dropped)."""
  state_dict = read_pth(path)
  if isinstance(state_dict, dict) and 'model' in state_dict:
    raise CheckpointError(f'{path} is a baseline checkpoint, not a torchvision state dict')
  _load_torchvision(model, state_dict, path)


def _load_baseline(model: nnx.Module, checkpoint, path: str) -> int:
  if not isinstance(checkpoint, dict) or 'model' not in checkpoint:
    raise CheckpointError(f"{path}: expected the baseline's {{'model', 'optim', 'epoch'}} "
                          f'dict, found {type(checkpoint).__name__} '
                          f'{sorted(checkpoint)[:5] if isinstance(checkpoint, dict) else ""}')
  arrays = {_torchvision_name(k): np.asarray(v) for k, v in checkpoint['model'].items()
            if not k.endswith('num_batches_tracked')}
  _check_depth([k for k in arrays if k.startswith('layer')], model, path)
  if 'fc_cls.weight' in arrays:
    arrays = _remap_category_head(arrays)
  named = {}
  for name, array in arrays.items():
    path_in_model = _flax_path(name)
    if path_in_model[0] in ('conv1', 'bn1') or path_in_model[0].startswith('layer'):
      path_in_model = ('backbone',) + path_in_model
    named[name] = (path_in_model, array)
  _load(model, named, path)
  return int(checkpoint.get('epoch', 0))


def _load_torchvision(model: nnx.Module, state_dict, path: str):
  if not isinstance(state_dict, dict):
    raise CheckpointError(f'{path}: expected a state dict, found {type(state_dict).__name__}')
  arrays = {k: np.asarray(v) for k, v in state_dict.items()
            if not k.startswith('fc.') and not k.endswith('num_batches_tracked')}
  _check_depth([k for k in arrays if k.startswith('layer')], model, path)
  named = {k: (('backbone',) + _flax_path(k), v) for k, v in arrays.items()}
  _load(model, named, path, only_prefix=('backbone',))
