"""The grain pipeline: batch contents, determinism, epochs, sharding, resume, bad images."""

import dataclasses
import os
import re
import shutil

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from deepfashion_jax.data import annotations
from deepfashion_jax.data import pipeline
from deepfashion_jax.data import sources
from deepfashion_jax.data import transforms

OPTIONS = pipeline.ImageOptions()


@pytest.fixture(scope='module')
def index(synthetic_folder):
  return annotations.read_deepfashion(synthetic_folder[0])


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batches_hold_the_documented_fields(index):
  source = sources.FolderSource(index, index.split_indices('train'))
  batch = next(pipeline.iterate(pipeline.train_dataset(source, batch_size=4, seed=0,
                                                       options=OPTIONS)))
  expected = dict(canvas=((4, 300, 300, 3), np.uint8), window=((4, 4), np.int32),
                  region=((4, 4), np.float32), flip=((4,), np.bool_),
                  bbox=((4, 4), np.float32), box_valid=((4,), np.bool_),
                  category=((4,), np.int32),
                  category_type=((4,), np.int32), attribute_positive=((4, 1000), np.bool_),
                  attribute_unknown=((4, 1000), np.bool_), index=((4,), np.int32),
                  valid=((4,), np.bool_), skipped=((4,), np.int32))
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  rows = batch['index']
  np.testing.assert_array_equal(batch['category'], index.category[rows])
  np.testing.assert_array_equal(batch['attribute_positive'], index.attribute_positive[rows])
  np.testing.assert_array_equal(batch['attribute_unknown'], index.attribute_unknown[rows])
  assert batch['valid'].all() and batch['box_valid'].all() and not batch['skipped'].any()
  assert (batch['bbox'] >= 0).all() and (batch['bbox'] <= 1).all()
  for i, row in enumerate(rows):  # the box is the index's box moved with the crop
    crop = transforms.Crop(batch['region'][i], bool(batch['flip'][i]))
    np.testing.assert_allclose(batch['bbox'][i], transforms.crop_box(index.bbox[row], crop),
                               atol=1e-6)


def test_the_same_seed_gives_the_same_batches_whatever_the_workers(index):
  source = sources.FolderSource(index, index.split_indices('train'))
  dataset = pipeline.train_dataset(source, batch_size=4, seed=7, options=OPTIONS)
  one_thread = _take(pipeline.iterate(dataset, threads=1), 3)
  _assert_same_batches(one_thread, _take(pipeline.iterate(dataset, threads=3), 3))
  _assert_same_batches(one_thread, _take(pipeline.iterate(dataset, processes=2), 3))
  other = next(pipeline.iterate(pipeline.train_dataset(source, batch_size=4, seed=8,
                                                       options=OPTIONS)))
  assert not np.array_equal(other['index'], one_thread[0]['index'])


def test_each_epoch_is_a_new_permutation_of_the_split(index):
  rows = index.split_indices('train')[:16]
  source = sources.FolderSource(index, rows)
  dataset = pipeline.train_dataset(source, batch_size=4, seed=0, options=OPTIONS)
  seen = np.concatenate([b['index'] for b in _take(pipeline.iterate(dataset), 8)])
  first, second = seen[:16], seen[16:]
  assert sorted(first) == sorted(second) == sorted(rows)  # both epochs cover the split
  assert not np.array_equal(first, second)  # in another order


def test_processes_load_their_rows_of_the_same_global_batches(index):
  """Two processes with batches of 2 load, between them, exactly the batches of 4 that one
  process loads: the same images, crops and flips, in the same order."""
  source = sources.FolderSource(index, index.split_indices('train')[:16])
  alone = _take(pipeline.iterate(pipeline.train_dataset(source, batch_size=4, seed=3,
                                                        options=OPTIONS)), 6)
  shares = [_take(pipeline.iterate(pipeline.train_dataset(
      source, batch_size=2, seed=3, options=OPTIONS, process_index=p, process_count=2)), 6)
            for p in range(2)]
  for step, batch in enumerate(alone):
    for key, value in batch.items():
      np.testing.assert_array_equal(
          np.concatenate([shares[0][step][key], shares[1][step][key]]), value, err_msg=key)


