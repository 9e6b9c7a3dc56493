"""Training throughput end to end: the real input pipeline feeding the jitted step.

Writes a synthetic DeepFashion folder (the real on-disk format), then trains the config's
model on it the way training does (grain pipeline with the config's threads and worker
processes -> global batch -> jitted, donated train step), without the training loop's
logging, evaluation and checkpoints, which are not throughput and whose TensorBoard
writer needs TensorFlow (not on every GPU machine). The first --warmup steps (compiling
included) are not timed; the figure is training images per second over the rest, the
input pipeline and the host-to-device copies included. The JSON adds the train step's
flops_per_step (XLA's cost analysis), the tflops_per_sec they make at that rate and, on a
GPU whose peak deepfashion_jax/throughput.py lists, mfu.

  python -m benchmarks.end_to_end --config configs/resnet50_bf16.py --steps 300 \\
      [--batch_size 256] [--image_size 224] [--synthetic_images 4096] [--json OUT]
"""

import argparse
import importlib.util
import json
import os
import tempfile
import time

import jax

from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax import throughput
from deepfashion_jax.data import folder
from deepfashion_jax.data import pipeline
from deepfashion_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # for the default config


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'resnet50_bf16.py'))
  parser.add_argument('--steps', type=int, default=300, help='steps in all')
  parser.add_argument('--warmup', type=int, default=20, help='first steps, not timed')
  parser.add_argument('--batch_size', type=int, default=0, help="0: the config's")
  parser.add_argument('--image_size', type=int, default=0,
                      help="0: the config's; else the crop side (and the resize side)")
  parser.add_argument('--synthetic_images', type=int, default=4096)
  parser.add_argument('--threads', type=int, default=0, help="decoding threads; 0: config's")
  parser.add_argument('--processes', type=int, default=-1,
                      help="grain worker processes; -1: the config's")
  parser.add_argument('--workdir', default='', help='for the synthetic folder; default: a '
                      'temporary folder')
  parser.add_argument('--json', default='')
  return parser.parse_args(argv)


def load_config(path: str):
  spec = importlib.util.spec_from_file_location('benchmark_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def benchmark_config(args):
  """The config, on a synthetic folder, at the given batch, size and data workers."""
  config = load_config(args.config)
  config.num_train_steps = args.steps
  config.warmup_steps = min(config.warmup_steps, args.steps // 2)  # the schedule's shape only
  config.data.data_dir = ''
  config.data.synthetic_images = args.synthetic_images
  if args.batch_size:
    config.batch_size = args.batch_size
  if args.image_size:
    config.data.crop_size = args.image_size
    config.data.img_size = args.image_size + args.image_size // 7  # the baseline's 256/224
  if args.threads:
    config.data.threads = args.threads
  if args.processes >= 0:
    config.data.processes = args.processes
  return config


def train_rate(config, workdir: str, steps_total: int, warmup: int) -> tuple:
  """(training images per second after `warmup` steps, pipeline included; the train
  step's FLOPs, or None when XLA counts none)."""
  index = folder.load_index(config.data, workdir)
  mesh = sharding.make_mesh()
  step_config, state = steps.create_train_state(config, mesh, index.attribute_facts())
  train_step = steps.jit_steps(step_config, mesh).train
  dataset = pipeline.train_dataset(
      sources.FolderSource(index, index.split_indices('train')),
      batch_size=pipeline.per_process_batch_size(config.batch_size, jax.process_count()),
      seed=config.seed, options=pipeline.image_options(config.data))
  iterator = pipeline.iterate(dataset, threads=config.data.threads,
                              processes=config.data.processes)
  start, flops = None, None
  for step in range(steps_total):
    if step == warmup:
      jax.block_until_ready(state)
      start = time.perf_counter()
    batch = sharding.global_batch(next(iterator), mesh)
    if step == 0:  # compiles the step as its first call would, and counts its FLOPs
      flops = throughput.train_step_flops(train_step, step_config, state, batch)
    state, batch_metrics = train_step(state, batch)
  jax.block_until_ready((state, batch_metrics))
  return (steps_total - warmup) * config.batch_size / (time.perf_counter() - start), flops


def main(argv=None):
  args = parse_args(argv)
  if not 0 < args.warmup < args.steps:
    raise SystemExit(f'--warmup={args.warmup} must be between 0 and --steps={args.steps}')
  config = benchmark_config(args)
  with tempfile.TemporaryDirectory() as scratch:
    workdir = args.workdir or scratch
    config.data.cache_dir = os.path.join(workdir, 'annotation_cache')
    start = time.perf_counter()
    figure, flops = train_rate(config, workdir, args.steps, args.warmup)
    wall = time.perf_counter() - start
  result = dict(config=os.path.relpath(args.config, ROOT), steps=args.steps,
                warmup=args.warmup, batch_size=config.batch_size,
                image_size=config.data.crop_size, dtype=config.dtype,
                backbone=config.model.backbone, data_threads=config.data.threads,
                data_processes=config.data.processes,
                device=str(jax.devices()[0].device_kind), device_count=jax.device_count(),
                end_to_end_img_s=figure, wall_s=wall)
  # flops_per_step, tflops_per_sec at the end-to-end rate and, where the peak is known, mfu
  result.update(throughput.flops_figures(flops, figure / config.batch_size,
                                         throughput.device_peak(config.dtype),
                                         jax.device_count()))
  print(f"end to end, {result['config']}, {result['backbone']}, batch "
        f"{result['batch_size']}, {result['image_size']} px, {result['dtype']}, "
        f"{result['device']} x {result['device_count']}")
  print(f"training images/s over steps {args.warmup + 1}-{args.steps}: {figure:.1f} "
        f"(whole run, data writing and compiling included: {wall:.0f} s)")
  if 'flops_per_step' in result:
    print(f"{result['flops_per_step'] / 1e9:.1f} GFLOP/step, "
          f"{result['tflops_per_sec']:.2f} TFLOP/s"
          + (f", MFU {result['mfu']:.1%}" if 'mfu' in result else ''))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
