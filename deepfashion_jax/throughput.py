"""How hard training works the devices: images per second between logs (`Throughput`),
the train step's FLOPs, the TFLOP/s they make, model FLOPs utilisation (MFU) against the
device's peak, and a profiler trace of chosen steps (config.profile_steps). The devices'
memory bandwidths and the step's bytes accessed (XLA's count) are here too, for the
roofline projection of benchmarks/projection.py.

FLOPs per step are XLA's count of the train step as written, before compiling (counted once,
at the first step, from the trace the step's own compile uses): the same count on every
platform. Never the compiled program's: XLA:CPU's rewrites add FLOPs to some gradients (a
ConvNeXt's depthwise ones), and a GPU's compiled program calls cuDNN for its convolutions,
whose FLOPs its cost analysis leaves out (an MFU many times too low on an H200:
benchmarks/RESULTS.md). Where the devices cannot count before compiling (GPU plugins), the
step is traced again on shapes alone and lowered for the host's CPU, where XLA counts it
(`counted_flops`). The lowered program is the global one (before it is split over
devices): its count is the whole global batch's. XLA counts a loop's body once, so with config.grad_accum_steps = k > 1 (a `lax.scan` over k
micro-batches) the FLOPs are those of the same step without accumulation on the same global
batch (measured: the same count as k = 1). Bytes accessed, for the roofline projection of
benchmarks/projection.py, are the compiled step's (after fusion; `compiled_cost`).
"""

import dataclasses
import functools
import os
import time
from typing import Callable, Optional

from absl import logging
import jax

from deepfashion_jax import steps as steps_lib

# Dense (no sparsity) peak TFLOP/s per device, by a substring of
# jax.devices()[0].device_kind ('NVIDIA H100 80GB HBM3', 'NVIDIA H200',
# 'NVIDIA A100-SXM4-80GB', 'NVIDIA A100 80GB PCIe', ...); the first entry that matches wins,
# and an entry of None (variants whose clocks differ and whose figure is not listed) means
# unknown: no MFU. 'bf16' is the bfloat16 and float16 peak, 'tf32' the float32 one (XLA's
# default matmul precision on these GPUs runs float32 dots and convolutions as TF32).
PEAK_TFLOPS = (
    ('NVL', None),  # H100 NVL, H200 NVL: lower clocks than SXM
    ('H100 PCIe', dict(bf16=756.0, tf32=378.0)),
    ('H100', dict(bf16=989.0, tf32=494.0)),  # SXM: 'NVIDIA H100 80GB HBM3'
    ('H200', dict(bf16=989.0, tf32=494.0)),  # the H100 SXM's chip with more memory
    ('A100', dict(bf16=312.0, tf32=156.0)),  # SXM4 and PCIe alike
)
_PRECISION = {'bfloat16': 'bf16', 'float16': 'bf16', 'float32': 'tf32'}

# HBM bandwidth per device in TB/s (10^12 bytes/s), the vendors' spec sheets, looked up as
# PEAK_TFLOPS is; None: not listed.
PEAK_HBM_TBPS = (
    ('NVL', None),
    ('H100 PCIe', 2.0),
    ('H100', 3.35),  # SXM, HBM3
    ('H200', 4.8),  # SXM, HBM3e
    ('A100-SXM4-80GB', 2.039),
    ('A100 80GB PCIe', 1.935),
    ('A100', 1.555),  # the 40 GB SXM4 and PCIe
)


def _listed(table, device_kind: str):
  """The value of `table`'s first entry whose substring is in `device_kind`; None when
  there is none."""
  for substring, value in table:
    if substring in device_kind:
      return value
  return None


def peak_flops_per_sec(device_kind: str, dtype: str) -> Optional[float]:
  """One device's dense peak FLOP/s for config.dtype's matmuls, or None when unknown (a
  device not in PEAK_TFLOPS, a CPU, or float32 with jax_default_matmul_precision set to
  full float32, whose peak the table does not hold)."""
  peaks = _listed(PEAK_TFLOPS, device_kind)
  if peaks is None or dtype not in _PRECISION:
    return None
  if dtype == 'float32' and str(jax.config.jax_default_matmul_precision).lower() in (
      'highest', 'float32', 'precision.highest'):
    return None
  return peaks[_PRECISION[dtype]] * 1e12


