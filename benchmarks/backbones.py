"""Every backbone of models/backbones.BACKBONES side by side: its size, its forward FLOPs
against the published figure, and how fast FashionNet trains on it.

For each backbone (all by default, those given with --backbones otherwise):
  parameters      millions, of the backbone alone and of the whole FashionNet (at 224 px);
  GFLOPs          the backbone's forward pass on one image of --flops_image_size (224) px,
                  XLA's cost analysis before compiling (`throughput.counted_flops`; on
                  the host's CPU where the devices cannot count), eval mode, in --dtype;
  published       the published forward figure at 224 px where there is one (PUBLISHED),
                  and measured / published;
  img/s           the real train step (`steps.create_train_state`, `steps.jit_steps`, as
                  benchmarks/train_step.py times it) of the default recipe with this backbone
                  on --batch_size images of --image_size px, median of --steps timed steps
                  after --warmup untimed ones;
and the seconds each part took (counting FLOPs; building the state and compiling the step).
Rows are printed as they are measured. A backbone that fails a part keeps its row: that
part's columns read '-', the error is printed under the row and kept in the JSON's
`errors`, and the exit status is 1.

  python -m benchmarks.backbones [--backbones resnet18,vgg16] [--image_size 64] \\
      [--batch_size 4] [--steps 3] [--dtype float32] [--skip_flops] [--skip_step] [--json OUT]
"""

import argparse
import json
import os
import statistics
import time
import traceback

from flax import nnx
import jax
import jax.numpy as jnp

from benchmarks import train_step
from deepfashion_jax import errors
from deepfashion_jax import steps
from deepfashion_jax import throughput
from deepfashion_jax.models import backbones

# Published forward FLOPs of the whole classifier at 224 px, in GFLOPs, as 2 x the
# multiply-adds that the sources below call "FLOPs" or "GFLOPS" (fvcore's convention, one
# multiply-add each). The classifier's head is included there and not in our backbone:
# ResNet's fc is 0.5 M multiply-adds (negligible), VGG-16's three fc layers 0.12 G (0.8%).
PUBLISHED_GFLOPS = {
    # torchvision's model docs, the GFLOPS column of the classification table (the weights'
    # `_ops` metadata, e.g. ResNet18_Weights.IMAGENET1K_V1.meta['_ops'] == 1.814).
    'resnet18': 2 * 1.814,
    'resnet34': 2 * 3.664,
    'resnet50': 2 * 4.089,
    'resnet101': 2 * 7.801,
    'resnet152': 2 * 11.514,
    'vgg16': 2 * 15.47,
    'vgg16_bn': 2 * 15.47,
    # Liu et al., "A ConvNet for the 2020s" (CVPR 2022, arXiv:2201.03545), Table 1: ConvNeXt-T
    # 4.5 G, -S 8.7 G, -B 15.4 G at 224 px (torchvision's docs: 4.456, 8.684, 15.355).
    'convnext_tiny': 2 * 4.5,
    'convnext_small': 2 * 8.7,
    'convnext_base': 2 * 15.4,
    # Touvron et al., "Training data-efficient image transformers" (DeiT, ICML 2021,
    # arXiv:2012.12877), ViT-S/16 as DeiT-S 4.6 G, ViT-B/16 as DeiT-B 17.6 G (also the
    # ConvNeXt paper's Table 1; torchvision's docs give ViT-B/16 17.564).
    'vit_s16': 2 * 4.6,
    'vit_b16': 2 * 17.6,
}
PUBLISHED_SIZE = 224  # the side the published figures are at


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--backbones', default='',
                      help='comma-separated names of models/backbones.BACKBONES; all by default')
  parser.add_argument('--image_size', type=int, default=64, help="the train step's side")
  parser.add_argument('--batch_size', type=int, default=4, help="the train step's batch")
  parser.add_argument('--steps', type=int, default=3, help='timed train steps')
  parser.add_argument('--warmup', type=int, default=1, help='untimed train steps')
  parser.add_argument('--flops_image_size', type=int, default=PUBLISHED_SIZE,
                      help="the forward pass's side for counting FLOPs (batch 1)")
  parser.add_argument('--dtype', default='float32', choices=sorted(steps.DTYPES))
  parser.add_argument('--skip_flops', action='store_true', help='count no FLOPs')
  parser.add_argument('--skip_step', action='store_true', help='time no train step')
  parser.add_argument('--json', default='', help='write the figures to this file')
  return parser.parse_args(argv)


