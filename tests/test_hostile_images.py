"""Hostile image files: refused before they are opened, read or decoded, in bounded memory,
and skipped like unreadable ones; users' photos read as a photo viewer shows them (EXIF
orientation, 16-bit grayscale, transparency)."""

import io
import os
import shutil
import tracemalloc

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
from PIL import Image
from PIL import ImageOps
import pytest

from benchmarks import hostile_input
from benchmarks.hostile import images as hostile
from configs import test as test_config
from deepfashion_jax import config_checks
from deepfashion_jax import errors
from deepfashion_jax import predict
from deepfashion_jax.data import annotations
from deepfashion_jax.data import image_files
from deepfashion_jax.data import photos
from deepfashion_jax.data import pipeline
from deepfashion_jax.data import sources
from deepfashion_jax.data import transforms
from tests import helpers

MB = 2**20


def _peak_bytes(function, *args, **kwargs):
  """(what `function` raised, or None; the peak of traced memory while it ran)."""
  tracemalloc.start()
  try:
    function(*args, **kwargs)
    raised = None
  except errors.DeepFashionError as e:
    raised = e
  finally:
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
  return raised, peak


@pytest.fixture
def never_opened(monkeypatch):
  """never_opened(path, ...): the test fails at once if one of the paths is opened."""
  return lambda *paths: helpers.forbid_opening(monkeypatch, *paths)


# ------------------------------------------------------------------------ decoding


def test_a_huge_jpeg_header_is_refused_before_decoding():
  """A 20000 x 20000 JPEG header (a few hundred bytes): libjpeg-turbo would allocate 1.2 GB."""
  raised, peak = _peak_bytes(transforms.decode_image, hostile.jpeg_with_size(20000, 20000))
  assert peak < 1 * MB  # 1,145 MiB traced before the header was checked
  assert isinstance(raised, transforms.ImageDecodeError)
  assert 'config.data.max_image_pixels' in str(raised) and '20000 x 20000' in str(raised)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns at open
def test_a_huge_png_header_is_refused_before_decoding():
  """12000 x 12000 is under PIL's own limit (it only warns): refused from the header."""
  with pytest.raises(transforms.ImageDecodeError, match='12000 x 12000 pixels, more than '
                     'config.data.max_image_pixels'):
    transforms.decode_image(hostile.png_with_size(12000, 12000))
  small = hostile.encode(hostile.photo(60, 80), 'PNG')
  assert transforms.decode_image(small, max_pixels=60 * 80).shape == (60, 80, 3)
  with pytest.raises(transforms.ImageDecodeError, match='80 x 60 pixels'):
    transforms.decode_image(small, max_pixels=60 * 80 - 1)


def test_a_damaged_png_is_refused_as_a_photo_too():
  """Its EXIF is looked for after the pixels are decoded: reading it first (a PNG's getexif
  decodes the image) swallowed the decoding error and returned the half-decoded image."""
  png = bytearray(hostile.encode(hostile.photo(), 'PNG'))
  start = png.index(b'IDAT') + 12
  png[start:start + 8] = b'\xff' * 8  # the compressed pixels, broken
  for upright in (False, True):
    with pytest.raises(transforms.ImageDecodeError):
      transforms.decode_image(bytes(png), upright=upright)


def test_16_bit_grayscale_is_scaled_not_saturated():
  decoded = transforms.decode_image(hostile.sixteen_bit_ramp())
  assert decoded.shape == (40, 256, 3) and decoded.dtype == np.uint8
  np.testing.assert_array_equal(decoded[0, :, 0], np.arange(256))  # each 8-bit level once
  assert abs(decoded.mean() - 127.5) < 0.5


@pytest.mark.parametrize('mode', ['RGBA', 'LA', 'P'])
def test_transparent_pixels_are_composited_on_white(mode):
  decoded = transforms.decode_image(hostile.transparent_png(mode))
  assert (decoded[:, :30] == 255).all()  # transparent: the white background
  assert (decoded[:, 30:] == 0).all()  # opaque black stays black


@pytest.mark.parametrize('orientation', range(1, 9))
def test_exif_orientation_is_applied_to_photos_only(orientation):
  """upright=True as PIL.ImageOps.exif_transpose turns the photo; the dataset's reader
  (upright=False) keeps the stored pixels, which the lists' boxes refer to."""
  data = hostile.exif_rotated_jpeg(orientation)
  stored = transforms.decode_image(data)
  assert stored.shape == (60, 80, 3)
  with Image.open(io.BytesIO(data)) as image:
    expected = np.asarray(ImageOps.exif_transpose(image).convert('RGB')).astype(int)
  upright = transforms.decode_image(data, upright=True)
  assert upright.shape == expected.shape
  assert np.abs(upright - expected).mean() < 2  # JPEG decoders may round apart
  png = hostile.encode(Image.fromarray(stored), 'PNG', exif=_exif(orientation))
  with Image.open(io.BytesIO(png)) as image:
    np.testing.assert_array_equal(transforms.decode_image(png, upright=True),
                                  np.asarray(ImageOps.exif_transpose(image).convert('RGB')))


