"""Training side by side with the PyTorch baseline: same model, same recipe, same batches.

The claim "same model, same recipe as the PyTorch baseline", shown by a run. The parity
tests' PyTorch reference of the baseline's FashionResnet (`benchmarks/torch_reference.py`),
trained with the baseline's loss and `torch.optim.Adam`, and this project's jitted train
step (the default config with the baseline's integer-box pooling, float32) start from the
same weights: the torch model's, saved with `torch.save` and converted by
`convert_torch.with_torch_weights` (through `torch_io.load_into`). Both then train on the
same batches of this project's input pipeline over a synthetic DeepFashion folder: ours on
the pipeline batch as training runs it, torch on the uint8 images our on-device transform
makes of it, normalised the baseline's way, with the batch's targets. Batch norm trains on
both sides.

Two things are aligned so that both sides compute one function, and said so here:
- the baseline's category labels are 1-based: torch gets our label + 1, and images of the
  last category (which has no logit in the baseline; its loss would raise) are left out;
- the converted head drops the baseline's logit 0 (no category), which still counts in
  the baseline's softmax; before saving, torch's logit 0 gets weight 0 and bias
  `torch_io.common.NO_LOGIT_BIAS`, so that it counts for nothing on both sides (its
  gradient is then exactly 0 and Adam leaves it there). `--keep_category_logit_0` skips this,
  to measure what it changes.

Per step: both losses and their relative difference |jax - torch| / |torch|. At the end:
the largest relative difference over all parameter arrays, each array's being
||jax - torch||_2 / ||torch||_2 after converting the trained torch model into ours (the
same for the batch-norm statistics, apart), and both median step times (step 1, compiling,
left out; ours includes the on-device crop/resize/flip, torch's only the model's step).
`--noise_floor` puts in our place a second PyTorch model whose initial weights differ from
the first's by one float32 rounding: how far two float32 runs of one implementation drift
apart under this recipe, the yardstick for ours.

  python -m benchmarks.compare_baseline --steps 50 --image_size 96 [--backbone resnet18] \\
      [--batch_size 16] [--noise_floor] [--json OUT] [--out_dir benchmarks/out/compare_baseline]

Prints a table, draws the loss curves into OUT_DIR/losses_jax.png (losses_nudged_torch.png
with --noise_floor) and writes jax_loss, torch_loss, max_relative_loss_difference,
max_relative_parameter_difference, jax_step_s and torch_step_s (and more) as JSON.
"""

import argparse
import copy
import dataclasses
import json
import os
import statistics
import tempfile
import time
from typing import Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import train_step
from deepfashion_jax import convert_torch
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax.data import device_transforms
from deepfashion_jax.data import folder
from deepfashion_jax.data import pipeline
from deepfashion_jax.data import sources
from deepfashion_jax.torch_io import common as torch_io_common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # for --out_dir's default

CANVAS_SIZE = 300  # the pipeline's default canvas: the synthetic images' long side


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=50, help='training steps of each side')
  parser.add_argument('--image_size', type=int, default=96, help='crop side (= resize side)')
  parser.add_argument('--backbone', default='resnet18',
                      help='resnet18 | resnet34 | resnet50 (the torch reference has these)')
  parser.add_argument('--batch_size', type=int, default=16,
                      help='16: 50 steps of both sides in a few minutes on 2 cores')
  parser.add_argument('--synthetic_images', type=int, default=256)
  parser.add_argument('--keep_category_logit_0', action='store_true',
                      help="leave the baseline's unused logit 0 in torch's softmax")
  parser.add_argument('--noise_floor', action='store_true',
                      help='instead of ours, a second PyTorch model whose initial weights '
                      'differ by one float32 rounding')
  parser.add_argument('--json', default='', help='write the figures to this file')
  parser.add_argument('--out_dir', default=os.path.join(ROOT, 'benchmarks', 'out',
                                                        'compare_baseline'),
                      help='where the loss-curve figure goes')
  args = parser.parse_args(argv)
  args.dtype = 'float32'  # train_step.benchmark_config's field; the comparison is float32
  return args


