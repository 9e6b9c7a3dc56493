"""The annotation reader: every field round-trips; every bad input names file and line."""

import os
import shutil

from absl import logging
import numpy as np
import pytest

from deepfashion_jax.data import annotations
from deepfashion_jax.data import synthetic
from deepfashion_jax.data import vocabulary

NUM_IMAGES = 40


def _random_contents(seed=0, n=NUM_IMAGES):
  """List contents drawn at random, independently of the image writer."""
  rng = np.random.default_rng(seed)
  category = rng.integers(0, 50, n)
  paths = [f'img/Random_Title_{vocabulary.CATEGORY_NAMES[c]}/img_{i + 1:08d}.jpg'
           for i, c in enumerate(category)]
  x1, y1 = rng.integers(0, 100, n), rng.integers(0, 100, n)
  bbox = np.stack([x1, y1, x1 + rng.integers(1, 150, n), y1 + rng.integers(1, 150, n)], 1)
  landmarks = []
  for c in category:
    k = vocabulary.LANDMARKS_PER_GARMENT_TYPE[vocabulary.CATEGORY_TYPES[c]]
    landmarks.append(np.column_stack([rng.integers(0, 3, k), rng.integers(0, 300, (k, 2))]))
  return synthetic.ListContents(
      image_paths=paths, category=category,
      attribute_values=rng.choice(np.array([1, -1, 0], np.int8), (n, 1000), p=[.05, .9, .05]),
      bbox=bbox, split=rng.integers(0, 3, n).astype(np.int8), landmarks=landmarks)


def _write(root, contents):
  names, types = synthetic.attribute_vocabulary()
  synthetic.write_lists(str(root), contents, names, types)
  os.makedirs(os.path.join(root, 'Img', 'img'), exist_ok=True)
  return names, types


@pytest.fixture
def lists(tmp_path):
  contents = _random_contents()
  names, types = _write(tmp_path, contents)
  return str(tmp_path), contents, names, types


def test_every_field_round_trips(lists):
  root, contents, names, types = lists
  index = annotations.read_deepfashion(root)
  assert index.image_paths.tolist() == contents.image_paths
  np.testing.assert_array_equal(index.category, contents.category)
  np.testing.assert_array_equal(index.category_type,
                                np.array(vocabulary.CATEGORY_TYPES)[contents.category])
  np.testing.assert_array_equal(index.attribute_positive, contents.attribute_values == 1)
  np.testing.assert_array_equal(index.attribute_unknown, contents.attribute_values == 0)
  np.testing.assert_array_equal(index.bbox, contents.bbox)
  np.testing.assert_array_equal(index.split, contents.split)
  assert index.category_names.tolist() == list(vocabulary.CATEGORY_NAMES)
  np.testing.assert_array_equal(index.category_types, vocabulary.CATEGORY_TYPES)
  assert index.attribute_names.tolist() == names
  assert any(' ' in name for name in names)  # names with spaces survive
  np.testing.assert_array_equal(index.attribute_types, types)
  for i, points in enumerate(contents.landmarks):
    k = len(points)
    np.testing.assert_array_equal(index.landmark_visibility[i, :k], points[:, 0])
    np.testing.assert_array_equal(index.landmark_xy[i, :k], points[:, 1:])
    assert (index.landmark_visibility[i, k:] == -1).all()
  np.testing.assert_array_equal(index.landmark_garment_type, index.category_type)
  assert index.image_dir() == os.path.join(root, 'Img')


def test_attribute_chunks_split_lines_correctly(lists, monkeypatch):
  """Chunk boundaries that cut lines anywhere give the same values."""
  root, contents, _, _ = lists
  monkeypatch.setattr(annotations, '_ATTR_CHUNK_BYTES', 4999)
  index = annotations.read_deepfashion(root)
  np.testing.assert_array_equal(index.attribute_positive, contents.attribute_values == 1)
  np.testing.assert_array_equal(index.attribute_unknown, contents.attribute_values == 0)


def test_crlf_line_endings_read_the_same(lists):
  root, contents, _, _ = lists
  for folder in ('Anno', 'Eval'):
    for name in os.listdir(os.path.join(root, folder)):
      path = os.path.join(root, folder, name)
      with open(path, 'rb') as f:
        data = f.read()
      with open(path, 'wb') as f:
        f.write(data.replace(b'\n', b'\r\n'))
  index = annotations.read_deepfashion(root)
  assert index.image_paths.tolist() == contents.image_paths
  np.testing.assert_array_equal(index.attribute_positive, contents.attribute_values == 1)