def _exif(orientation):
  exif = Image.Exif()
  exif[0x0112] = orientation
  return exif.tobytes()


SAMPLES = hostile.samples()


def _mutated(data) -> bytes:
  """A sample with a few bytes overwritten (its header too), then perhaps cut short (as
  `hostile.mutated_samples`, drawn by hypothesis)."""
  original = bytearray(data.draw(st.sampled_from(SAMPLES)))
  for _ in range(data.draw(st.integers(0, 8))):
    position = data.draw(st.integers(0, min(len(original) - 1, 64))
                         if data.draw(st.booleans()) else st.integers(0, len(original) - 1))
    original[position] = data.draw(st.integers(0, 255))
  return bytes(original[:data.draw(st.integers(0, len(original)))])


def _decodes_or_refuses(data):
  """decode_image returns an RGB image or raises ImageDecodeError, in bounded memory; the
  same for a photo (upright) as for a listed image (a damaged file is not accepted as a
  photo because reading its EXIF first decoded part of it)."""
  mutated = _mutated(data)
  outcomes = []
  for upright in (False, True):
    raised, peak = _peak_bytes(transforms.decode_image, mutated, max_pixels=10**6,
                               upright=upright)
    assert raised is None or isinstance(raised, transforms.ImageDecodeError)
    assert peak < 16 * MB
    outcomes.append(raised is None)
  assert outcomes[0] == outcomes[1]


@pytest.mark.filterwarnings('ignore')  # PIL warns about damaged files it reads past
@settings(max_examples=60, deadline=None)
@given(st.data())
def test_mutated_images_decode_or_raise_the_projects_error(data):
  _decodes_or_refuses(data)


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore')
@settings(max_examples=3000, deadline=None)
@given(st.data())
def test_mutated_images_decode_or_raise_the_projects_error_at_length(data):
  _decodes_or_refuses(data)


# ---------------------------------------------------------------- the folder source


@pytest.fixture
def hostile_folder(synthetic_folder, tmp_path):
  """A copy of the synthetic folder whose first listed images are replaced by hostile files,
  and a JPEG outside it; returns (index, {kind: row})."""
  root = tmp_path / 'deepfashion'
  shutil.copytree(synthetic_folder[0], root)
  index = annotations.read_deepfashion(str(root))
  outside = tmp_path / 'outside.jpg'
  outside.write_bytes(hostile.encode(hostile.photo()))
  makers = {
      'fifo': os.mkfifo,
      'dev_zero': lambda path: path.symlink_to('/dev/zero'),
      'outside': lambda path: path.symlink_to(outside),
      'folder': os.mkdir,
      'oversize': lambda path: hostile.oversize_file(path, image_files.DEFAULT_MAX_BYTES + 1),
      'huge_jpeg': lambda path: path.write_bytes(hostile.jpeg_with_size(20000, 20000)),
  }
  rows = {}
  for row, (kind, make) in enumerate(makers.items()):
    path = root / 'Img' / str(index.image_paths[row])
    path.unlink()
    make(path)
    rows[kind] = row
  return index, rows, str(outside)


def test_listed_files_that_are_not_regular_or_leave_the_folder_are_never_read(
    hostile_folder, never_opened):
  """A FIFO, /dev/zero, a link out of the image folder, a folder, a file over the byte cap
  and a JPEG over the pixel cap: each skipped like an unreadable image (counted, masked
  out), none read (the FIFO, /dev/zero and the folder never opened), the whole pass in
  bounded memory."""
  index, rows, _ = hostile_folder
  image_dir = index.image_dir()
  never_opened('/dev/zero', *(os.path.join(image_dir, str(index.image_paths[rows[k]]))
                              for k in ('fifo', 'folder')))
  source = sources.FolderSource(index, np.arange(len(rows) + 2))
  records = {kind: source[row] for kind, row in rows.items()}
  reasons = {kind: record['image_error'] for kind, record in records.items()}
  assert 'FIFO' in reasons['fifo'] and 'a folder' in reasons['folder']
  assert 'a character device' in reasons['dev_zero']
  assert 'outside the image folder' in reasons['outside']
  assert records['outside']['image_bytes'] is None
  assert 'config.data.max_image_bytes' in reasons['oversize']
  assert source[rows['huge_jpeg']]['image_bytes'] is not None  # refused by the decoder

  examples = pipeline.EvalExample(source, np.arange(len(source)), pipeline.ImageOptions())
  raised, peak = _peak_bytes(lambda: [examples.map(p) for p in range(len(source))])
  assert raised is None and peak < 4 * MB
  batches = list(pipeline.eval_dataset(source, batch_size=4, options=pipeline.ImageOptions()))
  valid = np.concatenate([b['index'][b['valid']] for b in batches])
  assert list(valid) == [len(rows), len(rows) + 1]
  assert sum(int(b['skipped'].sum()) for b in batches) == len(rows)


