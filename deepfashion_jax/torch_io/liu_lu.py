"""A state dict of Liu & Lu 2018's WholeNetwork into the whole model.

Their public code (fdjingyuan/Deep-Fashion-Analysis-ECCV2018) saves `net.state_dict()`;
the file is told by its `lm_branch.*` and `attention_pred_net.*` keys, found directly or
under 'model' or 'state_dict'. It fills a FashionNet(backbone='vgg16', heads='liu_lu',
landmarks='attention') on ImageNet-normalised inputs: a model configured otherwise is
refused, naming each flag to set. Their extractor's convolutions up to conv4_3 fill our
backbone's features[0..21]; their conv5_1..3 our features[24/26/28]; the landmark branch,
the U-Net and the heads theirs (`_MODULES`).
"""

import math

from absl import logging
from flax import nnx
import numpy as np

from deepfashion_jax.torch_io import common
from deepfashion_jax.torch_io.errors import CheckpointError

NAME = 'liu_lu'
_CATEGORIES = 48  # their category head's outputs
# Their WholeNetwork (src/networks.py, src/lm_networks.py, src/base_networks.py of their
# code): module names -> the paths of ours.
_MARKERS = ('lm_branch.', 'attention_pred_net.')  # prefixes no other file has
_EXTRACTOR = 'vgg16_extractor.vgg.'  # torchvision's vgg16().features, run whole
# The extractor's convolutions up to conv4_3 (features[21]; its ReLU, features[22], gives
# the map they read): torchvision's indices, which our VGG-16 keeps.
_EXTRACTOR_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21)
_LAST_USED = 22
# Their LandmarkBranchUpsample's layers in the order they run: our LandmarkBranch.layers.
_BRANCH = ('conv1', 'conv2', 'conv3', 'conv4', 'upconv1', 'conv5', 'conv6', 'upconv2',
           'conv7', 'conv8', 'upconv3', 'conv9', 'conv10')
# Their CustomUnetGenerator(513, 512, num_downs=2, ngf=32): `model` is the outermost
# UnetSkipConnectionBlock, each block's `model` an nn.Sequential whose index 1 (outermost)
# or 3 (middle) is the next block: outermost [conv, block, ReLU, convT, Tanh], middle
# [LeakyReLU, conv, BN, block, ReLU, convT, BN], innermost [LeakyReLU, conv, ReLU, convT,
# BN]. Below 'attention_pred_net.model.model.' -> our AttentionUNet's names.
_UNET = {
    '0': 'conv_in',
    '1.model.1': 'down1', '1.model.2': 'down1_bn',
    '1.model.3.model.1': 'down2', '1.model.3.model.2': 'down2_bn',
    '1.model.3.model.3.model.1': 'inner_down', '1.model.3.model.3.model.3': 'inner_up',
    '1.model.3.model.3.model.4': 'inner_bn',
    '1.model.3.model.5': 'up2', '1.model.3.model.6': 'up2_bn',
    '1.model.5': 'up1', '1.model.6': 'up1_bn',
    '3': 'conv_out',
}
_UNET_PREFIX = 'attention_pred_net.model.model.'
_MODULES = {
    **{f'{_EXTRACTOR}{i}': ('backbone', 'features', i) for i in _EXTRACTOR_CONVS},
    # Their own conv5_1..3 (copied from the extractor's features[24/26/28] when built, then
    # trained) read the attended conv4_3 after pool4; ours are the backbone's, which reads
    # the attended map in the same place.
    'conv5_1': ('backbone', 'features', 24), 'conv5_2': ('backbone', 'features', 26),
    'conv5_3': ('backbone', 'features', 28),
    **{f'lm_branch.{name}': ('landmark_branch', 'layers', k) for k, name in enumerate(_BRANCH)},
    **{_UNET_PREFIX + theirs: ('landmark_attention', 'unet', ours)
       for theirs, ours in _UNET.items()},
    'category_fc1': ('category_hidden',), 'category_fc2': ('category_classifier',),
    'attr_fc1': ('attribute_hidden',), 'attr_fc2': ('attribute_classifier',),
}
# Their nn.ConvTranspose2d modules: weights (in, out, kh, kw), not a convolution's.
_TRANSPOSED = frozenset(
    [f'lm_branch.{name}' for name in _BRANCH if name.startswith('upconv')]
    + [_UNET_PREFIX + theirs for theirs, ours in _UNET.items()
       if ours in ('inner_up', 'up2', 'up1', 'conv_out')])
_STEP = '__step'  # their ModuleWithAttr's buffer: the training step it was saved at


def _their_state_dict(content):
  """The state dict of their WholeNetwork that `content` is (their training saves
  `net.state_dict()` itself) or holds under 'model' or 'state_dict', keys without
  nn.DataParallel's 'module.'; None when it holds none."""
  candidates = [content]
  if isinstance(content, dict):
    candidates += [content[k] for k in ('model', 'state_dict') if isinstance(content.get(k), dict)]
  for candidate in candidates:
    if not isinstance(candidate, dict) or not all(isinstance(k, str) for k in candidate):
      continue
    state = common.without_module_prefix(candidate)
    if all(any(k.startswith(marker) for k in state) for marker in _MARKERS):
      return state
  return None


