"""Host transforms (pure NumPy) and the device resampling, against plain PIL references."""

import io

import jax
import numpy as np
from PIL import Image
import pytest

from deepfashion_jax.data import device_transforms
from deepfashion_jax.data import transforms


def _photo(height=200, width=300, seed=0):
  """A smooth random image with edges: resampling errors show in it."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (height // 10 + 1, width // 10 + 1, 3)).astype(np.uint8)
  image = np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR)).copy()
  image[height // 3:height // 2, width // 4:width // 2] = rng.integers(0, 256, 3)
  return image


def _encode(image, format_name='JPEG', mode='RGB'):
  buffer = io.BytesIO()
  Image.fromarray(image).convert(mode).save(buffer, format=format_name)
  return buffer.getvalue()


@pytest.mark.parametrize('mode, format_name', [('RGB', 'JPEG'), ('L', 'JPEG'),
                                               ('CMYK', 'JPEG'), ('RGB', 'PNG')])
def test_every_kind_of_image_decodes_to_rgb(mode, format_name):
  image = _photo(60, 80)
  decoded = transforms.decode_image(_encode(image, format_name, mode))
  assert decoded.shape == (60, 80, 3) and decoded.dtype == np.uint8
  reference = np.asarray(Image.open(io.BytesIO(_encode(image, format_name, mode))).convert('RGB'))
  assert np.abs(decoded.astype(int) - reference).mean() < 2  # JPEG decoders may round apart


@pytest.mark.parametrize('data', [_encode(_photo())[:3000], b'not an image at all', b''])
def test_unreadable_images_raise(data):
  with pytest.raises(transforms.ImageDecodeError):
    transforms.decode_image(data)


def _resize_then_crop(image, img_size, crop_size, left, top, flip):
  """The baseline's order of operations, written plainly."""
  resized = np.asarray(Image.fromarray(image).resize((img_size, img_size), Image.BILINEAR))
  crop = resized[top:top + crop_size, left:left + crop_size]
  return crop[:, ::-1] if flip else crop


def _draws(seed, img_size=256, crop_size=224):
  """The offsets and flip that random_train_crop draws, in its order."""
  rng = np.random.default_rng(seed)
  left, top = (int(rng.integers(0, img_size - crop_size + 1)) for _ in range(2))
  return left, top, bool(rng.random() < 0.5)


@pytest.mark.parametrize('seed', range(6))
def test_train_crop_equals_resize_then_crop_then_flip(seed):
  image = _photo(200, 300, seed)
  crop = transforms.random_train_crop(np.random.default_rng(seed), 200, 300, 256, 224)
  left, top, flip = _draws(seed)
  assert crop.flip == flip
  np.testing.assert_array_equal(transforms.resize_crop_flip(image, crop, 224),
                                _resize_then_crop(image, 256, 224, left, top, flip))


def test_train_crops_cover_the_offsets_and_flip_half_the_time():
  rng = np.random.default_rng(0)
  crops = [transforms.random_train_crop(rng, 300, 300, 256, 224) for _ in range(2000)]
  lefts = [round(c.region[0] * 256 / 300) for c in crops]
  assert min(lefts) == 0 and max(lefts) == 32
  assert 0.45 < np.mean([c.flip for c in crops]) < 0.55


def _box_reference(bbox, width, height, img_size, crop_size, left, top, flip):
  """Resize the box with the image, move it with the crop, clip, mirror, scale to [0, 1]."""
  x1, y1, x2, y2 = bbox
  sx, sy = img_size / width, img_size / height
  x1, x2 = (np.clip(v * sx - left, 0, crop_size) for v in (x1, x2))
  y1, y2 = (np.clip(v * sy - top, 0, crop_size) for v in (y1, y2))
  if flip:
    x1, x2 = crop_size - x2, crop_size - x1
  return np.array([x1, y1, x2, y2]) / crop_size


@pytest.mark.parametrize('seed', range(8))
def test_box_moves_with_the_crop_and_is_clipped(seed):
  rng = np.random.default_rng(100 + seed)
  bbox = np.array([rng.uniform(0, 150), rng.uniform(0, 100), rng.uniform(150, 300),
                   rng.uniform(100, 200)], np.float32)
  bbox[0] = 0.0 if seed == 0 else bbox[0]  # touches the edge: clipped by any crop
  crop = transforms.random_train_crop(np.random.default_rng(seed), 200, 300, 256, 224)
  left, top, flip = _draws(seed)
  np.testing.assert_allclose(transforms.crop_box(bbox, crop),
                             _box_reference(bbox, 300, 200, 256, 224, left, top, flip),
                             atol=1e-5)
  assert (transforms.crop_box(bbox, crop) >= 0).all()
  assert (transforms.crop_box(bbox, crop) <= 1).all()


