"""FLOPs per step, TFLOP/s, MFU and the profiler window (deepfashion_jax/throughput.py)."""

import glob
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import convolutions
from configs import test as test_config
from deepfashion_jax import config_checks
from deepfashion_jax import throughput
from deepfashion_jax import train
from tests import helpers


def test_the_flops_of_a_matmul_are_its_hand_count():
  a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
  assert throughput.counted_flops(jnp.matmul, a, b) == 2 * 8 * 16 * 4
  assert throughput.compiled_cost(jax.jit(jnp.matmul).lower(a, b))['flops'] == 2 * 8 * 16 * 4


def test_where_the_devices_cannot_count_the_host_cpu_counts_the_same_program(monkeypatch):
  """As on a GPU (a PJRT plugin: jax raises NotImplementedError before compiling): the
  function is lowered again on shapes placed on the host's CPU and counted there."""
  a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
  counted = []
  real = throughput.lowered_cost

  def plugin_like(lowered):
    counted.append(lowered)
    if len(counted) == 1:  # the devices' own lowering: no count, as on a GPU
      return dict(flops=None, bytes_accessed=None)
    return real(lowered)

  monkeypatch.setattr(throughput, 'lowered_cost', plugin_like)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert throughput.counted_flops(jnp.matmul, a, b) == 2 * 8 * 16 * 4
  assert len(counted) == 2


@pytest.mark.parametrize('device_kind, dtype, tflops', [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989), ('NVIDIA H100 80GB HBM3', 'float32', 494),
    ('NVIDIA H100 PCIe', 'float16', 756), ('NVIDIA H200', 'bfloat16', 989),
    ('NVIDIA H200', 'float32', 494), ('NVIDIA A100-SXM4-80GB', 'bfloat16', 312),
    ('NVIDIA A100 80GB PCIe', 'float32', 156), ('NVIDIA H200 NVL', 'bfloat16', None),
    ('NVIDIA GeForce RTX 4090', 'bfloat16', None), ('cpu', 'float32', None)])
def test_peaks_are_looked_up_by_device_kind_and_dtype(device_kind, dtype, tflops):
  peak = throughput.peak_flops_per_sec(device_kind, dtype)
  assert peak == (None if tflops is None else tflops * 1e12)


def test_full_float32_matmuls_have_no_listed_peak():
  with jax.default_matmul_precision('highest'):
    assert throughput.peak_flops_per_sec('NVIDIA H200', 'float32') is None
    assert throughput.peak_flops_per_sec('NVIDIA H200', 'bfloat16') == 989e12


def test_mfu_is_achieved_over_peak_times_devices(monkeypatch):
  monkeypatch.setattr(throughput, 'PEAK_TFLOPS', (('cpu', dict(bf16=2.0, tf32=0.5)),))
  assert throughput.device_peak('bfloat16') == 2e12  # this machine's 'cpu'
  assert throughput.device_peak('float32') == 0.5e12
  # 3e12 FLOPs a step at 2 steps/s on 4 devices of 2 TFLOP/s: 6 of 8 TFLOP/s.
  assert throughput.flops_figures(3e12, 2.0, 2e12, 4) == dict(
      flops_per_step=3e12, tflops_per_sec=6.0, mfu=0.75)
  assert throughput.flops_figures(3e12, 2.0, None, 4) == dict(flops_per_step=3e12,
                                                                tflops_per_sec=6.0)
  assert throughput.flops_figures(None, 2.0, 2e12, 4) == {}  # no count: nothing, not 0
  # The train log's figures: a batch of 8 at 16 images/s is 2 steps/s, on one device.
  rates = throughput.Throughput(8, 0, flops_per_step=3e12,
                           peak_per_device=throughput.device_peak('bfloat16')).figures(16.0)
  assert rates == dict(images_per_sec=16.0, flops_per_step=3e12, tflops_per_sec=6.0,
                       mfu=3.0)
  assert throughput.Throughput(8, 0).figures(16.0) == dict(images_per_sec=16.0)


@pytest.mark.parametrize('window', [(5, 2), (0, 3), (2.5, 3), (4,), (True, 2)])
def test_a_wrong_profile_window_is_refused(window):
  config = test_config.get_config()
  config.profile_steps = window
  with pytest.raises(ValueError, match=re.escape(f'config.profile_steps={window!r}: expected '
                                                 '(0, 0) (off) or (a, b)')):
    config_checks.check(config)


