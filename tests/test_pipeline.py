"""The grain pipeline: batch contents, determinism, epochs, sharding, resume, bad images."""

import dataclasses
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from deepfashion_jax import errors
from deepfashion_jax.data import annotations
from deepfashion_jax.data import landmark_slots
from deepfashion_jax.data import pipeline
from deepfashion_jax.data import sources
from deepfashion_jax.data import transforms

OPTIONS = pipeline.ImageOptions()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
                  landmarks=((4, 8, 2), np.float32), landmark_visible=((4, 8), np.bool_),
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
  visibility, xy = landmark_slots.to_slots(index.landmark_garment_type[rows],
                                           index.landmark_visibility[rows],
                                           index.landmark_xy[rows])
  for i, row in enumerate(rows):  # the box and landmarks are the index's, moved with the crop
    crop = transforms.Crop(batch['region'][i], bool(batch['flip'][i]))
    np.testing.assert_allclose(batch['bbox'][i], transforms.crop_box(index.bbox[row], crop),
                               atol=1e-6)
    landmarks, visible = transforms.crop_landmarks(xy[i], visibility[i], crop)
    np.testing.assert_allclose(batch['landmarks'][i], landmarks, atol=1e-6)
    np.testing.assert_array_equal(batch['landmark_visible'][i], visible)
  assert batch['landmark_visible'].any()
  assert (batch['landmarks'] >= 0).all() and (batch['landmarks'] <= 1).all()


def test_the_same_seed_gives_the_same_batches_whatever_the_workers(index, caplog):
  """More threads than the default read-ahead (4 batches) read that many at once: grain
  would otherwise use 4 of them and say so."""
  source = sources.FolderSource(index, index.split_indices('train'))
  dataset = pipeline.train_dataset(source, batch_size=4, seed=7, options=OPTIONS)
  one_thread = _take(pipeline.iterate(dataset, threads=1), 3)
  with caplog.at_level(logging.WARNING):
    _assert_same_batches(one_thread, _take(pipeline.iterate(dataset, threads=6), 3))
  assert 'smaller than num_threads' not in caplog.text
  _assert_same_batches(one_thread, _take(pipeline.iterate(dataset, processes=2), 3))
  other = next(pipeline.iterate(pipeline.train_dataset(source, batch_size=4, seed=8,
                                                       options=OPTIONS)))
  assert not np.array_equal(other['index'], one_thread[0]['index'])


def test_worker_processes_start_in_a_plain_python_process(synthetic_folder):
  """A script or a notebook takes batches from grain worker processes without parsing absl
  flags, and its own flags stay unparsed for it to parse later. (This suite's conftest
  marks the flags parsed, so the caller is a process of its own.)"""
  script = textwrap.dedent(f"""
      from absl import flags
      import numpy as np
      from deepfashion_jax.data import annotations, pipeline, sources
      flags.DEFINE_integer('callers_own_flag', 1, 'a flag of the calling script')
      index = annotations.read_deepfashion({synthetic_folder[0]!r})
      source = sources.FolderSource(index, index.split_indices('train'))
      dataset = pipeline.train_dataset(source, batch_size=4, seed=7,
                                       options=pipeline.ImageOptions())
      iterator = pipeline.iterate(dataset, processes=2)
      batch = {{key: np.array(value) for key, value in next(iterator).items()}}
      iterator.close()
      expected = next(pipeline.iterate(dataset))
      assert all(np.array_equal(batch[key], expected[key]) for key in expected)
      assert not flags.FLAGS.is_parsed()
      try:
        flags.FLAGS.callers_own_flag
        raise AssertionError("the caller's own flag was made readable")
      except flags.UnparsedFlagAccessError:
        pass
      flags.FLAGS(['script', '--callers_own_flag=5', '--grain_py_debug_mode=false'])
      print('parsed later:', flags.FLAGS.callers_own_flag)
  """)
  completed = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                             text=True, timeout=300, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert 'parsed later: 5' in completed.stdout


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


