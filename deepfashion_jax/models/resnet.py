"""ResNet-18/34/50/101/152, layer for layer torchvision's architecture, in Flax NNX (NHWC).

Names follow torchvision's state-dict keys (`conv1`, `bn1`, `layer1[0].conv1`,
`layer2[0].downsample_conv`, ...) so that torchvision and baseline weights map one to one
(see `torch_io/torchvision.py`, `torch_io/baseline.py`). Padding is explicit, as in PyTorch: 'SAME' would pad stride-2
convolutions asymmetrically and shift every feature map by half a pixel.

Activations run in `dtype` (float32, bfloat16 or float16); parameters and batch-norm
statistics stay float32. The convolutions and the stem's max pool come from `xla_cpu`
(the same values, faster gradients on CPU).
"""

import dataclasses
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from deepfashion_jax.models import xla_cpu

# torchvision's initialisation: He normal over fan-out for convolutions.
_conv_init = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')


@dataclasses.dataclass(frozen=True)
class Architecture:
  block: str  # 'basic' (two 3x3 convolutions) or 'bottleneck' (1x1, 3x3, 1x1)
  blocks_per_stage: tuple


ARCHITECTURES = {
    18: Architecture('basic', (2, 2, 2, 2)),
    34: Architecture('basic', (3, 4, 6, 3)),
    50: Architecture('bottleneck', (3, 4, 6, 3)),
    101: Architecture('bottleneck', (3, 4, 23, 3)),
    152: Architecture('bottleneck', (3, 8, 36, 3)),
}
STAGES = ('stem', 'layer1', 'layer2', 'layer3', 'layer4')


def conv(in_features, out_features, kernel, stride, dtype, rngs):
  """A bias-free convolution padded like PyTorch's (kernel // 2 on every side)."""
  pad = kernel // 2
  return xla_cpu.Conv(in_features, out_features, (kernel, kernel), strides=stride,
                      padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                      param_dtype=jnp.float32, kernel_init=_conv_init,
                      conv_general_dilated=xla_cpu.conv_general_dilated, rngs=rngs)


class BatchNorm(nnx.BatchNorm):
  """nn.BatchNorm2d: nnx.BatchNorm, except that the running variance follows the unbiased
  batch variance, n / (n - 1) times the biased one that normalises the batch, as PyTorch's
  does (Flax's follows the biased one), so that statistics trained here and in PyTorch
  agree."""

  def __call__(self, x, use_running_average=None, *, mask=None):
    if use_running_average is None:
      use_running_average = self.use_running_average
    previous = self.var[...]
    y = super().__call__(x, use_running_average, mask=mask)
    if not use_running_average:
      axes = tuple(range(x.ndim - 1))
      count = math.prod(x.shape[a] for a in axes)
      x = x.astype(jnp.float32)
      mean = x.mean(axes)  # the statistics nnx.BatchNorm computed (XLA computes them once)
      biased = jnp.maximum((x * x).mean(axes) - mean * mean, 0.0)
      unbiased = biased * (count / max(count - 1, 1))
      self.var[...] = jax.lax.stop_gradient(
          self.momentum * previous + (1 - self.momentum) * unbiased)
    return y


def batch_norm(features, dtype, rngs):
  # PyTorch's momentum 0.1 is Flax's 0.9 (the weight of the running value).
  return BatchNorm(features, momentum=0.9, epsilon=1e-5, dtype=dtype,
                   param_dtype=jnp.float32, rngs=rngs)


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, in_features, planes, stride, dtype, rngs):
    self.conv1 = conv(in_features, planes, 3, stride, dtype, rngs)
    self.bn1 = batch_norm(planes, dtype, rngs)
    self.conv2 = conv(planes, planes, 3, 1, dtype, rngs)
    self.bn2 = batch_norm(planes, dtype, rngs)
    self.downsample_conv, self.downsample_bn = _downsample(
        in_features, planes * self.expansion, stride, dtype, rngs)

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return jax.nn.relu(y + _shortcut(self, x))


