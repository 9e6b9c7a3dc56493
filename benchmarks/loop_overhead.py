"""The training loop's host overhead per step, against the bare jitted step.

Both sides run the same jitted train step of a model small enough that its device time
is negligible (ViT-test at 32 px, batch 8, by default), so that what is left is the host's
work per step:
  bare      `state, metrics = train(state, batch)` in a tight loop, the batch already on
            the device: dispatch alone (the device runs behind, asynchronously)
  loop      `train._train_loop` as training runs it, per step: the next batch from an
            iterator of ready batches (the pipeline's prefetch buffer), its skipped count,
            the stop mark, device_put onto the mesh, the step's dispatch, the profiler
            window, the progress report, the metrics read LAG steps late and merged on the
            host, the log (every `--log_every` steps) and the stop check
Each is timed per step in the main thread's CPU time (the host's work: what would delay
the next dispatch on a GPU) and in wall time (on CPU the device is these same cores, so
the wall time includes the device's work, which the loop waits for LAG steps late). The
difference in CPU time is the loop's overhead (on CPU it also holds device work the main
thread does while it waits for a step's metrics), so the loop's own parts are timed alone
too, on a finished step: fetching and marking a batch, its device_put, copying a step's
metrics to the host and merging them. Both are printed beside 2% of a ResNet-50 bfloat16
step on an H200 (`--reference_step_ms`, 40 ms at batch 256 by default: 256 images /
(2,470 img/s x 2.5), the A100 anchor scaled to an H200), to read as a share of a GPU step.
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


def loop_period_ms(run, state) -> tuple:
  """Median (wall, CPU) ms per step of `train._train_loop`, evaluation and checkpoints
  stubbed."""
  stamps = []
  run = dataclasses.replace(run, steps=dataclasses.replace(
      run.steps, train=timed(run.steps.train, stamps)))
  with contextlib.ExitStack() as stack:
    stack.enter_context(mock.patch.object(train, '_evaluate_and_report',
                                          lambda *args: {}))
    stack.enter_context(mock.patch.object(checkpoints, 'save', lambda *args, **kwargs: None))
    run.stop = stack.enter_context(train._StopSignals())  # pylint: disable=protected-access
    train._train_loop(run, state)  # pylint: disable=protected-access
  return median_periods_ms(stamps)


def bare_period_ms(run, state, batch, count: int) -> tuple:
  """Median (wall, CPU) ms per step of the jitted step alone, on one batch already on the
  device."""
  stop = train._StopSignals(processes=1)  # pylint: disable=protected-access
  batch = sharding.global_batch(stop.mark(batch), run.mesh)
  stamps = []
  for _ in range(count):
    stamps.append(stamp())
    state, metrics = run.steps.train(state, batch)
  jax.block_until_ready(metrics)
  return median_periods_ms(stamps)


def parts_ms(run, state, batches, count: int = 50) -> dict:
  """Median host ms of each of the loop's own parts per step, timed alone on a finished
  step (nothing waits for the device): what the loop adds to the step's dispatch."""
  stop = train._StopSignals(processes=1)  # pylint: disable=protected-access
  ready = ReadyBatches(batches)
  batch = sharding.global_batch(stop.mark(batches[0]), run.mesh)
  state, metrics = run.steps.train(state, batch)
  jax.block_until_ready(metrics)
  host_metrics = sharding.local_copy(metrics)
  parts = dict(
      fetch_and_mark=lambda: stop.mark(next(ready))['skipped'].sum(),
      device_put=lambda: sharding.global_batch(stop.mark(batches[0]), run.mesh),
      metrics_copy=lambda: sharding.local_copy(metrics),
      metrics_merge=lambda: host_metrics.merge(host_metrics))
  times = {}
  for name, part in parts.items():
    samples = []
    for _ in range(count):
      start = time.perf_counter()
      part()
      samples.append(time.perf_counter() - start)
    times[name] = 1e3 * statistics.median(samples)
  return times


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
  parser.add_argument('--reference_step_ms', type=float, default=40.0,
                      help='a ResNet-50 bf16 step on an H200 at batch 256 (for the share)')
  parser.add_argument('--json', default='')
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory() as workdir:
    config = tiny_config(workdir, args)
    run, state, batches = build(config, workdir)
    bare, loop = [], []
    for _ in range(args.repeats):
      bare.append(bare_period_ms(run, fresh_copy(state), batches[0], args.steps))
      loop.append(loop_period_ms(run, fresh_copy(state)))
    parts = parts_ms(run, fresh_copy(state), batches)
  figures = dict(backbone=args.backbone, image_size=args.image_size,
                 batch_size=args.batch_size, steps=args.steps, log_every=args.log_every,
                 device=str(jax.devices()[0]), reference_step_ms=args.reference_step_ms)
  for name, runs in (('bare', bare), ('loop', loop)):
    figures[f'{name}_wall_ms'] = statistics.median(wall for wall, _ in runs)
    figures[f'{name}_cpu_ms'] = statistics.median(cpu for _, cpu in runs)
    figures[f'{name}_runs_ms'] = runs
  figures['overhead_ms'] = figures['loop_cpu_ms'] - figures['bare_cpu_ms']
  figures['parts_ms'] = parts
  figures['parts_total_ms'] = sum(parts.values())
  figures['overhead_share_of_reference'] = figures['overhead_ms'] / args.reference_step_ms
  print(f'training loop host overhead, {args.backbone} at {args.image_size} px, batch '
        f'{args.batch_size}, {args.steps} steps x {args.repeats} (median), on '
        f'{figures["device"]}')
  print(f'{"measure, per step":<34}{"host CPU ms":>12}{"wall ms":>10}')
  for name, title in (('bare', 'bare jitted step'), ('loop', 'training loop')):
    print(f'{title:<34}{figures[f"{name}_cpu_ms"]:>12.3f}{figures[f"{name}_wall_ms"]:>10.3f}')
  print(f'{"loop overhead (host CPU)":<34}{figures["overhead_ms"]:>12.3f}   '
        f'{figures["overhead_share_of_reference"]:.1%} of a {args.reference_step_ms:g} ms '
        f'H200 ResNet-50 bf16 step (target < 2%: {0.02 * args.reference_step_ms:.2f} ms)')
  print(f'{"parts of the loop, each alone":<34}{"host ms":>12}')
  for name, value in parts.items():
    print(f'  {name:<32}{value:>12.3f}')
  print(f'  {"total":<32}{figures["parts_total_ms"]:>12.3f}   '
        f'{figures["parts_total_ms"] / args.reference_step_ms:.1%} of the H200 step')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(figures, f, indent=2)
  return figures


if __name__ == '__main__':
  main()
