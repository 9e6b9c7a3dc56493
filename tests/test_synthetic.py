"""The synthetic writer: format checked independently of the writer and the reader."""

import filecmp
import os

import numpy as np
from PIL import Image
import pytest

from deepfashion_jax.data import annotations
from deepfashion_jax.data import landmark_slots
from deepfashion_jax.data import pipeline
from deepfashion_jax.data import sources
from deepfashion_jax.data import synthetic
from deepfashion_jax.data import vocabulary


def _rows(root, name):
  """A list file's header count, column names and rows, split the plainest way."""
  with open(os.path.join(root, name)) as f:
    lines = f.read().splitlines()
  return int(lines[0]), lines[1].split(), [line.split() for line in lines[2:]]


def test_format_checked_independently(synthetic_folder):
  root, summary = synthetic_folder
  n = summary['num_images']
  count, columns, rows = _rows(root, 'Anno/list_category_cloth.txt')
  assert (count, columns) == (50, ['category_name', 'category_type'])
  assert [r[0] for r in rows] == list(vocabulary.CATEGORY_NAMES)
  assert [int(r[1]) for r in rows] == [t + 1 for t in vocabulary.CATEGORY_TYPES]

  count, columns, rows = _rows(root, 'Anno/list_attr_cloth.txt')
  assert (count, len(rows), columns) == (1000, 1000, ['attribute_name', 'attribute_type'])
  types = [int(r[-1]) for r in rows]
  assert [types.count(t) for t in range(1, 6)] == list(vocabulary.ATTRIBUTE_TYPE_COUNTS)
  assert len({' '.join(r[:-1]) for r in rows}) == 1000

  expected_columns = {'Anno/list_category_img.txt': 2, 'Anno/list_bbox.txt': 5,
                      'Anno/list_attr_img.txt': 1001, 'Eval/list_eval_partition.txt': 2}
  first_columns = {}
  for name, width in expected_columns.items():
    count, _, rows = _rows(root, name)
    assert count == len(rows) == n, name
    assert all(len(r) == width for r in rows), name
    first_columns[name] = [r[0] for r in rows]
  assert len({tuple(v) for v in first_columns.values()}) == 1  # same images, same order
  paths = first_columns['Anno/list_bbox.txt']

  _, _, rows = _rows(root, 'Anno/list_category_img.txt')
  labels = [int(r[1]) for r in rows]
  assert set(labels) == set(range(1, 51))  # every category has images
  for path, label in zip(paths, labels):  # img/<Product_Title_Category>/img_XXXXXXXX.jpg
    prefix, folder, file_name = path.split('/')
    assert prefix == 'img' and folder.split('_')[-1] == vocabulary.CATEGORY_NAMES[label - 1]
    assert len(file_name) == len('img_00000001.jpg') and file_name.startswith('img_')

  _, _, rows = _rows(root, 'Anno/list_attr_img.txt')
  values = np.array([r[1:] for r in rows], int)
  assert set(np.unique(values)) == {-1, 0, 1}
  assert 1 <= (values == 1).sum(axis=1).mean() <= 8  # sparse positives

  _, _, rows = _rows(root, 'Eval/list_eval_partition.txt')
  splits = [r[1] for r in rows]
  assert set(splits) == {'train', 'val', 'test'}
  assert abs(splits.count('train') / n - 0.72) < 0.03

  _, _, rows = _rows(root, 'Anno/list_bbox.txt')
  for path, row in zip(paths, rows):
    x1, y1, x2, y2 = map(int, row[1:])
    with Image.open(os.path.join(root, 'Img', path)) as image:
      assert image.format == 'JPEG' and image.mode == 'RGB'
      width, height = image.size
    assert max(width, height) == 300
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, path

  count, columns, rows = _rows(root, 'Anno/list_landmarks.txt')
  assert count == n and columns[:2] == ['image_name', 'clothes_type']
  for label, row in zip(labels, rows):
    garment_type = int(row[1])
    assert garment_type == vocabulary.CATEGORY_TYPES[label - 1] + 1
    triples = np.array(row[2:], int).reshape(-1, 3)
    assert len(triples) == vocabulary.LANDMARKS_PER_GARMENT_TYPE[garment_type - 1]
    assert set(triples[:, 0]) <= {0, 1, 2}