class Bottleneck(nnx.Module):
  """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution."""
  expansion = 4

  def __init__(self, in_features, planes, stride, dtype, rngs):
    self.conv1 = conv(in_features, planes, 1, 1, dtype, rngs)
    self.bn1 = batch_norm(planes, dtype, rngs)
    self.conv2 = conv(planes, planes, 3, stride, dtype, rngs)
    self.bn2 = batch_norm(planes, dtype, rngs)
    self.conv3 = conv(planes, planes * self.expansion, 1, 1, dtype, rngs)
    self.bn3 = batch_norm(planes * self.expansion, dtype, rngs)
    self.downsample_conv, self.downsample_bn = _downsample(
        in_features, planes * self.expansion, stride, dtype, rngs)

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return jax.nn.relu(y + _shortcut(self, x))


def _downsample(in_features, out_features, stride, dtype, rngs):
  """torchvision's `downsample` (1x1 conv + BN) where the shape changes, else (None, None)."""
  if stride == 1 and in_features == out_features:
    return None, None
  return (conv(in_features, out_features, 1, stride, dtype, rngs),
          batch_norm(out_features, dtype, rngs))


def _shortcut(block, x):
  if block.downsample_conv is None:
    return x
  return block.downsample_bn(block.downsample_conv(x))


class ResNet(nnx.Module):
  """The backbone without fc; returns every stage's output by name, and avgpool's as
  'global'."""

  final_map = 'layer4'
  stride = 32  # input pixels per cell of layer4
  landmark_map = 'layer2'  # the stride-8 stage the landmark branch and attention read

  def __init__(self, depth: int, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if depth not in ARCHITECTURES:
      raise ValueError(f'ResNet depth must be one of {sorted(ARCHITECTURES)}, got {depth}')
    architecture = ARCHITECTURES[depth]
    block = BasicBlock if architecture.block == 'basic' else Bottleneck
    self.depth = depth
    self.conv1 = conv(3, 64, 7, 2, dtype, rngs)
    self.bn1 = batch_norm(64, dtype, rngs)
    in_features = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512),
                                                 architecture.blocks_per_stage)):
      layer = []
      for i in range(blocks):
        stride = 2 if stage > 0 and i == 0 else 1
        layer.append(block(in_features, planes, stride, dtype, rngs))
        in_features = planes * block.expansion
      setattr(self, f'layer{stage + 1}', nnx.List(layer))
      if f'layer{stage + 1}' == self.landmark_map:
        self.landmark_features = in_features  # its channels
    self.out_features = self.global_features = in_features

  def feature_size(self, side: int) -> int:
    """layer4's side for an input side: each of the five stride-2 layers rounds up."""
    return -(-side // self.stride)

  # Layer-wise learning-rate decay's depth (steps.py): one layer per stage, not per block.
  # Per block (timm's fine grouping) ResNet-152 would have 50 layers and its stem a rate
  # of decay ** 51 (1e-10 at 0.65): frozen in effect; per stage every depth has the same
  # five groups, as ConvNeXt's official fine-tuning groups its blocks into 12.
  num_layers = len(STAGES) - 1

  def layer_id(self, path: tuple) -> int:
    """The layer of the parameter at `path` inside this module (('layer3', 1, 'conv2',
    'kernel')): 0 for the stem (conv1, bn1), k for stage layer<k>."""
    if path[0] in ('conv1', 'bn1'):
      return 0
    if path[0] in STAGES[1:]:
      return STAGES.index(path[0])
    raise ValueError(f'{path}: not a parameter of a ResNet')

  def __call__(self, x, at_landmark_map=None) -> dict:
    """at_landmark_map: None, or a function of layer2's output whose result layer3 reads
    instead (the landmark attention); outputs['layer2'] is the map before it."""
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = xla_cpu.max_pool_3x3_stride_2(x)
    outputs = {'stem': x}
    for name in STAGES[1:]:
      for block in getattr(self, name):
        x = block(x)
      outputs[name] = x
      if name == self.landmark_map and at_landmark_map is not None:
        x = at_landmark_map(x)
    outputs['global'] = x.mean(axis=(1, 2))
    return outputs
