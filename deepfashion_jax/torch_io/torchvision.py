"""torchvision's ResNet and VGG-16 / VGG-16-BN state dicts into the backbone: the ImageNet
start (--config.init_from).

A ResNet's keys are `conv1.weight`, `layer1.0.conv1.weight`, ... and its ImageNet classifier
`fc.*`; a VGG's `features.<i>.weight`, ... and `classifier.*`. The classifiers are dropped;
our backbones keep torchvision's module names (models/resnet.py, models/vgg.py), so every
other key names the variable it fills. The baseline's backbone is torchvision's ResNet: its
family reads it with `flax_path` and `check_backbone` too.
"""

from absl import logging
from flax import nnx
import numpy as np

from deepfashion_jax.models import backbones
from deepfashion_jax.models import resnet
from deepfashion_jax.models import vgg
from deepfashion_jax.torch_io import common
from deepfashion_jax.torch_io.errors import CheckpointError

NAME = 'torchvision'
_CLASSIFIERS = ('fc.', 'classifier.')  # ResNet's, VGG's: ImageNet's 1000 classes


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


def backbone_of(names) -> str:
  """The backbone (its name in backbones.BACKBONES: 'resnet50', 'vgg16_bn') that a set of
  torchvision-style keys describes; CheckpointError when they describe none."""
  names = set(names)
  if any(n.startswith('features.') for n in names):
    return _vgg_of(names)
  return f'resnet{_depth_of(names)}'


def check_backbone(names, model: nnx.Module, path: str):
  """Refuses a file whose backbone (from its torchvision-style keys) is not the configured
  model's, naming both and the flag to set."""
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


def matches(content) -> bool:
  """Any state dict the families before this one did not claim: a plain state dict is
  read as torchvision's, and refused naming what it holds when it is not."""
  return isinstance(content, dict)


def load(model: nnx.Module, content, path: str) -> common.Loaded:
  """Loads a torchvision ResNet or VGG-16(-BN) state dict into the backbone; its ImageNet
  classifier (ResNet's `fc`, VGG's `classifier`) is dropped."""
  arrays = {k: np.asarray(v) for k, v in common.state_dict(content, path).items()
            if not k.startswith(_CLASSIFIERS) and not k.endswith('num_batches_tracked')}
  check_backbone(arrays, model, path)
  norms = common.norm_modules(arrays)
  named = {k: (('backbone',) + flax_path(k, norms), v) for k, v in arrays.items()}
  common.load_variables(model, named, path, only_prefix=('backbone',))
  if model.normalization != 'imagenet':
    logging.warning('%s is a torchvision backbone: its ImageNet weights expect '
                    "--config.data.normalization=imagenet, not %r.", path, model.normalization)
  return common.Loaded(NAME, 'backbone')
