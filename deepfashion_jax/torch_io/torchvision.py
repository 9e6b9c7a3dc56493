"""torchvision's ResNet, VGG-16 / VGG-16-BN and ConvNeXt state dicts into the backbone: the
ImageNet start (--config.init_from).

A ResNet's keys are `conv1.weight`, `layer1.0.conv1.weight`, ... and its ImageNet classifier
`fc.*`; a VGG's `features.<i>.weight`, ... and `classifier.*`; a ConvNeXt's
`features.<i>.<j>.block.<k>.weight`, `features.<i>.<j>.layer_scale`, ... and `classifier.0`
(a LayerNorm, kept: it makes the global feature) and `classifier.2` (ImageNet's Linear).
The ImageNet classifiers are dropped; our backbones keep torchvision's module names
(models/resnet.py, models/vgg.py, models/convnext.py), so every other key names the
variable it fills. A ConvNeXt's LayerNorms are the modules whose `weight` is 1-D (they keep
no running statistics to tell them by), and its `layer_scale`, (C, 1, 1) for NCHW maps, is
(C,) here. The baseline's backbone is torchvision's ResNet: its family reads it with
`flax_path` and `check_backbone` too.
"""

from absl import logging
from flax import nnx
import numpy as np

from deepfashion_jax.models import backbones
from deepfashion_jax.models import convnext
from deepfashion_jax.models import resnet
from deepfashion_jax.models import vgg
from deepfashion_jax.torch_io import common
from deepfashion_jax.torch_io.errors import CheckpointError

NAME = 'torchvision'
# The keys of ImageNet's 1000-class classifier, dropped: ResNet's, VGG's, and ConvNeXt's
# Linear (its classifier.0, a LayerNorm, is the backbone's).
_CLASSIFIERS = ('fc.', 'classifier.')
_CONVNEXT_CLASSIFIER = ('classifier.2.',)


def flax_path(name: str, norms: frozenset) -> tuple:
  """A torchvision-style key ('layer1.0.bn1.weight', 'features.0.bias', or ours:
  'box_reduce.weight') -> the path of the Flax variable it fills; `norms`: the batch-norm
  modules (`common.norm_modules`)."""
  is_norm = name.rsplit('.', 1)[0] in norms
  name = name.replace('downsample.0.', 'downsample_conv.').replace('downsample.1.',
                                                                     'downsample_bn.')
  parts = name.split('.')
  module, leaf = parts[:-1], parts[-1]
  leaf = (common.NORM_LEAVES if is_norm else common.LEAVES).get(leaf, leaf)
  return tuple(int(p) if p.isdigit() else p for p in module) + (leaf,)


def _depth_of(names) -> int:
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
  norms = common.norm_modules(names)
  convolutions = len(modules - norms)
  if convolutions != vgg.CONVOLUTIONS:
    raise CheckpointError(f'the checkpoint holds a VGG with {convolutions} convolutions; the '
                          f'VGG backbone here is VGG-16 ({vgg.CONVOLUTIONS})')
  return 'vgg16_bn' if norms else 'vgg16'


def _convnext_of(arrays: dict) -> str:
  """'convnext_tiny', '_small', '_base' or '_test', whichever ConvNeXt a torchvision state
  dict describes: each stage's blocks (`features.<i>.<j>.*`) and channels (the length of
  its first block's layer_scale; None where `arrays` holds no array for it)."""
  blocks, channels = [], []
  for index in convnext.STAGE_INDICES:
    prefix = f'features.{index}.'
    blocks.append(len({n[len(prefix):].split('.')[0] for n in arrays if n.startswith(prefix)}))
    shape = np.shape(arrays.get(f'{prefix}0.layer_scale', ()))
    channels.append(int(shape[0]) if shape else None)
  for size, architecture in convnext.ARCHITECTURES.items():
    if (architecture.blocks_per_stage, architecture.channels) == (tuple(blocks),
                                                                  tuple(channels)):
      return f'convnext_{size}'
  raise CheckpointError(f'the checkpoint holds a ConvNeXt with blocks per stage '
                        f'{tuple(blocks)} and channels {tuple(channels)}, which no ConvNeXt '
                        f'here has ({", ".join(f"convnext_{s}" for s in convnext.ARCHITECTURES)})')


