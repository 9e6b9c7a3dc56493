"""PyTorch checkpoints into the Flax model, without PyTorch.

Three kinds of file:
- the baseline's `epoch_N.pth`: {'model': state_dict, 'optim': ..., 'epoch': N}, keys
  `basemodel.0.weight`, ... and its heads' (`_BASELINE_MODULES` maps its module names to
  ours): a whole model (`load_baseline_into`);
- a state dict of Liu & Lu 2018's `WholeNetwork` (their public code,
  fdjingyuan/Deep-Fashion-Analysis-ECCV2018: `torch.save(net.state_dict())`), told by its
  `lm_branch.*` and `attention_pred_net.*` keys, directly or under 'model' or
  'state_dict': a whole FashionNet(backbone='vgg16', heads='liu_lu',
  landmarks='attention') (`load_liu_lu_into`; `_LIU_LU_MODULES` maps their modules);
- a torchvision ResNet state dict (`conv1.weight`, `layer1.0.conv1.weight`, ..., `fc.*`
  dropped) or VGG-16 / VGG-16-BN one (`features.<i>.weight`, ..., `classifier.*` dropped):
  the backbone only (`load_torchvision_backbone_into`), the ImageNet start.
A file whose backbone is not config.model.backbone is refused, saying what it holds.
Any may come from nn.DataParallel (every key prefixed `module.`) and from any device.

`read_pth` reads both formats torch.save writes: the zip archive (PyTorch >= 1.6: a pickle
plus one file per tensor storage) and the legacy stream (PyTorch < 1.6: a few pickles, then
the raw storages). One unpickler with an allow-list of the few classes a checkpoint needs
reads both, so that no code in the file runs. Tensors unpickle as placeholders, since the
legacy format stores their bytes after the pickle; `_resolve` then turns them into arrays.
"""

import collections
import dataclasses
import functools
import io
import math
import os
import pickle
import struct
import sys
import types
import zipfile

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from deepfashion_jax import checkpoints
from deepfashion_jax import config_checks
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax.models import backbones
from deepfashion_jax.models import fashion_net
from deepfashion_jax.models import resnet
from deepfashion_jax.models import vgg

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
# The baseline's module names -> ours. Its `basemodel` is an nn.Sequential of torchvision's
# ResNet modules, whose names our backbone keeps below them.
_BASELINE_MODULES = {
    'basemodel.0': 'backbone.conv1', 'basemodel.1': 'backbone.bn1',
    'basemodel.4': 'backbone.layer1', 'basemodel.5': 'backbone.layer2',
    'basemodel.6': 'backbone.layer3', 'basemodel.7': 'backbone.layer4',
    'reduce_1x1': 'box_reduce',
    'fc_bbox_xy': 'box_top_left',
    'fc_bbox_offset': 'box_size',
    'fc_bin': 'attribute_classifier',
    'fc_cls': 'category_classifier',
}
# A converted baseline has no logit for the last category (see `_remap_category_head`),
# a converted Liu & Lu network none for the last two (`_pad_liu_lu_categories`).
NO_LOGIT_BIAS = -1e4
LIU_LU_CATEGORIES = 48  # their category head's outputs

# Liu & Lu's WholeNetwork (src/networks.py, src/lm_networks.py, src/base_networks.py of
# fdjingyuan/Deep-Fashion-Analysis-ECCV2018): module names -> the paths of ours.
_LIU_LU_MARKERS = ('lm_branch.', 'attention_pred_net.')  # prefixes no other file has
_LIU_LU_EXTRACTOR = 'vgg16_extractor.vgg.'  # torchvision's vgg16().features, run whole
# The extractor's convolutions up to conv4_3 (features[21]; its ReLU, features[22], gives
# the map they read): torchvision's indices, which our VGG-16 keeps.
_LIU_LU_EXTRACTOR_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21)
_LIU_LU_LAST_USED = 22
# Their LandmarkBranchUpsample's layers in the order they run: our LandmarkBranch.layers.
_LIU_LU_BRANCH = ('conv1', 'conv2', 'conv3', 'conv4', 'upconv1', 'conv5', 'conv6', 'upconv2',
                  'conv7', 'conv8', 'upconv3', 'conv9', 'conv10')
