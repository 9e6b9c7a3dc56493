"""ConvNeXt-T/S/B, layer for layer torchvision's `convnext_tiny` / `_small` / `_base`, in
Flax NNX (NHWC).

torchvision builds the network as one nn.Sequential `features` and a `classifier`:
  features.0            the stem: a 4 x 4, stride-4 convolution (with bias) and a
                        LayerNorm2d over channels;
  features.1, 3, 5, 7   the four stages, each a list of CNBlocks: a 7 x 7 depthwise
                        convolution (padding 3, with bias), a LayerNorm over channels, a
                        Linear C -> 4C, exact GELU, a Linear 4C -> C, times `layer_scale`
                        (one factor per channel, 1e-6 at initialisation), through stochastic
                        depth, added to the block's input;
  features.2, 4, 6      the downsamplers between stages: LayerNorm2d and a 2 x 2, stride-2
                        convolution (with bias);
  avgpool, classifier   the mean of the last map, classifier.0 (a LayerNorm2d), a Flatten and
                        classifier.2, the ImageNet Linear.
Every LayerNorm has epsilon 1e-6. `features` and each stage and block are nnx.Lists with
torchvision's indices (its Permutes and GELU parameter-free placeholders that keep the
numbering), and `classifier` a list of its LayerNorm alone: ImageNet's Linear is left out.
So torchvision's keys name our variables one to one (`torch_io/torchvision.py`); its
`layer_scale`, shaped (C, 1, 1) to broadcast over NCHW maps, is (C,) here.

Outputs by name: 'stage1' .. 'stage4' (strides 4, 8, 16, 32: features.1, 3, 5, 7), and
'global', classifier.0 applied to the mean of stage4 (torchvision's avgpool and
classifier.0: the feature its ImageNet Linear reads). The stem and every downsampler drop
an odd last row and column (no padding), so stage4's side is floor(side / 32).

Initialisation is torchvision's: convolution and linear weights from trunc_normal_(std=0.02),
whose default bounds are +-2 in absolute value, 100 standard deviations: a plain normal,
which is what is drawn here; biases 0, LayerNorms 1 and 0.

Stochastic depth (`drop_path`, torchvision's stochastic_depth_prob, mode 'row'): block k of
the N blocks, counted over all stages from 0, drops its residual branch for each example
(row) of the batch with probability drop_path * k / (N - 1), and scales the kept ones by
1 / (1 - that rate): an nnx.Dropout whose mask is shared over the row's H, W and C. It runs
in training mode only (`model.train()`; `model.eval()` turns it off, as for FashionNet's
dropout). Its randomness is the `rng` the backbone is called with, the step's key (FashionNet
derives it from its `dropout_rng`), block k drawing from fold_in(rng, k): the same masks for
the same key, a new draw at each step.

Layer-wise learning-rate decay (`layer_id`): the official ConvNeXt fine-tuning's grouping
(its optim_factory's get_num_layer_for_convnext): 0 the stem; 1 the first stage; 2 the
second stage and the downsampler before it; the third stage's blocks in groups of three,
3, 4, ... (its downsampler with the first group); the last stage, its downsampler and
classifier.0: num_layers = 3 + ceil(blocks of the third stage / 3) (12 for ConvNeXt-S/B,
as the official code's fixed 12; 6 for ConvNeXt-T, whose third stage has 9 blocks, where
the official code leaves ids 6 to 11 unused). The official code gives the final norm
num_layers + 1 (no decay); here it is inside the backbone, whose ids end at num_layers.

Activations run in `dtype`; parameters stay float32, and the LayerNorms compute in float32
whatever `dtype` is, returning `dtype`.
"""

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from deepfashion_jax.models import layer_norm

EPSILON = 1e-6  # every LayerNorm's, torchvision's
LAYER_SCALE_INIT = 1e-6  # torchvision's default layer_scale
STAGES = ('stage1', 'stage2', 'stage3', 'stage4')
STAGE_INDICES = (1, 3, 5, 7)  # each stage's index in `features`
# torchvision's trunc_normal_(std=0.02) (bounds +-2, absolute): in effect a normal.
_weight_init = nnx.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class Architecture:
  channels: tuple  # each stage's
  blocks_per_stage: tuple


ARCHITECTURES = {
    'tiny': Architecture((96, 192, 384, 768), (3, 3, 9, 3)),
    'small': Architecture((96, 192, 384, 768), (3, 3, 27, 3)),
    'base': Architecture((128, 256, 512, 1024), (3, 3, 27, 3)),
    # A shrunk ConvNeXt for tests and CPU demos: no published weights exist for it.
    'test': Architecture((8, 16, 32, 64), (1, 1, 2, 1)),
}


def _layer_norm(features: int, rngs: nnx.Rngs) -> layer_norm.LayerNorm:
  """nn.LayerNorm over the channels, epsilon 1e-6: torchvision's LayerNorm2d on NCHW maps is
  this on NHWC ones."""
  return layer_norm.LayerNorm(features, epsilon=EPSILON, rngs=rngs)


class Permute(nnx.Module):
  """torchvision's Permute between NCHW and channels-last: its place in `block`. The maps
  here are always NHWC, so it changes nothing."""

  def __call__(self, x):
    return x


class GELU(nnx.Module):
  """nn.GELU's place in `block`: the exact (erf) GELU."""

  def __call__(self, x):
    return jax.nn.gelu(x, approximate=False)


def _conv(in_features, out_features, kernel, *, dtype, rngs, **kwargs):
  return nnx.Conv(in_features, out_features, (kernel, kernel), use_bias=True, dtype=dtype,
                  param_dtype=jnp.float32, kernel_init=_weight_init,
                  bias_init=nnx.initializers.zeros_init(), rngs=rngs, **kwargs)


