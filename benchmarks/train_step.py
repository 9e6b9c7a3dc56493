"""One full training step of this project against a PyTorch step of the same model.

Both sides train the baseline's FashionResnet (ResNet backbone, box branch, the baseline's
integer-box max-pooled local features, category and attribute heads) on the same batch:
forward, the three losses (summed BCE, cross-entropy, beta-weighted L1), backward and an
Adam update. Ours is `steps.train_step` as training runs it, jitted with the state donated,
including the on-device crop/resize/flip of the uint8 canvas (here an identity resize: the
canvas is the image). The PyTorch side is the parity tests' reference model
(`benchmarks/torch_reference.py`) with the baseline's loss and `torch.optim.Adam`, on the same
number of threads. After warm-up the two steps alternate, N times each; the median counts.

  python -m benchmarks.train_step --backbone resnet18 --batch_size 32 --image_size 224 \\
      --steps 10 [--dtype float32] [--no_torch] [--json OUT]

Prints a table and writes jax_img_s and torch_img_s (and the step times) as JSON, with our
step's flops_per_step and bytes_accessed_per_step (XLA's cost analysis), tflops_per_sec
and, on a GPU whose peak deepfashion_jax/throughput.py lists, mfu.

`benchmarks/backbones.py` times the same step (`config_step`, of the default recipe) for
every backbone, beside their parameters and FLOPs, without the PyTorch side.
"""

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from configs import default
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax import throughput
from deepfashion_jax.data import annotations
from deepfashion_jax.data import vocabulary

NUM_ATTRIBUTES = 1000
NUM_CATEGORIES = 50


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--backbone', default='resnet18',
                      help='resnet18 | resnet34 | resnet50 | resnet101 | resnet152')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--steps', type=int, default=10, help='timed steps of each side')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps of each side')
  parser.add_argument('--dtype', default='float32', choices=sorted(steps.DTYPES))
  parser.add_argument('--no_torch', action='store_true',
                      help='time this project only (e.g. on a GPU: the torch here is a CPU build)')
  parser.add_argument('--json', default='', help='write the figures to this file')
  return parser.parse_args(argv)


def depth_of(backbone: str) -> int:
  if not backbone.startswith('resnet') or not backbone[6:].isdigit():
    raise SystemExit(f'--backbone must look like resnet18 or resnet50, got {backbone!r}')
  return int(backbone[6:])


def make_batch(batch_size: int, image_size: int, seed: int = 0) -> dict:
  """A training batch as the pipeline delivers it: uint8 images filling their canvas."""
  rng = np.random.default_rng(seed)
  x1y1 = rng.uniform(0.0, 0.4, (batch_size, 2))
  x2y2 = x1y1 + rng.uniform(0.3, 0.6, (batch_size, 2))
  categories = rng.integers(0, NUM_CATEGORIES, batch_size).astype(np.int32)
  return dict(
      canvas=rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8),
      window=np.tile(np.array([0, 0, image_size, image_size], np.int32), (batch_size, 1)),
      region=np.tile(np.array([0, 0, image_size, image_size], np.float32), (batch_size, 1)),
      flip=np.zeros(batch_size, bool),
      bbox=np.concatenate([x1y1, x2y2], 1).astype(np.float32),
      category=categories,
      category_type=np.asarray(vocabulary.CATEGORY_TYPES, np.int32)[categories],
      attribute_positive=rng.random((batch_size, NUM_ATTRIBUTES)) < 0.01,
      attribute_unknown=np.zeros((batch_size, NUM_ATTRIBUTES), bool),
      index=np.arange(batch_size, dtype=np.int32), valid=np.ones(batch_size, bool),
      box_valid=np.ones(batch_size, bool),
      skipped=np.zeros(batch_size, np.int32))


def training_config(backbone: str, batch_size: int, image_size: int, dtype: str):
  """The default recipe with `backbone`, at this batch, side (images that fill their canvas)
  and activation dtype."""
  config = default.get_config()
  config.model.backbone = backbone
  config.batch_size = batch_size
  config.data.img_size = config.data.crop_size = image_size
  config.data.canvas_size = image_size
  config.dtype = dtype
  return config


def benchmark_config(args):
  """The default (baseline) recipe with the reference model's box pooling."""
  # A ResNet: torch's side is one.
  config = training_config(f'resnet{depth_of(args.backbone)}', args.batch_size,
                           args.image_size, args.dtype)
  config.model.roi_pool = 'baseline_max'
  return config


def jax_step(args, batch):
  """A function that runs one training step of this project and waits for it."""
  return config_step(benchmark_config(args), batch)


def attribute_facts() -> annotations.AttributeFacts:
  """Made-up attribute facts for the step's metrics and pos_weight: what a dataset's would
  be, without one."""
  return annotations.AttributeFacts(types=np.arange(NUM_ATTRIBUTES) % 5,
                                    train_positives=np.ones(NUM_ATTRIBUTES, np.int64),
                                    train_images=2)


def config_step(config, batch):
  """A function that runs one training step of `config`'s model on `batch` (`make_batch`)
  and waits for it; its `flops` are the step's (XLA's count), its `holder` the state."""
  mesh = sharding.make_mesh()
  step_config, state = steps.create_train_state(config, mesh, attribute_facts())
  train_step = steps.jit_steps(step_config, mesh).train
  device_batch = sharding.global_batch(batch, mesh)
  holder = {'state': state}

  def run():
    holder['state'], batch_metrics = train_step(holder['state'], device_batch)
    jax.block_until_ready((holder['state'], batch_metrics))

  run.holder = holder  # the current state, for tests
  # Compiles the step (its first call reuses the executable) and counts its FLOPs and
  # bytes accessed.
  run.cost = throughput.train_step_cost(train_step, step_config, state, device_batch)
  run.flops = run.cost['flops']
  return run


