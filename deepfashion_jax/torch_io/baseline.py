"""The PyTorch baseline's `epoch_N.pth` into the whole model.

The file is {'model': state_dict, 'optim': ..., 'epoch': N}; the optimiser state and any
other key are not used. Its keys are `basemodel.0.weight`, ... (its backbone: an
nn.Sequential of torchvision's ResNet modules, read as `torchvision` reads them) and its
heads' (`MODULES` maps its module names to ours). It computes what the baseline did only with
the baseline's local pooling, pixel normalisation and input size: a model configured
otherwise is refused, naming each flag to set. Its category logit i is 1-based category i,
so the last category has no logit (`_remap_category_head`). `fitting_config` says which config
values its weights need, for --mode=convert to set them.
"""

import math

from absl import logging
from flax import nnx
import numpy as np

from deepfashion_jax.models import fashion_net
from deepfashion_jax.models import resnet
from deepfashion_jax.torch_io import common
from deepfashion_jax.torch_io import torchvision
from deepfashion_jax.torch_io.errors import CheckpointError

NAME = 'baseline'
# The baseline's module names -> ours. Its `basemodel` is an nn.Sequential of torchvision's
# ResNet modules, whose names our backbone keeps below them.
MODULES = {
    'basemodel.0': 'backbone.conv1', 'basemodel.1': 'backbone.bn1',
    'basemodel.4': 'backbone.layer1', 'basemodel.5': 'backbone.layer2',
    'basemodel.6': 'backbone.layer3', 'basemodel.7': 'backbone.layer4',
    'reduce_1x1': 'box_reduce',
    'fc_bbox_xy': 'box_top_left',
    'fc_bbox_offset': 'box_size',
    'fc_bin': 'attribute_classifier',
    'fc_cls': 'category_classifier',
}


def _our_name(key: str) -> str:
  """A baseline key with its module named as ours (`MODULES`):
  'basemodel.4.0.conv1.weight' -> 'backbone.layer1.0.conv1.weight'; others unchanged."""
  parts = key.split('.')
  for length in (2, 1):
    module = '.'.join(parts[:length])
    if module in MODULES:
      return '.'.join([MODULES[module]] + parts[length:])
  return key


def _box_branch_side(arrays: dict) -> int | None:
  """The side of the feature maps its box branch reads (None when the file has none, or a
  weight of another rank: loading names its shape)."""
  if 'box_top_left.weight' not in arrays or arrays['box_top_left.weight'].ndim != 2:
    return None
  return math.isqrt(arrays['box_top_left.weight'].shape[-1] // fashion_net.BOX_CHANNELS)


def fitting_config(content, config, path: str) -> dict:
  """The config fields that the file's weights need ({'model.roi_pool': 'baseline_max',
  ...}): its backbone, the baseline's local pooling and pixel normalisation, and a
  config.data.crop_size whose feature maps its box branch reads (the configured one when it
  gives them already). --mode=convert sets them."""
  arrays = _arrays(content, path)
  fields = {'model.roi_pool': 'baseline_max', 'data.normalization': 'baseline'}
  try:
    fields['model.backbone'] = torchvision.backbone_of(
        [k.removeprefix('backbone.') for k in arrays if k.startswith('backbone.')])
  except CheckpointError:
    pass  # loading names what the file holds
  side = _box_branch_side(arrays)
  if side and -(-config.data.crop_size // resnet.ResNet.stride) != side:
    fields['data.crop_size'] = resnet.ResNet.stride * side
  return fields


def _check_fits(model: nnx.Module, arrays: dict, path: str):
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
  side = _box_branch_side(arrays)
  if side is not None:
    if side != model.feature_size:
      fixes.append(f'its box branch reads {side}x{side} feature maps; set '
                   f'--config.data.crop_size={model.feature_stride * side} '
                   f'(config.data.crop_size gives {model.feature_size}x{model.feature_size} maps)')
  if fixes:
    raise CheckpointError(f'{path} is a baseline checkpoint: ' + '; and '.join(fixes))


def _remap_category_head(arrays: dict, model: nnx.Module) -> dict:
  """The baseline's logit i is 1-based category i: drop logit 0, add a never-winning last.
  A head of another shape than the model's is left as it is, for `common.load_variables`
  to refuse naming its shape."""
  weight, bias = arrays['category_classifier.weight'], arrays.get('category_classifier.bias')
  head = model.category_classifier
  if weight.shape != (head.out_features, head.in_features) or bias is None or bias.shape != (
      head.out_features,):
    return arrays
  logging.warning('Remapping the baseline category head: its logit i is category i (1-based); '
                  'its logit 0 is dropped and the last category, which it has no logit for, '
                  'gets a bias of %g so that it never wins.', common.NO_LOGIT_BIAS)
  arrays['category_classifier.weight'] = np.concatenate([weight[1:], np.zeros_like(weight[:1])])
  arrays['category_classifier.bias'] = np.concatenate(
      [bias[1:], np.full_like(bias[:1], common.NO_LOGIT_BIAS)])
  return arrays


def matches(content) -> bool:
  """The baseline's {'model', 'optim', 'epoch'} dict."""
  return isinstance(content, dict) and 'model' in content


def _arrays(content, path: str) -> dict:
  """content['model'] as {our name: array} (`MODULES`)."""
  return {_our_name(k): np.asarray(v)
          for k, v in common.state_dict(content['model'], path).items()
          if not k.endswith('num_batches_tracked')}


def load(model: nnx.Module, content, path: str) -> common.Loaded:
  """Loads content['model'] into the whole model; the account holds content['epoch']."""
  arrays = _arrays(content, path)
  torchvision.check_backbone(
      [k.removeprefix('backbone.') for k in arrays if k.startswith('backbone.')], model, path)
  _check_fits(model, arrays, path)
  if 'category_classifier.weight' in arrays:
    arrays = _remap_category_head(arrays, model)
  norms = common.norm_modules(arrays)
  named = {name: (torchvision.flax_path(name, norms), array) for name, array in arrays.items()}
  common.load_variables(model, named, path)
  return common.Loaded(NAME, 'model', common.integer(content.get('epoch', 0), 'epoch', path))