def test_rows_in_another_order_are_joined_by_path(lists):
  root, contents, _, _ = lists
  path = os.path.join(root, annotations.BBOX)
  with open(path) as f:
    lines = f.read().splitlines()
  with open(path, 'w') as f:
    f.write('\n'.join(lines[:2] + lines[2:][::-1]) + '\n')
  np.testing.assert_array_equal(annotations.read_deepfashion(root).bbox, contents.bbox)


def test_landmarks_with_a_variation_type_column(lists):
  root, contents, _, _ = lists
  path = os.path.join(root, annotations.LANDMARKS)
  with open(path) as f:
    lines = f.read().splitlines()
  lines[1] = lines[1].replace('clothes_type', 'clothes_type  variation_type')
  lines[2:] = [' '.join(line.split()[:2] + ['1'] + line.split()[2:]) for line in lines[2:]]
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  index = annotations.read_deepfashion(root)
  k = len(contents.landmarks[0])
  np.testing.assert_array_equal(index.landmark_xy[0, :k], contents.landmarks[0][:, 1:])


def test_landmarks_are_optional(lists):
  root, _, _, _ = lists
  os.remove(os.path.join(root, annotations.LANDMARKS))
  index = annotations.read_deepfashion(root)
  assert index.landmark_xy is None and index.landmark_visibility is None


def _edit_line(root, name, line_number, edit):
  path = os.path.join(root, name)
  with open(path) as f:
    lines = f.read().splitlines()
  lines[line_number - 1] = edit(lines[line_number - 1])
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def _replace_last_token(value):
  return lambda line: ' '.join(line.split()[:-1] + [value])


def _replace_token(position, value):
  def edit(line):
    tokens = line.split()
    tokens[position] = value
    return ' '.join(tokens)
  return edit


@pytest.mark.parametrize('name, line, edit, message', [
    (annotations.BBOX, 5, lambda line: ' '.join(line.split()[:-1]),
     'list_bbox.txt, line 5: expected 5 columns, found 4'),
    (annotations.ATTR_IMG, 7, _replace_token(10, '2'),
     'list_attr_img.txt, line 7: expected values 1, -1 or 0 separated by blanks, found \'2\''),
    (annotations.ATTR_IMG, 4, lambda line: line.rsplit(' ', 1)[0],
     'list_attr_img.txt, line 4: expected the image path and 1000 values, found 999'),
    (annotations.ATTR_IMG, 9, _replace_token(3, '-0'),
     'list_attr_img.txt, line 9: expected values 1, -1 or 0 separated by blanks'),
    (annotations.ATTR_IMG, 9, _replace_token(3, '11'),
     'list_attr_img.txt, line 9: expected values 1, -1 or 0 separated by blanks'),
    (annotations.ATTR_IMG, 9, _replace_token(3, '1-1'),
     'list_attr_img.txt, line 9: expected values 1, -1 or 0 separated by blanks'),
    (annotations.CATEGORY_IMG, 6, _replace_last_token('51'),
     'list_category_img.txt, line 6: category label must be an integer in 1..50, found \'51\''),
    (annotations.CATEGORY_IMG, 6, _replace_last_token('0'),
     'list_category_img.txt, line 6: category label must be an integer in 1..50'),
    (annotations.CATEGORY_IMG, 6, _replace_last_token('x'),
     'list_category_img.txt, line 6: category label must be an integer in 1..50'),
    (annotations.BBOX, 8, _replace_token(3, 'ten'),
     'list_bbox.txt, line 8: box coordinates x_1 y_1 x_2 y_2 must be integers, found \'ten\''),
    (annotations.BBOX, 8, _replace_token(2, '1e3'),
     'list_bbox.txt, line 8: box coordinates x_1 y_1 x_2 y_2 must be integers, found \'1e3\''),
    (annotations.BBOX, 1, lambda line: str(int(line) + 1),
     f'list_bbox.txt: line 1 says {NUM_IMAGES + 1} rows, found {NUM_IMAGES}'),
    (annotations.ATTR_IMG, 1, lambda line: str(int(line) - 1),
     f'list_attr_img.txt: line 1 says {NUM_IMAGES - 1} rows, found more'),
    (annotations.ATTR_IMG, 1, lambda line: 'many',
     'list_attr_img.txt, line 1: expected the number of rows'),
    (annotations.CATEGORY_CLOTH, 3, _replace_last_token('4'),
     'list_category_cloth.txt, line 3: category type must be an integer in 1..3'),
    (annotations.ATTR_CLOTH, 12, _replace_last_token('6'),
     'list_attr_cloth.txt, line 12: attribute type must be an integer in 1..5'),
    (annotations.PARTITION, 10, _replace_last_token('training'),
     'list_eval_partition.txt, line 10: expected train, val or test, found \'training\''),
    (annotations.BBOX, 7, _replace_token(0, 'img/Elsewhere/img_00000001.jpg'),
     'list_bbox.txt, line 7: image img/Elsewhere/img_00000001.jpg is absent from '),
    (annotations.LANDMARKS, 5, lambda line: line + ' 0',
     'list_landmarks.txt, line 5: expected (visibility, x, y) triples'),
    (annotations.LANDMARKS, 6, _replace_token(2, '7'),
     'list_landmarks.txt, line 6: landmark visibility must be 0, 1 or 2'),
    (annotations.LANDMARKS, 6, _replace_token(3, '1.5'),
     'list_landmarks.txt, line 6: landmark values must be integers, found \'1.5\''),
    (annotations.LANDMARKS, 6, _replace_token(4, '40000'),
     'list_landmarks.txt, line 6: landmark coordinates must be integers in -32768..32767, '
     'found 40000'),
])
def test_bad_input_names_file_and_line(lists, name, line, edit, message):
  root = lists[0]
  _edit_line(root, name, line, edit)
  with pytest.raises(annotations.AnnotationError) as error:
    annotations.read_deepfashion(root)
  assert message in str(error.value)
  assert os.path.join(root, os.path.dirname(name)) in str(error.value)