def test_strict_mode_names_the_refused_file(hostile_folder, never_opened):
  index, rows, _ = hostile_folder
  fifo = str(index.image_paths[rows['fifo']])
  never_opened(os.path.join(index.image_dir(), fifo))
  source = sources.FolderSource(index, np.array([rows['fifo']]))
  strict = pipeline.ImageOptions(strict=True)
  with pytest.raises(transforms.ImageDecodeError, match=f'{fifo}: .*a FIFO'):
    list(pipeline.eval_dataset(source, batch_size=1, options=strict))


def test_training_refused_images_in_a_row_stop_with_the_projects_error(hostile_folder,
                                                                      monkeypatch,
                                                                      never_opened):
  """Training replaces each refused image by the next; a run of them, past the limit, stops
  with an ImageDecodeError (main.py prints it as one message), not a RuntimeError."""
  index, rows, _ = hostile_folder
  never_opened('/dev/zero', *(os.path.join(index.image_dir(), str(index.image_paths[rows[k]]))
                              for k in ('fifo', 'folder')))
  monkeypatch.setattr(pipeline, '_MAX_CONSECUTIVE_BAD_FILES', 3)
  source = sources.FolderSource(index, np.arange(len(rows)))  # all refused
  dataset = pipeline.train_dataset(source, batch_size=2, seed=0,
                                   options=pipeline.ImageOptions())
  with pytest.raises(transforms.ImageDecodeError, match='3 unreadable images in a row'):
    dataset[0]  # pylint: disable=pointless-statement


def test_the_caps_are_config_fields_checked_at_start():
  config = test_config.get_config()
  assert config.data.max_image_bytes == image_files.DEFAULT_MAX_BYTES
  assert config.data.max_image_pixels == image_files.DEFAULT_MAX_PIXELS
  assert pipeline.image_options(config.data).max_image_pixels == image_files.DEFAULT_MAX_PIXELS
  for name, value in (('max_image_bytes', 0), ('max_image_pixels', -5),
                      ('max_image_bytes', -1)):
    config = test_config.get_config()
    config.data[name] = value
    with pytest.raises(errors.ConfigError, match=f'config.data.{name}'):
      config_checks.check(config)


# ----------------------------------------------------------------- predict's photos


def test_photos_that_are_not_regular_files_are_reported_never_read(tmp_path, never_opened):
  """A FIFO called pipe.jpg in an --images folder, /dev/zero, a folder and a file over the
  byte cap: each an error, none opened; a rotated photo is read upright."""
  fifo, folder = tmp_path / 'pipe.jpg', tmp_path / 'folder.jpg'
  os.mkfifo(fifo)
  folder.mkdir()
  big = tmp_path / 'big.jpg'
  hostile.oversize_file(big, image_files.DEFAULT_MAX_BYTES + 1)
  rotated = tmp_path / 'rotated.jpg'
  rotated.write_bytes(hostile.exif_rotated_jpeg(6))  # stored 80 wide, 60 high
  never_opened(fifo, '/dev/zero', folder)
  assert str(fifo) in photos.find_images(str(tmp_path))
  for path, reason in ((fifo, 'a FIFO'), ('/dev/zero', 'a character device'),
                       (folder, 'a folder'), (big, 'config.data.max_image_bytes')):
    raised, peak = _peak_bytes(photos.load_image, str(path), 300)
    assert raised is None and peak < 1 * MB
    loaded = photos.load_image(str(path), 300)
    assert loaded.canvas_image is None and reason in loaded.error, loaded.error
  loaded = photos.load_image(str(rotated), 300)
  assert not loaded.error and loaded.original_size == (80, 60)
  assert loaded.canvas_image.shape == (80, 60, 3)


def test_figure_names_fit_in_a_file_name():
  """A legal 250-character photo name (or 125 two-byte characters) gives a figure name of
  at most 255 bytes, which the system accepts; two long names alike but for their ends
  keep two figures."""
  names = ['x' * 246 + '.jpg', 'x' * 245 + 'y.jpg', 'é' * 125 + '.jpg']
  figure_path = predict._figure_path  # pylint: disable=protected-access
  paths = [figure_path('/out', 12, name) for name in names]
  for path in paths:
    base = os.path.basename(path)
    assert len(os.fsencode(base)) <= 255
    assert base.startswith('00012_') and base.endswith('.png')
  assert len(set(paths)) == len(paths)
  assert figure_path('/out', 3, 'dir/front.jpg') == '/out/00003_front.png'


@pytest.mark.filterwarnings('ignore')  # PIL warns about the damaged files it reads past
def test_every_try_of_the_benchmark_is_clean(tmp_path):
  """benchmarks/hostile/images.py: each try accepted or refused with the project's error."""
  outcomes = [hostile_input.run_try(description, thunk)
              for description, thunk in hostile.tries(tmp_path)]
  assert len(outcomes) >= 60
  assert {o.outcome for o in outcomes} == {'accepted', 'refused cleanly'}, [
      o for o in outcomes if o.outcome == 'not clean']
