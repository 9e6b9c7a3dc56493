"""Training throughput end to end: the real input pipeline feeding the jitted step.

Trains a config for N steps on a synthetic DeepFashion folder (written first, in the real
on-disk format, and decoded by the real pipeline), logging every --log_every steps, and
reports the training images per second of every log interval after the first (which
includes compiling the step); evaluation and checkpoints are left out of the figure.

  python benchmarks/end_to_end.py --config configs/resnet50_bf16.py --steps 300 \
      [--batch_size 256] [--image_size 224] [--synthetic_images 4096] [--json OUT]
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top

from deepfashion_jax import train  # pylint: disable=g-import-not-at-top


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'resnet50_bf16.py'))
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--log_every', type=int, default=50)
  parser.add_argument('--batch_size', type=int, default=0, help="0: the config's")
  parser.add_argument('--image_size', type=int, default=0,
                      help="0: the config's; else the crop side (and the resize side)")
  parser.add_argument('--synthetic_images', type=int, default=4096)
  parser.add_argument('--threads', type=int, default=0, help="decoding threads; 0: config's")
  parser.add_argument('--processes', type=int, default=-1,
                      help="grain worker processes; -1: the config's")
  parser.add_argument('--workdir', default='', help='default: a temporary folder')
  parser.add_argument('--json', default='')
  return parser.parse_args(argv)


def load_config(path: str):
  spec = importlib.util.spec_from_file_location('benchmark_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def benchmark_config(args):
  """The config, trained for --steps with one evaluation and one checkpoint at the end."""
  config = load_config(args.config)
  config.num_train_steps = args.steps
  config.log_every_steps = args.log_every
  config.eval_every_steps = args.steps  # once, at the end
  config.checkpoint_every_steps = args.steps
  config.warmup_steps = min(config.warmup_steps, args.steps // 2)
  config.data.data_dir = ''
  config.data.synthetic_images = args.synthetic_images
  config.num_box_images = 0
  if args.batch_size:
    config.batch_size = args.batch_size
    config.eval.batch_size = args.batch_size
  if args.image_size:
    config.data.crop_size = args.image_size
    config.data.img_size = args.image_size + args.image_size // 7  # the baseline's 256/224
  if args.threads:
    config.data.threads = args.threads
  if args.processes >= 0:
    config.data.processes = args.processes
  return config


def main(argv=None):
  args = parse_args(argv)
  config = benchmark_config(args)
  with tempfile.TemporaryDirectory() as scratch:
    workdir = args.workdir or scratch
    start = time.perf_counter()
    results = train.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
  result = dict(config=os.path.relpath(args.config, ROOT), steps=args.steps,
                batch_size=config.batch_size, image_size=config.data.crop_size,
                dtype=config.dtype, backbone=config.model.backbone,
                device=str(jax.devices()[0].device_kind), device_count=jax.device_count(),
                end_to_end_img_s=results.get('train_images_per_sec'), wall_s=wall)
  print(f"end to end, {result['config']}, ResNet-{result['backbone']}, batch "
        f"{result['batch_size']}, {result['image_size']} px, {result['dtype']}, "
        f"{result['steps']} steps, {result['device']} x {result['device_count']}")
  figure = result['end_to_end_img_s']
  print(f"training images/s (after the first log interval): "
        f"{'n/a' if figure is None else f'{figure:.1f}'}; whole run {wall:.0f} s")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