# Their CustomUnetGenerator(513, 512, num_downs=2, ngf=32): `model` is the outermost
# UnetSkipConnectionBlock, each block's `model` an nn.Sequential whose index 1 (outermost)
# or 3 (middle) is the next block: outermost [conv, block, ReLU, convT, Tanh], middle
# [LeakyReLU, conv, BN, block, ReLU, convT, BN], innermost [LeakyReLU, conv, ReLU, convT,
# BN]. Below 'attention_pred_net.model.model.' -> our AttentionUNet's names.
_LIU_LU_UNET = {
    '0': 'conv_in',
    '1.model.1': 'down1', '1.model.2': 'down1_bn',
    '1.model.3.model.1': 'down2', '1.model.3.model.2': 'down2_bn',
    '1.model.3.model.3.model.1': 'inner_down', '1.model.3.model.3.model.3': 'inner_up',
    '1.model.3.model.3.model.4': 'inner_bn',
    '1.model.3.model.5': 'up2', '1.model.3.model.6': 'up2_bn',
    '1.model.5': 'up1', '1.model.6': 'up1_bn',
    '3': 'conv_out',
}
_LIU_LU_UNET_PREFIX = 'attention_pred_net.model.model.'
_LIU_LU_MODULES = {
    **{f'{_LIU_LU_EXTRACTOR}{i}': ('backbone', 'features', i) for i in _LIU_LU_EXTRACTOR_CONVS},
    # Their own conv5_1..3 (copied from the extractor's features[24/26/28] when built, then
    # trained) read the attended conv4_3 after pool4; ours are the backbone's, which reads
    # the attended map in the same place.
    'conv5_1': ('backbone', 'features', 24), 'conv5_2': ('backbone', 'features', 26),
    'conv5_3': ('backbone', 'features', 28),
    **{f'lm_branch.{name}': ('landmark_branch', 'layers', k)
       for k, name in enumerate(_LIU_LU_BRANCH)},
    **{_LIU_LU_UNET_PREFIX + theirs: ('landmark_attention', 'unet', ours)
       for theirs, ours in _LIU_LU_UNET.items()},
    'category_fc1': ('category_hidden',), 'category_fc2': ('category_classifier',),
    'attr_fc1': ('attribute_hidden',), 'attr_fc2': ('attribute_classifier',),
}
# Their nn.ConvTranspose2d modules: weights (in, out, kh, kw), not a convolution's.
_LIU_LU_TRANSPOSED = frozenset(
    [f'lm_branch.{name}' for name in _LIU_LU_BRANCH if name.startswith('upconv')]
    + [_LIU_LU_UNET_PREFIX + theirs for theirs, ours in _LIU_LU_UNET.items()
       if ours in ('inner_up', 'up2', 'up1', 'conv_out')])
_LIU_LU_LEAVES = {'weight': 'kernel', 'bias': 'bias'}
_LIU_LU_NORM_LEAVES = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean',
                       'running_var': 'var'}
_LIU_LU_STEP = '__step'  # their ModuleWithAttr's buffer: the training step it was saved at


class CheckpointError(ValueError):
  """A file is not a usable PyTorch checkpoint for the configured model."""


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


# ----------------------------------------------------------------------------- key mapping


def _our_name(key: str) -> str:
  """A baseline key with its module named as ours (`_BASELINE_MODULES`):
  'basemodel.4.0.conv1.weight' -> 'backbone.layer1.0.conv1.weight'; others unchanged."""
  parts = key.split('.')
  for length in (2, 1):
    module = '.'.join(parts[:length])
    if module in _BASELINE_MODULES:
      return '.'.join([_BASELINE_MODULES[module]] + parts[length:])
  return key


