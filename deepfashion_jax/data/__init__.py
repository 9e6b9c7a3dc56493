"""The one way into the data: what train.py, evaluate.py, predict.py and main.py call.

`create_datasets` (training), `create_eval_data` (--mode=evaluate) and `create_photos`
(--mode=predict) own the choice of the folder (a configured DeepFashion folder, or the
synthetic one, written once by process 0 while the others wait), the source (the folder's
files or the prepared TFDS dataset), the image options and this process's share of each
global batch. The modules below them: `folder` (where the data is), `annotations` (the
lists), `sources`, `pipeline` and `transforms` (the batches), `photos` (users' photos).
"""

import dataclasses
from typing import Any

import jax
from jax.experimental import multihost_utils

from deepfashion_jax.data import annotations
from deepfashion_jax.data import folder
from deepfashion_jax.data import photos
from deepfashion_jax.data import pipeline
from deepfashion_jax.data import sources


class EvalBatches:
  """This process's share of an evaluation split, padded to whole batches: each `iter()`
  is one pass (padding and unreadable images carry `valid` False)."""

  def __init__(self, dataset, threads: int):
    self.dataset, self.threads = dataset, threads

  def __len__(self):
    return len(self.dataset)

  def __iter__(self):
    return pipeline.iterate(self.dataset, threads=self.threads)

  def first(self) -> dict:
    return self.dataset[0]


@dataclasses.dataclass(frozen=True)
class TrainingData:
  attributes: annotations.AttributeFacts  # for the loss and the metrics
  train_batches: Any  # endless, checkpointable iterator over this process's share
  eval_batches: EvalBatches  # config.eval.split


@dataclasses.dataclass(frozen=True)
class EvalData:
  attributes: annotations.AttributeFacts
  eval_batches: EvalBatches
  # The folder's images and every row's path in it ('img/...'): a batch's `index` names its
  # examples' files, which the evaluation report reads again for its thumbnails.
  image_dir: str = ''
  image_paths: Any = None


def load_index(config, workdir: str) -> annotations.DeepFashionIndex:
  """The configured folder's annotation index (config.data.partition applied); with
  several processes, process 0 writes the synthetic folder (if any) while the others wait."""
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      folder.data_root(config.data, workdir)
    multihost_utils.sync_global_devices('data folder ready')
  return folder.load_index(config.data, workdir)


def _source(config, index, split: str, workdir: str):
  return sources.make_source(config.data, index, split, folder.tfds_dir(config.data, workdir))


def _per_process(global_batch_size: int, field: str) -> int:
  return pipeline.per_process_batch_size(global_batch_size, jax.process_count(), field)


def _eval_batches(config, index, workdir: str) -> EvalBatches:
  dataset = pipeline.eval_dataset(
      _source(config, index, config.eval.split, workdir),
      batch_size=_per_process(config.eval.batch_size, 'config.eval.batch_size'),
      options=pipeline.image_options(config.data), process_index=jax.process_index(),
      process_count=jax.process_count())
  return EvalBatches(dataset, config.data.threads)


def create_datasets(config, workdir: str) -> TrainingData:
  """The training batches (endless, shuffled; checkpoint the iterator with the model) and
  the evaluation batches of config.eval.split."""
  index = load_index(config, workdir)
  train = pipeline.train_dataset(
      _source(config, index, 'train', workdir),
      batch_size=_per_process(config.batch_size, 'config.batch_size'), seed=config.seed,
      options=pipeline.image_options(config.data),
      process_index=jax.process_index(), process_count=jax.process_count())
  return TrainingData(
      attributes=index.attribute_facts(),
      train_batches=pipeline.iterate(train, threads=config.data.threads,
                                     processes=config.data.processes),
      eval_batches=_eval_batches(config, index, workdir))


def create_eval_data(config, workdir: str) -> EvalData:
  """The evaluation batches of config.eval.split."""
  index = load_index(config, workdir)
  return EvalData(index.attribute_facts(), _eval_batches(config, index, workdir),
                  index.image_dir(), index.image_paths)


def create_photos(config, workdir: str, images: str, device_count: int) -> photos.Photos:
  """--images (files and folders) in batches of config.predict.batch_size photos, named
  by the folder's lists when there is a folder. Every batch has the same number of
  photos, a multiple of `device_count`: the predict step compiles once."""
  return photos.Photos(photos.find_images(images),
                       photos.load_output_names(config.data, workdir), config.data,
                       images_per_batch=config.predict.batch_size, device_count=device_count)


def summary(config, workdir: str) -> str:
  """--mode=describe: the configured folder's index, summarised."""
  return load_index(config, workdir).summary()


def prepare_tfds(config, workdir: str) -> str:
  """--mode=prepare: writes the folder's official partition as a TFDS dataset; returns
  its folder."""
  from deepfashion_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  return tfds_builder.prepare(load_index(config, workdir), folder.tfds_dir(config.data, workdir),
                              config.data.max_image_bytes)