def backbone_of(arrays) -> str:
  """The backbone (its name in backbones.BACKBONES: 'resnet50', 'vgg16_bn', 'convnext_tiny')
  that torchvision-style keys describe: `arrays` maps them to their arrays (a ConvNeXt's
  size needs their shapes), or is the keys alone for a ResNet or VGG; CheckpointError when
  they describe none."""
  if any(n.endswith('.layer_scale') for n in arrays):
    return _convnext_of(arrays if isinstance(arrays, dict) else dict.fromkeys(arrays))
  names = set(arrays)
  if any(n.startswith('features.') for n in names):
    return _vgg_of(names)
  return f'resnet{_depth_of(names)}'


def check_backbone(arrays, model: nnx.Module, path: str) -> str:
  """Refuses a file whose backbone (from its torchvision-style keys: `arrays`, as
  `backbone_of` takes them) is not the configured model's, naming both and the flag to set;
  returns the backbone's name."""
  try:
    held = backbone_of(arrays)
  except CheckpointError as e:
    raise CheckpointError(f'{path}: {e}') from None
  if held != model.backbone_name:
    title = lambda name: backbones.BACKBONES[name].title
    raise CheckpointError(
        f'{path} holds a {title(held)} backbone; the configured model is '
        f'{title(model.backbone_name)} (config.model.backbone={model.backbone_name!r}): '
        f'set --config.model.backbone={held} to load it')
  return held


def matches(content) -> bool:
  """Any state dict the families before this one did not claim: a plain state dict is
  read as torchvision's, and refused naming what it holds when it is not."""
  return isinstance(content, dict)


def _layer_norms(arrays: dict) -> frozenset:
  """The LayerNorms among the modules a ConvNeXt's keys name: those whose weight is 1-D
  (convolutions' and linear layers' are 4-D and 2-D)."""
  return frozenset(n.rsplit('.', 1)[0] for n, a in arrays.items()
                   if n.endswith('.weight') and a.ndim == 1)


def _in_our_layout(name: str, array: np.ndarray) -> np.ndarray:
  """A ConvNeXt's layer_scale, (C, 1, 1) to broadcast over NCHW maps, as our (C,); any
  other array as it is (`common.load_variables` transposes kernels)."""
  if name.endswith('.layer_scale') and array.ndim == 3 and array.shape[1:] == (1, 1):
    return array.reshape(array.shape[0])
  return array


def load(model: nnx.Module, content, path: str) -> common.Loaded:
  """Loads a torchvision ResNet, VGG-16(-BN) or ConvNeXt state dict into the backbone; its
  ImageNet classifier (ResNet's `fc`, VGG's `classifier`, ConvNeXt's `classifier.2`) is
  dropped."""
  arrays = {k: np.asarray(v) for k, v in common.state_dict(content, path).items()
            if not k.endswith('num_batches_tracked')}
  held = check_backbone(arrays, model, path)
  is_convnext = held.startswith('convnext_')
  dropped = _CONVNEXT_CLASSIFIER if is_convnext else _CLASSIFIERS
  arrays = {k: _in_our_layout(k, v) for k, v in arrays.items() if not k.startswith(dropped)}
  norms = common.norm_modules(arrays) | (_layer_norms(arrays) if is_convnext else frozenset())
  named = {k: (('backbone',) + flax_path(k, norms), v) for k, v in arrays.items()}
  common.load_variables(model, named, path, only_prefix=('backbone',))
  if model.normalization != 'imagenet':
    logging.warning('%s is a torchvision backbone: its ImageNet weights expect '
                    "--config.data.normalization=imagenet, not %r.", path, model.normalization)
  return common.Loaded(NAME, 'backbone')