def _linear(in_features, out_features, *, dtype, rngs):
  return nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=_weight_init, bias_init=nnx.initializers.zeros_init(),
                    rngs=rngs)


def _patchify(in_features, out_features, side, *, dtype, rngs):
  """A side x side convolution with stride `side` and no padding (the stem's, the
  downsamplers'): an odd remainder of rows and columns is dropped, as in PyTorch."""
  return _conv(in_features, out_features, side, strides=side, padding='VALID', dtype=dtype,
               rngs=rngs)


class CNBlock(nnx.Module):
  """torchvision's CNBlock (see the module's docstring); `drop_path_rate` its own rate."""

  def __init__(self, channels: int, drop_path_rate: float, *, dtype: Any, rngs: nnx.Rngs):
    self.block = nnx.List([
        _conv(channels, channels, 7, padding=((3, 3), (3, 3)), feature_group_count=channels,
              dtype=dtype, rngs=rngs),
        Permute(),
        _layer_norm(channels, rngs),
        _linear(channels, 4 * channels, dtype=dtype, rngs=rngs),
        GELU(),
        _linear(4 * channels, channels, dtype=dtype, rngs=rngs),
        Permute(),
    ])
    self.layer_scale = nnx.Param(jnp.full((channels,), LAYER_SCALE_INIT, jnp.float32))
    # One draw per example, shared over its H, W and C: torchvision's 'row' mode.
    self.stochastic_depth = nnx.Dropout(drop_path_rate, broadcast_dims=(1, 2, 3))

  def __call__(self, x, rng=None):
    y = x
    for layer in self.block:
      y = layer(y)
    y = y * self.layer_scale[...].astype(y.dtype)
    return x + self.stochastic_depth(y, rngs=rng)


class ConvNeXt(nnx.Module):
  """The backbone without classifier.2; returns each stage's output by name, and
  classifier.0 of the last one's mean as 'global' (see the module's docstring)."""

  final_map = 'stage4'
  stride = 32  # input pixels per cell of stage4
  landmark_map = 'stage2'  # stride 8: what the landmark branch and attention read

  def __init__(self, size: str, *, drop_path: float = 0.0, dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    if size not in ARCHITECTURES:
      raise ValueError(f'ConvNeXt size must be one of {tuple(ARCHITECTURES)}, got {size!r}')
    architecture = ARCHITECTURES[size]
    channels, depths = architecture.channels, architecture.blocks_per_stage
    self.size, self.drop_path = size, drop_path
    self.blocks_per_stage = depths
    layers = [nnx.List([_patchify(3, channels[0], 4, dtype=dtype, rngs=rngs),
                        _layer_norm(channels[0], rngs)])]
    rates = _drop_path_rates(drop_path, sum(depths))
    for stage, (width, blocks) in enumerate(zip(channels, depths)):
      if stage > 0:
        layers.append(nnx.List([_layer_norm(channels[stage - 1], rngs),
                                _patchify(channels[stage - 1], width, 2, dtype=dtype,
                                          rngs=rngs)]))
      first = sum(depths[:stage])
      layers.append(nnx.List([CNBlock(width, rates[first + i], dtype=dtype, rngs=rngs)
                              for i in range(blocks)]))
    self.features = nnx.List(layers)
    self.classifier = nnx.List([_layer_norm(channels[-1], rngs)])
    self.out_features = self.global_features = channels[-1]
    self.landmark_features = channels[STAGES.index(self.landmark_map)]
    self.num_layers = 3 + -(-depths[2] // 3)

  def feature_size(self, side: int) -> int:
    """stage4's side for an input side: the stem floors side / 4, each downsampler / 2."""
    return side // self.stride

  def layer_id(self, path: tuple) -> int:
    """The layer-decay group (0 .. num_layers) of the parameter at `path` inside this
    module (('features', 5, 4, 'block', 3, 'kernel')): the official fine-tuning's grouping,
    described in the module's docstring."""
    if path[0] == 'classifier':
      return self.num_layers
    index = int(path[1])
    if index == 0:
      return 0
    stage = index // 2  # features.1 -> 0; features.2 (its downsampler) and .3 -> 1; ...
    if stage < 2:
      return stage + 1
    if stage == 2:
      return 3 + (int(path[2]) // 3 if index == STAGE_INDICES[2] else 0)
    return self.num_layers

  def __call__(self, x, at_landmark_map=None, dropout_rng=None) -> dict:
    """at_landmark_map: None, or a function of stage2's output whose result stage3 reads
    instead (the landmark attention); outputs['stage2'] is the map before it.
    dropout_rng: the key stochastic depth draws from in training mode (needed there when
    drop_path > 0; ignored otherwise)."""
    for layer in self.features[0]:
      x = layer(x)
    outputs, block_number = {}, 0
    for stage, name in enumerate(STAGES):
      if stage > 0:
        for layer in self.features[STAGE_INDICES[stage] - 1]:
          x = layer(x)
      for block in self.features[STAGE_INDICES[stage]]:
        x = block(x, None if dropout_rng is None else jax.random.fold_in(dropout_rng,
                                                                          block_number))
        block_number += 1
      outputs[name] = x
      if name == self.landmark_map and at_landmark_map is not None:
        x = at_landmark_map(x)
    outputs['global'] = self.classifier[0](x.mean(axis=(1, 2)))
    return outputs


def _drop_path_rates(drop_path: float, blocks: int) -> list:
  """torchvision's linear rule: block k of `blocks` drops with drop_path * k / (blocks - 1)."""
  return [drop_path * k / max(blocks - 1, 1) for k in range(blocks)]

