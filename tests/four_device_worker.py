"""The sharded checks' computations, run by tests/test_sharding.py in a process of its own
with 4 forced CPU devices (XLA_FLAGS counts only before JAX starts, and the suite runs on
one device: see conftest.py). Usage: python -m tests.four_device_worker FOLDER OUT.json

Writes, for one training step on 1 and on 4 devices from the same state and batch (plain
SGD, mean losses, dropout 0.5 on the joined features):
  relative_updates: |update_4 - update_1| / |update_1| of every leaf the step changes
    (parameters, batch-norm statistics, optimiser state);
  head_updates: the same for the heads' parameters, whose gradients pass through the
    dropout masks;
  losses: the step's loss on 1 and on 4 devices.
"""

import json
import sys

import jax
import numpy as np

from configs import test as test_config
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax.data import annotations
from deepfashion_jax.data import pipeline
from deepfashion_jax.data import sources


def _config():
  config = test_config.get_config()
  config.optimizer, config.learning_rate, config.momentum = 'sgd', 1e-3, 0.0
  config.loss.reduce_sum = False
  config.data.img_size, config.data.crop_size = 72, 64
  config.model.dropout = 0.5
  return config


def _first_batch(index, config) -> dict:
  source = sources.FolderSource(index, index.split_indices('train'))
  options = pipeline.ImageOptions(img_size=config.data.img_size,
                                  crop_size=config.data.crop_size)
  dataset = pipeline.train_dataset(source, batch_size=config.batch_size, seed=0,
                                   options=options)
  return next(pipeline.iterate(dataset, threads=1))


def _step(config, index, batch, device_count: int):
  """(state before, state after, loss) of one training step on `device_count` devices."""
  mesh = sharding.make_mesh(jax.devices()[:device_count])
  step_config, state = steps.create_train_state(config, mesh, index.attribute_facts())
  before = jax.tree.map(np.asarray, state)
  after, batch_metrics = steps.jit_steps(step_config, mesh).train(
      state, sharding.global_batch(batch, mesh))
  return before, jax.tree.map(np.asarray, after), float(batch_metrics.compute()['loss'])


def _relative(start, one, four) -> list:
  """|update_4 - update_1| / |update_1| of each leaf that one device's step changed."""
  relative = []
  for s, a, b in zip(*(jax.tree.leaves(x) for x in (start, one, four))):
    if np.any(a != s):
      relative.append(float(np.linalg.norm((b - s) - (a - s)) / np.linalg.norm(a - s)))
  return relative


def main(folder: str, out: str):
  index = annotations.read_deepfashion(folder)
  config = _config()
  batch = _first_batch(index, config)
  start, one, loss_one = _step(config, index, batch, 1)
  _, four, loss_four = _step(config, index, batch, 4)
  model_and_optimiser = lambda s: (s.params, s.batch_stats, s.opt_state)
  heads = lambda s: {k: v for k, v in s.params.items() if k != 'backbone'}
  with open(out, 'w') as f:
    json.dump(dict(device_count=jax.device_count(),
                   relative_updates=_relative(*map(model_and_optimiser, (start, one, four))),
                   head_updates=_relative(*map(heads, (start, one, four))),
                   losses=(loss_one, loss_four)), f)


if __name__ == '__main__':
  main(*sys.argv[1:])