def test_evaluation_sees_every_example_exactly_once_across_processes(index):
  rows = index.split_indices('val')
  source = sources.FolderSource(index, rows)
  seen, batches = [], []
  for process in range(2):
    dataset = pipeline.eval_dataset(source, batch_size=4, options=OPTIONS,
                                    process_index=process, process_count=2)
    batches.append(len(dataset))
    for batch in dataset:
      seen += batch['index'][batch['valid']].tolist()
      assert (batch['index'][~batch['valid']] == -1).all()
  assert batches[0] == batches[1]  # the processes step together
  assert sorted(seen) == sorted(rows.tolist())


def test_a_restored_iterator_continues_exactly(index, tmp_path):
  source = sources.FolderSource(index, index.split_indices('train'))
  dataset = pipeline.train_dataset(source, batch_size=4, seed=3, options=OPTIONS)
  for workers in (0, 2):
    uninterrupted = _take(pipeline.iterate(dataset, processes=workers), 6)
    iterator = pipeline.iterate(dataset, processes=workers)
    _take(iterator, 3)
    manager = ocp.CheckpointManager(tmp_path / f'workers_{workers}')
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    restored = pipeline.iterate(dataset, processes=workers)
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    _assert_same_batches(_take(restored, 3), uninterrupted[3:])


