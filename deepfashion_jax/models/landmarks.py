"""The landmark branch and the landmark-driven attention of Liu & Lu 2018 ("A Deep Fashion
Model with Landmark-Driven Attention"), written from the facts of their public code
(src/lm_networks.py, src/base_networks.py, src/networks.py), in Flax NNX (NHWC).

`LandmarkBranch` reads a stride-8 feature map (VGG-16's conv4_3 in their setting, a
ResNet's layer2 here) and returns one heatmap per landmark slot (`landmark_slots`) at 8x
the map's side, the input's: a 1x1 convolution to 64 channels, three 3x3 convolutions (64,
64, 128), then three times a 4x4 stride-2 transposed convolution (halving the channels:
64, 32, 16) followed by 3x3 convolutions (two, two, one), and a 1x1 convolution to 8 maps
without activation; a ReLU after every other layer.

`AttentionUNet` is their `CustomUnetGenerator(513, 512, num_downs=2, ngf=32,
last_act='tanh')`: a U-Net over [landmark map, features] whose tanh output A in (-1, 1)
re-weights the features as (1 + A) * features. Its layers, outermost first:
  in      1x1 conv (C + 1 -> 32, no bias)                                        side s
  down1   LeakyReLU(0.2), 4x4 stride-2 conv (32 -> 64, no bias), BN             s / 2
  down2   LeakyReLU(0.2), 4x4 stride-2 conv (64 -> 128, no bias), BN            s / 4
  inner   LeakyReLU(0.2), 1x1 conv (128 -> 128, no bias), ReLU,
          1x1 transposed conv (128 -> 128), BN; joined with its input            s / 4
  up2     ReLU, 4x4 stride-2 transposed conv (256 -> 64, no bias), BN; joined    s / 2
  up1     ReLU, 4x4 stride-2 transposed conv (128 -> 32, no bias), BN; joined    s
  out     ReLU, 1x1 transposed conv (64 -> C), tanh                              s
"Joined" concatenates a block's input before its output (channels: input, then output).
Their LeakyReLUs run in place (pix2pix's `inplace=True`), so the input a skip connection
joins is the activated one, as here; the ReLU after every join makes that immaterial
(ReLU after LeakyReLU is ReLU). The side s must be a multiple of 4.

Initialisation: PyTorch's defaults (uniform +-1/sqrt(fan_in), fan_in of a transposed
convolution counting its output channels, as PyTorch's does), BN scale 1 and offset 0.
"""

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from deepfashion_jax.data import landmark_slots
from deepfashion_jax.models import resnet
from deepfashion_jax.models import xla_cpu

BRANCH_STRIDE = 8  # the branch's three transposed convolutions double the side three times
UNET_FILTERS = 32  # their ngf


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def conv(in_features, out_features, kernel, *, stride=1, padding=None, use_bias=True,
         dtype, rngs):
  """nn.Conv2d(in, out, kernel, stride, padding) with PyTorch's initialisation; padding
  defaults to kernel // 2."""
  pad = kernel // 2 if padding is None else padding
  bound = 1.0 / np.sqrt(in_features * kernel * kernel)
  return xla_cpu.Conv(in_features, out_features, (kernel, kernel), strides=stride,
                      padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype,
                      param_dtype=jnp.float32, kernel_init=_uniform(bound),
                      bias_init=_uniform(bound),
                      conv_general_dilated=xla_cpu.conv_general_dilated, rngs=rngs)


class ConvTranspose(nnx.Module):
  """nn.ConvTranspose2d(in, out, kernel, stride, padding): output side
  (side - 1) * stride - 2 * padding + kernel.

  The kernel is kept as (kernel, kernel, in, out), PyTorch's (in, out, kh, kw) weight
  transposed, and applied as PyTorch defines the operation: the input dilated by the
  stride, padded by kernel - 1 - padding, and convolved with the spatially flipped kernel.
  """

  def __init__(self, in_features, out_features, kernel, *, stride=1, padding=0,
               use_bias=True, dtype, rngs):
    bound = 1.0 / np.sqrt(out_features * kernel * kernel)  # PyTorch's fan_in: weight.size(1)
    self.kernel = nnx.Param(_uniform(bound)(rngs.params(),
                                            (kernel, kernel, in_features, out_features)))
    self.bias = (nnx.Param(_uniform(bound)(rngs.params(), (out_features,)))
                 if use_bias else None)
    self.stride, self.padding, self.dtype = stride, padding, dtype

  def __call__(self, x):
    kernel = self.kernel[...].astype(self.dtype)
    pad = kernel.shape[0] - 1 - self.padding
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel[::-1, ::-1], (1, 1), ((pad, pad), (pad, pad)),
        lhs_dilation=(self.stride, self.stride),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LandmarkBranch(nnx.Module):
  """Stride-8 features (B, h, w, C) -> heatmaps (B, 8h, 8w, NUM_SLOTS), float32."""

  def __init__(self, in_features: int, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    c = lambda i, o, k: conv(i, o, k, dtype=dtype, rngs=rngs)
    up = lambda i, o: ConvTranspose(i, o, 4, stride=2, padding=1, dtype=dtype, rngs=rngs)
    self.layers = nnx.List([
        c(in_features, 64, 1), c(64, 64, 3), c(64, 64, 3), c(64, 128, 3),
        up(128, 64), c(64, 64, 3), c(64, 64, 3),
        up(64, 32), c(32, 32, 3), c(32, 32, 3),
        up(32, 16), c(16, 16, 3),
        c(16, landmark_slots.NUM_SLOTS, 1)])

  def __call__(self, features):
    x = features
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x).astype(jnp.float32)