@pytest.mark.parametrize('window', [(0, 0), (), (3, 3), (10, 15)])
def test_profile_windows_that_are_accepted(window):
  config = test_config.get_config()
  config.profile_steps = window
  config_checks.check(config)


def test_a_trace_is_stopped_and_kept_when_the_run_fails_inside_its_window(tmp_path):
  log_dir = str(tmp_path / 'profile')
  with pytest.raises(KeyboardInterrupt):
    with throughput.ProfileWindow((1, 5), log_dir) as profile:
      for step in (1, 2):
        profile.before(step)
        jnp.ones(4).sum().block_until_ready()
        profile.after(step, None)
      raise KeyboardInterrupt
  assert not profile.active and glob.glob(f'{log_dir}/plugins/profile/*/*.xplane.pb')
  jax.profiler.start_trace(str(tmp_path / 'again'))  # no trace is left running
  jax.profiler.stop_trace()


def _taps(size: int, kernel: int, stride: int) -> int:
  """Along one axis of a convolution padded by (kernel - 1) // 2 (torchvision's ResNet):
  the (output position, kernel tap) pairs that read the input, not its zero padding."""
  pad = (kernel - 1) // 2
  outputs = (size + 2 * pad - kernel) // stride + 1
  return sum(0 <= o * stride - pad + t < size for o in range(outputs) for t in range(kernel))


def _backbone_step_flops(depth: int, image_size: int, batch_size: int) -> float:
  """A hand count of a training step's convolution FLOPs as XLA counts them: 2 per
  multiply-add that reads the input (not the padding: at 72 px, 30% of the backbone's
  taps fall on it); the forward pass, the input gradient and the weight gradient as many
  each, the stem's input gradient left out (the image needs none)."""
  forward, stem = 0, 0
  for (size, cin, cout, kernel, stride), count in convolutions.backbone_convolutions(
      depth, image_size).items():
    macs = count * _taps(size, kernel, stride) ** 2 * cin * cout
    forward += macs
    stem = macs if cin == 3 else stem
  return 2 * batch_size * (3 * forward - stem)


@pytest.mark.slow
def test_a_run_logs_its_flops_and_traces_its_profile_window(synthetic_folder, tmp_path):
  """The tiny config (ResNet-18 at 72 px, batches of 8) traces steps 2 to 4 into
  WORKDIR/profile, and its FLOPs per step are the backbone's hand count and a little more
  (box branch, heads, ROI pooling, batch-norm, the optimiser)."""
  config = helpers.tiny_config(synthetic_folder[0], num_train_steps=4, eval_every_steps=4,
                               num_box_images=0, profile_steps=(2, 4))
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)
  traces = glob.glob(os.path.join(workdir, 'profile', 'plugins', 'profile', '*', '*'))
  assert any(path.endswith('.xplane.pb') for path in traces), traces
  assert any(path.endswith('perfetto_trace.json.gz') for path in traces), traces

  flops = results['train_flops_per_step']
  hand_count = _backbone_step_flops(18, config.data.crop_size, config.batch_size)
  # Measured: 9.54e9 = 1.14 x 8.39e9. A forward-only count would be ~0.4, one counted
  # twice (or per device and then again) ~2.3.
  assert 1.0 < flops / hand_count < 1.3, (flops, hand_count)
  np.testing.assert_allclose(results['train_tflops_per_sec'],
                             flops * results['train_images_per_sec'] / 8 / 1e12, rtol=1e-9)
  assert 'train_mfu' not in results  # a CPU: no listed peak


def test_throughput_leaves_out_the_first_interval(monkeypatch):
  clock = iter([0.0, 10.0, 12.0, 13.0, 14.0])  # start, logs at 5 and 10, restart, log at 12
  monkeypatch.setattr(throughput.time, 'perf_counter', lambda: next(clock))
  measured = throughput.Throughput(batch_size=4, step=0)
  assert measured.steady() is None
  assert measured.measure(5) == 20 / 10  # compiling included
  assert measured.measure(10) == 20 / 2
  measured.restart(10)  # an evaluation, say: not counted
  assert measured.measure(12) == 8 / 1
  assert measured.steady() == (20 + 8) / (2 + 1)
