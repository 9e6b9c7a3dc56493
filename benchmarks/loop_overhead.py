"""The training loop's host overhead per step, against the bare jitted step.

Both sides run the same jitted train step of a model small enough that its device time
is negligible (ViT-test at 32 px, batch 8, by default), so that what is left is the host's
work per step:
  bare      `state, metrics = train(state, batch)` in a tight loop, the batch already on
            the device: dispatch alone (the device runs behind, asynchronously)
  loop      `train._train_loop` as training runs it, per step: the next batch from an
            iterator of ready batches (the pipeline's prefetch buffer), its skipped count,
            the stop mark, device_put onto the mesh (packed: `train._device_entries`), the
            step's dispatch, the profiler window, the progress report, the metrics merged
            on the device (a second dispatch), the log (every `--log_every` steps: the
            merged metrics copied to the host) and the stop check
  before    the same loop as it was before: every batch entry put on the devices as an
            array of its own, each step's metrics copied to the host LAG steps late and
            merged there (`HostMergedMetrics`)
Each is timed per step in the main thread's CPU time (the host's work: what would delay
the next dispatch on a GPU) and in wall time (on CPU the device is these same cores, so
the wall time includes the device's work). The difference in CPU time is the loop's
overhead (on CPU it also holds device work the main thread does while it waits for a
step's metrics or the device's queue), so the loop's own parts are timed alone too, on a
finished step: fetching and marking a batch, its packed device_put, the merge's dispatch;
what they replaced (the whole batch's device_put, copying a step's metrics to the host and
merging them there); and what several processes add (copying a step's stop flag). All are
printed as shares of a ResNet-50 bfloat16 step on an H200 (`--reference_step_ms`, 15.6 ms
at batch 256 by default: 256 images at the 16,436 img/s that benchmarks/projection.py
gives at 40% MFU), beside the target, 2% of it.
Evaluation and checkpointing, which run every few thousand steps, are left out (stubbed):
each step's time is its period between two consecutive dispatches, median over the steps
after the first few.

  python -m benchmarks.loop_overhead [--steps 200] [--repeats 3] [--json OUT]
"""

import argparse
import contextlib
import dataclasses
import json
import statistics
import tempfile
import time
from unittest import mock

import jax
from clu import metric_writers

from configs import test as test_config
from deepfashion_jax import checkpoints
from deepfashion_jax import data
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax import train

# What the loop puts on the devices of a batch: its entries the step reads, packed.
device_entries = train._device_entries  # pylint: disable=protected-access
# 256 images / 16,436 img/s: the ResNet-50 bf16 step at 40% MFU on an H200
# (benchmarks/projection.py, the GPU's program).
REFERENCE_STEP_MS = 15.6
WARMUP_STEPS = 5  # compilation, the FLOP count, the first metrics reads


def tiny_config(workdir: str, args):
  """configs/test.py shrunk until the step's device time is negligible."""
  config = test_config.get_config()
  config.model.backbone = args.backbone
  config.data.img_size, config.data.crop_size = args.image_size + 8, args.image_size
  config.batch_size = args.batch_size
  config.num_train_steps = args.steps
  config.log_every_steps = args.log_every
  config.eval_every_steps = config.checkpoint_every_steps = 10 * args.steps
  config.data.synthetic_images = 4 * args.batch_size
  config.workdir = workdir
  return config


class ReadyBatches:
  """An endless iterator over a few batches already in host memory: the pipeline's
  prefetch buffer when the pipeline keeps ahead of the step."""

  def __init__(self, batches):
    self.batches, self.count = batches, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.count += 1
    return self.batches[self.count % len(self.batches)]


def stamp():
  """(wall seconds, this thread's CPU seconds) now."""
  return time.perf_counter(), time.thread_time()


def timed(function, stamps: list):
  """`function` (a jitted function: its `lower` too), recording each call's start."""
  def call(*args):
    stamps.append(stamp())
    return function(*args)
  call.lower = function.lower  # the loop counts the step's FLOPs from its lowering
  return call


def median_periods_ms(stamps: list) -> tuple:
  """Median (wall, CPU) milliseconds between consecutive stamps, past the warm-up."""
  steady = stamps[WARMUP_STEPS:]
  return tuple(1e3 * statistics.median(b[i] - a[i] for a, b in zip(steady, steady[1:]))
               for i in (0, 1))