def _norm_modules(names) -> frozenset:
  """The batch norms among the modules that torchvision-style keys name: those with running
  statistics (ResNet's `bn1`, `downsample.1`; VGG-16-BN's `features.1`, whose name alone
  does not tell)."""
  return frozenset(n.rsplit('.', 1)[0] for n in names if n.endswith('.running_mean'))


def _flax_path(name: str, norms: frozenset) -> tuple:
  """A torchvision-style key ('layer1.0.bn1.weight', 'features.0.bias', or ours:
  'box_reduce.weight') -> the path of the Flax variable it fills; `norms`: the batch-norm
  modules (`_norm_modules`)."""
  is_norm = name.rsplit('.', 1)[0] in norms
  name = name.replace('downsample.0.', 'downsample_conv.').replace('downsample.1.',
                                                                     'downsample_bn.')
  parts = name.split('.')
  module, leaf = parts[:-1], parts[-1]
  leaf = {('weight', True): 'scale', ('weight', False): 'kernel', ('bias', True): 'bias',
          ('bias', False): 'bias', ('running_mean', True): 'mean',
          ('running_var', True): 'var'}.get((leaf, is_norm), leaf)
  return tuple(int(p) if p.isdigit() else p for p in module) + (leaf,)


def _to_flax_layout(array: np.ndarray, transposed: bool = False) -> np.ndarray:
  if array.ndim == 4 and transposed:  # ConvTranspose2d: (in, out, kh, kw) -> (kh, kw, in, out)
    return array.transpose(2, 3, 0, 1)
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


def _vgg_of(names) -> str:
  """'vgg16' or 'vgg16_bn', whichever VGG a set of torchvision-style `features.*` keys
  describes: torchvision's VGGs differ in their number of convolutions (VGG-16: 13) and
  in batch norms after them (`_bn`)."""
  modules = {n.rsplit('.', 1)[0] for n in names if n.startswith('features.')}
  norms = _norm_modules(names)
  convolutions = len(modules - norms)
  if convolutions != vgg.CONVOLUTIONS:
    raise CheckpointError(f'the checkpoint holds a VGG with {convolutions} convolutions; the '
                          f'VGG backbone here is VGG-16 ({vgg.CONVOLUTIONS})')
  return 'vgg16_bn' if norms else 'vgg16'


def backbone_of(names) -> str:
  """The backbone (its name in backbones.BACKBONES: 'resnet50', 'vgg16_bn') that a set of
  torchvision-style keys describes."""
  names = set(names)
  if any(n.startswith('features.') for n in names):
    return _vgg_of(names)
  return f'resnet{depth_of(names)}'


def _load(model: nnx.Module, named_arrays: dict, path: str, only_prefix: tuple = (), *,
          transposed: frozenset = frozenset(), key_of=None):
  """Writes arrays into the model's variables by path; lists missing and unexpected keys,
  and refuses a shape that differs before anything is written.

  named_arrays: {key in the file: (variable path, array in PyTorch's layout)};
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
    flax_array = _to_flax_layout(array, key in transposed)
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


def _check_backbone(names, model, path):
  """Refuses a file whose backbone (from its keys) is not the configured model's."""
  try:
    held = backbone_of(names)
  except CheckpointError as e:
    raise CheckpointError(f'{path}: {e}') from None
  if held != model.backbone_name:
    title = lambda name: backbones.BACKBONES[name].title
    raise CheckpointError(
        f'{path} holds a {title(held)} backbone; the configured model is '
        f'{title(model.backbone_name)} (config.model.backbone={model.backbone_name!r}): '
        f'set --config.model.backbone={held} to load it')


def _remap_category_head(arrays: dict) -> dict:
  """The baseline's logit i is 1-based category i: drop logit 0, add a never-winning last."""
  weight, bias = arrays['category_classifier.weight'], arrays['category_classifier.bias']
  logging.warning('Remapping the baseline category head: its logit i is category i (1-based); '
                  'its logit 0 is dropped and the last category, which it has no logit for, '
                  'gets a bias of %g so that it never wins.', NO_LOGIT_BIAS)
  arrays['category_classifier.weight'] = np.concatenate([weight[1:], np.zeros_like(weight[:1])])
  arrays['category_classifier.bias'] = np.concatenate(
      [bias[1:], np.full_like(bias[:1], NO_LOGIT_BIAS)])
  return arrays


