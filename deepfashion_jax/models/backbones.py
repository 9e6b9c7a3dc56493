"""The backbones FashionNet stands on, by the names configs give them.

`config.model.backbone` is one of BACKBONES: 'resnet18', 'resnet34', 'resnet50',
'resnet101', 'resnet152', 'vgg16', 'vgg16_bn', 'convnext_tiny', 'convnext_small' or
'convnext_base', torchvision's names; the Vision Transformers 'vit_s16', 'vit_b16'
(torchvision's and timm's ViT-S/16, ViT-B/16), 'clip_vit_b16' (CLIP's image tower) and
'siglip_b16' (SigLIP's); and 'convnext_test', 'vit_test', 'clip_vit_test', 'siglip_test',
shrunk variants for tests and CPU demos that have no published weights. Each backbone is an
nnx.Module called on (B, H, W, 3) images that returns its intermediate feature maps by
name, and under 'global' its (B, global_features) global feature (a ResNet's or VGG's: the
mean of its last map; a ConvNeXt's: that mean through a LayerNorm; a ViT's: its class
token, mean token or attention-pooled feature, `vit.py`), and says what FashionNet needs of
its last one:
  out_features      its channels (512 for ResNet-18/34 and VGG-16, 2048 for ResNet-50+,
                    768 for ConvNeXt-T/S and ViT-B);
  final_map         its name ('layer4' for a ResNet, 'conv5_3' for VGG-16, 'stage4');
  stride            input pixels per cell (32, 16, 32, a ViT's 16): ROI-Align's
                    spatial_scale is 1 / stride;
  feature_size(s)   its side for an input side s (ceil(s / 32), floor(s / 16),
                    floor(s / 32), s / 16);
and of its stride-8 map, which the landmark branch reads (`landmarks.py`):
  landmark_map      its name ('layer2', 'conv4_3', 'stage2'), landmark_features its
                    channels;
  global_features   the global feature's size (out_features for all of them).
Called with at_landmark_map=f, a backbone goes on from f(that map) instead of the map:
the landmark-driven attention re-weights it there. A ViT's token map has stride 16: it
offers the landmark branch the tokens of a middle block repeated 2 x 2 (stride 8), and
reads f's result back as their 2 x 2 means (`vit.py`).
A backbone that takes `drop_path` is also called with dropout_rng=KEY, the key its
stochastic depth draws from in training mode (FashionNet's, folded in from the step's
dropout key; None outside training).
"""

import dataclasses
import functools
from typing import Any, Callable

from flax import nnx

from deepfashion_jax import errors
from deepfashion_jax.models import convnext
from deepfashion_jax.models import resnet
from deepfashion_jax.models import vgg
from deepfashion_jax.models import vit


@dataclasses.dataclass(frozen=True)
class Backbone:
  title: str  # how messages name it: 'ResNet-50', 'VGG-16-BN'
  build: Callable[..., nnx.Module]  # (*, dtype, rngs, **options) -> the module
  # config.model's fields that the module takes as keyword arguments (`create`); a
  # backbone refuses the others when they differ from their defaults (OPTIONS).
  options: tuple = ()
  # Whether `build` takes image_size=, the input side (a ViT's position embedding grid).
  sized: bool = False
  # (side, **options) -> None: raises ConfigError naming the field when the input side
  # (config.data.crop_size) or an option's value does not fit this backbone.
  check: Callable[..., None] | None = None


# config.model's fields that only some backbones use, with the value that leaves them off.
OPTIONS = {
    'drop_path': 0.0,  # stochastic depth's highest rate (ConvNeXt, ViT)
    'global_pool': 'default',  # a ViT's global feature: 'default', 'token', 'mean', 'map'
    'landmark_block': 0,  # the ViT block the landmark branch reads (0: the middle one)
}
_VIT_OPTIONS = ('drop_path', 'global_pool', 'landmark_block')
_VIT_TITLES = {'vit_s16': 'ViT-S/16', 'vit_b16': 'ViT-B/16', 'clip_vit_b16': 'CLIP ViT-B/16',
               'siglip_b16': 'SigLIP ViT-B/16', 'vit_test': 'ViT (shrunk, for tests)',
               'clip_vit_test': 'CLIP ViT (shrunk, for tests)',
               'siglip_test': 'SigLIP ViT (shrunk, for tests)'}


def _vit(name: str) -> Backbone:
  architecture, title = vit.ARCHITECTURES[name], _VIT_TITLES[name]
  return Backbone(
      title, functools.partial(vit.VisionTransformer, architecture, title=title),
      _VIT_OPTIONS, sized=True,  # any drop_path rate fits (config_checks' NUMBERS)
      check=lambda side, drop_path=0.0, **options: vit.check_options(
          architecture, side, title=title, **options))


BACKBONES = {
    **{f'resnet{depth}': Backbone(f'ResNet-{depth}', functools.partial(resnet.ResNet, depth))
       for depth in resnet.ARCHITECTURES},
    'vgg16': Backbone('VGG-16', functools.partial(vgg.VGG16, batch_norm=False)),
    'vgg16_bn': Backbone('VGG-16-BN', functools.partial(vgg.VGG16, batch_norm=True)),
    **{name: _vit(name) for name in vit.ARCHITECTURES},
    # convnext_test: convnext.ARCHITECTURES['test'], shrunk, without published weights.
    **{f'convnext_{size}': Backbone(title, functools.partial(convnext.ConvNeXt, size),
                                    options=('drop_path',))
       for size, title in (('tiny', 'ConvNeXt-T'), ('small', 'ConvNeXt-S'),
                           ('base', 'ConvNeXt-B'), ('test', 'ConvNeXt (shrunk, for tests)'))},
}


def check_name(value, field: str = 'backbone'):
  """Raises ConfigError (a ValueError), naming `field`, unless `value` is one of BACKBONES."""
  if not isinstance(value, str) or value not in BACKBONES:
    raise errors.ConfigError(f'{field}={value!r}: expected one of {tuple(BACKBONES)}')


def check_options(name: str, options: dict, side: int | None = None):
  """Raises ConfigError naming the field when a backbone option in `options` (config.model's
  fields in OPTIONS) is set away from its default for a backbone that does not take it, or
  when the backbone's own check refuses an option's value or the input side (when given)."""
  check_name(name)
  backbone = BACKBONES[name]
  for field, value in options.items():
    if field not in backbone.options and value != OPTIONS[field]:
      takers = tuple(n for n, b in BACKBONES.items() if field in b.options)
      raise errors.ConfigError(
          f'config.model.{field}={value!r}: {backbone.title} has no such option; '
          f'leave it at {OPTIONS[field]!r}, or pick a backbone that has it: {takers}')
  if backbone.check is not None:
    backbone.check(side, **{k: v for k, v in options.items() if k in backbone.options})


def create(name: str, *, dtype: Any, rngs: nnx.Rngs, image_size: int | None = None,
           **options) -> nnx.Module:
  """The backbone called `name` (one of BACKBONES) for inputs of side `image_size` (None: a
  sized backbone's native side); `options`: config.model's fields in OPTIONS, those the
  backbone takes passed on to it."""
  check_options(name, options, image_size)
  backbone = BACKBONES[name]
  taken = {k: v for k, v in options.items() if k in backbone.options}
  if backbone.sized:
    taken['image_size'] = image_size
  return backbone.build(dtype=dtype, rngs=rngs, **taken)