def build(config, workdir: str):
  """The training loop's run (`train._Run`) and its initial state, with ready batches."""
  training_data = data.create_datasets(config, workdir)
  mesh = sharding.make_mesh()
  step_config, state = steps.create_train_state(config, mesh, training_data.attributes)
  batches = [next(training_data.train_batches) for _ in range(4)]
  training_data = dataclasses.replace(training_data, train_batches=ReadyBatches(batches))
  manager = checkpoints.create_manager(workdir, config.keep_checkpoints, config.best_metric)
  writer = metric_writers.create_default_writer(workdir, just_logging=True)
  run = train._Run(  # pylint: disable=protected-access
      config, workdir, mesh, steps.jit_steps(step_config, mesh), training_data, manager,
      writer, step_config)
  return run, state, batches


class HostMergedMetrics:
  """`train._TrainMetrics` as it was before the metrics were merged on the device: each
  step's metrics copied from this process's replica LAG steps late and merged on the host;
  a log reads all of them. For the side-by-side measurement only."""

  LAG = train._TrainMetrics.LAG  # pylint: disable=protected-access

  def __init__(self, merge=None, stop_flags=False):  # pylint: disable=unused-argument
    self.on_device, self.merged, self.stop_requested = [], None, False

  def add(self, step_metrics):
    self.on_device.append(step_metrics)

  def read(self, keep: int = LAG):
    while len(self.on_device) > keep:
      step_metrics = sharding.local_copy(self.on_device.pop(0))
      self.stop_requested |= bool(step_metrics.stop_requested.value)
      self.merged = (step_metrics if self.merged is None
                     else self.merged.merge(step_metrics))

  def take(self):
    self.read(keep=0)
    merged, self.merged = self.merged, None
    return merged


def loop_period_ms(run, state, before: bool = False) -> tuple:
  """Median (wall, CPU) ms per step of `train._train_loop`, evaluation and checkpoints
  stubbed; before: as the loop was before (every batch entry put on the devices, the
  metrics merged on the host: `HostMergedMetrics`)."""
  stamps = []
  run = dataclasses.replace(run, steps=dataclasses.replace(
      run.steps, train=timed(run.steps.train, stamps)))
  with contextlib.ExitStack() as stack:
    stack.enter_context(mock.patch.object(train, '_evaluate_and_report',
                                          lambda *args: {}))
    stack.enter_context(mock.patch.object(checkpoints, 'save', lambda *args, **kwargs: None))
    if before:
      stack.enter_context(mock.patch.object(train, '_TrainMetrics', HostMergedMetrics))
      stack.enter_context(mock.patch.object(train, '_device_entries', lambda batch: batch))
    run.stop = stack.enter_context(train._StopSignals())  # pylint: disable=protected-access
    train._train_loop(run, state)  # pylint: disable=protected-access
  return median_periods_ms(stamps)


def bare_period_ms(run, state, batch, count: int) -> tuple:
  """Median (wall, CPU) ms per step of the jitted step alone, on one batch already on the
  device."""
  stop = train._StopSignals(processes=1)  # pylint: disable=protected-access
  batch = sharding.global_batch(device_entries(stop.mark(batch)), run.mesh)
  stamps = []
  for _ in range(count):
    stamps.append(stamp())
    state, metrics = run.steps.train(state, batch)
  jax.block_until_ready(metrics)
  return median_periods_ms(stamps)


def parts_ms(run, state, batches, count: int = 200) -> dict:
  """Median host ms of each of the loop's own parts per step, timed alone on a finished
  step (nothing waits for the device): what the loop adds to the step's dispatch (PARTS),
  what the device merge replaced (BEFORE) and what several processes add (MULTI_PROCESS)."""
  stop = train._StopSignals(processes=1)  # pylint: disable=protected-access
  ready = ReadyBatches(batches)
  batch = sharding.global_batch(device_entries(stop.mark(batches[0])), run.mesh)
  state, metrics = run.steps.train(state, batch)
  jax.block_until_ready(metrics)
  host_metrics = sharding.local_copy(metrics)
  running = jax.block_until_ready(run.steps.merge_metrics(None, metrics))
  jax.block_until_ready(run.steps.merge_metrics(running, metrics))  # compiled
  parts = dict(
      fetch_and_mark=lambda: stop.mark(next(ready))['skipped'].sum(),
      device_put=lambda: sharding.global_batch(
          device_entries(stop.mark(batches[0])), run.mesh),
      device_put_whole_batch=lambda: sharding.global_batch(stop.mark(batches[0]), run.mesh),
      device_merge=lambda: run.steps.merge_metrics(running, metrics),
      metrics_copy=lambda: sharding.local_copy(metrics),
      host_merge=lambda: host_metrics.merge(host_metrics),
      stop_flag_copy=lambda: sharding.local_copy(metrics.stop_requested.value))
  samples = {name: [] for name in parts}
  for _ in range(count):  # interleaved: a burst of load on the shared cores hits them all
    for name, part in parts.items():
      start = time.perf_counter()
      part()
      samples[name].append(time.perf_counter() - start)
  return {name: 1e3 * statistics.median(times) for name, times in samples.items()}