def peak_bytes_per_sec(device_kind: str) -> Optional[float]:
  """One device's HBM bandwidth in bytes/s (PEAK_HBM_TBPS), or None when not listed."""
  tbps = _listed(PEAK_HBM_TBPS, device_kind)
  return None if tbps is None else tbps * 1e12


def _figure(cost_analysis, key: str = 'flops') -> Optional[float]:
  """The `key` ('flops', 'bytes accessed') of a cost analysis (a dict, or a list of one
  per program in older jax); None when there is none or it is not positive."""
  if isinstance(cost_analysis, (list, tuple)):
    cost_analysis = cost_analysis[0] if cost_analysis else None
  if not cost_analysis:
    return None
  value = cost_analysis.get(key)
  return float(value) if value is not None and value > 0 else None


def compiled_cost(lowered) -> dict:
  """flops and bytes_accessed of a lowered jitted call over all devices: its compiled
  executable's cost analysis (one device's program) times the device count; each None
  when XLA gives none. Bytes accessed are the compiled program's: after fusion, so what
  the compiling platform's fusions read and write, not what another platform's would."""
  compiled = lowered.compile()
  try:
    cost = compiled.cost_analysis()
  except NotImplementedError:
    cost = None
  count = jax.device_count()
  figures = {name: _figure(cost, key) for name, key in (('flops', 'flops'),
                                                        ('bytes_accessed', 'bytes accessed'))}
  return {name: None if value is None else value * count for name, value in figures.items()}


def lowered_cost(lowered) -> dict:
  """flops and bytes_accessed of a lowered jitted call, counted before compiling: the
  program as written, before any platform's rewrites or fusions (so bytes are every op's
  operands and result); each None where XLA cannot count before compiling (GPU plugins)."""
  try:
    cost = lowered.cost_analysis()
  except NotImplementedError:  # jax's answer on a PJRT plugin (CUDA)
    cost = None
  return dict(flops=_figure(cost, 'flops'), bytes_accessed=_figure(cost, 'bytes accessed'))


def counted_flops(fun: Callable, *args, lowered=None) -> Optional[float]:
  """The FLOPs of `fun(*args)` as written (see the module's docstring): from `lowered` (the
  jitted call's own lowering, when the caller has it) or a lowering of `fun` on `args`
  (arrays or jax.ShapeDtypeStructs, global shapes); where the devices cannot count before
  compiling, `fun` lowered on the shapes alone for the host's CPU and counted there."""
  flops = lowered_cost(lowered or jax.jit(fun).lower(*args))['flops']
  if flops is None and jax.default_backend() != 'cpu':
    host = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host),
                          args)
    flops = lowered_cost(jax.jit(fun).lower(*shapes))['flops']
  return flops


def train_step_cost(train, step_config: steps_lib.StepConfig, state, batch) -> dict:
  """flops and bytes_accessed of one train step on the global `batch` (see the module's
  docstring), each None when XLA's cost analysis has none; with gradient accumulation no
  bytes (the scan's body is counted once). `train` is `steps.jit_steps(...).train`: it is
  compiled here for (state, batch), as its first call would compile it, and that call
  reuses the executable."""
  start = time.perf_counter()
  lowered = train.lower(state, batch)
  compiled = compiled_cost(lowered)
  plain = dataclasses.replace(step_config, grad_accum_steps=1)
  step = functools.partial(steps_lib.train_step, plain)
  if step_config.grad_accum_steps > 1:  # XLA counts the scan's body once: count k = 1
    cost = dict(flops=counted_flops(step, state, batch), bytes_accessed=None)
  else:
    cost = dict(flops=counted_flops(step, state, batch, lowered=lowered),
                bytes_accessed=compiled['bytes_accessed'])
  logging.info('The train step: %s FLOPs per step (XLA cost analysis; compiled in %.1f s)',
               'no count of' if cost['flops'] is None else f"{cost['flops']:.4g}",
               time.perf_counter() - start)
  return cost


def train_step_flops(train, step_config: steps_lib.StepConfig, state, batch) -> Optional[float]:
  """The FLOPs of one train step on the global `batch` (`train_step_cost`), or None when
  XLA's cost analysis has none."""
  return train_step_cost(train, step_config, state, batch)['flops']