@pytest.mark.parametrize('listed, clipped, area', [
    ((10, 20, 100, 150), (10, 20, 100, 150), 90 * 130),  # inside: unchanged
    ((-10, -5, 400, 250), (0, 0, 300, 200), 300 * 200),  # past every edge
    ((50, 60, 40, 90), (50, 60, 50, 90), 0),  # x_2 < x_1: empty, ordered
    ((10, 10, 10, 50), (10, 10, 10, 50), 0),  # zero width
    ((320, 10, 400, 50), (300, 10, 300, 50), 0),  # right of the image
    ((-50, -40, -10, -5), (0, 0, 0, 0), 0),  # above and left of it
])
def test_boxes_are_clipped_to_their_image(listed, clipped, area):
  box = transforms.clip_box_to_image(np.array(listed, np.int32), 200, 300)
  assert box.dtype == np.float32
  np.testing.assert_array_equal(box, clipped)
  assert transforms.box_area(box) == area
  for flip in (False, True):  # an empty box stays empty through any crop and flip
    crop = transforms.random_train_crop(np.random.default_rng(int(flip)), 200, 300, 256, 224)
    crop = transforms.Crop(crop.region, flip)
    assert (transforms.box_area(transforms.crop_box(box, crop)) > 0) <= (area > 0)


def test_eval_crops():
  image = _photo(200, 300)
  resize = transforms.eval_crop(200, 300, 256, 224, 'resize')
  np.testing.assert_array_equal(
      transforms.resize_crop_flip(image, resize, 224),
      np.asarray(Image.fromarray(image).resize((224, 224), Image.BILINEAR)))
  centre = transforms.eval_crop(200, 300, 256, 224, 'center_crop')
  np.testing.assert_array_equal(transforms.resize_crop_flip(image, centre, 224),
                                _resize_then_crop(image, 256, 224, 16, 16, False))
  np.testing.assert_allclose(transforms.crop_box(np.array([0, 0, 300, 200]), resize),
                             [0, 0, 1, 1])
  with pytest.raises(ValueError, match='center_crop'):
    transforms.eval_crop(200, 300, 256, 224, 'random')


def test_large_images_are_shrunk_into_the_canvas():
  image = _photo(400, 600)
  fitted, box = transforms.fit_to_canvas(image, np.array([60, 40, 600, 400], np.float32), 300)
  assert fitted.shape == (200, 300, 3)
  np.testing.assert_allclose(box, [30, 20, 300, 200])
  small = _photo(100, 80)
  assert transforms.fit_to_canvas(small, np.zeros(4), 300)[0] is small


def _window_and_crop(seed: int, height: int, width: int):
  """One case of the resampling test: a whole image or a 'gt_box' window (odd seeds from
  4 on), and a training crop (odd seeds) or the evaluation resize of it."""
  window = transforms.whole_image(height, width)
  if seed >= 4:
    rng = np.random.default_rng(seed)
    x1, y1 = rng.uniform(0, 0.4, 2) * (width, height)
    x2, y2 = (x1, y1) + rng.uniform(0.3, 0.6, 2) * (width, height)
    window = transforms.box_window(np.array([x1, y1, x2, y2]), 10.0, height, width)
  window_height, window_width = transforms.window_size(window)
  crop = (transforms.random_train_crop(np.random.default_rng(seed), window_height,
                                       window_width, 256, 224)
          if seed % 2 else transforms.eval_crop(window_height, window_width, 256, 224, 'resize'))
  return window, transforms.in_window(crop, window)


def test_device_resampling_matches_pil():
  """The device's crop-resize-flip is PIL's (crop to the window, then resize, crop and
  flip) to within one grey level.

  Pillow runs some crops' passes in the other order and its weights in float64, so
  rounding differs by one level on a few percent of the pixels of some crops.
  """
  canvas_size, shapes = 300, [(200, 300), (300, 180), (120, 97), (300, 300)]
  canvases, windows, regions, flips, expected = [], [], [], [], []
  for seed, (height, width) in enumerate(shapes * 3):
    image = _photo(height, width, seed)
    window, crop = _window_and_crop(seed, height, width)
    canvas = np.zeros((canvas_size, canvas_size, 3), np.uint8)
    canvas[:height, :width] = image
    canvases.append(canvas)
    windows.append(window)
    regions.append(crop.region)
    flips.append(crop.flip)
    expected.append(transforms.resize_crop_flip(image, crop, 224, window))
  assert sum(w[0] > 0 for w in windows) >= 4  # box windows are among the cases
  got = jax.jit(device_transforms.crop_resize_flip, static_argnums=4)(
      np.stack(canvases), np.stack(windows), np.stack(regions), np.array(flips), 224)
  difference = np.abs(np.asarray(got).astype(int) - np.stack(expected))
  assert difference.max() <= 1
  assert difference.mean() < 0.05