PARTS = ('fetch_and_mark', 'device_put', 'device_merge')  # the loop's, per step
BEFORE = ('fetch_and_mark', 'device_put_whole_batch', 'metrics_copy', 'host_merge')
MULTI_PROCESS = ('stop_flag_copy',)  # added per step with several processes


def fresh_copy(state):
  """A copy of the initial state: each measurement starts at step 0 and donates its own."""
  return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--backbone', default='vit_test')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--steps', type=int, default=200, help='steps per measurement')
  parser.add_argument('--log_every', type=int, default=100,
                      help='the loop logs the merged metrics every this many steps')
  parser.add_argument('--repeats', type=int, default=3,
                      help='bare and loop measured alternately this many times; medians')
  parser.add_argument('--reference_step_ms', type=float, default=REFERENCE_STEP_MS,
                      help='a ResNet-50 bf16 step on an H200 at batch 256 (for the share)')
  parser.add_argument('--json', default='')
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory() as workdir:
    config = tiny_config(workdir, args)
    run, state, batches = build(config, workdir)
    bare, loop, before = [], [], []
    for _ in range(args.repeats):  # interleaved: the machine's load falls on all three
      bare.append(bare_period_ms(run, fresh_copy(state), batches[0], args.steps))
      loop.append(loop_period_ms(run, fresh_copy(state)))
      before.append(loop_period_ms(run, fresh_copy(state), before=True))
    parts = parts_ms(run, fresh_copy(state), batches)
  figures = dict(backbone=args.backbone, image_size=args.image_size,
                 batch_size=args.batch_size, steps=args.steps, log_every=args.log_every,
                 device=str(jax.devices()[0]), reference_step_ms=args.reference_step_ms)
  for name, runs in (('bare', bare), ('loop', loop), ('loop_before', before)):
    figures[f'{name}_wall_ms'] = statistics.median(wall for wall, _ in runs)
    figures[f'{name}_cpu_ms'] = statistics.median(cpu for _, cpu in runs)
    figures[f'{name}_runs_ms'] = runs
  figures['overhead_ms'] = figures['loop_cpu_ms'] - figures['bare_cpu_ms']
  figures['overhead_before_ms'] = figures['loop_before_cpu_ms'] - figures['bare_cpu_ms']
  figures['parts_ms'] = parts
  figures['parts_total_ms'] = sum(parts[name] for name in PARTS)
  figures['parts_before_total_ms'] = sum(parts[name] for name in BEFORE)
  figures['parts_multi_process_total_ms'] = figures['parts_total_ms'] + sum(
      parts[name] for name in MULTI_PROCESS)
  figures['overhead_share_of_reference'] = figures['overhead_ms'] / args.reference_step_ms
  share = lambda ms: f'{ms / args.reference_step_ms:6.1%}'
  print(f'training loop host overhead, {args.backbone} at {args.image_size} px, batch '
        f'{args.batch_size}, {args.steps} steps x {args.repeats} (median), on '
        f'{figures["device"]}; shares of a {args.reference_step_ms:g} ms H200 ResNet-50 '
        f'bf16 step (target < 2%: {0.02 * args.reference_step_ms:.2f} ms)')
  print(f'{"measure, per step":<36}{"host CPU ms":>12}{"wall ms":>10}{"share":>8}')
  for name, title in (('bare', 'bare jitted step'), ('loop', 'training loop'),
                      ('loop_before', 'training loop before')):
    print(f'{title:<36}{figures[f"{name}_cpu_ms"]:>12.3f}{figures[f"{name}_wall_ms"]:>10.3f}')
  for name, title in (('overhead_ms', 'loop overhead (host CPU)'),
                      ('overhead_before_ms', 'loop overhead before')):
    print(f'{title:<36}{figures[name]:>12.3f}{"":>10}{share(figures[name]):>8}')
  print(f'{"parts of the loop, each alone":<36}{"host ms":>12}')
  for name, value in parts.items():
    print(f'  {name:<34}{value:>12.3f}{"":>10}{share(value):>8}')
  for key, title in (('parts_total_ms', 'the loop now, one process'),
                     ('parts_multi_process_total_ms', 'the loop now, several processes'),
                     ('parts_before_total_ms', 'the loop before')):
    print(f'  {title:<34}{figures[key]:>12.3f}{"":>10}{share(figures[key]):>8}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(figures, f, indent=2)
  return figures


if __name__ == '__main__':
  main()