def comparison_config(args, workdir: str):
  """train_step's baseline recipe (default config, baseline_max pooling, Adam 2e-4,
  reduce_sum, beta 0.001, crop = resize = image_size), on a synthetic folder."""
  config = train_step.benchmark_config(args)
  config.data.canvas_size = CANVAS_SIZE
  config.data.data_dir = ''
  config.data.synthetic_images = args.synthetic_images
  config.data.cache_dir = os.path.join(workdir, 'annotation_cache')
  return config


def training_batches(config, index):
  """The pipeline's training batches over the train split, less the last category's
  images (the baseline has no logit for it)."""
  rows = index.split_indices('train')
  rows = rows[index.category[rows] < index.num_categories - 1]
  dataset = pipeline.train_dataset(sources.FolderSource(index, rows),
                                   batch_size=config.batch_size, seed=config.seed,
                                   options=pipeline.image_options(config.data))
  return pipeline.iterate(dataset, threads=config.data.threads)


def save_torch_weights(model, path: str, keep_category_logit_0: bool):
  """torch.save of the model as a baseline checkpoint; logit 0 neutralised unless kept."""
  import torch  # pylint: disable=g-import-not-at-top
  if not keep_category_logit_0:
    with torch.no_grad():
      model.fc_cls.weight[0] = 0.0
      model.fc_cls.bias[0] = torch_io_common.NO_LOGIT_BIAS
  torch.save({'model': model.state_dict(), 'epoch': 0}, path)


def jax_training(config, index, weights_path: str):
  """(mesh, step_config, state, jitted train step), the state from the torch weights."""
  mesh = sharding.make_mesh()
  step_config, state = steps.create_train_state(config, mesh, index.attribute_facts())
  state = convert_torch.with_torch_weights(step_config, state, weights_path, mesh)
  train = steps.jit_steps(step_config, mesh).train
  return mesh, step_config, state, train


def torch_targets(batch: dict) -> dict:
  """The batch's targets as the baseline's training sees them (1-based categories)."""
  import torch  # pylint: disable=g-import-not-at-top
  return dict(positive=torch.from_numpy(batch['attribute_positive'].astype(np.float32)),
              category=torch.from_numpy(batch['category'].astype(np.int64) + 1),
              bbox=torch.from_numpy(batch['bbox']))


def torch_train_step(model, optimizer, images, targets: dict, beta: float):
  """One baseline training step; returns its loss."""
  optimizer.zero_grad()
  loss, _ = train_step.baseline_loss(model(images), targets['positive'],
                                     targets['category'], targets['bbox'], beta)
  loss.backward()
  optimizer.step()
  return loss.item()


@dataclasses.dataclass
class Side:
  """One side of the comparison: `step(inputs)` trains on one prepared batch and returns a
  function giving its loss (read after the timing); `state()` gives the side's current
  (parameters, batch-norm statistics) as nnx.States of our model."""
  name: str
  step: Callable[[dict], Callable[[], float]]
  state: Callable[[], tuple]


def jax_side(config, index, weights_path: str):
  """This project's side, from the torch weights; also the template (mesh, step config,
  a copy of the initial state: training donates the state) that torch weights convert into."""
  mesh, step_config, state, train = jax_training(config, index, weights_path)
  template = (mesh, step_config, jax.tree.map(jnp.copy, state))
  holder = {'state': state}

  def step(inputs):
    holder['state'], batch_metrics = train(holder['state'], inputs['device_batch'])
    jax.block_until_ready((holder['state'], batch_metrics))
    return lambda: float(batch_metrics.compute()['loss'])

  side = Side('jax', step, lambda: (holder['state'].params, holder['state'].batch_stats))
  return side, template


def converted_state(model, template, path: str) -> tuple:
  """A torch model's (parameters, batch-norm statistics) in our model, by convert_torch."""
  import torch  # pylint: disable=g-import-not-at-top
  mesh, step_config, state = template
  torch.save({'model': model.state_dict(), 'epoch': 0}, path)
  converted = convert_torch.with_torch_weights(step_config, state, path, mesh)
  return converted.params, converted.batch_stats


