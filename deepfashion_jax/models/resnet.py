"""ResNet-18/34/50/101/152, layer for layer torchvision's architecture, in Flax NNX (NHWC).

Names follow torchvision's state-dict keys (`conv1`, `bn1`, `layer1[0].conv1`,
`layer2[0].downsample_conv`, ...) so that torchvision and baseline weights map one to one
(see `convert_torch.py`). Padding is explicit, as in PyTorch: 'SAME' would pad stride-2
convolutions asymmetrically and shift every feature map by half a pixel.

Activations run in `dtype` (float32, bfloat16 or float16); parameters and batch-norm
statistics stay float32.
"""

import dataclasses
import functools
import math
from typing import Any

from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

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
  return Conv(in_features, out_features, (kernel, kernel), strides=stride,
              padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
              param_dtype=jnp.float32, kernel_init=_conv_init,
              conv_general_dilated=conv_general_dilated, rngs=rngs)


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None, out_sharding=None):
  """lax.conv_general_dilated; a plain NHWC convolution gets `_conv_nhwc`'s gradient."""
  plain = (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
           and lhs_dilation in (None, (1, 1)) and rhs_dilation in (None, (1, 1))
           and feature_group_count == 1 and out_sharding is None
           and not isinstance(padding, str))
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, precision=precision,
        preferred_element_type=preferred_element_type, out_sharding=out_sharding)
  return _conv_nhwc(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)), precision,
                    preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_nhwc(x, kernel, strides, padding, precision, preferred_element_type):
  """An NHWC x HWIO convolution (lax's) whose gradients, on CPU, XLA computes faster.

  On other platforms the gradients are lax's. On CPU (benchmarks/RESULTS.md):
  - Weight gradient: XLA:CPU computes it as a convolution that wants x as (C, H, W, B),
    and fuses that transpose into the loop that makes x (batch norm, residual add, ReLU),
    which then reads every input in transposed order (107 ms for one 56 x 56 x 64 map of
    ResNet-18's step at 224 px, against 4 ms for the transpose alone). Here the transpose
    runs inside a conditional, a fusion boundary XLA keeps (both branches are the
    transpose, so the predicate's value does not matter), and lax's own rule gets x and
    the output gradient in the layouts that convolution wants: the same convolution, so
    the same gradient, bit for bit. A strided 1 x 1 convolution's weight gradient uses
    every stride-th pixel only (2x faster than the strided form; also bit for bit).
  - Input gradient of a 3 x 3, stride-2 convolution: see `_stride_2_input_grad` (equal up
    to rounding).
  Tested against lax in tests/test_models.py.
  """
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC,
                                  precision=precision,
                                  preferred_element_type=preferred_element_type)


def _conv_nhwc_forward(x, kernel, strides, padding, precision, preferred_element_type):
  out = _conv_nhwc(x, kernel, strides, padding, precision, preferred_element_type)
  return out, (x, kernel)


def _conv_nhwc_backward(strides, padding, precision, preferred_element_type, residuals,
                        grad):
  x, kernel = residuals
  conv_of = functools.partial(lax.conv_general_dilated, window_strides=strides,
                              padding=padding, precision=precision,
                              preferred_element_type=preferred_element_type)

  def lax_input_grad(kernel, grad):
    return jax.linear_transpose(
        lambda x: conv_of(x, kernel, dimension_numbers=_NHWC), x)(grad)[0]

  def cpu_input_grad(kernel, grad):
    if strides == (2, 2) and kernel.shape[:2] == (3, 3) and padding == ((1, 1), (1, 1)) \
        and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
      return _stride_2_input_grad(grad, kernel, x, precision, preferred_element_type)
    return lax_input_grad(kernel, grad)

  def lax_weight_grad(x, grad):
    return jax.linear_transpose(
        lambda k: conv_of(x, k, dimension_numbers=_NHWC), kernel)(grad)[0]

  def cpu_weight_grad(x, grad):
    pointwise = kernel.shape[:2] == (1, 1) and padding == ((0, 0), (0, 0))
    # A 1 x 1 convolution reads every stride-th pixel only: its weight gradient is the
    # stride-1 one of those pixels.
    read = (lambda a: a[:, ::strides[0], ::strides[1]]) if pointwise else (lambda a: a)
    transpose = lambda a: jnp.transpose(read(a), (3, 1, 2, 0))  # (B, H, W, C) -> (C, H, W, B)
    x_chwb = lax.cond(grad[0, 0, 0, 0] == grad[0, 0, 0, 0], transpose, transpose, x)
    # The same convolution on x laid out (C, H, W, B) and grad (H, W, B, C): lax's
    # gradient rule then hands XLA both operands in the layout its convolution wants.
    return jax.linear_transpose(
        lambda k: lax.conv_general_dilated(
            x_chwb, k, (1, 1) if pointwise else strides, padding,
            dimension_numbers=('CHWN', 'HWIO', 'HWNC'), precision=precision,
            preferred_element_type=preferred_element_type),
        kernel)(jnp.transpose(grad, (1, 2, 0, 3)))[0]

  input_grad = lax.platform_dependent(kernel, grad, cpu=cpu_input_grad,
                                      default=lax_input_grad)
  kernel_grad = lax.platform_dependent(x, grad, cpu=cpu_weight_grad, default=lax_weight_grad)
  return input_grad, kernel_grad