def test_a_box_window_is_the_box_and_its_margin_out_to_whole_pixels_in_the_image():
  window = transforms.box_window(np.array([20.4, 30.6, 100.2, 150.0]), 10, 200, 300)
  np.testing.assert_array_equal(window, [10, 20, 111, 160])
  assert window.dtype == np.int32
  clipped = transforms.box_window(np.array([5.0, 3.0, 295.0, 198.0]), 10, 200, 300)
  np.testing.assert_array_equal(clipped, [0, 0, 300, 200])
  empty = transforms.box_window(np.array([50.0, 50.0, 50.0, 80.0]), 10, 200, 300)
  np.testing.assert_array_equal(empty, transforms.whole_image(200, 300))
  assert transforms.window_size(window) == (140, 101)


def test_a_crop_of_a_window_moves_with_the_window():
  window = np.array([10, 20, 111, 160], np.int32)
  crop = transforms.eval_crop(140, 101, 256, 224, 'resize')
  shifted = transforms.in_window(crop, window)
  np.testing.assert_allclose(shifted.region, [10, 20, 111, 160])
  # The whole window is the crop: the box target is the box within its margin.
  np.testing.assert_allclose(transforms.crop_box(np.array([20, 30, 101, 150]), shifted),
                             [10 / 101, 10 / 140, 91 / 101, 130 / 140], atol=1e-6)


def test_without_random_flip_the_same_crops_unflipped():
  for seed in range(8):
    flipped = transforms.random_train_crop(np.random.default_rng(seed), 200, 300, 256, 224)
    plain = transforms.random_train_crop(np.random.default_rng(seed), 200, 300, 256, 224,
                                         random_flip=False)
    np.testing.assert_array_equal(plain.region, flipped.region)
    assert not plain.flip


# One landmark per slot, in file pixels, and the file's visibility (-1: the slot is absent).
_LANDMARK_XY = np.array([[39, 19], [79, 19], [9, 59], [119, 59], [0, 0], [0, 0], [49, 149],
                         [69, 99]], np.float32)
_LANDMARK_VISIBILITY = np.array([0, 1, 0, 0, -1, -1, 2, 0], np.int8)


def test_landmarks_move_with_the_shrink_and_the_crop():
  """An image shrunk to half its size in the canvas, cropped to the canvas's (10, 5, 60,
  55): a landmark at pixel x sits at (x + 0.5) / 2 canvas pixels."""
  crop = transforms.Crop(np.array([10, 5, 60, 55], np.float32), False)
  points, visible = transforms.crop_landmarks(_LANDMARK_XY, _LANDMARK_VISIBILITY, crop,
                                              scale=(0.5, 0.5))
  np.testing.assert_allclose(points, [
      [0.195, 0.095], [0.595, 0.095],  # visible; occluded
      [0.0, 0.495], [0.995, 0.495],  # left of the crop: clipped; visible
      [0, 0], [0, 0],  # absent
      [0.295, 1.0], [0.495, 0.895]], atol=1e-6)  # truncated, below the crop; visible
  np.testing.assert_array_equal(visible, [True, False, False, True, False, False, False, True])
  assert points.dtype == np.float32 and visible.dtype == bool


def test_a_flip_mirrors_the_landmarks_and_swaps_left_and_right():
  crop = transforms.Crop(np.array([10, 5, 60, 55], np.float32), True)
  points, visible = transforms.crop_landmarks(_LANDMARK_XY, _LANDMARK_VISIBILITY, crop,
                                              scale=(0.5, 0.5))
  np.testing.assert_allclose(points, [
      [0.405, 0.095], [0.805, 0.095],  # right collar (occluded), left collar (visible)
      [0.005, 0.495], [1.0, 0.495],  # right sleeve, left sleeve (outside)
      [0, 0], [0, 0],
      [0.505, 0.895], [0.705, 1.0]], atol=1e-6)  # right hem, left hem (truncated)
  np.testing.assert_array_equal(visible, [False, True, True, False, False, False, True, False])
  # On a whole image, the flipped landmark sits on the mirrored pixel, W - 1 - x.
  whole = transforms.Crop(np.array([0, 0, 300, 200], np.float32), True)
  points, _ = transforms.crop_landmarks(_LANDMARK_XY, _LANDMARK_VISIBILITY, whole)
  np.testing.assert_allclose(points[1] * (300, 200) - 0.5, [300 - 1 - 39, 19], atol=1e-4)