def torch_side(name: str, model, optimizer, beta: float, template, path: str) -> Side:
  """A PyTorch model trained with the baseline's loss and optimiser."""

  def step(inputs):
    loss = torch_train_step(model, optimizer, inputs['images'], inputs['targets'], beta)
    return lambda: loss

  return Side(name, step, lambda: converted_state(model, template, path))


def nudged_torch_side(model, config, template, path: str) -> Side:
  """The noise floor: a copy of the torch model with every initial weight scaled by
  (1 + 2^-23), one float32 rounding, trained the same way with its own Adam."""
  import torch  # pylint: disable=g-import-not-at-top
  twin = copy.deepcopy(model)
  with torch.no_grad():
    for parameter in twin.parameters():
      parameter.mul_(1.0 + 2.0 ** -23)
  optimizer = torch.optim.Adam(twin.parameters(), lr=config.learning_rate,
                               eps=config.adam_eps)
  return torch_side('nudged_torch', twin, optimizer, config.loss.beta, template, path)


def prepared_inputs(batch: dict, crop_size: int, mesh, images_of) -> dict:
  """One pipeline batch for both sides: ours on the device, torch's images and targets."""
  images = train_step.torch_inputs(np.array(images_of(batch, crop_size)))
  return dict(device_batch=sharding.global_batch(batch, mesh), images=images,
              targets=torch_targets(batch))


def train_side_by_side(steps_count: int, batches, prepare, sides) -> dict:
  """Each side trains on the same batches, one step each in turn (so that a slow spell of
  the machine hits both); per side, its losses and step times."""
  record = {f'{side.name}_{key}': [] for side in sides for key in ('loss', 'step_s_all')}
  for _ in range(steps_count):
    inputs = prepare(next(batches))
    for side in sides:
      start = time.perf_counter()
      loss = side.step(inputs)
      record[f'{side.name}_step_s_all'].append(time.perf_counter() - start)
      record[f'{side.name}_loss'].append(loss())
  return record


def flat_arrays(state) -> dict:
  """'backbone.layer1.0.conv1.kernel' -> NumPy array, for each variable of an nnx.State."""
  return {'.'.join(map(str, path)): np.asarray(variable[...])
          for path, variable in nnx.to_flat_state(state)}


def relative_differences(ours, theirs) -> dict:
  """name -> ||ours - theirs||_2 / ||theirs||_2 for each array of two like nnx.States."""
  ours, theirs = flat_arrays(ours), flat_arrays(theirs)
  return {name: float(np.linalg.norm((ours[name] - theirs[name]).ravel())
                      / max(np.linalg.norm(theirs[name].ravel()), 1e-30))
          for name in theirs}


def state_differences(other: tuple, reference: tuple) -> dict:
  """The largest relative difference of the parameters and of the batch-norm statistics
  between two (parameters, batch_stats), and the arrays where each is."""
  result = {}
  for kind, ours, theirs in zip(('parameter', 'batch_stat'), other, reference):
    differences = relative_differences(ours, theirs)
    worst = max(differences, key=differences.get)
    result[f'max_relative_{kind}_difference'] = differences[worst]
    result[f'max_relative_{kind}_difference_at'] = worst
  return result


def summarise(args, other: str, record: dict, differences: dict) -> dict:
  """The JSON's figures: the run's settings, per-step losses, differences, step times."""
  ours, theirs = np.array(record[f'{other}_loss']), np.array(record['torch_loss'])
  relative = np.abs(ours - theirs) / np.abs(theirs)
  timed_steps = slice(1, None) if args.steps > 1 else slice(None)  # step 1 compiles
  result = dict(backbone=args.backbone, batch_size=args.batch_size,
                image_size=args.image_size, steps=args.steps, dtype=args.dtype, other=other,
                keep_category_logit_0=args.keep_category_logit_0,
                device=str(jax.devices()[0].device_kind), cpu_count=os.cpu_count(),
                **record, relative_loss_difference=relative.tolist(),
                max_relative_loss_difference=float(relative.max()), **differences)
  for name in (other, 'torch'):
    result[f'{name}_step_s'] = statistics.median(record[f'{name}_step_s_all'][timed_steps])
  return result