def test_reader_reads_the_writer(synthetic_folder):
  root, summary = synthetic_folder
  index = annotations.read_deepfashion(root)
  assert len(index) == summary['num_images']
  assert {name: len(index.split_indices(name)) for name in vocabulary.SPLIT_NAMES} == \
      summary['split_sizes']
  # The visible texture is always one positive among the first few texture attributes.
  visible = index.attribute_positive[:, :len(synthetic.VISIBLE_TEXTURES)]
  np.testing.assert_array_equal(visible.sum(axis=1), 1)
  assert index.attribute_unknown.any()


def test_the_same_seed_writes_the_same_folder(tmp_path):
  first, second, other = (str(tmp_path / name) for name in ('a', 'b', 'c'))
  synthetic.write_synthetic_deepfashion(first, num_images=12, seed=3)
  synthetic.write_synthetic_deepfashion(second, num_images=12, seed=3)
  synthetic.write_synthetic_deepfashion(other, num_images=12, seed=4)
  comparison = filecmp.dircmp(first, second)
  for name in ('Anno/list_attr_img.txt', 'Anno/list_bbox.txt', 'Anno/list_landmarks.txt',
               'Eval/list_eval_partition.txt'):
    assert filecmp.cmp(os.path.join(first, name), os.path.join(second, name), shallow=False)
    assert not filecmp.cmp(os.path.join(first, name), os.path.join(other, name), shallow=False)
  for path in annotations.read_deepfashion(first).image_paths:
    assert filecmp.cmp(os.path.join(first, 'Img', path), os.path.join(second, 'Img', path),
                       shallow=False)
  assert not comparison.left_only and not comparison.right_only


def test_photo_texture_codes_like_a_photograph_over_the_same_folder(tmp_path):
  # The same drawings and lists as the flat folder, in files of DeepFashion's 10-25 KB,
  # still parsed and batched.
  flat, photo = str(tmp_path / 'flat'), str(tmp_path / 'photo')
  synthetic.write_synthetic_deepfashion(flat, num_images=16, seed=5)
  synthetic.write_synthetic_deepfashion(photo, num_images=16, seed=5, texture='photo')
  for name in ('Anno/list_category_img.txt', 'Anno/list_attr_img.txt', 'Anno/list_bbox.txt',
               'Anno/list_landmarks.txt', 'Eval/list_eval_partition.txt'):
    assert filecmp.cmp(os.path.join(flat, name), os.path.join(photo, name), shallow=False)
  index = annotations.read_deepfashion(photo)
  sizes = [os.path.getsize(os.path.join(photo, 'Img', p)) / 1e3 for p in index.image_paths]
  assert all(8 < size < 35 for size in sizes), sizes
  assert 10 < np.median(sizes) < 25, sizes
  differences = []
  for path in index.image_paths:
    with Image.open(os.path.join(flat, 'Img', path)) as a, \
         Image.open(os.path.join(photo, 'Img', path)) as b:
      first, second = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert first.shape == second.shape
    differences.append(np.abs(first - second).mean())
  # Shading and grain of a few grey levels over the drawing: the silhouette is kept.
  assert 2 < np.median(differences) < 15, differences
  source = sources.FolderSource(index, np.arange(len(index)))
  batch = next(pipeline.iterate(pipeline.train_dataset(
      source, batch_size=8, seed=0, options=pipeline.ImageOptions()), threads=1))
  assert batch['valid'].all() and not batch['skipped'].any()
  with pytest.raises(ValueError, match='texture'):
    synthetic.write_synthetic_deepfashion(str(tmp_path / 'x'), num_images=2, texture='glossy')


def _silhouette_mask(category, size=96):
  """The category's garment at its natural aspect ratio, as drawn before random jitter."""
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  polygons, natural_size = synthetic.silhouette(category)
  mask = Image.new('L', (size, size), 0)
  draw = ImageDraw.Draw(mask)
  for polygon, hole in sorted(polygons, key=lambda part: part[1]):
    draw.polygon([tuple(p) for p in polygon * natural_size / natural_size.max() * (size - 1)],
                 fill=0 if hole else 1)
  return np.asarray(mask, bool)


def test_every_category_has_its_own_silhouette():
  """No two garments overlap by more than 98%: the closest pairs differ by a zigzag hem, a
  neckline or a belt slot, a few percent of the garment."""
  masks = [_silhouette_mask(c) for c in range(vocabulary.NUM_CATEGORIES)]
  for a in range(len(masks)):
    for b in range(a + 1, len(masks)):
      iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
      assert iou < 0.98, (vocabulary.CATEGORY_NAMES[a], vocabulary.CATEGORY_NAMES[b], iou)


