"""Workarounds for XLA:CPU, kept apart from the model they speed up.

The model's three pieces compute what lax's plain forms do, bit for bit unless said
otherwise. The figures, and the attempts that did not pay, are in benchmarks/RESULTS.md
("Train step against PyTorch" and its "Small maps").

One switch, `workarounds_on`, turns them all on or off: on where the platform is CPU,
off elsewhere, where each function below is lax's plain form and the steps compile with
XLA's defaults. The environment variable DEEPFASHION_JAX_XLA_CPU_WORKAROUNDS=0 turns them
off on CPU too, so that a CPU runs the program a GPU runs (tests/test_gpu_path.py checks
it computes the same); 1, or unset, leaves them on for CPU. An environment variable, not
a config field: the model is built and called without a config (conversion, export, the
benchmarks, the tests), and a variable reaches all of them, and the processes they start.
It is read when a function is traced, not when it runs: a function jitted before the
variable changed keeps the program it was traced with (jax.jit caches traces by their
arguments' shapes only), so code that flips it within one process must jit afresh.

- `compiler_options(mesh)`: on CPU meshes, convolutions by XLA's own (Eigen) kernels, not
  YNNPACK's, whose weight gradients are several times slower and run on one core.
  `init_compiler_options(mesh)`: those, and the initial state (every parameter's random
  draw, run once) compiled with LLVM's lighter optimisation: half the compile time, and
  drawn as fast.
- `conv_general_dilated` (`_conv_nhwc`'s gradient, CPU only): XLA:CPU fuses the weight
  gradient's transpose of x into the loop that makes x, which then reads its inputs
  transposed: here that transpose runs unfused. 3 x 3 stride-2 input gradients are summed
  by parity phases, not over a zero-dilated gradient (`_stride_2_input_grad`; equal up to
  rounding).
- `Conv`: XLA:CPU's convolution is tens of times slower on output maps of a few pixels
  (ResNet's last stage below 72 px): those are one matrix product (equal up to rounding).
- `max_pool_3x3_stride_2` (the stem's pool): reduce_window's gradient, select-and-scatter,
  is slow on XLA:CPU; it is written out by stride phases, routed the same way.
- `unroll_loops`: XLA:CPU runs loop bodies slowly; gradient accumulation's scan is
  unrolled on CPU.
"""

import functools
import os
from typing import Optional

from absl import logging
from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

SWITCH = 'DEEPFASHION_JAX_XLA_CPU_WORKAROUNDS'


def workarounds_on(platform: Optional[str] = None) -> bool:
  """Whether this module's workarounds apply on `platform` (default: JAX's default
  backend, the one a jitted function without placement runs on): on CPU unless
  DEEPFASHION_JAX_XLA_CPU_WORKAROUNDS=0. The one place the switch is read."""
  value = os.environ.get(SWITCH, '')
  if value not in ('', '0', '1'):
    raise ValueError(f'{SWITCH}={value!r}: expected 1 or unset (on where the platform is '
                     'CPU) or 0 (off everywhere: the plain lax program a GPU runs)')
  on = (platform or jax.default_backend()) == 'cpu' and value != '0'
  if value == '0':
    _say_off_once()
  return on


@functools.cache
def _say_off_once():
  logging.info('XLA:CPU workarounds off (%s=0): the plain lax program, as on a GPU', SWITCH)


# XLA:CPU (jaxlib 0.10) convolutions by XLA's own (Eigen) kernels: YNNPACK for dots and
# reductions only.
CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type':
                        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}


@functools.cache
def _cpu_compiler_options() -> Optional[dict]:
  """CPU_COMPILER_OPTIONS if this XLA knows them (a tiny compile tells), else None."""
  try:
    zero = jax.device_put(jnp.zeros(()), jax.local_devices(backend='cpu')[0])
    jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS)(zero).block_until_ready()
  except Exception as error:  # pylint: disable=broad-except
    logging.warning('XLA:CPU compiler options %s not accepted (%s); convolutions keep '
                    "XLA's default (slower weight gradients on CPU)",
                    CPU_COMPILER_OPTIONS, error)
    return None
  return CPU_COMPILER_OPTIONS


def compiler_options(mesh) -> Optional[dict]:
  """The XLA options the steps compile with on this mesh's platform: XLA's defaults (None)
  with the workarounds off."""
  return _cpu_compiler_options() if workarounds_on(mesh.devices.flat[0].platform) else None


# LLVM's optimisation level 1, below XLA's default, for a function that runs once.
RUN_ONCE_COMPILER_OPTIONS = {'xla_backend_optimization_level': 1}


def init_compiler_options(mesh) -> Optional[dict]:
  """The XLA options the initial state compiles with on this mesh's platform: the steps'
  (`compiler_options`) and RUN_ONCE_COMPILER_OPTIONS on CPU; XLA's defaults (None) with
  the workarounds off."""
  if not workarounds_on(mesh.devices.flat[0].platform):
    return None
  return dict(_cpu_compiler_options() or {}, **RUN_ONCE_COMPILER_OPTIONS)


def unroll_loops() -> bool:
  """Whether the steps' loops (gradient accumulation's scan over micro-batches) should be
  unrolled: on CPU, where XLA runs a loop's body many times slower than the same code
  unrolled (benchmarks/RESULTS.md). Elsewhere, or with the workarounds off, the loop stays
  rolled, so that one micro-batch's activations at a time are live, which is what
  accumulation is for."""
  return workarounds_on()


