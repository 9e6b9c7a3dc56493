"""Do landmarks learn? Trains the same model three ways on one synthetic folder and prints
their held-out figures side by side with a constant predictor's landmark error.

  python -m benchmarks.landmarks [--steps 1500] [--image_size 64] [--batch_size 32]
      [--synthetic_images 1200] [--backbone resnet18] [--variants none,heatmaps,attention]
      [--workdir DIR] [--json OUT]

Each variant (config.model.landmarks) trains from the same initial weights (the landmark
parts are made last) with the default config's losses, then is evaluated on the val split
by the training loop's own evaluation. The constant predictor answers, for every image,
each slot's mean position over the val split's visible landmarks: the best constant for
the squared distance, and a bar at least as high as the training split's mean would set.
Its error goes through the same metric code (`metrics.landmark_values`).
"""

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from deepfashion_jax import data
from deepfashion_jax import metrics
from deepfashion_jax import train
from deepfashion_jax.data import synthetic

COLUMNS = ('category_top1', 'category_top3', 'attr_recall_top3', 'attr_recall_top5',
           'landmark_error', 'landmark_detection_rate')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=1500)
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--synthetic_images', type=int, default=1200)
  parser.add_argument('--backbone', default='resnet18')
  parser.add_argument('--variants', default='none,heatmaps,attention')
  parser.add_argument('--learning_rate', type=float, default=2e-4)
  parser.add_argument('--workdir', default='', help='default: a temporary folder')
  parser.add_argument('--json', default='')
  return parser.parse_args(argv)


def variant_config(args, landmarks: str, data_root: str):
  config = default.get_config()
  config.data.data_dir = data_root
  config.data.crop_size = args.image_size
  config.data.img_size = args.image_size + args.image_size // 8
  config.data.threads = 2
  config.model.backbone = args.backbone
  config.model.landmarks = landmarks
  # Liu & Lu's 16 px at 224, scaled to the input: the peaks' width relative to the garment
  config.loss.landmark_radius = 16.0 * args.image_size / 224
  config.learning_rate = args.learning_rate
  config.batch_size = config.eval.batch_size = args.batch_size
  config.num_train_steps = args.steps
  config.log_every_steps = 50
  config.eval_every_steps = config.checkpoint_every_steps = args.steps // 50 * 50 or 50
  config.keep_checkpoints = 1
  config.num_box_images = 0
  return config


def constant_at_the_mean(config, workdir: str) -> dict:
  """The landmark metrics of answering each slot's mean visible position on the split."""
  batches = list(data.create_eval_data(config, workdir).eval_batches)
  total = np.zeros((len(batches[0]['landmarks'][0]), 2))
  count = np.zeros(total.shape[0])
  for batch in batches:
    seen = batch['landmark_visible'] & batch['valid'][:, None]
    total += (batch['landmarks'] * seen[..., None]).sum(axis=0)
    count += seen.sum(axis=0)
  mean = (total / np.maximum(count, 1)[:, None]).astype(np.float32)
  merged = None
  for batch in batches:
    constant = jnp.broadcast_to(mean, batch['landmarks'].shape)
    values = metrics.landmark_values(constant, jax.tree.map(jnp.asarray, batch))
    one = metrics.collection_class(tuple(values)).single_from_model_output(**values)
    merged = one if merged is None else merged.merge(one)
  return {name: float(value) for name, value in merged.compute().items()}


def main(argv=None):
  args = parse_args(argv)
  variants = args.variants.split(',')
  rows = {}
  with tempfile.TemporaryDirectory() as scratch:
    root = args.workdir or scratch
    data_root = os.path.join(root, 'synthetic_deepfashion')
    if not os.path.isdir(data_root):
      synthetic.write_synthetic_deepfashion(data_root, args.synthetic_images, seed=0)
    for landmarks in variants:
      config = variant_config(args, landmarks, data_root)
      workdir = os.path.join(root, landmarks)
      start = time.perf_counter()
      rows[landmarks] = dict(train.train_and_evaluate(config, workdir),
                             wall_s=time.perf_counter() - start)
    rows['constant at the mean'] = constant_at_the_mean(config, workdir)
  print(f'{args.backbone}, {args.image_size} px, {args.steps} steps of {args.batch_size}, '
        f'{args.synthetic_images} synthetic images, val split:')
  print(f"{'landmarks':<22}" + ''.join(f'{c:>24}' for c in COLUMNS))
  for name, row in rows.items():
    cells = [f"{row[c]:>24.4f}" if c in row else f"{'-':>24}" for c in COLUMNS]
    print(f'{name:<22}' + ''.join(cells))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(vars(args), rows=rows), f, indent=1)
  return rows


if __name__ == '__main__':
  main()
