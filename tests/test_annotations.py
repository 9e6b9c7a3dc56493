"""The annotation reader: every field round-trips; every bad input names file and line."""

import os
import shutil
import tracemalloc

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


# ----------------------------------------------------------------------------- hostile lists

# Every list whose first column is an image path.
PATH_LISTS = (annotations.CATEGORY_IMG, annotations.ATTR_IMG, annotations.BBOX,
              annotations.PARTITION, annotations.LANDMARKS)


def _plant_path(root, line, path):
  """Lists `path` instead of the image on `line` of every list (they share one order)."""
  for name in PATH_LISTS:
    _edit_line(root, name, line, _replace_token(0, path))


def _traced_peak(function):
  """What `function` returns (or raises) and the peak of the memory traced meanwhile."""
  tracemalloc.start()
  try:
    return _outcome(function), tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def _outcome(function):
  try:
    return function()
  except annotations.AnnotationError as e:
    return e


@pytest.mark.parametrize('path, problem', [
    ('../../../../etc/passwd', "'../../../../etc/passwd', whose \"..\" leads out of the image "
                               'folder'),
    ('img/../../secret.jpg', 'leads out of the image folder'),
    ('/etc/passwd', "'/etc/passwd', an absolute path"),
    ('/dev/zero', "'/dev/zero', an absolute path"),
    ('img/a\x00b.jpg', "the control character '\\x00' in 'img/a\\x00b.jpg'"),
    ('img/a\x1bb.jpg', "the control character '\\x1b'"),
    ('.', "'.', the image folder itself"),
    ('img/' + 'a' * 2000 + '.jpg', 'a path of 2,008 bytes (at most 1,024)'),
    ('img/' + 'a' * 300 + '.jpg', 'a part of which is longer than 255 bytes'),
])
def test_unsafe_image_paths_are_odd_rows_left_out_named_and_counted(lists, monkeypatch, path,
                                                                    problem):
  root, contents, _, _ = lists
  _plant_path(root, 5, path)
  warnings = _warnings(monkeypatch, '.txt')
  index = annotations.read_deepfashion(root)
  assert len(index) == NUM_IMAGES - 1
  assert index.image_paths.tolist() == contents.image_paths[:2] + contents.image_paths[3:]
  np.testing.assert_array_equal(index.bbox, np.delete(contents.bbox, 2, axis=0))
  np.testing.assert_array_equal(index.attribute_positive,
                                np.delete(contents.attribute_values, 2, axis=0) == 1)
  assert len(warnings()) == len(PATH_LISTS)  # one per list, each naming the line
  for name in PATH_LISTS:
    (warning,) = [w for w in warnings() if os.path.join(root, name) in w]
    assert '1 rows left out for their image path (line 5: ' in warning and problem in warning
    assert len(warning) < 1000
  assert ('rows left out for an unsafe image path: 5 (list_category_img.txt 1, '
          'list_attr_img.txt 1, list_bbox.txt 1, list_eval_partition.txt 1, '
          'list_landmarks.txt 1; never opened)') in index.summary()


def test_safe_paths_are_not_odd():
  for path in ('img/Sheer_Pleated-Front_Blouse/img_00000001.jpg', 'img/./a.jpg', 'img//a.jpg',
               'a', 'img/caf\u00e9.jpg', 'img/' + 'a' * 250 + '/' + 'b' * 250 + '.jpg'):
    assert annotations.path_problem(path) is None, path
  assert annotations.path_problem('img/' + '\u00e9' * 511) == 'a path of 1,026 bytes (at most ' \
                                                             '1,024)'  # bytes, not characters


def test_strict_refuses_unsafe_image_paths_parsed_or_cached(lists, tmp_path, monkeypatch):
  root = lists[0]
  _plant_path(root, 4, '../../../../etc/passwd')
  _plant_path(root, 9, '/dev/zero')
  refusal = (f'{os.path.join(root, annotations.CATEGORY_IMG)}, line 4: expected a relative '
             "image path inside the image folder, found '../../../../etc/passwd', whose \"..\" "
             'leads out of the image folder (2 such rows; config.data.strict refuses them')
  with pytest.raises(annotations.AnnotationError) as error:
    annotations.read_deepfashion(root, strict=True)
  assert refusal in str(error.value)
  cache_dir = str(tmp_path / 'cache')
  assert len(annotations.load_deepfashion(root, cache_dir)) == NUM_IMAGES - 2

  def no_parsing(_):
    raise AssertionError('parsed although the cache is valid')
  monkeypatch.setattr(annotations, '_parse_lists', no_parsing)
  cached = annotations.load_deepfashion(root, cache_dir)
  assert len(cached) == NUM_IMAGES - 2 and '/dev/zero' not in cached.image_paths.tolist()
  assert 'unsafe image path: 10 (' in cached.summary()
  with pytest.raises(annotations.AnnotationError) as error:
    annotations.load_deepfashion(root, cache_dir, strict=True)
  assert refusal in str(error.value)


