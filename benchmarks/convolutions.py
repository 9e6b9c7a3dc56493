"""Every convolution of a ResNet backbone, this project's against PyTorch's, one by one.

Times, at the training step's shapes, each distinct backbone convolution's forward pass,
its input gradient and its weight gradient: ours as the step computes them (the model's
convolution with its custom gradient, jitted with the step's XLA options), PyTorch's with
`F.conv2d` and `aten.convolution_backward` (one gradient at a time), same threads, median
of N, the two sides alternating. The stem's input gradient is left out on both sides:
training never computes it. Totals count each convolution as often as the network has it.
This tells how much of the step's gap to PyTorch is convolution kernels, which this
project does not write, and how much is everything else. (Output maps of <= 4 pixels,
which the model computes as matrix products, are timed as convolutions here.)

  python -m benchmarks.convolutions --backbone resnet18 --batch_size 32 --image_size 224 \\
      [--steps 5] [--json OUT]
"""

import argparse
import collections
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.train_step import depth_of
from deepfashion_jax import sharding
from deepfashion_jax.models import resnet
from deepfashion_jax.models import xla_cpu

PARTS = ('forward', 'input_grad', 'weight_grad')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--backbone', default='resnet18')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--steps', type=int, default=5, help='timed runs of each part')
  parser.add_argument('--json', default='', help='write the figures to this file')
  return parser.parse_args(argv)


def backbone_convolutions(depth: int, image_size: int) -> collections.Counter:
  """(input size, in features, out features, kernel, stride) -> how many the backbone has."""
  if depth not in resnet.ARCHITECTURES:
    raise SystemExit(f'--backbone must be one of resnet{sorted(resnet.ARCHITECTURES)}')
  architecture = resnet.ARCHITECTURES[depth]
  expansion = 1 if architecture.block == 'basic' else 4
  convolutions = collections.Counter()
  convolutions[(image_size, 3, 64, 7, 2)] += 1
  size, features = -(-image_size // 4), 64  # after the stem's stride-2 convolution and pool
  for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512),
                                               architecture.blocks_per_stage)):
    for i in range(blocks):
      stride = 2 if stage > 0 and i == 0 else 1
      out_size = -(-size // stride)
      if architecture.block == 'basic':
        convolutions[(size, features, planes, 3, stride)] += 1
        convolutions[(out_size, planes, planes, 3, 1)] += 1
      else:
        convolutions[(size, features, planes, 1, 1)] += 1
        convolutions[(size, planes, planes, 3, stride)] += 1
        convolutions[(out_size, planes, planes * expansion, 1, 1)] += 1
      if stride != 1 or features != planes * expansion:
        convolutions[(size, features, planes * expansion, 1, stride)] += 1
      size, features = out_size, planes * expansion
  return convolutions


def jax_parts(shape, batch_size, compiler_options):
  """part -> a function that computes it for this convolution and waits for it."""
  size, in_features, out_features, kernel, stride = shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch_size, size, size, in_features)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, in_features, out_features)) * 0.05,
                  jnp.float32)
  pad = kernel // 2

  def conv(x, w):
    return xla_cpu.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  grad = jnp.ones(jax.eval_shape(conv, x, w).shape, jnp.float32)
  jit = lambda f: jax.jit(f, compiler_options=compiler_options)
  functions = {
      'forward': (jit(conv), (x, w)),
      'input_grad': (jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)), (x, w, grad)),
      'weight_grad': (jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)),
                      (x, w, grad)),
  }
  return {part: (lambda f=f, args=args: jax.block_until_ready(f(*args)))
          for part, (f, args) in functions.items()}


def torch_parts(shape, batch_size):
  import torch  # pylint: disable=g-import-not-at-top
  size, in_features, out_features, kernel, stride = shape
  torch.manual_seed(0)
  x = torch.randn(batch_size, in_features, size, size)
  w = torch.randn(out_features, in_features, kernel, kernel) * 0.05
  pad = kernel // 2
  grad = torch.ones_like(torch.nn.functional.conv2d(x, w, None, stride, pad))

  def backward(mask):
    return lambda: torch.ops.aten.convolution_backward(
        grad, x, w, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1, mask)

  return {'forward': lambda: torch.nn.functional.conv2d(x, w, None, stride, pad),
          'input_grad': backward([True, False, False]),
          'weight_grad': backward([False, True, False])}


def timed(run) -> float:
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


def measure(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  mesh = sharding.make_mesh()
  options = xla_cpu.compiler_options(mesh)
  rows = []
  with torch.no_grad():
    for shape, count in backbone_convolutions(depth_of(args.backbone), args.image_size).items():
      sides = {'jax': jax_parts(shape, args.batch_size, options),
               'torch': torch_parts(shape, args.batch_size)}
      row = dict(zip(('size', 'in_features', 'out_features', 'kernel', 'stride'), shape),
                 count=count)
      for part in PARTS:
        if part == 'input_grad' and shape[1] == 3:  # the stem: training has no use for it
          continue
        for run in (sides['jax'][part], sides['torch'][part]):
          run()  # compile, warm up
        times = {'jax': [], 'torch': []}
        for _ in range(args.steps):  # alternating
          for side in times:
            times[side].append(timed(sides[side][part]))
        for side, values in times.items():
          row[f'{side}_{part}_s'] = statistics.median(values)
      rows.append(row)
  totals = {f'{side}_{part}_s': sum(r.get(f'{side}_{part}_s', 0.0) * r['count'] for r in rows)
            for side in ('jax', 'torch') for part in PARTS}
  return dict(backbone=args.backbone, batch_size=args.batch_size, image_size=args.image_size,
              steps=args.steps, device=str(jax.devices()[0].device_kind),
              cpu_count=os.cpu_count(), convolutions=rows, totals=totals)


def print_table(result: dict):
  print(f"convolutions of {result['backbone']}, batch {result['batch_size']}, "
        f"{result['image_size']} px, float32, median of {result['steps']}, "
        f"{result['device']}; ms, ours / PyTorch")
  print(f"{'input':>6} {'in':>5} {'out':>5} {'k':>2} {'s':>2} {'n':>2}"
        + ''.join(f'{part:>20}' for part in PARTS))

  def cell(row, part):
    if f'jax_{part}_s' not in row:
      return f"{'-':>20}"
    return f"{row[f'jax_{part}_s'] * 1e3:>11.1f} /{row[f'torch_{part}_s'] * 1e3:>7.1f}"

  for row in result['convolutions']:
    print(f"{row['size']:>6} {row['in_features']:>5} {row['out_features']:>5} "
          f"{row['kernel']:>2} {row['stride']:>2} {row['count']:>2}"
          + ''.join(cell(row, part) for part in PARTS))
  totals = result['totals']
  print(f"{'total x n, s':<26}" + ''.join(
      f"{totals[f'jax_{part}_s']:>11.3f} /{totals[f'torch_{part}_s']:>7.3f}" for part in PARTS))
  jax_sum = sum(totals[f'jax_{part}_s'] for part in PARTS)
  torch_sum = sum(totals[f'torch_{part}_s'] for part in PARTS)
  print(f'all convolutions: ours {jax_sum:.3f} s, PyTorch {torch_sum:.3f} s '
        f'({torch_sum / jax_sum:.2f}x)')


def main(argv=None):
  args = parse_args(argv)
  result = measure(args)
  print_table(result)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