def load_into(model: nnx.Module, path: str) -> str:
  """Loads a baseline checkpoint (the whole model), a state dict of Liu & Lu's WholeNetwork
  (the whole model) or a torchvision ResNet or VGG-16(-BN) state dict (the backbone),
  whichever the file is; returns 'baseline', 'liu_lu' or 'torchvision'."""
  content = read_pth(path)
  if _liu_lu_state_dict(content, path) is not None:
    _load_liu_lu(model, content, path)
    return 'liu_lu'
  if isinstance(content, dict) and 'model' in content:
    _load_baseline(model, content, path)
    return 'baseline'
  _load_torchvision(model, content, path)
  return 'torchvision'


def load_baseline_into(model: nnx.Module, path: str) -> int:
  """Loads a baseline `epoch_N.pth` into a FashionNet (category_head='single'); returns N."""
  return _load_baseline(model, read_pth(path), path)


def load_liu_lu_into(model: nnx.Module, path: str) -> int:
  """Loads a state dict of Liu & Lu's WholeNetwork into a FashionNet(backbone='vgg16',
  heads='liu_lu', landmarks='attention'); returns the training step it was saved at (their
  `__step` buffer; 0 without one)."""
  return _load_liu_lu(model, read_pth(path), path)


def load_torchvision_backbone_into(model: nnx.Module, path: str):
  """Initialises the backbone from a torchvision ResNet or VGG-16(-BN) state dict (its
  classifier is dropped)."""
  state_dict = read_pth(path)
  if _liu_lu_state_dict(state_dict, path) is not None:
    raise CheckpointError(f"{path} is a state dict of Liu & Lu's WholeNetwork, not a "
                          'torchvision state dict')
  if isinstance(state_dict, dict) and 'model' in state_dict:
    raise CheckpointError(f'{path} is a baseline checkpoint, not a torchvision state dict')
  _load_torchvision(model, state_dict, path)


def _state_dict(obj, path: str) -> dict:
  """The state dict `obj`, keys as the module had them: nn.DataParallel and
  DistributedDataParallel save every key prefixed 'module.', which is dropped when all have it."""
  if not isinstance(obj, dict):
    raise CheckpointError(f'{path}: expected a state dict, found {type(obj).__name__}')
  prefix = 'module.'
  if obj and all(isinstance(k, str) and k.startswith(prefix) for k in obj):
    return {k[len(prefix):]: v for k, v in obj.items()}
  return obj