def merged_landmark_map(heatmaps, side: tuple):
  """Their attention's input: the heatmaps' maximum over slots (B, H, W, 1), resized to
  the feature map's side by bilinear interpolation (nn.Upsample(mode='bilinear',
  align_corners=False): no antialiasing, so each cell reads the heatmap near its centre)."""
  merged = heatmaps.max(axis=-1, keepdims=True)
  return jax.image.resize(merged, (merged.shape[0], *side, 1), 'linear', antialias=False)


class AttentionUNet(nnx.Module):
  """[merged landmark map, features] (B, s, s, 1 + C) -> attention (B, s, s, C) in (-1, 1);
  see the module's docstring for the layers."""

  def __init__(self, in_features: int, out_features: int, *, dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    f = UNET_FILTERS
    bn = lambda n: resnet.batch_norm(n, dtype, rngs)
    down = lambda i, o: conv(i, o, 4, stride=2, padding=1, use_bias=False, dtype=dtype,
                             rngs=rngs)
    up = lambda i, o: ConvTranspose(i, o, 4, stride=2, padding=1, use_bias=False,
                                    dtype=dtype, rngs=rngs)
    self.conv_in = conv(in_features, f, 1, use_bias=False, dtype=dtype, rngs=rngs)
    self.down1, self.down1_bn = down(f, 2 * f), bn(2 * f)
    self.down2, self.down2_bn = down(2 * f, 4 * f), bn(4 * f)
    self.inner_down = conv(4 * f, 4 * f, 1, use_bias=False, dtype=dtype, rngs=rngs)
    self.inner_up = ConvTranspose(4 * f, 4 * f, 1, dtype=dtype, rngs=rngs)
    self.inner_bn = bn(4 * f)
    self.up2, self.up2_bn = up(8 * f, 2 * f), bn(2 * f)
    self.up1, self.up1_bn = up(4 * f, f), bn(f)
    self.conv_out = ConvTranspose(2 * f, out_features, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    if x.shape[1] % 4 or x.shape[2] % 4:
      raise ValueError(f'the attention U-Net needs a feature map whose sides are multiples '
                       f'of 4, got {x.shape[1]} x {x.shape[2]}: make the input side a '
                       f'multiple of {4 * BRANCH_STRIDE} (config.data.crop_size)')
    leaky = lambda v: jax.nn.leaky_relu(v, 0.2)
    join = lambda skip, v: jnp.concatenate([skip, v.astype(skip.dtype)], axis=-1)
    skip1 = leaky(self.conv_in(x))
    skip2 = leaky(self.down1_bn(self.down1(skip1)))
    skip3 = leaky(self.down2_bn(self.down2(skip2)))
    inner = self.inner_bn(self.inner_up(jax.nn.relu(self.inner_down(skip3))))
    x = self.up2_bn(self.up2(jax.nn.relu(join(skip3, inner))))
    x = self.up1_bn(self.up1(jax.nn.relu(join(skip2, x))))
    return jnp.tanh(self.conv_out(jax.nn.relu(join(skip1, x))))


class LandmarkAttention(nnx.Module):
  """Liu & Lu's attention: features -> (1 + A) * features, A from the U-Net over the
  features and the merged landmark map."""

  def __init__(self, channels: int, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.unet = AttentionUNet(channels + 1, channels, dtype=dtype, rngs=rngs)

  def __call__(self, features, heatmaps):
    merged = merged_landmark_map(heatmaps, features.shape[1:3]).astype(features.dtype)
    attention = self.unet(jnp.concatenate([merged, features], axis=-1))
    return (1 + attention.astype(features.dtype)) * features, attention


def landmark_positions(heatmaps):
  """(B, H, W, S) heatmaps -> (B, S, 2) (x, y) in [0, 1] coordinates of the input: the
  centre of each map's highest pixel ((column + 0.5) / W, (row + 0.5) / H), the
  convention of the batches' `landmarks`. (Liu & Lu divided the pixel index by W - 1.)"""
  batch, height, width, slots = heatmaps.shape
  flat = jnp.transpose(heatmaps, (0, 3, 1, 2)).reshape(batch, slots, height * width)
  index = jnp.argmax(flat, axis=-1)
  rows, cols = index // width, index % width
  return jnp.stack([(cols + 0.5) / width, (rows + 0.5) / height], axis=-1).astype(jnp.float32)