# ------------------------------------------------------------- convolutions' gradients

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None, out_sharding=None):
  """lax.conv_general_dilated; with the workarounds on, a plain NHWC convolution gets
  `_conv_nhwc`'s gradient."""
  custom_gradient = (workarounds_on()
                     and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                     == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
                     and lhs_dilation in (None, (1, 1)) and rhs_dilation in (None, (1, 1))
                     and feature_group_count == 1 and out_sharding is None
                     and not isinstance(padding, str))
  if not custom_gradient:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, precision=precision,
        preferred_element_type=preferred_element_type, out_sharding=out_sharding)
  return _conv_nhwc(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)), precision,
                    preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_nhwc(x, kernel, strides, padding, precision, preferred_element_type):
  """An NHWC x HWIO convolution (lax's) whose gradients, on CPU, XLA computes faster.

  Used only with the workarounds on; even then, lowered for another platform (a CPU
  process exporting for a GPU) the gradients are lax's. On CPU:
  - Weight gradient: XLA:CPU computes it as a convolution that wants x as (C, H, W, B),
    and fuses that transpose into the loop that makes x (batch norm, residual add, ReLU),
    which then reads every input in transposed order. Here the transpose runs inside a
    conditional, a fusion boundary XLA keeps (both branches are the transpose, so the
    predicate's value does not matter), and lax's own rule gets x and the output gradient
    in the layouts that convolution wants: the same convolution, so the same gradient, bit
    for bit. A strided 1 x 1 convolution's weight gradient uses every stride-th pixel only
    (also bit for bit).
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
  full cost: 3/4 of its products are with zeros. Padded input pixel (2 r + a, 2 c + b)
  only meets the kernel taps of the same parity (a, b), so each of the four parity phases
  of the padded input has its own stride-1 convolution with those taps; their transposes
  give the phases' gradients, which interleave back into the padded input's.
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


# ------------------------------------------------------------------ small output maps

# Output maps this small are computed as one matrix product (see Conv).
DENSE_MAX_OUTPUT_PIXELS = 4


class Conv(nnx.Conv):
  """nnx.Conv (same parameters), computed as a matrix product when its output map has at
  most DENSE_MAX_OUTPUT_PIXELS pixels, where XLA:CPU's convolution is tens of times slower
  (with the workarounds on; else nnx.Conv's own).

  Each output pixel is a sum over the input pixels its window covers, so the convolution
  is x (B, H W C) @ M (H W C, Ho Wo O) with M's blocks the kernel's taps, or 0 where the
  window falls on padding: the same products, summed in another order.
  """

  def __call__(self, inputs, out_sharding=None):
    if not workarounds_on():
      return super().__call__(inputs, out_sharding)
    _, height, width, _ = inputs.shape
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    out_height, out_width = (_output_size(n, k, s, pad) for n, k, s, pad in zip(
        (height, width), self.kernel_size, strides, self.padding))
    if out_height * out_width > DENSE_MAX_OUTPUT_PIXELS:
      return super().__call__(inputs, out_sharding)
    matrix = _dense_conv_matrix(self.kernel[...].astype(self.dtype), (height, width),
                                strides, self.padding)
    flat = inputs.astype(self.dtype).reshape(inputs.shape[0], -1) @ matrix
    outputs = flat.reshape(inputs.shape[0], out_height, out_width, self.out_features)
    if self.bias is not None:  # VGG's convolutions have one, ResNet's none
      outputs = outputs + self.bias[...].astype(self.dtype)
    return outputs


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


# ------------------------------------------------------------------- the stem's max pool

# Its value is lax.reduce_window's; with the workarounds on, its gradient is written out by
# stride phases instead of reduce_window's select-and-scatter (four index arrays the size of
# the padded input). Same result: each window's gradient goes to its first maximum in
# row-major order, as in XLA's select-and-scatter and PyTorch's max_pool2d.


def max_pool_3x3_stride_2(x):
  """(B, H, W, C) -> (B, ceil(H / 2), ceil(W / 2), C), padding 1 on every side."""
  return _max_pool_by_phases(x) if workarounds_on() else _reduce_window_max(x)


def _reduce_window_max(x):
  # A Python scalar: lax then knows the reduction (reduce_window_max), and its gradient.
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                           ((0, 0), (1, 1), (1, 1), (0, 0)))


_max_pool_by_phases = jax.custom_vjp(_reduce_window_max)


def _stride_2_phases(x):
  """x padded with -inf to (2 Ho + 2, 2 Wo + 2) and split by row and column parity:
  phases[a][b][:, r, c] is padded pixel (2 r + a, 2 c + b)."""
  b, h, w, c = x.shape
  ho, wo = (h + 1) // 2, (w + 1) // 2
  padded = jnp.pad(x, ((0, 0), (1, 2 * ho + 1 - h), (1, 2 * wo + 1 - w), (0, 0)),
                   constant_values=-jnp.inf).reshape(b, ho + 1, 2, wo + 1, 2, c)
  return [[padded[:, :, a, :, col, :] for col in range(2)] for a in range(2)]


def _max_pool_forward(x):
  return _reduce_window_max(x), x


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


_max_pool_by_phases.defvjp(_max_pool_forward, _max_pool_backward)