# Boxes that are data, not format errors: line of list_bbox.txt -> its values.
ODD_BOXES = {7: '50 60 40 90', 9: '-3 10 100 120', 12: '10 10 10 50'}
ODD_BOXES_WARNING = ('list_bbox.txt: 3 boxes are empty or outside their image (line 7: 50 60 '
                     '40 90; line 9: -3 10 100 120; line 12: 10 10 10 50): they are clipped '
                     'to the image, and an image left with no box has its box loss and box '
                     'metrics masked')
ODD_BOXES_REFUSAL = ('list_bbox.txt, line 7: expected a box with 0 <= x_1 < x_2 and 0 <= y_1 '
                     '< y_2, found 50 60 40 90 (3 such rows; config.data.strict refuses them')


def _plant_boxes(root, boxes):
  for line, box in boxes.items():
    _edit_line(root, annotations.BBOX, line, lambda text, box=box: ' '.join(
        text.split()[:1] + box.split()))


def _warnings(monkeypatch, file_name):
  """The warnings logged from now on that are about `file_name`."""
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda fmt, *args: warnings.append(fmt % args))
  return lambda: [w for w in warnings if file_name in w]


def test_odd_boxes_load_counted_with_one_warning_naming_their_lines(lists, monkeypatch):
  root = lists[0]
  assert 'boxes empty or outside their image: 0 ' in annotations.read_deepfashion(root).summary()
  _plant_boxes(root, ODD_BOXES)
  warnings = _warnings(monkeypatch, 'list_bbox.txt')
  index = annotations.read_deepfashion(root)
  assert len(index) == NUM_IMAGES
  np.testing.assert_array_equal(index.bbox[[4, 6, 9]], [[50, 60, 40, 90], [-3, 10, 100, 120],
                                                        [10, 10, 10, 50]])  # as listed
  assert len(warnings()) == 1 and ODD_BOXES_WARNING in warnings()[0]
  assert os.path.join(root, annotations.BBOX) in warnings()[0]
  assert 'boxes empty or outside their image: 3 (clipped' in index.summary()


def test_the_warning_names_the_first_five_odd_boxes_by_line(lists, monkeypatch):
  root = lists[0]
  _plant_boxes(root, {line: '5 5 5 5' for line in range(3, 11)})
  warnings = _warnings(monkeypatch, 'list_bbox.txt')
  annotations.read_deepfashion(root)
  (warning,) = warnings()
  assert '8 boxes are empty' in warning
  assert '(line 3: 5 5 5 5; line 4: 5 5 5 5; line 5: 5 5 5 5; line 6: 5 5 5 5; line 7: 5 5 5 5; ' \
         '3 more)' in warning