def cost_figures(run) -> dict:
  """bytes_accessed_per_step of a `config_step` run where XLA counted them (the compiled
  step's, after fusion: the roofline projection's, benchmarks/projection.py)."""
  bytes_accessed = run.cost['bytes_accessed']
  return {} if bytes_accessed is None else dict(bytes_accessed_per_step=bytes_accessed)


def torch_inputs(images: np.ndarray):
  """uint8 (B, H, W, 3) images -> the baseline's input: NCHW float32, (x / 255 - 0.5) / 0.5."""
  import torch  # pylint: disable=g-import-not-at-top
  scaled = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
  return (scaled - 0.5) / 0.5


def baseline_loss(outputs, positive, category, bbox, beta: float):
  """The baseline's training loss of a torch forward pass, and its three parts: BCE summed
  over attributes (reduce_sum) and averaged over the batch, cross-entropy, beta * L1 box.

  outputs: the model's (category logits, attribute logits, box); category: the label
  the baseline's model is trained with (its 1-based category, see docs/baseline.md).
  """
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top
  category_logits, attribute_logits, box = outputs
  parts = dict(
      attribute_loss=F.binary_cross_entropy_with_logits(
          attribute_logits, positive, reduction='none').sum(1).mean(),
      category_loss=F.cross_entropy(category_logits, category),
      box_loss=(box - bbox).abs().mean())
  return parts['attribute_loss'] + parts['category_loss'] + beta * parts['box_loss'], parts


def torch_training(args, config):
  """(model, optimiser): the PyTorch reference, seeded, in training mode, with the
  baseline's Adam, on as many threads as this machine has cores."""
  import torch  # pylint: disable=g-import-not-at-top

  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  model = torch_reference.FashionResnet(depth_of(args.backbone),
                                        feature_size=-(-args.image_size // 32))
  model.train()
  optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate,
                               eps=config.adam_eps)
  return model, optimizer


def torch_step(args, batch):
  """A function that runs one step of the PyTorch reference (the baseline's training)."""
  import torch  # pylint: disable=g-import-not-at-top

  config = benchmark_config(args)
  model, optimizer = torch_training(args, config)
  images = torch_inputs(batch['canvas'])
  positive = torch.from_numpy(batch['attribute_positive'].astype(np.float32))
  category = torch.from_numpy(batch['category']).long()
  bbox = torch.from_numpy(batch['bbox'])

  def run():
    optimizer.zero_grad()
    loss, _ = baseline_loss(model(images), positive, category, bbox, config.loss.beta)
    loss.backward()
    optimizer.step()

  return run


def timed(run) -> float:
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


def measure(args) -> dict:
  batch = make_batch(args.batch_size, args.image_size)
  runners = {'jax': jax_step(args, batch)}
  if not args.no_torch:
    runners['torch'] = torch_step(args, batch)
  for run in runners.values():
    for _ in range(args.warmup):
      run()
  times = {name: [] for name in runners}
  for _ in range(args.steps):  # alternating, so that a slow spell of the machine hits both
    for name, run in runners.items():
      times[name].append(timed(run))
  result = dict(backbone=args.backbone, batch_size=args.batch_size,
                image_size=args.image_size, dtype=args.dtype, steps=args.steps,
                device=str(jax.devices()[0].device_kind), device_count=jax.device_count(),
                cpu_count=os.cpu_count())
  for name, values in times.items():
    median = statistics.median(values)
    result[f'{name}_step_s'] = median
    result[f'{name}_img_s'] = args.batch_size / median
    result[f'{name}_step_s_all'] = values
  # Ours: flops_per_step (XLA's count), tflops_per_sec at the median step and, on a device
  # whose peak deepfashion_jax/throughput.py lists, mfu.
  result.update(throughput.flops_figures(runners['jax'].flops, 1 / result['jax_step_s'],
                                         throughput.device_peak(args.dtype),
                                         jax.device_count()))
  result.update(cost_figures(runners['jax']))
  return result


def print_table(result: dict):
  print(f"train step, {result['backbone']}, batch {result['batch_size']}, "
        f"{result['image_size']} px, {result['dtype']}, median of {result['steps']}, "
        f"{result['device']} x {result['device_count']}")
  print(f"{'side':<8}{'s/step':>10}{'img/s':>10}")
  for name in ('jax', 'torch'):
    if f'{name}_img_s' in result:
      print(f"{name:<8}{result[f'{name}_step_s']:>10.3f}{result[f'{name}_img_s']:>10.1f}")
  if 'flops_per_step' in result:
    print(f"jax: {result['flops_per_step'] / 1e9:.1f} GFLOP/step, "
          f"{result['tflops_per_sec']:.2f} TFLOP/s"
          + (f", MFU {result['mfu']:.1%}" if 'mfu' in result else ''))
  if 'torch_img_s' in result:
    print(f"jax / torch: {result['jax_img_s'] / result['torch_img_s']:.2f}x")


def main(argv=None):
  args = parse_args(argv)
  result = measure(args)
  print_table(result)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