def _outline(mask: np.ndarray) -> np.ndarray:
  """Garment pixels with background (or the image's edge) among their 8 neighbours."""
  padded = np.pad(mask, 1)
  height, width = mask.shape
  all_garment = np.ones_like(mask)
  for dy in (0, 1, 2):
    for dx in (0, 1, 2):
      all_garment &= padded[dy:dy + height, dx:dx + width]
  return mask & ~all_garment


def test_every_landmark_is_a_point_of_the_drawn_garments_outline():
  """Each drawn landmark lies on the garment's outline, within 3% of the garment's size of
  its planned point (collar corner, cuff, waistline or hem corner), left of its right twin;
  written in the list's order of its type, mostly visible."""
  visibility = []
  for category in range(vocabulary.NUM_CATEGORIES):
    garment_type = vocabulary.CATEGORY_TYPES[category]
    slots = list(landmark_slots.FILE_ORDER_SLOTS[garment_type])
    planned = synthetic.landmark_points(category)
    assert np.isnan(planned).any(axis=1).tolist() == [s not in slots for s in range(8)]
    for seed in range(3):
      drawn = synthetic.draw_image(np.random.default_rng(seed), category, 'solid')
      assert drawn.landmarks.shape == (len(slots), 3)
      x, y = drawn.landmarks[:, 1], drawn.landmarks[:, 2]
      assert _outline(drawn.mask)[y, x].all(), (vocabulary.CATEGORY_NAMES[category], seed)
      x1, y1, x2, y2 = drawn.bbox
      expected = planned[slots] * (x2 - 1 - x1, y2 - 1 - y1) + (x1, y1)
      assert np.abs(drawn.landmarks[:, 1:] - expected).max() <= 0.03 * max(x2 - x1, y2 - y1)
      slot_x = dict(zip(slots, x))
      for left in range(0, 8, 2):
        if left in slot_x:
          assert slot_x[left] < slot_x[left + 1]
      visibility += drawn.landmarks[:, 0].tolist()
  assert set(visibility) == {0, 1} and np.mean(visibility) < 0.2


def _between_category_spread(colours, category):
  means = np.array([colours[category == c].mean(axis=0) for c in np.unique(category)])
  return means.var(axis=0).sum()


def test_colour_does_not_tell_the_category(synthetic_folder):
  """Garment colours spread between categories no more than under shuffled labels."""
  root, _ = synthetic_folder
  index = annotations.read_deepfashion(root)
  colours = []
  for path, (x1, y1, x2, y2) in zip(index.image_paths, index.bbox):
    with Image.open(os.path.join(root, 'Img', path)) as image:
      pixels = np.asarray(image.convert('RGB'))[y1:y2, x1:x2]
    colours.append(pixels.reshape(-1, 3).mean(axis=0))
  colours = np.array(colours)
  observed = _between_category_spread(colours, index.category)
  rng = np.random.default_rng(0)
  shuffled = [_between_category_spread(colours, rng.permutation(index.category))
              for _ in range(200)]
  assert observed < np.quantile(shuffled, 0.99)


def test_quirks(quirky_folder):
  root, summary = quirky_folder
  quirks = summary['quirks']
  assert set(quirks) == set(synthetic.QUIRKS) | {'known_unreadable'}
  image = lambda name: os.path.join(root, 'Img', quirks[name])
  with Image.open(image('grayscale')) as im:
    assert (im.format, im.mode) == ('JPEG', 'L')
  with Image.open(image('cmyk')) as im:
    assert (im.format, im.mode) == ('JPEG', 'CMYK')
  with Image.open(image('png_as_jpg')) as im:
    assert im.format == 'PNG' and quirks['png_as_jpg'].endswith('.jpg')
  with pytest.raises(OSError):
    with Image.open(image('truncated')) as im:
      im.load()
  assert not os.path.exists(image('missing'))
  index = annotations.read_deepfashion(root)
  assert quirks['missing'] in index.image_paths.tolist()  # listed, though absent
  present = {index.category_names[c] for c in np.unique(index.category)}
  assert present.isdisjoint(synthetic.EMPTY_CATEGORIES)
  assert len(present) == 46