def _stride_2_input_grad(grad, kernel, x, precision, preferred_element_type):
  """x's gradient of a 3 x 3, stride-2, pad-1 convolution (x's H and W even), by phases.

  lax's rule convolves the output gradient dilated with zeros, which XLA:CPU computes at
  full cost: 3/4 of its products are with zeros (56 x 56 x 64 -> 128: 57 ms against 29 ms
  here, benchmarks/RESULTS.md). Padded input pixel (2 r + a, 2 c + b) only meets the
  kernel taps of the same parity (a, b), so each of the four parity phases of the padded
  input has its own stride-1 convolution with those taps; their transposes give the
  phases' gradients, which interleave back into the padded input's.
  """
  batch, height, width, features = x.shape
  rows, cols = height // 2 + 1, width // 2 + 1  # phase grids of the padded input
  out_h, out_w = grad.shape[1:3]
  phase_rows = []
  for a in range(2):
    phase_row = []
    for b in range(2):
      taps = kernel[a::2, b::2]
      shape = (batch, out_h + taps.shape[0] - 1, out_w + taps.shape[1] - 1, features)
      phase_grad, = jax.linear_transpose(
          lambda phase: lax.conv_general_dilated(
              phase, taps, (1, 1), 'VALID', dimension_numbers=_NHWC, precision=precision,
              preferred_element_type=preferred_element_type),
          jax.ShapeDtypeStruct(shape, x.dtype))(grad)
      phase_row.append(jnp.pad(phase_grad,
                               ((0, 0), (0, rows - shape[1]), (0, cols - shape[2]), (0, 0))))
    phase_rows.append(jnp.stack(phase_row, axis=3))  # (B, rows, cols, 2, C)
  padded = jnp.stack(phase_rows, axis=2).reshape(batch, 2 * rows, 2 * cols, features)
  return padded[:, 1:1 + height, 1:1 + width]


_conv_nhwc.defvjp(_conv_nhwc_forward, _conv_nhwc_backward)


# Output maps this small are computed as one matrix product (see Conv).
DENSE_MAX_OUTPUT_PIXELS = 4


class Conv(nnx.Conv):
  """nnx.Conv (same parameters), computed as a matrix product when its output map has at
  most DENSE_MAX_OUTPUT_PIXELS pixels.

  Why: XLA:CPU's convolution is 40-60x slower on such maps (a 3 x 3 convolution on 2 x 2
  maps: 317 ms against 5.5 ms on 3 x 3 maps, batch 32, 512 channels; benchmarks/RESULTS.md),
  which ResNet's last stage meets below 72 px. Each output pixel is a sum over the input
  pixels its window covers, so the convolution is x (B, H W C) @ M (H W C, Ho Wo O) with
  M's blocks the kernel's taps, or 0 where the window falls on padding: the same products,
  summed in another order.
  """

  def __call__(self, inputs, out_sharding=None):
    _, height, width, _ = inputs.shape
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    out_height, out_width = (_output_size(n, k, s, pad) for n, k, s, pad in zip(
        (height, width), self.kernel_size, strides, self.padding))
    if out_height * out_width > DENSE_MAX_OUTPUT_PIXELS:
      return super().__call__(inputs, out_sharding)
    matrix = _dense_conv_matrix(self.kernel[...].astype(self.dtype), (height, width),
                                strides, self.padding)
    flat = inputs.astype(self.dtype).reshape(inputs.shape[0], -1) @ matrix
    return flat.reshape(inputs.shape[0], out_height, out_width, self.out_features)


def _output_size(size: int, kernel: int, stride: int, padding) -> int:
  return (size + padding[0] + padding[1] - kernel) // stride + 1