def _check_fits_baseline(model: nnx.Module, arrays: dict, path: str):
  """A baseline checkpoint computes what the baseline did only with its local pooling, its
  pixel normalisation and a box branch sized for its input: names each config field that
  differs, with the value to set, in one error."""
  fixes = []
  if model.roi_pool != 'baseline_max':
    fixes.append("its heads were trained on the baseline's local pooling; set "
                 '--config.model.roi_pool=baseline_max (config.model.roi_pool is '
                 f'{model.roi_pool!r})')
  normalization = model.normalization
  if normalization != 'baseline':
    fixes.append('it was trained on pixels normalised as (x - 0.5) / 0.5; set '
                 '--config.data.normalization=baseline (config.data.normalization is '
                 f'{normalization!r})')
  if 'box_top_left.weight' in arrays:
    side = math.isqrt(arrays['box_top_left.weight'].shape[-1] // fashion_net.BOX_CHANNELS)
    if side != model.feature_size:
      fixes.append(f'its box branch reads {side}x{side} feature maps; set '
                   f'--config.data.crop_size={model.feature_stride * side} '
                   f'(config.data.crop_size gives {model.feature_size}x{model.feature_size} maps)')
  if fixes:
    raise CheckpointError(f'{path} is a baseline checkpoint: ' + '; and '.join(fixes))


def _load_baseline(model: nnx.Module, checkpoint, path: str) -> int:
  """Loads checkpoint['model'] into the whole model (the optimiser state and any other key
  are not used); returns checkpoint['epoch']."""
  if not isinstance(checkpoint, dict) or 'model' not in checkpoint:
    raise CheckpointError(f"{path}: expected the baseline's {{'model', 'optim', 'epoch'}} "
                          f'dict, found {type(checkpoint).__name__} '
                          f'{sorted(checkpoint)[:5] if isinstance(checkpoint, dict) else ""}')
  arrays = {_our_name(k): np.asarray(v)
            for k, v in _state_dict(checkpoint['model'], path).items()
            if not k.endswith('num_batches_tracked')}
  _check_backbone([k.removeprefix('backbone.') for k in arrays if k.startswith('backbone.')],
                  model, path)
  _check_fits_baseline(model, arrays, path)
  if 'category_classifier.weight' in arrays:
    arrays = _remap_category_head(arrays)
  norms = _norm_modules(arrays)
  named = {name: (_flax_path(name, norms), array) for name, array in arrays.items()}
  _load(model, named, path)
  return int(checkpoint.get('epoch', 0))


def _load_torchvision(model: nnx.Module, state_dict, path: str):
  """Loads a torchvision ResNet or VGG-16(-BN) state dict into the backbone; its ImageNet
  classifier (ResNet's `fc`, VGG's `classifier`) is dropped."""
  arrays = {k: np.asarray(v) for k, v in _state_dict(state_dict, path).items()
            if not k.startswith(('fc.', 'classifier.'))
            and not k.endswith('num_batches_tracked')}
  _check_backbone(arrays, model, path)
  norms = _norm_modules(arrays)
  named = {k: (('backbone',) + _flax_path(k, norms), v) for k, v in arrays.items()}
  _load(model, named, path, only_prefix=('backbone',))


# ------------------------------------------------------------ Liu & Lu's WholeNetwork


def _liu_lu_state_dict(content, path: str):
  """The state dict of Liu & Lu's WholeNetwork that `content` is (their training saves
  `net.state_dict()` itself) or holds under 'model' or 'state_dict', keys without
  nn.DataParallel's 'module.'; None when it holds none."""
  candidates = [content]
  if isinstance(content, dict):
    candidates += [content[k] for k in ('model', 'state_dict') if isinstance(content.get(k), dict)]
  for candidate in candidates:
    if not isinstance(candidate, dict) or not all(isinstance(k, str) for k in candidate):
      continue
    state = _state_dict(candidate, path)
    if all(any(k.startswith(marker) for k in state) for marker in _LIU_LU_MARKERS):
      return state
  return None


def _liu_lu_unused(key: str) -> bool:
  """Keys of their state dict that are no part of what the network computes."""
  if key == _LIU_LU_STEP or key.endswith('.num_batches_tracked'):
    return True  # counters: their training step, batch norm's batches
  if key.split('.', 1)[0].endswith('_loss_func'):
    return True  # a loss's buffers: attr_loss_func.weight, the class weights (0.1, 1)
  if key.startswith(_LIU_LU_EXTRACTOR):
    # Their VGG16Extractor runs all of vgg16().features, but WholeNetwork reads only
    # conv4_3 (features[22]) from it: features[24/26/28] (conv5_x) compute maps nothing
    # reads, get no gradient and keep the ImageNet weights they started from. Their own
    # conv5_1..3 (copies of them at the start, then trained) are the ones the network uses.
    index = key[len(_LIU_LU_EXTRACTOR):].split('.', 1)[0]
    return index.isdigit() and int(index) > _LIU_LU_LAST_USED
  return False


def _liu_lu_target(key: str) -> tuple:
  """Their key -> the path of our variable; a path the model lacks for keys of no module
  of theirs that we know (so that `_load` lists them as unexpected)."""
  module, leaf = key.rsplit('.', 1) if '.' in key else ('', key)
  ours = _LIU_LU_MODULES.get(module)
  if ours is None:
    return ('<not theirs>', key)
  leaves = _LIU_LU_NORM_LEAVES if str(ours[-1]).endswith('_bn') else _LIU_LU_LEAVES
  return ours + (leaves[leaf],) if leaf in leaves else ('<not theirs>', key)


def _liu_lu_key(target: tuple) -> str:
  """The inverse of `_liu_lu_target`: the key of theirs that fills our variable `target`."""
  modules = {ours: theirs for theirs, ours in _LIU_LU_MODULES.items()}
  module = modules.get(tuple(target[:-1]))
  leaves = _LIU_LU_NORM_LEAVES if str(target[-2]).endswith('_bn') else _LIU_LU_LEAVES
  leaf = {ours: theirs for theirs, ours in leaves.items()}.get(target[-1])
  if module is None or leaf is None:
    return f'(none of theirs fills our {".".join(map(str, target))})'
  return f'{module}.{leaf}'


def _check_fits_liu_lu(model: nnx.Module, arrays: dict, path: str):
  """Their network is a FashionNet(backbone='vgg16', heads='liu_lu', landmarks='attention')
  on ImageNet-normalised 224 px inputs (pool5 7 x 7) with 48 categories: names each
  difference of the model, with the value to set, in one error; then a category count
  that differs."""
  fixes = []
  if model.backbone_name != 'vgg16':
    fixes.append("its backbone is VGG-16 (torchvision's vgg16, without batch norm); set "
                 f'--config.model.backbone=vgg16 (config.model.backbone is '
                 f'{model.backbone_name!r})')
  if model.heads != 'liu_lu':
    fixes.append('its heads are theirs; set --config.model.heads=liu_lu '
                 f'(config.model.heads is {model.heads!r})')
  if model.landmarks != 'attention':
    fixes.append('it has their landmark branch and landmark-driven attention; set '
                 '--config.model.landmarks=attention (config.model.landmarks is '
                 f'{model.landmarks!r})')
  if model.normalization != 'imagenet':
    fixes.append("it was trained on pixels normalised with ImageNet's mean and std; set "
                 '--config.data.normalization=imagenet (config.data.normalization is '
                 f'{model.normalization!r})')
  hidden = arrays.get('category_fc1.weight')
  if not fixes and hidden is not None and hidden.ndim == 2:
    side = math.isqrt(hidden.shape[1] // model.backbone.out_features)
    ours = model.feature_size // 2
    if side != ours:
      fixes.append(f'its heads read {side}x{side} pool5 maps (category_fc1.weight has shape '
                   f'{hidden.shape}); set --config.data.crop_size='
                   f'{2 * model.feature_stride * side} (config.data.crop_size gives '
                   f'{ours}x{ours})')
  if fixes:
    raise CheckpointError(f"{path} is a state dict of Liu & Lu's WholeNetwork: "
                          + '; and '.join(fixes))
  classifier = arrays.get('category_fc2.weight')
  expected = (model.category_classifier.out_features, model.category_classifier.in_features)
  if classifier is not None and classifier.shape[:1] != expected[:1] and not (
      classifier.shape[0] == LIU_LU_CATEGORIES and expected[0] > LIU_LU_CATEGORIES):
    raise CheckpointError(
        f'{path}: category_fc2.weight has shape {classifier.shape}: {classifier.shape[0]} '
        f'categories; the model has {expected[0]} categories, its '
        f'category_classifier expects category_fc2.weight of shape {expected}')


def _pad_liu_lu_categories(arrays: dict, categories: int) -> dict:
  """Their category head has 48 outputs (nn.Linear(1024, 48)): their logit j is category
  j + 1 of list_category_cloth.txt, as ours is (their label is the file's minus 1), and
  categories 49 and 50 get never-winning logits, as a converted baseline's last does."""
  weight, bias = arrays['category_fc2.weight'], arrays['category_fc2.bias']
  missing = categories - len(weight)
  if missing <= 0:
    return arrays
  logging.warning("Liu & Lu's category head has %d outputs: categories %d to %d get a bias "
                  'of %g so that they never win.', len(weight), len(weight) + 1, categories,
                  NO_LOGIT_BIAS)
  arrays['category_fc2.weight'] = np.concatenate(
      [weight, np.zeros((missing, weight.shape[1]), weight.dtype)])
  arrays['category_fc2.bias'] = np.concatenate(
      [bias, np.full((missing,), NO_LOGIT_BIAS, bias.dtype)])
  return arrays


def _load_liu_lu(model: nnx.Module, content, path: str) -> int:
  """Loads the state dict of their WholeNetwork in `content` into the whole model; returns
  their `__step`. Their extractor's convolutions up to conv4_3 fill our backbone's
  features[0..21]; their conv5_1..3 our features[24/26/28]; the landmark branch, the U-Net
  and the heads theirs (`_LIU_LU_MODULES`)."""
  state = _liu_lu_state_dict(content, path)
  if state is None:
    raise CheckpointError(f"{path}: not a state dict of Liu & Lu's WholeNetwork (no keys "
                          f"starting {' and '.join(map(repr, _LIU_LU_MARKERS))})")
  step = int(np.asarray(state.get(_LIU_LU_STEP, 0)))
  arrays = {k: np.asarray(v) for k, v in state.items() if not _liu_lu_unused(k)}
  _check_fits_liu_lu(model, arrays, path)
  if 'category_fc2.weight' in arrays:
    arrays = _pad_liu_lu_categories(arrays, model.category_classifier.out_features)
  named = {key: (_liu_lu_target(key), array) for key, array in arrays.items()}
  transposed = frozenset(k for k in arrays if k.rsplit('.', 1)[0] in _LIU_LU_TRANSPOSED)
  _load(model, named, path, transposed=transposed, key_of=_liu_lu_key)
  return step


# ----------------------------------------------------------------------------- train states


def with_torch_weights(step_config, state, path: str, mesh):
  """The train state with weights from a PyTorch file: a baseline checkpoint or Liu &
  Lu's state dict sets the whole model, a torchvision state dict the backbone; the
  optimiser starts afresh, and a moving average of the weights (config.ema_decay > 0)
  from the loaded weights."""
  model = nnx.merge(step_config.graphdef, state.params, state.batch_stats, copy=True)
  kind = load_into(model, path)
  logging.info('Initialised %s from the %s checkpoint %s',
               'the backbone' if kind == 'torchvision' else 'the model', kind, path)
  if kind == 'torchvision' and model.normalization != 'imagenet':
    logging.warning('%s is a torchvision backbone: its ImageNet weights expect '
                    "--config.data.normalization=imagenet, not %r.", path, model.normalization)
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  new_state = state.replace(params=params, batch_stats=batch_stats,
                            opt_state=step_config.optimizer.init(params))
  if steps.has_ema(new_state):
    new_state = steps.restart_ema(new_state)
  return jax.device_put(new_state, sharding.replicated(mesh))


def convert(config, workdir: str, torch_checkpoint: str) -> int:
  """--mode=convert: writes a PyTorch baseline, Liu & Lu (or torchvision) checkpoint as this
  project's step-0 checkpoint in `workdir`, for `--mode=evaluate` and prediction; returns
  the step."""
  config_checks.check(config)
  mesh = sharding.make_mesh()
  step_config, state = steps.create_train_state(config, mesh)
  state = with_torch_weights(step_config, state, torch_checkpoint, mesh)
  manager = checkpoints.create_manager(workdir, config.keep_checkpoints, config.best_metric)
  checkpoints.save(manager, 0, state, config=config)
  manager.wait_until_finished()
  logging.info('Wrote %s as the step-0 checkpoint of %s', torch_checkpoint, workdir)
  return 0