def test_the_lines_named_are_those_of_list_bbox(lists, monkeypatch):
  """list_bbox.txt in another order than the master list: its own lines are named."""
  root = lists[0]
  path = os.path.join(root, annotations.BBOX)
  with open(path) as f:
    lines = f.read().splitlines()
  with open(path, 'w') as f:
    f.write('\n'.join(lines[:2] + lines[2:][::-1]) + '\n')
  _plant_boxes(root, {5: '9 9 3 30'})  # the row of the master list's last image
  warnings = _warnings(monkeypatch, 'list_bbox.txt')
  index = annotations.read_deepfashion(root)
  np.testing.assert_array_equal(index.bbox[NUM_IMAGES - 3], [9, 9, 3, 30])
  assert '1 boxes are empty or outside their image (line 5: 9 9 3 30)' in warnings()[0]


def test_strict_refuses_odd_boxes_naming_file_and_line_parsed_or_cached(lists, tmp_path,
                                                                       monkeypatch):
  root = lists[0]
  _plant_boxes(root, ODD_BOXES)
  with pytest.raises(annotations.AnnotationError) as error:
    annotations.read_deepfashion(root, strict=True)
  assert ODD_BOXES_REFUSAL in str(error.value)
  assert os.path.join(root, annotations.BBOX) in str(error.value)

  cache_dir = str(tmp_path / 'cache')
  assert len(annotations.load_deepfashion(root, cache_dir)) == NUM_IMAGES  # cached, lenient

  def no_parsing(_):
    raise AssertionError('parsed although the cache is valid')
  monkeypatch.setattr(annotations, '_parse_lists', no_parsing)
  with pytest.raises(annotations.AnnotationError) as error:
    annotations.load_deepfashion(root, cache_dir, strict=True)
  assert ODD_BOXES_REFUSAL in str(error.value)


def test_strict_comes_from_the_config(lists, tmp_path):
  from deepfashion_jax.data import folder  # pylint: disable=g-import-not-at-top
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  root = lists[0]
  _plant_boxes(root, ODD_BOXES)
  config = test_config.get_config()
  config.data.data_dir = root
  config.data.partition = 'official'
  assert len(folder.load_index(config.data, str(tmp_path / 'run'))) == NUM_IMAGES
  config.data.strict = True
  with pytest.raises(annotations.AnnotationError, match='list_bbox.txt, line 7: '):
    folder.load_index(config.data, str(tmp_path / 'run'))


def test_landmarks_at_negative_coordinates_are_data(lists, monkeypatch):
  root = lists[0]
  # Line 6: its first landmark visible at x = -4. Line 8: its first landmark truncated at
  # y = -9, which is what truncated means: not counted.
  _edit_line(root, annotations.LANDMARKS, 6, _replace_token(2, '0'))
  _edit_line(root, annotations.LANDMARKS, 6, _replace_token(3, '-4'))
  _edit_line(root, annotations.LANDMARKS, 8, _replace_token(2, '2'))
  _edit_line(root, annotations.LANDMARKS, 8, _replace_token(4, '-9'))
  with open(os.path.join(root, annotations.LANDMARKS)) as f:
    y = int(f.read().splitlines()[5].split()[4])  # line 6's first landmark's y
  warnings = _warnings(monkeypatch, 'list_landmarks.txt')
  index = annotations.read_deepfashion(root)
  np.testing.assert_array_equal(index.landmark_xy[3, 0], [-4, y])
  assert index.landmark_xy[5, 0, 1] == -9 and index.landmark_visibility[5, 0] == 2
  (warning,) = warnings()
  assert (f'list_landmarks.txt: 1 images have a visible or occluded landmark at a negative '
          f'coordinate (line 6: landmark 1 at (-4, {y})): they are kept as they are') in warning
  assert 'landmarks: present, 1 images with a landmark at a negative coordinate' in \
      index.summary()
  with pytest.raises(annotations.AnnotationError) as error:
    annotations.read_deepfashion(root, strict=True)
  assert (f'list_landmarks.txt, line 6: expected visible and occluded landmarks at '
          f'coordinates >= 0, found landmark 1 at (-4, {y})') in str(error.value)


def test_image_missing_from_a_list_names_both_files(lists):
  root, contents, _, _ = lists
  path = os.path.join(root, annotations.PARTITION)
  with open(path) as f:
    lines = f.read().splitlines()
  with open(path, 'w') as f:  # drop one row and fix the count, as a careless edit would
    f.write('\n'.join([str(NUM_IMAGES - 1)] + lines[1:5] + lines[6:]) + '\n')
  with pytest.raises(annotations.AnnotationError,
                     match=rf'list_category_img.txt, line 6: image {contents.image_paths[3]} '
                           'is absent from .*list_eval_partition.txt'):
    annotations.read_deepfashion(root)


