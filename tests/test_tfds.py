"""The TFDS (ArrayRecord) dataset: prepared from a folder, the same examples in the same
order as the folder source, the same batches, and training from it."""

import dataclasses
import logging
import os
import shutil

import numpy as np
import pytest

from configs import test as test_config
from deepfashion_jax import train
from deepfashion_jax.data import annotations
from deepfashion_jax.data import image_files
from deepfashion_jax.data import pipeline
from deepfashion_jax.data import sources
from deepfashion_jax.data import tfds_builder
from deepfashion_jax.data import vocabulary
from tests import helpers

OPTIONS = pipeline.ImageOptions(img_size=80, crop_size=72)


@pytest.fixture(scope='module')
def prepared(quirky_folder, tmp_path_factory):
  """The quirky synthetic folder (missing and broken images too), prepared once."""
  root, _ = quirky_folder
  index = annotations.read_deepfashion(root)
  tfds_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds_builder.prepare(index, tfds_dir)
  return index, tfds_dir


def _assert_same_record(a: dict, b: dict, where: str):
  assert a.keys() == b.keys(), where
  for key, value in a.items():
    if key == 'image_error':  # the folder says why a file is unread, the dataset that it is
      assert bool(value) == bool(b[key]), f'{where} {key}: {value!r}, {b[key]!r}'
      continue
    if isinstance(value, np.ndarray):
      assert value.dtype == b[key].dtype, f'{where} {key}'
      np.testing.assert_array_equal(value, b[key], err_msg=f'{where} {key}')
    else:
      assert value == b[key], f'{where} {key}: {value!r} != {b[key]!r}'


@pytest.mark.parametrize('split', vocabulary.SPLIT_NAMES)
def test_both_sources_hold_the_same_examples_in_the_same_order(prepared, split):
  index, tfds_dir = prepared
  folder_source = sources.FolderSource(index, index.split_indices(split))
  tfds_source = sources.TfdsSource(tfds_dir, split)
  assert len(tfds_source) == len(folder_source) > 0
  for position in range(len(folder_source)):
    _assert_same_record(folder_source[position], tfds_source[position],
                        f'{split}[{position}]')


def test_missing_images_stay_missing(prepared):
  # The quirky folder lists files that are not there: both sources say None, so the
  # pipeline skips them the same way.
  index, tfds_dir = prepared
  del index
  missing = 0
  for split in vocabulary.SPLIT_NAMES:
    source = sources.TfdsSource(tfds_dir, split)
    missing += sum(source[p]['image_bytes'] is None for p in range(len(source)))
  assert missing


@pytest.mark.parametrize('crop', ['none', 'gt_box'])
def test_the_same_batches_come_from_both_sources(prepared, crop):
  index, tfds_dir = prepared
  options = dataclasses.replace(OPTIONS, crop=crop)
  batches = {}
  for name, source in (('folder', sources.FolderSource(index, index.split_indices('train'))),
                       ('tfds', sources.TfdsSource(tfds_dir, 'train'))):
    dataset = pipeline.train_dataset(source, batch_size=8, seed=3, options=options)
    iterator = pipeline.iterate(dataset, threads=1)
    batches[name] = [next(iterator) for _ in range(3)]
    batches[name].append(pipeline.eval_dataset(source, batch_size=8, options=options)[0])
  for i, (a, b) in enumerate(zip(batches['folder'], batches['tfds'])):
    _assert_same_record(a, b, f'batch {i}')
  windows = np.concatenate([b['window'] for b in batches['folder']])
  whole = (windows[:, :2] == 0).all(axis=1) & (windows[:, 2:] >= 100).all(axis=1)
  assert whole.all() if crop == 'none' else whole.mean() < 0.5  # box crops, mostly


def test_the_stored_fields_are_the_index(prepared):
  index, tfds_dir = prepared
  builder = tfds_builder.load_builder(tfds_dir)
  assert builder.info.splits['train'].num_examples == len(index.split_indices('train'))
  example = builder.as_data_source('val')[0]
  row = int(index.split_indices('val')[0])
  assert example['index'] == row
  assert example['file_name'].decode() == index.image_paths[row]
  np.testing.assert_array_equal(np.unpackbits(example['attribute_positive_bits'])[
      :index.num_attributes].astype(bool), index.attribute_positive[row])
  np.testing.assert_array_equal(example['bbox'], index.bbox[row])
  with open(os.path.join(index.image_dir(), index.image_paths[row]), 'rb') as f:
    assert example['image_bytes'] == f.read()  # as stored, not re-encoded
  height, width = example['image_size']
  assert height > 0 and width > 0


def test_preparing_stores_refused_files_as_missing(synthetic_folder, tmp_path, monkeypatch):
  """A listed link out of the image folder, a FIFO and a file over the byte cap are stored
  as missing images (b''), never read (the FIFO never opened)."""
  root = tmp_path / 'deepfashion'
  shutil.copytree(synthetic_folder[0], root)
  index = annotations.read_deepfashion(str(root))
  image_dir = index.image_dir()
  inside = image_files.resolved_folders(image_dir, os.path.join(image_dir, 'img'))
  paths = [os.path.join(image_dir, str(p)) for p in index.image_paths[:4]]
  (tmp_path / 'outside.jpg').write_bytes(open(paths[3], 'rb').read())
  for path in paths[:2]:
    os.remove(path)
  os.symlink(tmp_path / 'outside.jpg', paths[0])
  os.mkfifo(paths[1])
  helpers.forbid_opening(monkeypatch, paths[1])
  make_example = tfds_builder._example  # pylint: disable=protected-access
  example = lambda row, cap=2**20: make_example(index, row, image_dir, inside, cap)
  assert example(0)['image_bytes'] == example(1)['image_bytes'] == b''
  assert example(2, cap=10)['image_bytes'] == b''
  assert example(3)['image_bytes'] == (tmp_path / 'outside.jpg').read_bytes()


def test_an_unprepared_folder_names_the_command(tmp_path):
  with pytest.raises(FileNotFoundError, match='--mode=prepare'):
    sources.TfdsSource(str(tmp_path), 'train')


def test_preparing_says_how_long_it_takes(quirky_folder, tmp_path, caplog):
  caplog.set_level(logging.INFO)
  root, _ = quirky_folder
  tfds_builder.prepare(annotations.read_deepfashion(root), str(tmp_path))
  assert any('left' in r.getMessage() and 'images/s' in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_training_reads_the_prepared_dataset(prepared, tmp_path):
  index, tfds_dir = prepared
  config = test_config.get_config()
  config.data.data_dir = index.root
  config.data.source = 'tfds'
  config.data.tfds_dir = tfds_dir
  config.num_train_steps = config.log_every_steps = config.checkpoint_every_steps = 2
  config.eval_every_steps = 2
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 'category_top1' in results


def test_the_order_holds_when_the_writer_spills_to_disk(quirky_folder, tmp_path, monkeypatch):
  # Past its memory buffer TFDS's writer sorts examples into 1,000 temporary buckets by
  # key: the keys must keep the split's order across buckets (the real dataset spills).
  monkeypatch.setattr(tfds_builder, '_WRITER_MEMORY_BYTES', 20_000)
  root, _ = quirky_folder
  index = annotations.read_deepfashion(root)
  tfds_builder.prepare(index, str(tmp_path))
  folder_source = sources.FolderSource(index, index.split_indices('train'))
  tfds_source = sources.TfdsSource(str(tmp_path), 'train')
  assert [tfds_source[p]['index'] for p in range(len(tfds_source))] == [
      folder_source[p]['index'] for p in range(len(folder_source))]