def test_padding_and_unreadable_images_have_no_box_and_no_landmarks(quirky_folder):
  root, _ = quirky_folder
  quirky = annotations.read_deepfashion(root)
  source = sources.FolderSource(quirky, np.arange(len(quirky)))
  batches = list(pipeline.eval_dataset(source, batch_size=16, options=OPTIONS))
  invalid = np.concatenate([~batch['valid'] for batch in batches])
  box_valid, landmarks, landmark_visible = (
      np.concatenate([batch[key] for batch in batches])
      for key in ('box_valid', 'landmarks', 'landmark_visible'))
  assert invalid.sum() >= 3  # two unreadable images and padding
  assert not box_valid[invalid].any() and box_valid[~invalid].all()
  assert not landmark_visible[invalid].any() and (landmarks[invalid] == 0).all()
  assert landmark_visible[~invalid].mean() > 0.4  # of 8 slots: 4, 6 or 8 there, 9 in 10 seen


def test_per_process_batch_must_divide_the_global_batch():
  assert pipeline.per_process_batch_size(64, 4) == 16
  with pytest.raises(errors.ConfigError, match='config.batch_size=30 must be a multiple'):
    pipeline.per_process_batch_size(30, 4)
  with pytest.raises(errors.ConfigError, match='config.eval.batch_size=6 must be a multiple'):
    pipeline.per_process_batch_size(6, 4, 'config.eval.batch_size')


@pytest.mark.parametrize('options, message', [
    (dict(canvas_size=0), 'config.data.canvas_size=0: expected an integer >= 1'),
    (dict(img_size=-1), 'config.data.img_size=-1'),
    (dict(crop_size=72.0, img_size=80), 'config.data.crop_size=72.0: expected an integer'),
    (dict(crop_size=300), 'config.data.crop_size=300 is larger than config.data.img_size=256'),
    (dict(random_flip='yes'), "config.data.random_flip='yes': expected True or False"),
    (dict(strict='no'), "config.data.strict='no'"),
    (dict(eval_crop='bogus'), "config.data.eval_crop='bogus': expected one of"),
    (dict(crop='bogus'), "config.data.crop='bogus': expected one of"),
    (dict(crop_margin=float('nan')), 'config.data.crop_margin=nan: expected pixels >= 0'),
    (dict(crop_margin=-5.0), 'config.data.crop_margin=-5.0'),
])
def test_image_options_refuse_careless_values_naming_the_field(options, message):
  # A script or a notebook reaches the pipeline without main.py's start-up checks: each of
  # these ran silently as something else, or failed later inside NumPy or grain.
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    pipeline.ImageOptions(**options)


def test_counts_are_refused_naming_their_field(index):
  source = sources.FolderSource(index, index.split_indices('train'))
  dataset = pipeline.train_dataset(source, batch_size=4, seed=0, options=OPTIONS)
  train = lambda **kwargs: pipeline.train_dataset(
      source, **dict(dict(batch_size=4, seed=0, options=OPTIONS), **kwargs))
  cases = [
      (lambda: pipeline.iterate(dataset, processes=-1), 'config.data.processes=-1'),
      (lambda: pipeline.iterate(dataset, processes='2'), "config.data.processes='2'"),
      (lambda: pipeline.iterate(dataset, processes=True), 'config.data.processes=True'),
      (lambda: pipeline.iterate(dataset, threads=0), 'config.data.threads=0'),
      (lambda: pipeline.iterate(dataset, threads=1.5), 'config.data.threads=1.5'),
      (lambda: train(seed=-1), 'config.seed=-1: expected an integer in [0, 4294967295]'),
      (lambda: train(seed=2**70), f'config.seed={2**70}'),
      (lambda: train(batch_size=0), 'config.batch_size (per process)=0'),
      (lambda: train(batch_size=len(source) + 1),
       f'the training split has only {len(source)} images'),
      (lambda: pipeline.eval_dataset(source, batch_size=0, options=OPTIONS),
       'config.eval.batch_size (per process)=0'),
      (lambda: pipeline.per_process_batch_size(2.0, 1), 'config.batch_size=2.0'),
  ]
  for call, message in cases:
    with pytest.raises(errors.ConfigError, match=re.escape(message)):
      call()