def test_a_megabyte_path_makes_no_huge_array_nor_message(lists, monkeypatch):
  """Before, the index's fixed-width path array took the longest path's width for every
  row (40 x 1 M characters x 4 bytes: 160 MB) and the warning quoted it whole."""
  root = lists[0]
  _plant_path(root, 6, 'img/' + 'x' * 2**20)
  files = sum(os.path.getsize(os.path.join(root, name)) for name in annotations.ALL_FILES)
  warnings = _warnings(monkeypatch, '.txt')
  index, peak = _traced_peak(lambda: annotations.read_deepfashion(root))
  assert len(index) == NUM_IMAGES - 1
  assert index.image_paths.dtype.itemsize <= 4 * annotations.MAX_PATH_BYTES
  assert peak < 4 * files + (8 << 20), (peak, files)
  assert all(len(w) < 2000 for w in warnings())


LARGE = {'2^31': str(2**31), '2^40+100': str(2**40 + 100), '2^64': str(2**64),
         '-2^63-1': str(-2**63 - 1)}


@pytest.mark.parametrize('name, line, edit, message', [
    (annotations.BBOX, 5, _replace_token(3, LARGE['2^40+100']),
     'list_bbox.txt, line 5: box coordinates x_1 y_1 x_2 y_2 must be integers in '
     f'-2147483648..2147483647, found {2**40 + 100}'),
    (annotations.BBOX, 5, _replace_token(1, LARGE['2^31']),
     f'list_bbox.txt, line 5: box coordinates x_1 y_1 x_2 y_2 must be integers in '
     f'-2147483648..2147483647, found {2**31}'),
    (annotations.BBOX, 6, _replace_token(4, LARGE['2^64']),
     f"list_bbox.txt, line 6: box coordinates x_1 y_1 x_2 y_2 must be integers, found "
     f"'{2**64}'"),
    (annotations.BBOX, 6, _replace_token(2, LARGE['-2^63-1']),
     'list_bbox.txt, line 6: box coordinates x_1 y_1 x_2 y_2 must be integers, found'),
    (annotations.LANDMARKS, 7, _replace_token(3, str(2**40 + 7)),
     'list_landmarks.txt, line 7: landmark coordinates must be integers in -32768..32767, '
     f'found {2**40 + 7}'),
    (annotations.LANDMARKS, 7, _replace_token(2, str(2**32 + 1)),
     'list_landmarks.txt, line 7: landmark visibility must be 0, 1 or 2'),
    (annotations.LANDMARKS, 7, _replace_token(4, LARGE['2^64']),
     f"list_landmarks.txt, line 7: landmark values must be integers, found '{2**64}'"),
    (annotations.CATEGORY_IMG, 8, _replace_token(1, LARGE['2^64']),
     f"list_category_img.txt, line 8: category label must be an integer in 1..50, found "
     f"'{2**64}'"),
    (annotations.LANDMARKS, 9, _replace_token(1, LARGE['2^64']),
     'list_landmarks.txt, line 9: clothes type must be an integer in 1..3'),
    (annotations.CATEGORY_CLOTH, 4, _replace_token(1, str(2**32 + 2)),
     'list_category_cloth.txt, line 4: category type must be an integer in 1..3'),
])
def test_numbers_are_checked_before_they_are_narrowed(lists, name, line, edit, message):
  test_bad_input_names_file_and_line(lists, name, line, edit, message)


@pytest.mark.parametrize('name', [annotations.ATTR_IMG, annotations.BBOX,
                                  annotations.CATEGORY_IMG, annotations.ATTR_CLOTH])
@pytest.mark.parametrize('count', [str(2**40), '-1', str(2**64), '9' * 5000, '+3', '\u0664\u0660'])
def test_header_counts_are_checked_against_the_files_size(lists, name, count):
  """Before, list_attr_img.txt's count was allocated at once: 2^40 rows, 1,000 TiB."""
  root = lists[0]
  _edit_line(root, name, 1, lambda _: count)
  error, peak = _traced_peak(lambda: annotations.read_deepfashion(root))
  assert isinstance(error, annotations.AnnotationError)
  assert f'{os.path.join(root, name)}, line 1: ' in str(error)
  assert len(str(error)) < 500
  assert peak < 16 << 20


def test_a_count_the_file_can_hold_is_still_compared_with_its_rows(lists):
  root = lists[0]
  _edit_line(root, annotations.ATTR_IMG, 1, lambda _: str(NUM_IMAGES + 1))
  with pytest.raises(annotations.AnnotationError, match=f'line 1 says {NUM_IMAGES + 1} rows, '
                                                        f'found {NUM_IMAGES}'):
    annotations.read_deepfashion(root)


def _replace_bytes(root, name, old, new):
  path = os.path.join(root, name)
  with open(path, 'rb') as f:
    data = f.read()
  assert old in data
  with open(path, 'wb') as f:
    f.write(data.replace(old, new, 1))