def chosen_backbones(value: str) -> list:
  """--backbones as a list of names, each checked against BACKBONES; all when empty."""
  names = [name.strip() for name in value.split(',') if name.strip()]
  names = names or list(backbones.BACKBONES)
  for name in names:
    backbones.check_name(name, field='--backbones')
  return names


def parameter_count(module: nnx.Module) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


def abstract_backbone(name: str, image_size: int, dtype: str) -> nnx.Module:
  """The backbone's module for inputs of `image_size`, with shapes only: nothing is
  initialised. A sized backbone (`Backbone.sized`: a ViT, whose position embeddings are
  one per patch) is built for that side, as FashionNet builds it for its crop."""
  sized = getattr(backbones.BACKBONES[name], 'sized', False)
  side = dict(image_size=image_size) if sized else {}
  return nnx.eval_shape(lambda: backbones.create(name, dtype=steps.DTYPES[dtype],
                                                 rngs=nnx.Rngs(0), **side))


def parameters(name: str, dtype: str) -> dict:
  """Parameter counts of the backbone and of FashionNet on it (224 px, the default recipe)."""
  config = train_step.training_config(name, 1, PUBLISHED_SIZE, dtype)
  model = nnx.eval_shape(lambda: steps.create_model(config, nnx.Rngs(0)))
  return dict(backbone_params=parameter_count(abstract_backbone(name, PUBLISHED_SIZE, dtype)),
              fashion_net_params=parameter_count(model))


def forward_flops(name: str, image_size: int, dtype: str) -> dict:
  """XLA's FLOPs of the backbone's forward pass (eval mode) on one image of `image_size`."""
  start = time.perf_counter()
  model = abstract_backbone(name, image_size, dtype)
  model.eval()
  graphdef, state = nnx.split(model)

  def forward(state, images):
    return nnx.merge(graphdef, state)(images)

  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  flops = throughput.counted_flops(forward, state, images)
  if flops is None:
    raise RuntimeError("XLA's cost analysis gave no FLOPs")
  figures = dict(gflops=flops / 1e9, flops_s=time.perf_counter() - start)
  published = PUBLISHED_GFLOPS.get(name) if image_size == PUBLISHED_SIZE else None
  if published:
    figures.update(published_gflops=published, flops_ratio=figures['gflops'] / published)
  return figures


def train_step_speed(name: str, args) -> dict:
  """Images/s of the default recipe's train step on this backbone (median of args.steps)."""
  config = train_step.training_config(name, args.batch_size, args.image_size, args.dtype)
  batch = train_step.make_batch(args.batch_size, args.image_size)
  start = time.perf_counter()
  run = train_step.config_step(config, batch)  # builds the state, compiles the step
  figures = dict(compile_s=time.perf_counter() - start)
  for _ in range(args.warmup):
    run()
  times = [train_step.timed(run) for _ in range(args.steps)]
  median = statistics.median(times)
  figures.update(step_s=median, img_s=args.batch_size / median, step_s_all=times)
  # The step's FLOPs (XLA's count), the TFLOP/s they make and, on a device whose peak
  # deepfashion_jax/throughput.py lists, MFU.
  figures.update(throughput.flops_figures(run.flops, 1 / median,
                                          throughput.device_peak(args.dtype),
                                          jax.device_count()))
  figures.update(train_step.cost_figures(run))  # bytes accessed, for the projection
  return figures


def error_text(part: str, error: Exception) -> str:
  """'part: Type: first line of the message (at file:line)'."""
  where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
  first_line = (str(error).splitlines() or [''])[0]
  at = f' (at {os.path.basename(where.filename)}:{where.lineno})' if where else ''
  return f'{part}: {type(error).__name__}: {first_line}{at}'