def _landmarks(xy=None, visibility=None) -> dict:
  """A record's landmark fields: every slot absent unless given."""
  if xy is None:
    xy = np.zeros((8, 2))
    visibility = np.full(8, landmark_slots.ABSENT)
  return dict(landmark_xy=np.asarray(xy, np.float32),
              landmark_visibility=np.asarray(visibility, np.int8))


class _OneImageSource:
  """A source of one record whose image is larger than the canvas; its one landmark (a
  left collar) is at its bottom-right pixel."""
  num_attributes = 8

  def __init__(self, image_bytes):
    self.record = dict(image_bytes=image_bytes, path='big.jpg', index=0, position=0,
                       category=1, category_type=0,
                       attribute_positive_bits=np.packbits(np.ones(8, bool)),
                       attribute_unknown_bits=np.packbits(np.zeros(8, bool)),
                       bbox=np.array([60, 40, 600, 400], np.float32),
                       **_landmarks([[599, 399]] + [[0, 0]] * 7, [0] + [-1] * 7))

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
  # The last pixel's centre, (599.5, 399.5) of 600 x 400, halved with the image.
  np.testing.assert_allclose(batch['landmarks'][0, 0], [599.5 / 600, 399.5 / 400], atol=1e-6)
  assert batch['landmark_visible'][0].tolist() == [True] + [False] * 7
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
                bbox=self.boxes[position], **_landmarks())


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


# A dotted folder: grey 300 x 200 images that show each landmark as a 7 x 7 dot of its
# slot's colour, centred on the landmark's pixel.
_DOT_XY = np.array([[120, 50], [180, 50], [75, 100], [225, 100], [130, 110], [170, 110],
                    [100, 155], [200, 155]])
_DOT_COLOURS = np.array([(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0),
                         (255, 0, 255), (0, 255, 255), (0, 0, 0), (255, 255, 255)])
_WIDE_BOX = (40, 30, 260, 180)  # with its margin, every dot stays in any crop
# Category, box and per-slot visibility (-1 absent: no dot) of each image of the folder.
# The small box holds only the collars and the waistline: a 'gt_box' crop cuts the other
# dots out, whole.
_DOTTED_IMAGES = (
    ('Dress', _WIDE_BOX, (0, 0, 0, 0, 0, 0, 0, 0)),
    ('Dress', (100, 40, 200, 120), (0, 0, 0, 0, 0, 0, 0, 0)),
    ('Tee', _WIDE_BOX, (0, 0, 1, 0, -1, -1, 0, 0)),  # left sleeve occluded
    ('Skirt', _WIDE_BOX, (-1, -1, -1, -1, 0, 0, 0, 2)),  # right hem truncated
)


def _dotted_png(visibility) -> bytes:
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.full((200, 300, 3), 128, np.uint8)
  for (x, y), colour, seen in zip(_DOT_XY, _DOT_COLOURS, visibility):
    if seen != landmark_slots.ABSENT:
      image[y - 3:y + 4, x - 3:x + 4] = colour
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')  # lossless (a PNG under a .jpg name)
  return buffer.getvalue()