def print_table(result: dict):
  other = result['other']
  print(f"training side by side, {result['backbone']}, batch {result['batch_size']}, "
        f"{result['image_size']} px, {result['dtype']}, {result['steps']} steps, "
        f"{result['device']}")
  print(f"{'step':>5}{other + ' loss':>19}{'torch loss':>14}{'rel. diff':>12}")
  for step, (ours, theirs, relative) in enumerate(zip(
      result[f'{other}_loss'], result['torch_loss'], result['relative_loss_difference']), 1):
    print(f'{step:>5}{ours:>19.6f}{theirs:>14.6f}{relative:>12.2e}')
  print(f"max relative loss difference:       {result['max_relative_loss_difference']:.2e}")
  for kind in ('parameter', 'batch_stat'):
    print(f"max relative {kind.replace('_', '-') + ' difference:':<23}"
          f"{result[f'max_relative_{kind}_difference']:.2e} "
          f"({result[f'max_relative_{kind}_difference_at']}; per array ||a - b|| / ||b||)")
  print(f"median step: {other} {result[f'{other}_step_s']:.3f} s, torch "
        f"{result['torch_step_s']:.3f} s (step 1 left out)")


def plot_losses(result: dict, path: str):
  """Both loss curves on one plot, and their relative difference below (log scale)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  other = result['other']
  steps_axis = np.arange(1, result['steps'] + 1)
  figure, (losses, relative) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                            gridspec_kw=dict(height_ratios=(2, 1)))
  losses.plot(steps_axis, result['torch_loss'], label='PyTorch baseline', linewidth=3,
              alpha=0.5)
  losses.plot(steps_axis, result[f'{other}_loss'],
              label={'jax': 'deepfashion-jax'}.get(other, other), linestyle='--')
  losses.set_yscale('log')
  losses.set_ylabel('training loss')
  losses.legend()
  losses.set_title(f"{result['backbone']}, batch {result['batch_size']}, "
                   f"{result['image_size']} px, float32, same weights and batches")
  relative.semilogy(steps_axis, np.maximum(result['relative_loss_difference'], 1e-9))
  relative.axhline(1e-3, color='grey', linestyle=':')  # the target
  relative.set_ylabel('relative difference\n(0 drawn at 1e-9)')
  relative.set_xlabel('step')
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


def compare(args, workdir: str) -> dict:
  """Writes the data and the initial weights into workdir, trains both sides, compares."""
  config = comparison_config(args, workdir)
  index = folder.load_index(config.data, workdir)
  model, optimizer = train_step.torch_training(args, config)
  weights_path = os.path.join(workdir, 'initial.pth')
  save_torch_weights(model, weights_path, args.keep_category_logit_0)
  ours, template = jax_side(config, index, weights_path)
  if args.noise_floor:
    ours = nudged_torch_side(model, config, template, os.path.join(workdir, 'nudged.pth'))
  reference = torch_side('torch', model, optimizer, config.loss.beta, template,
                         os.path.join(workdir, 'torch.pth'))
  images_of = jax.jit(device_transforms.batch_images, static_argnums=1)
  prepare = lambda batch: prepared_inputs(batch, config.data.crop_size, template[0],
                                          images_of)
  record = train_side_by_side(args.steps, training_batches(config, index), prepare,
                              (ours, reference))
  return summarise(args, ours.name, record, state_differences(ours.state(), reference.state()))


def main(argv=None):
  args = parse_args(argv)
  with tempfile.TemporaryDirectory() as workdir:
    result = compare(args, workdir)
  print_table(result)
  os.makedirs(args.out_dir, exist_ok=True)
  plot_losses(result, os.path.join(args.out_dir, f"losses_{result['other']}.png"))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