def flops_figures(flops_per_step: Optional[float], steps_per_sec: float,
                  peak_per_device: Optional[float], device_count: int) -> dict:
  """What the train log carries beside images_per_sec: flops_per_step, tflops_per_sec
  (achieved, over all devices) and, when the peak is known, mfu = achieved /
  (peak x devices); nothing without a FLOP count."""
  if flops_per_step is None:
    return {}
  achieved = flops_per_step * steps_per_sec
  figures = dict(flops_per_step=flops_per_step, tflops_per_sec=achieved / 1e12)
  if peak_per_device:
    figures['mfu'] = achieved / (peak_per_device * device_count)
  return figures


def device_peak(dtype: str) -> Optional[float]:
  """peak_flops_per_sec of this run's first device."""
  return peak_flops_per_sec(str(jax.devices()[0].device_kind), dtype)


# --- config.profile_steps -------------------------------------------------------------

PROFILE_FOLDER = 'profile'


def profile_dir(workdir: str) -> str:
  """WORKDIR/profile for process 0, WORKDIR/profile/process_<i> for the others: each
  process traces its own devices into its own folder."""
  folder = os.path.join(workdir, PROFILE_FOLDER)
  index = jax.process_index()
  return folder if index == 0 else os.path.join(folder, f'process_{index}')


def profile_window(profile_steps) -> Optional[tuple]:
  """config.profile_steps as (first, last), both traced; None when off ((0, 0) or ())."""
  if not profile_steps or tuple(profile_steps) == (0, 0):
    return None
  first, last = profile_steps
  return int(first), int(last)


class ProfileWindow:
  """A jax.profiler trace of training steps first..last (both included) into `log_dir`:
  started before step `first` fetches its batch, stopped once step `last`'s state is
  computed (the device work waited for), or on leaving the `with` block if the run ends
  or fails inside the window. The trace is viewable in TensorBoard's profile plugin
  (xprof) and, as perfetto_trace.json.gz, in Perfetto (docs/gpus.md, "Profiles")."""

  def __init__(self, profile_steps, log_dir: str):
    self.window, self.log_dir, self.active = profile_window(profile_steps), log_dir, False

  def __enter__(self):
    return self

  def before(self, step: int):
    if self.window and step == self.window[0] and not self.active:
      os.makedirs(self.log_dir, exist_ok=True)
      logging.info('Profiling steps %d to %d into %s', *self.window, self.log_dir)
      jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
      self.active = True

  def after(self, step: int, state):
    if self.active and step >= self.window[1]:
      jax.block_until_ready(state)
      self._stop()

  def _stop(self):
    self.active = False
    jax.profiler.stop_trace()
    logging.info('Profile written into %s', self.log_dir)

  def __exit__(self, *exc):
    if self.active:  # the run ended or failed inside the window: keep what was traced
      self._stop()


class Throughput:
  """Training images per second between logs, evaluations and checkpoints left out.

  `measure` follows the log's device sync, so the steps it counts have finished. The
  first interval of a run includes compiling the step; `steady` leaves it out.
  `figures` adds `flops_figures` (flops_per_step, tflops_per_sec, mfu) once
  flops_per_step is known (the loop counts it at its first step).
  """

  def __init__(self, batch_size: int, step: int, flops_per_step=None, peak_per_device=None):
    self.batch_size, self.intervals = batch_size, []  # (images, seconds)
    self.flops_per_step, self.peak_per_device = flops_per_step, peak_per_device
    self.restart(step)

  def figures(self, images_per_sec: float) -> dict:
    """images_per_sec, and flops_per_step, tflops_per_sec and mfu where known."""
    return dict(images_per_sec=images_per_sec, **flops_figures(
        self.flops_per_step, images_per_sec / self.batch_size, self.peak_per_device,
        jax.device_count()))

  def restart(self, step: int, now=None):
    self.start_step = step
    self.start_time = time.perf_counter() if now is None else now

  def measure(self, step: int) -> float:
    now = time.perf_counter()
    images = (step - self.start_step) * self.batch_size
    seconds = now - self.start_time
    self.intervals.append((images, seconds))
    self.restart(step, now)
    return images / max(seconds, 1e-9)

  def steady(self):
    """Images per second over every interval but the first; None with fewer than two."""
    later = self.intervals[1:]
    if not later:
      return None
    return sum(i for i, _ in later) / max(sum(s for _, s in later), 1e-9)