@pytest.fixture(scope='module')
def dotted_sources(tmp_path_factory):
  """The dotted folder's training split (every image; val and test hold one each) from
  the folder and from its TFDS dataset, and each index row's per-slot visibility.

  Its list_landmarks.txt has each garment type's own order, as the release's has.
  """
  from deepfashion_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from deepfashion_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  from deepfashion_jax.data import vocabulary  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('dotted')
  images = _DOTTED_IMAGES + _DOTTED_IMAGES[:2]
  paths, categories, landmarks = [], [], []
  for i, (name, _, visibility) in enumerate(images):
    paths.append(f'img/Dotted_{name}/img_{i + 1:08d}.jpg')
    categories.append(vocabulary.CATEGORY_NAMES.index(name))
    file_order = list(landmark_slots.FILE_ORDER_SLOTS[vocabulary.CATEGORY_TYPES[categories[-1]]])
    landmarks.append(np.column_stack([np.array(visibility)[file_order], _DOT_XY[file_order]]))
    os.makedirs(root / 'Img' / os.path.dirname(paths[-1]), exist_ok=True)
    (root / 'Img' / paths[-1]).write_bytes(_dotted_png(visibility))
  names, types = synthetic.attribute_vocabulary()
  synthetic.write_lists(str(root), synthetic.ListContents(
      image_paths=paths, category=np.array(categories),
      attribute_values=np.full((len(images), len(names)), -1, np.int8),
      bbox=np.array([box for _, box, _ in images]), split=np.array([0, 0, 0, 0, 1, 2], np.int8),
      landmarks=landmarks), names, types)
  index = annotations.read_deepfashion(str(root))
  tfds_dir = str(tmp_path_factory.mktemp('dotted_tfds'))
  tfds_builder.prepare(index, tfds_dir)
  train = index.split_indices('train')
  return ((sources.FolderSource(index, train), sources.TfdsSource(tfds_dir, 'train')),
          {row: np.array(images[row][2]) for row in train})


# The slot named as each slot with left and right swapped: 'left_hem' -> 'right_hem'.
_MIRRORED_SLOT = [landmark_slots.SLOT_NAMES.index(
    name.replace('left', 'RIGHT').replace('right', 'left').replace('RIGHT', 'right'))
                  for name in landmark_slots.SLOT_NAMES]


def _assert_dots_where_the_landmarks_say(images: np.ndarray, batch: dict, visibilities: dict):
  """Each visible landmark is the centre of its dot (after a flip, the dot of its mirror
  slot); a landmark visible in the list but not in the crop has its dot cut out whole;
  occluded, truncated and absent ones are not visible, absent ones at 0."""
  side = images.shape[1]
  for image, row, landmarks, visible, flip in zip(images, batch['index'], batch['landmarks'],
                                                  batch['landmark_visible'], batch['flip']):
    for slot in range(landmark_slots.NUM_SLOTS):
      dot = _MIRRORED_SLOT[slot] if flip else slot
      listed = visibilities[row][dot]
      distance = np.abs(image.astype(int) - _DOT_COLOURS[dot]).max(axis=-1)
      rows, cols = np.nonzero(distance <= 40)
      if listed == 0:
        assert visible[slot] == (len(rows) > 0), (row, slot, flip)
      else:
        assert not visible[slot], (row, slot, flip)
      if visible[slot]:
        np.testing.assert_allclose([cols.mean() + 0.5, rows.mean() + 0.5],
                                   landmarks[slot] * side, atol=0.75, err_msg=f'{row} {slot}')
      if listed == landmark_slots.ABSENT:
        np.testing.assert_array_equal(landmarks[slot], 0)


@pytest.mark.parametrize('crop', ['none', 'gt_box'])
def test_each_landmark_lands_on_its_drawn_dot(dotted_sources, crop):
  """Through the crop's window, the resize, the crop and the flip, from the folder and
  from TFDS, in training and in evaluation."""
  import jax  # pylint: disable=g-import-not-at-top
  from deepfashion_jax.data import device_transforms  # pylint: disable=g-import-not-at-top
  both, visibilities = dotted_sources
  options = dataclasses.replace(OPTIONS, crop=crop)
  to_images = jax.jit(lambda b: device_transforms.batch_images(b, options.crop_size))
  small_box = [True, True, False, False, True, True, False, False]  # collars and waistline
  for source in both:
    evaluation = pipeline.eval_dataset(source, batch_size=4, options=options)[0]
    _assert_dots_where_the_landmarks_say(np.asarray(to_images(evaluation)), evaluation,
                                         visibilities)
    np.testing.assert_array_equal(evaluation['landmark_visible'][1],
                                  small_box if crop == 'gt_box' else [True] * 8)
    flips = []
    for seed in range(3):
      train = pipeline.train_dataset(source, batch_size=4, seed=seed, options=options)[0]
      _assert_dots_where_the_landmarks_say(np.asarray(to_images(train)), train, visibilities)
      flips += train['flip'].tolist()
    assert any(flips) and not all(flips)