def measure_backbone(name: str, args) -> dict:
  """One row: every part measured that can be; a part that fails leaves its error."""
  row = dict(name=name, title=backbones.BACKBONES[name].title, errors=[])
  parts = [('parameters', lambda: parameters(name, args.dtype))]
  if not args.skip_flops:
    parts.append(('flops', lambda: forward_flops(name, args.flops_image_size, args.dtype)))
  if not args.skip_step:
    parts.append(('train step', lambda: train_step_speed(name, args)))
  for part, measure_part in parts:
    try:
      row.update(measure_part())
    except Exception as error:  # pylint: disable=broad-except
      row['errors'].append(error_text(part, error))
  return row


def settings(args) -> dict:
  """What every row was measured with, and on what."""
  return dict(image_size=args.image_size, batch_size=args.batch_size, steps=args.steps,
              warmup=args.warmup, flops_image_size=args.flops_image_size, dtype=args.dtype,
              device=str(jax.devices()[0].device_kind), device_count=jax.device_count(),
              cpu_count=os.cpu_count())


def columns(names: list) -> tuple:
  """The table's columns, (header, key, width, format[, scale]); the first two as wide as
  the names and titles."""
  name_width = max(len(name) for name in names + ['name']) + 2
  title_width = max(len(backbones.BACKBONES[name].title) for name in names) + 2
  return (
      ('name', 'name', name_width, '{}'), ('title', 'title', title_width, '{}'),
      ('backbone M', 'backbone_params', 11, '{:.2f}', 1e-6),
      ('FashionNet M', 'fashion_net_params', 13, '{:.2f}', 1e-6),
      ('GFLOPs', 'gflops', 9, '{:.2f}'), ('published', 'published_gflops', 10, '{:.2f}'),
      ('ratio', 'flops_ratio', 7, '{:.3f}'), ('img/s', 'img_s', 9, '{:.1f}'),
      ('count s', 'flops_s', 8, '{:.1f}'), ('compile s', 'compile_s', 10, '{:.1f}'),
  )


LEFT_ALIGNED = ('name', 'title')


def _aligned(text: str, key: str, width: int) -> str:
  return f'{text:<{width}}' if key in LEFT_ALIGNED else f'{text:>{width}}'


def print_header(result: dict, table: tuple):
  print(f"backbones: parameters in millions at 224 px; GFLOPs of one forward pass at "
        f"{result['flops_image_size']} px (published ones at {PUBLISHED_SIZE}); img/s of the "
        f"train step at {result['image_size']} px, batch {result['batch_size']}, "
        f"{result['dtype']}, median of {result['steps']}; seconds to count the FLOPs and to "
        f"build and compile the step; {result['device']} x {result['device_count']}")
  print(''.join(_aligned(header, key, width) for header, key, width, *_ in table))


def print_row(row: dict, table: tuple):
  cells = []
  for _, key, width, fmt, *scale in table:
    value = row.get(key)
    text = '-' if value is None else fmt.format(value * scale[0] if scale else value)
    cells.append(_aligned(text, key, width))
  print(''.join(cells), flush=True)
  for error in row['errors']:
    print(f"  {row['name']} failed: {error}", flush=True)


def main(argv=None) -> int:
  """Prints each row as it is measured (a full-size one can take minutes); 1 when a
  backbone failed a part."""
  args = parse_args(argv)
  try:
    names = chosen_backbones(args.backbones)
  except errors.ConfigError as error:
    raise SystemExit(str(error)) from None
  result, table = settings(args), columns(names)
  print_header(result, table)
  result['rows'] = []
  for name in names:
    result['rows'].append(measure_backbone(name, args))
    print_row(result['rows'][-1], table)
    if args.json:  # after every row: a run cut short keeps the rows it measured
      with open(args.json, 'w') as f:
        json.dump(result, f, indent=1)
  return 1 if any(row['errors'] for row in result['rows']) else 0


if __name__ == '__main__':
  raise SystemExit(main())