@pytest.mark.parametrize('name, old, line', [
    (annotations.CATEGORY_IMG, b'img/', 3),
    (annotations.ATTR_IMG, b'img/', 3),
    (annotations.ATTR_IMG, b'image_name', 2),
    (annotations.ATTR_IMG, str(NUM_IMAGES).encode(), 1),
    (annotations.BBOX, b'x_1', 2),
    (annotations.ATTR_CLOTH, b'attribute_name', 2),
    (annotations.LANDMARKS, b'img/', 3),
])
def test_bytes_that_are_not_utf8_name_file_and_line(lists, name, old, line):
  root = lists[0]
  _replace_bytes(root, name, old, b'\xff\xfe' + old)
  with pytest.raises(annotations.AnnotationError) as error:
    annotations.read_deepfashion(root)
  assert (f"{os.path.join(root, name)}, line {line}: expected UTF-8 text, found the byte "
          "b'\\xff'") in str(error.value)


def test_bytes_that_are_not_utf8_in_a_later_chunk_name_their_line(lists, monkeypatch):
  root = lists[0]
  monkeypatch.setattr(annotations, '_ATTR_CHUNK_BYTES', 4999)
  _edit_line(root, annotations.ATTR_IMG, 30, lambda line: line)  # one order of rows
  _replace_bytes(root, annotations.ATTR_IMG, b'img/', b'img/')
  path = os.path.join(root, annotations.ATTR_IMG)
  with open(path, 'rb') as f:
    lines = f.read().split(b'\n')
  lines[29] = b'img/\xc3' + lines[29][4:]
  with open(path, 'wb') as f:
    f.write(b'\n'.join(lines))
  with pytest.raises(annotations.AnnotationError, match='list_attr_img.txt, line 30: expected '
                                                        'UTF-8 text'):
    annotations.read_deepfashion(root)


@pytest.mark.parametrize('name, token', [
    (annotations.CATEGORY_IMG, 1), (annotations.BBOX, 2), (annotations.PARTITION, 1),
    (annotations.LANDMARKS, 3),
])
def test_error_messages_quote_a_long_value_short(lists, name, token):
  root = lists[0]
  _edit_line(root, name, 5, _replace_token(token, 'y' * 2**20))
  with pytest.raises(annotations.AnnotationError) as error:
    annotations.read_deepfashion(root)
  assert f'{os.path.join(root, name)}, line 5: ' in str(error.value)
  assert "'yyyy" in str(error.value) and '(1,048,576 characters)' in str(error.value)
  assert len(str(error.value)) < 600


@pytest.mark.parametrize('name', [annotations.CATEGORY_CLOTH, annotations.ATTR_CLOTH])
def test_names_longer_than_the_bound_are_refused(lists, name):
  """Before, one 1 MB name made the names' fixed-width array 1 M characters wide."""
  root = lists[0]
  _edit_line(root, name, 4, _replace_token(0, 'z' * 2**20))
  error, peak = _traced_peak(lambda: annotations.read_deepfashion(root))
  assert isinstance(error, annotations.AnnotationError)
  assert f'{os.path.join(root, name)}, line 4: ' in str(error)
  assert 'must be at most 256 characters' in str(error) and len(str(error)) < 600
  assert peak < 32 << 20


@pytest.mark.parametrize('name, message', [
    (annotations.CATEGORY_CLOTH, 'list_category_cloth.txt: expected at least one category'),
    (annotations.ATTR_CLOTH, 'list_attr_cloth.txt: expected at least one attribute'),
    (annotations.CATEGORY_IMG, 'list_category_img.txt: expected at least one image'),
])
def test_lists_without_rows_are_refused(lists, name, message):
  """Before, a folder whose lists had no rows loaded, and its summary (`--mode=describe`)
  raised a bare ValueError (the minimum over no categories) or printed nan."""
  root = lists[0]
  for emptied in PATH_LISTS + (name,):
    path = os.path.join(root, emptied)
    with open(path) as f:
      column_names = f.read().splitlines()[1]
    with open(path, 'w') as f:
      f.write(f'0\n{column_names}\n')
  with pytest.raises(annotations.AnnotationError, match=message):
    annotations.read_deepfashion(root).summary()


def test_a_landmark_row_without_triples_is_read(lists):
  root = lists[0]
  _edit_line(root, annotations.LANDMARKS, 5, lambda line: ' '.join(line.split()[:2]))
  index = annotations.read_deepfashion(root)
  assert (index.landmark_visibility[2] == -1).all() and (index.landmark_xy[2] == 0).all()


def test_many_unsafe_paths_are_counted_and_the_first_five_named(lists, monkeypatch):
  root = lists[0]
  for line in range(3, 11):
    _plant_path(root, line, f'/abs/{line}.jpg')
  warnings = _warnings(monkeypatch, annotations.BBOX)
  index = annotations.read_deepfashion(root)
  assert len(index) == NUM_IMAGES - 8
  (warning,) = warnings()
  assert ("8 rows left out for their image path (line 3: '/abs/3.jpg', an absolute path; "
          "line 4: '/abs/4.jpg', an absolute path; line 5:") in warning
  assert "line 7: '/abs/7.jpg', an absolute path; 3 more)" in warning
  assert 'unsafe image path: 40 (list_category_img.txt 8, ' in index.summary()
