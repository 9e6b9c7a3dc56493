"""VGG-16 and VGG-16-BN, layer for layer torchvision's `vgg16` / `vgg16_bn` features, in
Flax NNX (NHWC).

torchvision builds the features as one nn.Sequential: per convolution a 3x3 Conv2d
(padding 1, with bias), for VGG-16-BN a BatchNorm2d, and a ReLU; after each of the five
blocks a 2x2, stride-2 max pool. `features` here is a list with the same indices, the ReLUs
and pools parameter-free placeholders that keep the numbering, so that torchvision's
`features.<i>.weight`, `.bias`, `.running_mean`, `.running_var` map one to one onto
`features[i]` (see `torch_io/torchvision.py`). The last pool (pool5), `avgpool` and `classifier`
are left out: the features end at conv5_3's ReLU, 512 channels at stride 16 (14 x 14 at
224 px), the map FashionNet, Liu & Lu and mmfashion read.

Returns, by name, each block's last convolution after its ReLU and before the block's
pool: 'conv1_2', 'conv2_2', 'conv3_3', 'conv4_3' (stride 8: torchvision's features[22],
features[32] in vgg16_bn) and 'conv5_3' (stride 16: features[29], features[42]).

Activations run in `dtype`; parameters and batch-norm statistics stay float32. The
convolutions come from `xla_cpu` (the same values, faster gradients on CPU).
"""

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from deepfashion_jax.models import resnet
from deepfashion_jax.models import xla_cpu

# torchvision's VGG initialisation: He normal over fan-out for convolutions, biases 0.
_conv_init = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# torchvision's cfgs['D']: each block's convolutions, by output channels.
BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
CONVOLUTIONS = sum(len(block) for block in BLOCKS)  # 13, what makes it VGG-16
STAGES = tuple(f'conv{b + 1}_{len(block)}' for b, block in enumerate(BLOCKS))
POOLS = len(BLOCKS) - 1  # the pools before conv5_3; pool5 is left out


class ReLU(nnx.Module):
  """nn.ReLU's place in `features`."""

  def __call__(self, x):
    return jax.nn.relu(x)


class MaxPool(nnx.Module):
  """nn.MaxPool2d(2, 2)'s place in `features`."""

  def __call__(self, x):
    return max_pool_2x2(x)


def max_pool_2x2(x):
  """nn.MaxPool2d(2, 2): (B, H, W, C) -> (B, H // 2, W // 2, C), an odd last row or
  column dropped (PyTorch's floor mode).

  A running maximum over each window's four pixels in row-major order, which keeps the
  earlier on ties: the value is reduce_window's, and so is the gradient, which goes to each
  window's first maximum as in PyTorch, without reduce_window's select-and-scatter (slow on
  XLA:CPU) and fused into whatever computes x.
  """
  height, width = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  best = x[:, 0:height:2, 0:width:2]
  for row, col in ((0, 1), (1, 0), (1, 1)):
    tap = x[:, row:height:2, col:width:2]
    best = jnp.where(tap > best, tap, best)
  return best


def conv3x3(in_features, out_features, dtype, rngs):
  """Conv2d(in, out, 3, padding=1) as torchvision's VGG initialises it: He normal over
  fan-out, bias 0."""
  return xla_cpu.Conv(in_features, out_features, (3, 3), padding=((1, 1), (1, 1)),
                      use_bias=True, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=_conv_init, bias_init=nnx.initializers.zeros_init(),
                      conv_general_dilated=xla_cpu.conv_general_dilated, rngs=rngs)


class VGG16(nnx.Module):
  """VGG-16's features up to conv5_3's ReLU (with `batch_norm`, VGG-16-BN's); returns
  each block's output before its pool by name (STAGES), and the mean of conv5_3's as
  'global'."""

  final_map = 'conv5_3'
  stride = 2 ** POOLS  # input pixels per cell of conv5_3
  landmark_map = 'conv4_3'  # Liu & Lu's landmark branch and attention read it (stride 8)

  def __init__(self, *, batch_norm: bool = False, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.batch_norm = batch_norm
    layers, stage_indices = [], []
    in_features = 3
    for b, block in enumerate(BLOCKS):
      for out_features in block:
        layers.append(conv3x3(in_features, out_features, dtype, rngs))
        if batch_norm:
          layers.append(resnet.batch_norm(out_features, dtype, rngs))
        layers.append(ReLU())
        in_features = out_features
      stage_indices.append((len(layers) - 1, STAGES[b]))  # the block's last ReLU
      if b < POOLS:
        layers.append(MaxPool())
    self.features = nnx.List(layers)
    self.stage_indices = tuple(stage_indices)  # (index in features, name)
    self.out_features = self.global_features = in_features
    self.landmark_features = BLOCKS[STAGES.index(self.landmark_map)][-1]  # its channels

  def feature_size(self, side: int) -> int:
    """conv5_3's side for an input side: the convolutions keep it, each pool floors it."""
    return side // self.stride

  # Layer-wise learning-rate decay's depth (steps.py): one layer per block of convolutions,
  # the first block (full resolution, before any pool) in the stem's place, 0.
  num_layers = len(BLOCKS) - 1

  def layer_id(self, path: tuple) -> int:
    """The block (0 to 4) of the parameter at `path` inside this module (('features', 7,
    'kernel')): the blocks that end before its index in `features`."""
    if path[0] != 'features' or not 0 <= path[1] < len(self.features):
      raise ValueError(f'{path}: not a parameter of VGG-16')
    return sum(path[1] > end for end, _ in self.stage_indices)

  def __call__(self, x, at_landmark_map=None) -> dict:
    """at_landmark_map: None, or a function of conv4_3's output whose result the rest of
    the network reads instead (the landmark attention); outputs['conv4_3'] is the map
    before it."""
    stages = dict(self.stage_indices)
    outputs = {}
    for index, layer in enumerate(self.features):
      x = layer(x)
      if index in stages:
        outputs[stages[index]] = x
        if stages[index] == self.landmark_map and at_landmark_map is not None:
          x = at_landmark_map(x)
    outputs['global'] = outputs[self.final_map].mean(axis=(1, 2))
    return outputs