def test_bad_images_are_replaced_in_training_and_masked_in_evaluation(quirky_folder):
  root, summary = quirky_folder
  quirky = annotations.read_deepfashion(root)
  rows = np.arange(len(quirky))
  source = sources.FolderSource(quirky, rows)
  bad = {quirky.image_paths.tolist().index(summary['quirks'][name])
         for name in ('truncated', 'missing')}
  readable = {quirky.image_paths.tolist().index(summary['quirks'][name])
              for name in ('grayscale', 'cmyk', 'png_as_jpg')}

  evaluated = list(pipeline.eval_dataset(source, batch_size=8, options=OPTIONS))
  valid = np.concatenate([b['index'][b['valid']] for b in evaluated])
  assert set(valid) == set(rows) - bad  # readable oddities decode; bad ones are masked
  assert sum(int(b['skipped'].sum()) for b in evaluated) == len(bad)
  assert readable <= set(valid)

  dataset = pipeline.train_dataset(source, batch_size=len(rows) // 2, seed=0, options=OPTIONS)
  epoch = _take(pipeline.iterate(dataset), 2)
  assert sum(int(b['skipped'].sum()) for b in epoch) == len(bad)
  assert all(b['valid'].all() for b in epoch)
  assert bad.isdisjoint(np.concatenate([b['index'] for b in epoch]))


def test_strict_mode_names_the_unreadable_file(quirky_folder):
  root, summary = quirky_folder
  quirky = annotations.read_deepfashion(root)
  source = sources.FolderSource(quirky, np.arange(len(quirky)))
  strict = pipeline.ImageOptions(strict=True)
  names = '|'.join(re.escape(summary['quirks'][name]) for name in ('truncated', 'missing'))
  with pytest.raises(transforms.ImageDecodeError, match=f'({names}): '):
    list(pipeline.eval_dataset(source, batch_size=8, options=strict))


# Boxes planted in a copy of the synthetic folder's list_bbox.txt: row -> the listed box.
# Row 0 is empty (x_2 < x_1), row 1 runs past three edges, row 2 lies right of the image.
PLANTED_BOXES = {0: (50, 60, 40, 90), 1: (-10, 20, 5000, 5000), 2: (1000, 10, 1200, 50)}


@pytest.fixture(scope='module')
def odd_boxes(synthetic_folder, tmp_path_factory):
  """The index of a copy of the synthetic folder with PLANTED_BOXES, and rows 0 to 3."""
  root = str(tmp_path_factory.mktemp('odd_boxes') / 'deepfashion')
  shutil.copytree(synthetic_folder[0], root)
  path = os.path.join(root, annotations.BBOX)
  with open(path) as f:
    lines = f.read().splitlines()
  for row, box in PLANTED_BOXES.items():  # list_bbox.txt is in the index's order
    lines[row + 2] = ' '.join([lines[row + 2].split()[0]] + [str(v) for v in box])
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  index = annotations.read_deepfashion(root)
  np.testing.assert_array_equal(index.bbox[list(PLANTED_BOXES)], list(PLANTED_BOXES.values()))
  return index, np.arange(4)


def test_boxes_are_clipped_to_the_image_and_empty_ones_masked_in_evaluation(odd_boxes):
  index, rows = odd_boxes
  batch = pipeline.eval_dataset(sources.FolderSource(index, rows), batch_size=4,
                                options=OPTIONS)[0]
  np.testing.assert_array_equal(batch['index'], rows)
  np.testing.assert_array_equal(batch['valid'], [True] * 4)
  np.testing.assert_array_equal(batch['box_valid'], [False, True, False, True])
  height = batch['window'][1, 3]  # 'resize': the crop is the whole image
  np.testing.assert_allclose(batch['bbox'][1], [0, 20 / height, 1, 1], atol=1e-6)
  np.testing.assert_allclose(batch['bbox'][2, [0, 2]], [1, 1])  # nothing left: x1 = x2 = W
  x1, y1, x2, y2 = index.bbox[3]
  width, height = batch['window'][3, 2:]
  np.testing.assert_allclose(batch['bbox'][3], [x1 / width, y1 / height, x2 / width,
                                                y2 / height], atol=1e-6)  # untouched


def test_boxes_are_clipped_and_empty_ones_masked_in_training(odd_boxes):
  index, rows = odd_boxes
  source = sources.FolderSource(index, rows)
  batch = pipeline.train_dataset(source, batch_size=4, seed=0, options=OPTIONS)[0]
  box_valid = dict(zip(batch['index'].tolist(), batch['box_valid'].tolist()))
  assert box_valid == {0: False, 1: True, 2: False, 3: True}
  assert batch['valid'].all()
  assert (batch['bbox'] >= 0).all() and (batch['bbox'] <= 1).all()
  for i, row in enumerate(batch['index']):  # the clipped box, moved with the crop
    width, height = batch['window'][i, 2:]
    clipped = np.clip(np.array(index.bbox[row], np.float32), 0, [width, height] * 2)
    crop = transforms.Crop(batch['region'][i], bool(batch['flip'][i]))
    if batch['box_valid'][i]:
      np.testing.assert_allclose(batch['bbox'][i], transforms.crop_box(clipped, crop),
                                 atol=1e-6)


def test_padding_and_unreadable_images_have_no_box(quirky_folder):
  root, _ = quirky_folder
  quirky = annotations.read_deepfashion(root)
  source = sources.FolderSource(quirky, np.arange(len(quirky)))
  for batch in pipeline.eval_dataset(source, batch_size=16, options=OPTIONS):
    assert not batch['box_valid'][~batch['valid']].any()
    assert batch['box_valid'][batch['valid']].all()


def test_per_process_batch_must_divide_the_global_batch():
  assert pipeline.per_process_batch_size(64, 4) == 16
  with pytest.raises(ValueError, match='config.batch_size=30 must be a multiple'):
    pipeline.per_process_batch_size(30, 4)


class _OneImageSource:
  """A source of one record whose image is larger than the canvas."""
  num_attributes = 8

  def __init__(self, image_bytes):
    self.record = dict(image_bytes=image_bytes, path='big.jpg', index=0, position=0,
                       category=1, category_type=0,
                       attribute_positive_bits=np.packbits(np.ones(8, bool)),
                       attribute_unknown_bits=np.packbits(np.zeros(8, bool)),
                       bbox=np.array([60, 40, 600, 400], np.float32))

  def __len__(self):
    return 1

  def __getitem__(self, position):
    return self.record


def test_images_larger_than_the_canvas_are_shrunk_with_their_crop_and_box():
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.new('RGB', (600, 400), (200, 30, 30)).save(buffer, format='JPEG')
  source = _OneImageSource(buffer.getvalue())
  batch = pipeline.eval_dataset(source, batch_size=1, options=OPTIONS)[0]
  np.testing.assert_array_equal(batch['window'], [[0, 0, 300, 200]])
  np.testing.assert_allclose(batch['region'], [[0, 0, 300, 200]])
  np.testing.assert_allclose(batch['bbox'], [[0.1, 0.1, 1.0, 1.0]], atol=1e-6)
  assert batch['attribute_positive'].all() and batch['valid'].all()
  train = pipeline.train_dataset(source, batch_size=1, seed=0, options=OPTIONS)[0]
  assert (train['region'][0, 2:] <= [300, 200]).all()  # a crop of the shrunk image
  # A box window's margin counts the file's pixels: (50, 30, 610 -> 600, 410 -> 400), halved.
  boxed = pipeline.eval_dataset(source, batch_size=1, options=dataclasses.replace(
      OPTIONS, crop='gt_box', crop_margin=10.0))[0]
  np.testing.assert_array_equal(boxed['window'], [[25, 15, 300, 200]])
  np.testing.assert_allclose(boxed['region'], [[25, 15, 300, 200]])


class _DrawnBoxSource:
  """Records whose image is grey with the box drawn in: its left half red, its right half
  blue, so that a flip shows."""
  num_attributes = 8
  boxes = np.array([[40, 30, 160, 170], [150, 10, 290, 120], [5, 60, 120, 195],
                    [100, 50, 200, 150]], np.float32)

  def __len__(self):
    return len(self.boxes)

  def __getitem__(self, position):
    import io  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    image = np.full((200, 300, 3), 128, np.uint8)
    x1, y1, x2, y2 = self.boxes[position].astype(int)
    middle = (x1 + x2) // 2
    image[y1:y2, x1:middle] = (255, 0, 0)
    image[y1:y2, middle:x2] = (0, 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='PNG')  # lossless: colours stay exact
    return dict(image_bytes=buffer.getvalue(), path=f'{position}.png', index=position,
                position=position, category=1, category_type=0,
                attribute_positive_bits=np.packbits(np.ones(8, bool)),
                attribute_unknown_bits=np.packbits(np.zeros(8, bool)),
                bbox=self.boxes[position])


def _assert_box_drawn_where_the_target_says(images: np.ndarray, batch: dict, boxes):
  """Inside the target box (less 2 pixels) only the drawn colours, red left of the drawn
  middle unless flipped; outside it (more 2 pixels) only grey."""
  side = images.shape[1]
  rows, cols = np.mgrid[:side, :side]
  for image, row, target, region, flip in zip(images, batch['index'], batch['bbox'],
                                              batch['region'], batch['flip']):
    x1, y1, x2, y2 = target * side
    inside = (cols > x1 + 2) & (cols < x2 - 2) & (rows > y1 + 2) & (rows < y2 - 2)
    box_x1, box_y1, box_x2, box_y2 = boxes[row]
    middle = (box_x1 + box_x2) // 2
    middle = transforms.crop_box(np.array([middle, box_y1, middle, box_y2]),
                                 transforms.Crop(region, bool(flip)))[0] * side
    left, right = inside & (cols < middle - 2), inside & (cols > middle + 2)
    red, blue = (right, left) if flip else (left, right)
    assert left.sum() + right.sum() > 100
    assert (image[red][:, 0] > 200).all() and (image[red][:, 2] < 50).all()
    assert (image[blue][:, 2] > 200).all() and (image[blue][:, 0] < 50).all()
    outside = (cols < x1 - 2) | (cols > x2 + 2) | (rows < y1 - 2) | (rows > y2 + 2)
    np.testing.assert_array_equal(image[outside], 128)


@pytest.mark.parametrize('margin', [0.0, 10.0])
def test_a_gt_box_crop_puts_the_drawn_box_where_its_target_says(margin):
  """config.data.crop='gt_box': the crop is cut from the box and its margin, before the
  resize, random crop and flip; the target box moves with it, to the whole frame less
  the margin (evaluation's 'resize'), or about it (training's random crop)."""
  import jax  # pylint: disable=g-import-not-at-top
  from deepfashion_jax.data import device_transforms  # pylint: disable=g-import-not-at-top
  options = pipeline.ImageOptions(img_size=80, crop_size=72, crop='gt_box', crop_margin=margin)
  source = _DrawnBoxSource()
  to_images = jax.jit(lambda b: device_transforms.batch_images(b, 72))
  evaluation = pipeline.eval_dataset(source, batch_size=4, options=options)[0]
  _assert_box_drawn_where_the_target_says(np.asarray(to_images(evaluation)), evaluation,
                                          source.boxes)
  for (x1, y1, x2, y2), window, target in zip(source.boxes, evaluation['window'],
                                               evaluation['bbox']):
    np.testing.assert_array_equal(window, [max(x1 - margin, 0), max(y1 - margin, 0),
                                           min(x2 + margin, 300), min(y2 + margin, 200)])
    width, height = window[2] - window[0], window[3] - window[1]
    np.testing.assert_allclose(target, [(x1 - window[0]) / width, (y1 - window[1]) / height,
                                        (x2 - window[0]) / width, (y2 - window[1]) / height],
                               atol=1e-6)
  flips = []
  for seed in range(3):
    train = pipeline.train_dataset(source, batch_size=4, seed=seed, options=options)[0]
    _assert_box_drawn_where_the_target_says(np.asarray(to_images(train)), train, source.boxes)
    flips += train['flip'].tolist()
  assert any(flips) and not all(flips)