def _dense_conv_matrix(kernel, in_size, strides, padding):
  """(H W C, Ho Wo O): block (input pixel, output pixel) is the kernel tap that joins them."""
  kernel_h, kernel_w, in_features, out_features = kernel.shape
  (height, width), (stride_h, stride_w) = in_size, strides
  out_h = _output_size(height, kernel_h, stride_h, padding[0])
  out_w = _output_size(width, kernel_w, stride_w, padding[1])
  # For input pixel (h, w) and output pixel (r, c): the tap (h + pad - r s, w + pad - c s).
  tap_h = (np.arange(height)[:, None] + padding[0][0] - np.arange(out_h)[None, :] * stride_h)
  tap_w = (np.arange(width)[:, None] + padding[1][0] - np.arange(out_w)[None, :] * stride_w)
  inside_h = (tap_h >= 0) & (tap_h < kernel_h)
  inside_w = (tap_w >= 0) & (tap_w < kernel_w)
  # (H, Ho, W, Wo, C, O): gathered taps, zero outside the kernel.
  taps = kernel[np.clip(tap_h, 0, kernel_h - 1)[:, :, None, None],
                np.clip(tap_w, 0, kernel_w - 1)[None, None, :, :]]
  inside = (inside_h[:, :, None, None] & inside_w[None, None, :, :])[..., None, None]
  blocks = jnp.where(inside, taps, jnp.zeros((), kernel.dtype))
  return blocks.transpose(0, 2, 4, 1, 3, 5).reshape(height * width * in_features,
                                                    out_h * out_w * out_features)


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
  """The backbone without avgpool and fc; returns every stage's output by name."""

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
    self.out_features = in_features

  def __call__(self, x) -> dict:
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = max_pool_3x3_stride_2(x)
    outputs = {'stem': x}
    for name in STAGES[1:]:
      for block in getattr(self, name):
        x = block(x)
      outputs[name] = x
    return outputs


# The stem's 3 x 3, stride-2, pad-1 max pool. Its value is lax.reduce_window's; its gradient
# is written out because XLA:CPU computes reduce_window's (select-and-scatter, with four
# index arrays the size of the padded input) 2.7x slower than the phase form below
# (benchmarks/RESULTS.md). Same result: each window's gradient goes to its first maximum in
# row-major order, as in XLA's select-and-scatter and PyTorch's max_pool2d.


@jax.custom_vjp
def max_pool_3x3_stride_2(x):
  """(B, H, W, C) -> (B, ceil(H / 2), ceil(W / 2), C), padding 1 on every side."""
  return lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), lax.max, (1, 3, 3, 1),
                           (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))


def _stride_2_phases(x):
  """x padded with -inf to (2 Ho + 2, 2 Wo + 2) and split by row and column parity:
  phases[a][b][:, r, c] is padded pixel (2 r + a, 2 c + b)."""
  b, h, w, c = x.shape
  ho, wo = (h + 1) // 2, (w + 1) // 2
  padded = jnp.pad(x, ((0, 0), (1, 2 * ho + 1 - h), (1, 2 * wo + 1 - w), (0, 0)),
                   constant_values=-jnp.inf).reshape(b, ho + 1, 2, wo + 1, 2, c)
  return [[padded[:, :, a, :, col, :] for col in range(2)] for a in range(2)]


def _max_pool_forward(x):
  return max_pool_3x3_stride_2.fun(x), x


def _max_pool_backward(x, grad):
  """Each window's gradient to its first maximum. The maximum is found again here, from
  this function's own x: XLA may recompute x for the backward pass (the stem's batch norm
  and ReLU), rounded differently from the forward's, so comparing with the forward's
  output would miss windows."""
  b, h, w, c = x.shape
  ho, wo = (h + 1) // 2, (w + 1) // 2
  phases = _stride_2_phases(x)
  # Window tap (i, j) of output (r, c) is padded pixel (2 r + i, 2 c + j): phase
  # (i % 2, j % 2) at (r + i // 2, c + j // 2).
  offsets = [(i, j) for i in range(3) for j in range(3)]
  taps = [phases[i % 2][j % 2][:, i // 2:i // 2 + ho, j // 2:j // 2 + wo] for i, j in offsets]
  best, best_tap = taps[0], jnp.zeros(taps[0].shape, jnp.int32)
  for k, tap in enumerate(taps[1:], start=1):
    later_and_larger = tap > best  # strictly: the first maximum wins, as in XLA and PyTorch
    best = jnp.where(later_and_larger, tap, best)
    best_tap = jnp.where(later_and_larger, k, best_tap)
  phase_grads = [[jnp.zeros((b, ho + 1, wo + 1, c), grad.dtype) for _ in range(2)]
                 for _ in range(2)]
  for k, (i, j) in enumerate(offsets):
    di, dj = i // 2, j // 2
    routed = jnp.pad(jnp.where(best_tap == k, grad, 0),
                     ((0, 0), (di, 1 - di), (dj, 1 - dj), (0, 0)))
    phase_grads[i % 2][j % 2] = phase_grads[i % 2][j % 2] + routed
  rows = [jnp.stack(phase_grads[a], axis=3) for a in range(2)]  # (b, ho + 1, wo + 1, 2, c)
  padded = jnp.stack(rows, axis=2).reshape(b, 2 * ho + 2, 2 * wo + 2, c)
  return (padded[:, 1:1 + h, 1:1 + w],)


max_pool_3x3_stride_2.defvjp(_max_pool_forward, _max_pool_backward)
