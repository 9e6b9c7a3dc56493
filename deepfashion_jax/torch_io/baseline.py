"""The PyTorch baseline's `epoch_N.pth` into the whole model.

The file is {'model': state_dict, 'optim': ..., 'epoch': N}; the optimiser state and any
other key are not used. Its keys are `basemodel.0.weight`, ... (its backbone: an
nn.Sequential of torchvision's ResNet modules, read as `torchvision` reads them) and its
heads' (`MODULES` maps its module names to ours). It computes what the baseline did only with
the baseline's local pooling, pixel normalisation and input size: a model configured
otherwise is refused, naming each flag to set. Its category logit i is 1-based category i,
so the last category has no logit (`_remap_category_head`).
"""

import math

from absl import logging
from flax import nnx
import numpy as np

from deepfashion_jax.models import fashion_net
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
  if 'box_top_left.weight' in arrays and arrays['box_top_left.weight'].ndim == 2:
    side = math.isqrt(arrays['box_top_left.weight'].shape[-1] // fashion_net.BOX_CHANNELS)
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


def load(model: nnx.Module, content, path: str) -> common.Loaded:
  """Loads content['model'] into the whole model; the account holds content['epoch']."""
  arrays = {_our_name(k): np.asarray(v)
            for k, v in common.state_dict(content['model'], path).items()
            if not k.endswith('num_batches_tracked')}
  torchvision.check_backbone(
      [k.removeprefix('backbone.') for k in arrays if k.startswith('backbone.')], model, path)
  _check_fits(model, arrays, path)
  if 'category_classifier.weight' in arrays:
    arrays = _remap_category_head(arrays, model)
  norms = common.norm_modules(arrays)
  named = {name: (torchvision.flax_path(name, norms), array) for name, array in arrays.items()}
  common.load_variables(model, named, path)
  return common.Loaded(NAME, 'model', common.integer(content.get('epoch', 0), 'epoch', path))