def _unused(key: str) -> bool:
  """Keys of their state dict that are no part of what the network computes."""
  if key == _STEP or key.endswith('.num_batches_tracked'):
    return True  # counters: their training step, batch norm's batches
  if key.split('.', 1)[0].endswith('_loss_func'):
    return True  # a loss's buffers: attr_loss_func.weight, the class weights (0.1, 1)
  if key.startswith(_EXTRACTOR):
    # Their VGG16Extractor runs all of vgg16().features, but WholeNetwork reads only
    # conv4_3 (features[22]) from it: features[24/26/28] (conv5_x) compute maps nothing
    # reads, get no gradient and keep the ImageNet weights they started from. Their own
    # conv5_1..3 (copies of them at the start, then trained) are the ones the network uses.
    index = key[len(_EXTRACTOR):].split('.', 1)[0]
    return index.isdigit() and int(index) > _LAST_USED
  return False


def _target(key: str) -> tuple:
  """Their key -> the path of our variable; a path the model lacks for keys of no module
  of theirs that we know (so that `common.load_variables` lists them as unexpected)."""
  module, leaf = key.rsplit('.', 1) if '.' in key else ('', key)
  ours = _MODULES.get(module)
  if ours is None:
    return ('<not theirs>', key)
  leaves = common.NORM_LEAVES if str(ours[-1]).endswith('_bn') else common.LEAVES
  return ours + (leaves[leaf],) if leaf in leaves else ('<not theirs>', key)


def _key(target: tuple) -> str:
  """The inverse of `_target`: the key of theirs that fills our variable `target`."""
  modules = {ours: theirs for theirs, ours in _MODULES.items()}
  module = modules.get(tuple(target[:-1]))
  leaves = common.NORM_LEAVES if str(target[-2]).endswith('_bn') else common.LEAVES
  leaf = {ours: theirs for theirs, ours in leaves.items()}.get(target[-1])
  if module is None or leaf is None:
    return f'(none of theirs fills our {".".join(map(str, target))})'
  return f'{module}.{leaf}'


def _check_fits(model: nnx.Module, arrays: dict, path: str):
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
  if classifier is not None and classifier.ndim == 2 and classifier.shape[0] != expected[0] and (
      not (classifier.shape[0] == _CATEGORIES and expected[0] > _CATEGORIES)):
    raise CheckpointError(
        f'{path}: category_fc2.weight has shape {classifier.shape}: {classifier.shape[0]} '
        f'categories; the model has {expected[0]} categories, its '
        f'category_classifier expects category_fc2.weight of shape {expected}')


def _pad_categories(arrays: dict, head: nnx.Linear) -> dict:
  """Their category head has 48 outputs (nn.Linear(1024, 48)): their logit j is category
  j + 1 of list_category_cloth.txt, as ours is (their label is the file's minus 1), and
  categories 49 and 50 get never-winning logits, as a converted baseline's last does. A
  head that does not fit ours (`head`) is left as it is, for `common.load_variables` to
  refuse naming its shape."""
  weight, bias = arrays['category_fc2.weight'], arrays.get('category_fc2.bias')
  missing = head.out_features - len(weight) if weight.ndim == 2 else 0
  if (missing <= 0 or weight.shape[1] != head.in_features or bias is None
      or bias.shape != weight.shape[:1]):
    return arrays
  logging.warning("Liu & Lu's category head has %d outputs: categories %d to %d get a bias "
                  'of %g so that they never win.', len(weight), len(weight) + 1, head.out_features,
                  common.NO_LOGIT_BIAS)
  arrays['category_fc2.weight'] = np.concatenate(
      [weight, np.zeros((missing, weight.shape[1]), weight.dtype)])
  arrays['category_fc2.bias'] = np.concatenate(
      [bias, np.full((missing,), common.NO_LOGIT_BIAS, bias.dtype)])
  return arrays


def matches(content) -> bool:
  """A state dict with their landmark branch and attention, directly or under 'model' or
  'state_dict'."""
  return _their_state_dict(content) is not None


def load(model: nnx.Module, content, path: str) -> common.Loaded:
  """Loads their WholeNetwork's state dict into the whole model; the account holds their
  `__step` (0 without one)."""
  state = common.only_tensors(_their_state_dict(content), path)
  step = common.integer(state.get(_STEP, 0), 'training step (__step)', path)
  arrays = {k: np.asarray(v) for k, v in state.items() if not _unused(k)}
  _check_fits(model, arrays, path)
  if 'category_fc2.weight' in arrays:
    arrays = _pad_categories(arrays, model.category_classifier)
  named = {key: (_target(key), array) for key, array in arrays.items()}
  transposed = frozenset(k for k in arrays if k.rsplit('.', 1)[0] in _TRANSPOSED)
  common.load_variables(model, named, path, transposed=transposed, key_of=_key)
  return common.Loaded(NAME, 'model', step)
