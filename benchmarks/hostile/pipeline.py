"""The input pipeline called as a library (a script, a notebook): no absl flags parsed, no
start-up config checks, careless config.data values.

Each try builds the data as a training run does (`deepfashion_jax.data.create_datasets`, or
the pipeline's own functions) from a tiny synthetic folder and takes one training and one
evaluation batch: grain worker processes must start, and a wrong value must be refused as
the project's error naming its field.
"""

import pathlib

from configs import test as test_config
from deepfashion_jax import data
from deepfashion_jax.data import pipeline

SURFACE = 'pipeline from a library call'


def _config(folder: pathlib.Path, fields: dict):
  """configs/test.py on a 40-image synthetic folder, with `fields` ('data.threads': 0, ...)."""
  config = test_config.get_config()
  config.data.synthetic_images = 40
  config.data.cache_dir = str(folder / 'annotation_cache')
  config.batch_size = config.eval.batch_size = 4
  for name, value in fields.items():
    *sections, field = name.split('.')
    target = config
    for section in sections:
      target = target[section]
    with target.ignore_type():  # a careless caller assigns whatever it has
      target[field] = value
  return config


def _close(iterator):
  close = getattr(iterator, 'close', None)
  if close is not None:
    close()


def _one_batch_each(folder: pathlib.Path, fields: dict = None):
  """The thunk: one training batch and one evaluation batch, as a run takes them."""
  fields = fields or {}
  def thunk():
    training = data.create_datasets(_config(folder, fields), str(folder / 'workdir'))
    try:
      next(training.train_batches)
    finally:
      _close(training.train_batches)
    evaluation = iter(training.eval_batches)
    try:
      next(evaluation)
    finally:
      _close(evaluation)
  return thunk


def _per_process(global_batch_size, process_count):
  return lambda: pipeline.per_process_batch_size(global_batch_size, process_count)


def tries(folder: pathlib.Path):
  """Worker processes without parsed flags, then values a careless caller gives (most
  wrong, a few unusual but right), each through the function a run calls."""
  yield 'processes=0, no absl flags parsed', _one_batch_each(folder)
  yield 'processes=2, no absl flags parsed', _one_batch_each(folder, {'data.processes': 2})
  yield 'processes=1 with threads=1', _one_batch_each(
      folder, {'data.processes': 1, 'data.threads': 1})
  careless = [('data.processes', v) for v in (-1, 2.5, '2', None, True)]
  careless += [('data.threads', v) for v in (0, -2, 1.5, '4')]
  careless += [(name, v) for name in ('batch_size', 'eval.batch_size') for v in (0, -1, 2.0)]
  # The training split holds 28 images (no batch of 10,000), evaluation 6 (one padded batch).
  careless += [('batch_size', 10_000), ('eval.batch_size', 64)]
  careless += [('seed', -1), ('seed', 2**70), ('seed', 'zero')]
  careless += [('data.canvas_size', 0), ('data.canvas_size', -300), ('data.img_size', 0),
               ('data.crop_size', 0), ('data.crop_size', 500),
               ('data.crop_margin', float('nan')), ('data.crop_margin', -5.0),
               ('data.eval_crop', 'bogus'), ('data.crop', 'bogus'), ('data.crop', 'gt_box'),
               ('data.random_flip', 'yes'), ('data.strict', 'no')]
  for name, value in careless:
    yield f'config.{name}={value!r}', _one_batch_each(folder, {name: value})
  yield 'config.batch_size=6 over 4 processes', _per_process(6, 4)