def test_missing_file_is_named(lists):
  root = lists[0]
  os.remove(os.path.join(root, annotations.BBOX))
  with pytest.raises(annotations.AnnotationError, match='list_bbox.txt: file not found'):
    annotations.read_deepfashion(root)


def test_missing_image_folder_is_named(lists):
  root = lists[0]
  shutil.rmtree(os.path.join(root, 'Img'))
  index = annotations.read_deepfashion(root)
  with pytest.raises(annotations.AnnotationError, match='no image folder'):
    index.image_dir()
  os.makedirs(os.path.join(root, 'img'))  # unzipped flat, without Img/
  assert index.image_dir() == root


def test_known_unreadable_images_are_dropped_with_a_notice(quirky_folder, monkeypatch):
  root, summary = quirky_folder
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda fmt, *args: warnings.append(fmt % args))
  index = annotations.read_deepfashion(root)
  unreadable = summary['quirks']['known_unreadable']
  assert unreadable not in index.image_paths.tolist()
  assert index.dropped_images == (unreadable,)
  assert len(index) == summary['num_images'] - 1
  assert any(unreadable in w for w in warnings)


def test_cache_is_used_then_invalidated_by_a_changed_file(lists, tmp_path, monkeypatch):
  root, contents, _, _ = lists
  cache_dir = str(tmp_path / 'cache')
  first = annotations.load_deepfashion(root, cache_dir)
  assert len(os.listdir(cache_dir)) == 1

  def no_parsing(_):
    raise AssertionError('parsed although the cache is valid')
  with monkeypatch.context() as patch:
    patch.setattr(annotations, '_parse_lists', no_parsing)
    cached = annotations.load_deepfashion(root, cache_dir)
  for name in ('image_paths', 'category', 'category_type', 'attribute_positive',
               'attribute_unknown', 'bbox', 'split', 'category_names', 'attribute_names',
               'attribute_types', 'landmark_visibility', 'landmark_xy'):
    np.testing.assert_array_equal(getattr(cached, name), getattr(first, name), err_msg=name)
  assert cached.root == first.root

  _edit_line(root, annotations.BBOX, 3, _replace_token(3, '999'))
  changed = annotations.load_deepfashion(root, cache_dir)
  assert changed.bbox[0, 2] == 999
  assert len(os.listdir(cache_dir)) == 1  # the stale cache was removed


def test_unreadable_cache_is_parsed_again(lists, tmp_path):
  root = lists[0]
  cache_dir = str(tmp_path / 'cache')
  annotations.load_deepfashion(root, cache_dir)
  path = annotations.cache_path(root, cache_dir)
  with open(path, 'r+b') as f:
    f.truncate(100)
  assert len(annotations.load_deepfashion(root, cache_dir)) == NUM_IMAGES


def _the_baselines_split(num_images):
  """The baseline's train.py, as written: shuffle a list, cut at int(0.9 N), int(0.95 N)."""
  indices = list(range(num_images))
  np.random.RandomState(0).shuffle(indices)
  return (indices[0:int(0.9 * len(indices))],
          indices[int(0.9 * len(indices)):int(0.95 * len(indices))],
          indices[int(0.95 * len(indices))::])


@pytest.mark.parametrize('num_images', [20, 1001, 10000, 289219])
def test_baseline_split_is_the_baselines_own(num_images):
  split = annotations.baseline_split(num_images)
  for part, indices in enumerate(_the_baselines_split(num_images)):
    np.testing.assert_array_equal(np.flatnonzero(split == part), np.sort(indices))


def test_baseline_split_is_disjoint_90_5_5_and_fixed(lists):
  root = lists[0]
  split = annotations.baseline_split(10000)
  np.testing.assert_array_equal(np.bincount(split), [9000, 500, 500])
  np.testing.assert_array_equal(split, annotations.baseline_split(10000))
  index = annotations.load_deepfashion(root, partition='baseline')
  parts = [set(index.split_indices(name)) for name in vocabulary.SPLIT_NAMES]
  assert sum(len(p) for p in parts) == NUM_IMAGES
  assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
  with pytest.raises(ValueError, match='partition must be one of'):
    annotations.load_deepfashion(root, partition='random')
