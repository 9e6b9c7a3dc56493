"""The backbones FashionNet stands on, by the names configs give them.

`config.model.backbone` is one of BACKBONES: 'resnet18', 'resnet34', 'resnet50',
'resnet101', 'resnet152', 'vgg16', 'vgg16_bn', 'convnext_tiny', 'convnext_small' or
'convnext_base', torchvision's names, or 'convnext_test', a shrunk ConvNeXt for tests and
CPU demos that has no published weights. Each backbone is an nnx.Module called on
(B, H, W, 3) images that returns its intermediate feature maps by name, and under 'global'
its (B, global_features) global feature (a ResNet's or VGG's: the mean of its last map; a
ConvNeXt's: that mean through a LayerNorm), and says what FashionNet needs of its last one:
  out_features      its channels (512 for ResNet-18/34 and VGG-16, 2048 for ResNet-50+,
                    768 for ConvNeXt-T/S);
  final_map         its name ('layer4' for a ResNet, 'conv5_3' for VGG-16, 'stage4');
  stride            input pixels per cell (32, 16, 32): ROI-Align's spatial_scale is
                    1 / stride;
  feature_size(s)   its side for an input side s (ceil(s / 32), floor(s / 16),
                    floor(s / 32));
and of its stride-8 map, which the landmark branch reads (`landmarks.py`):
  landmark_map      its name ('layer2', 'conv4_3', 'stage2'), landmark_features its
                    channels;
  global_features   the global feature's size (out_features for all of them).
Called with at_landmark_map=f, a backbone goes on from f(that map) instead of the map:
the landmark-driven attention re-weights it there. A backbone that takes `drop_path` is
also called with rng=KEY, the key its stochastic depth draws from in training mode
(FashionNet's, from the step's dropout key; None outside training).
"""

import dataclasses
import functools
from typing import Any, Callable

from flax import nnx

from deepfashion_jax import errors
from deepfashion_jax.models import convnext
from deepfashion_jax.models import resnet
from deepfashion_jax.models import vgg


@dataclasses.dataclass(frozen=True)
class Backbone:
  title: str  # how messages name it: 'ResNet-50', 'VGG-16-BN'
  build: Callable[..., nnx.Module]  # (*, dtype, rngs, **options) -> the module
  # config.model's fields that the module takes as keyword arguments (`create`); a
  # backbone refuses the others when they differ from their defaults (OPTIONS).
  options: tuple = ()


# config.model's fields that only some backbones use, with the value that leaves them off.
OPTIONS = {
    'drop_path': 0.0,  # stochastic depth's highest rate (ConvNeXt, ViT)
}


BACKBONES = {
    **{f'resnet{depth}': Backbone(f'ResNet-{depth}', functools.partial(resnet.ResNet, depth))
       for depth in resnet.ARCHITECTURES},
    'vgg16': Backbone('VGG-16', functools.partial(vgg.VGG16, batch_norm=False)),
    'vgg16_bn': Backbone('VGG-16-BN', functools.partial(vgg.VGG16, batch_norm=True)),
    # convnext_test: convnext.ARCHITECTURES['test'], shrunk, without published weights.
    **{f'convnext_{size}': Backbone(f'ConvNeXt-{title}',
                                    functools.partial(convnext.ConvNeXt, size),
                                    options=('drop_path',))
       for size, title in (('tiny', 'T'), ('small', 'S'), ('base', 'B'), ('test', 'test'))},
}


def check_name(value, field: str = 'backbone'):
  """Raises ConfigError (a ValueError), naming `field`, unless `value` is one of BACKBONES."""
  if not isinstance(value, str) or value not in BACKBONES:
    raise errors.ConfigError(f'{field}={value!r}: expected one of {tuple(BACKBONES)}')


def check_options(name: str, options: dict):
  """Raises ConfigError naming the field when a backbone option in `options` (config.model's
  fields in OPTIONS) is set away from its default for a backbone that does not take it."""
  check_name(name)
  for field, value in options.items():
    if field not in BACKBONES[name].options and value != OPTIONS[field]:
      takers = tuple(n for n, b in BACKBONES.items() if field in b.options)
      raise errors.ConfigError(
          f'config.model.{field}={value!r}: {BACKBONES[name].title} has no such option; '
          f'leave it at {OPTIONS[field]!r}, or pick a backbone that has it: {takers}')


def create(name: str, *, dtype: Any, rngs: nnx.Rngs, **options) -> nnx.Module:
  """The backbone called `name` (one of BACKBONES); `options`: config.model's fields in
  OPTIONS, those the backbone takes passed on to it."""
  check_options(name, options)
  taken = {k: v for k, v in options.items() if k in BACKBONES[name].options}
  return BACKBONES[name].build(dtype=dtype, rngs=rngs, **taken)
