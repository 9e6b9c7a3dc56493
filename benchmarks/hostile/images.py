"""Hostile image files through the real read functions: the folder source's record and the
pipeline's decoding (training and evaluation), and predict's photo loader.

Each try writes one file (or FIFO, link, folder) and feeds it to the product: a listed
image through `sources.FolderSource` and `pipeline.EvalExample` under config.data.strict
(a refused image raises the project's error instead of being skipped), a user's photo
through `photos.read_photo` (which predict's loader calls; predict writes the error in
the photo's line and goes on). Accepted: the image decoded; refused: ImageFileError or
ImageDecodeError, both DeepFashionErrors.

The makers (`jpeg_with_size`, `png_with_size`, ...) are shared with the tests
(tests/test_hostile_images.py).

  python -m benchmarks.hostile_input --surfaces images --each   # each try's outcome
"""

import io
import os
import pathlib
import struct
import zlib

import numpy as np
from PIL import Image

from deepfashion_jax import predict
from deepfashion_jax.data import annotations
from deepfashion_jax.data import image_files
from deepfashion_jax.data import photos
from deepfashion_jax.data import pipeline
from deepfashion_jax.data import sources
from deepfashion_jax.data import synthetic

SURFACE = 'images'
_CANVAS = 300
_SOURCE_IMAGES = 48  # rows of the tiny folder that the source's tries replace


# ------------------------------------------------------------------------- the makers


def photo(height: int = 60, width: int = 80, seed: int = 0) -> np.ndarray:
  """A smooth random RGB image whose quadrants differ (turns and mirrors show)."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
  return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def encode(image, format_name: str = 'JPEG', **options) -> bytes:
  buffer = io.BytesIO()
  (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(
      buffer, format=format_name, **options)
  return buffer.getvalue()


def jpeg_with_size(width: int, height: int) -> bytes:
  """A small JPEG whose header claims width x height (its frame header patched)."""
  data = bytearray(encode(photo(16, 16)))
  start = data.index(b'\xff\xc0')  # baseline frame: length (2), precision (1), height, width
  data[start + 5:start + 9] = struct.pack('>HH', height, width)
  return bytes(data)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
  return (struct.pack('>I', len(payload)) + kind + payload
          + struct.pack('>I', zlib.crc32(kind + payload)))


def png_with_size(width: int, height: int) -> bytes:
  """A PNG of a few hundred bytes whose header claims width x height grayscale pixels (its
  data holds a few rows: a decoder that trusts the header allocates the whole image)."""
  rows = zlib.compress(b'\x00' * (min(width, 4096) + 1) * 4)
  return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', struct.pack('>IIBBBBB', width, height,
                                                                  8, 0, 0, 0, 0))
          + _png_chunk(b'IDAT', rows) + _png_chunk(b'IEND', b''))


def bmp_with_size(width: int, height: int) -> bytes:
  """A BMP header claiming width x height 24-bit pixels, with no pixels."""
  info = struct.pack('<IiiHHIIiiII', 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
  return b'BM' + struct.pack('<IHHI', 14 + len(info), 0, 0, 14 + len(info)) + info


def exif_rotated_jpeg(orientation: int, image: np.ndarray = None) -> bytes:
  """A JPEG of `image` (stored pixels) tagged with an EXIF orientation."""
  exif = Image.Exif()
  exif[0x0112] = orientation
  return encode(photo() if image is None else image, exif=exif.tobytes())


def sixteen_bit_ramp(height: int = 40, width: int = 256) -> bytes:
  """A 16-bit grayscale PNG: a ramp from 0 to 65535 left to right (mean 8-bit level 127.5)."""
  ramp = np.linspace(0, 65535, width).round().astype(np.uint16)
  return encode(Image.fromarray(np.tile(ramp, (height, 1))), 'PNG')


def transparent_png(mode: str = 'RGBA') -> bytes:
  """A black 40 x 60 PNG, its left half fully transparent ('RGBA', 'LA', or 'P' with a
  transparent palette entry)."""
  if mode == 'P':
    indices = np.zeros((40, 60), np.uint8)
    indices[:, :30] = 1
    image = Image.fromarray(indices, 'P')
    image.putpalette([0, 0, 0, 0, 0, 0])
    return encode(image, 'PNG', transparency=1)
  channels = np.zeros((40, 60, len(mode)), np.uint8)
  channels[:, 30:, -1] = 255
  return encode(Image.fromarray(channels, mode), 'PNG')


def samples() -> list:
  """One small file of each format PIL and libjpeg-turbo read, and the odd kinds: what the
  mutations start from."""
  image = photo(24, 32)
  files = [encode(image, name) for name in ('JPEG', 'PNG', 'GIF', 'BMP', 'TIFF', 'WEBP')]
  return files + [exif_rotated_jpeg(6, image), sixteen_bit_ramp(8, 16),
                  transparent_png('RGBA'), transparent_png('P')]


def mutated_samples(count: int, seed: int = 0) -> list:
  """A fixed sample of `samples()` with up to 8 bytes overwritten (half of them in the
  first 64, the headers), some cut short: the property test's mutations
  (tests/test_hostile_images.py), drawn by a seeded generator."""
  rng = np.random.default_rng(seed)
  originals = samples()
  mutants = []
  for i in range(count):
    data = bytearray(originals[i % len(originals)])
    for _ in range(rng.integers(1, 9)):
      end = min(len(data), 64) if rng.random() < 0.5 else len(data)
      data[rng.integers(0, end)] = rng.integers(256)
    if rng.random() < 0.3:
      data = data[:rng.integers(0, len(data))]
    mutants.append(bytes(data))
  return mutants


def oversize_file(path: pathlib.Path, size: int):
  """A sparse file of `size` bytes: no disk, no memory to write."""
  with open(path, 'wb') as f:
    f.truncate(size)


# --------------------------------------------------------------------------- the tries


def _bytes(data: bytes):
  return lambda path: path.write_bytes(data)


def _symlink(target):
  return lambda path: path.symlink_to(target)


def _hostile_files(outside: pathlib.Path) -> list:
  """(description, maker of the file at a path): every hostile kind, listed or a photo."""
  sample = encode(photo())
  (outside / 'outside.jpg').write_bytes(sample)
  makers = [
      ('JPEG header 20000 x 20000 (a few hundred bytes)', _bytes(jpeg_with_size(20000, 20000))),
      ('JPEG header 65535 x 65535', _bytes(jpeg_with_size(65535, 65535))),
      ('JPEG header 65535 x 1', _bytes(jpeg_with_size(65535, 1))),
      ('PNG header 12000 x 12000', _bytes(png_with_size(12000, 12000))),
      ('PNG header 2^31-1 x 2^31-1', _bytes(png_with_size(2**31 - 1, 2**31 - 1))),
      ('BMP header 50000 x 50000', _bytes(bmp_with_size(50000, 50000))),
      ('file larger than max_image_bytes (sparse)',
       lambda path: oversize_file(path, image_files.DEFAULT_MAX_BYTES + 1)),
      ('FIFO', os.mkfifo),
      ('symlink to /dev/zero', _symlink('/dev/zero')),
      ('folder with an image name', os.mkdir),
      ('broken symlink', _symlink(outside / 'nowhere.jpg')),
      ('truncated JPEG', _bytes(sample[:len(sample) // 2])),
      ('empty file', _bytes(b'')),
      ('not an image', _bytes(b'hello, world\n' * 10)),
      ('EXIF orientation 6 (accepted, upright)', _bytes(exif_rotated_jpeg(6))),
      ('EXIF orientation 99 (ignored)', _bytes(exif_rotated_jpeg(99))),
      ('16-bit grayscale PNG (accepted)', _bytes(sixteen_bit_ramp())),
      ('RGBA PNG (accepted)', _bytes(transparent_png('RGBA'))),
      ('LA PNG (accepted)', _bytes(transparent_png('LA'))),
      ('palette PNG with a transparent entry (accepted)', _bytes(transparent_png('P'))),
  ]
  makers += [(f'mutated file {i}', _bytes(data)) for i, data in enumerate(mutated_samples(20))]
  return makers


def _accepted(_):
  """A thunk's return: nothing (the driver counts a return as accepted)."""


def _source_tries(folder: pathlib.Path, makers: list, outside: pathlib.Path):
  """Listed images: each maker's file replaces one listed image; read by the folder source
  and decoded by the pipeline's evaluation map, strict."""
  root = folder / 'deepfashion'
  synthetic.write_synthetic_deepfashion(str(root), num_images=_SOURCE_IMAGES, seed=0)
  index = annotations.read_deepfashion(str(root))
  makers = makers + [('symlink to a JPEG outside the image folder',
                      _symlink(outside / 'outside.jpg')),
                     ('symlink to /etc/passwd', _symlink('/etc/passwd'))]
  assert len(makers) <= len(index), 'more tries than images in the tiny folder'
  source = sources.FolderSource(index, np.arange(len(makers)))
  examples = pipeline.EvalExample(source, np.arange(len(makers)),
                                  pipeline.ImageOptions(strict=True))
  for row, (description, make) in enumerate(makers):
    path = pathlib.Path(index.image_dir(), str(index.image_paths[row]))
    path.unlink()
    make(path)
    yield f'listed image: {description}', lambda row=row: _accepted(examples.map(row))


def _photo_tries(folder: pathlib.Path, makers: list):
  """Users' photos for --mode=predict, read upright by predict's loader."""
  photo_dir = folder / 'photos'
  photo_dir.mkdir()
  read = lambda path: _accepted(photos.read_photo(str(path), _CANVAS))
  for number, (description, make) in enumerate(makers):
    path = photo_dir / f'{number:02d}.jpg'
    make(path)
    yield f'photo: {description}', lambda path=path: read(path)
  for orientation in range(1, 9):
    path = photo_dir / f'exif_{orientation}.jpg'
    path.write_bytes(exif_rotated_jpeg(orientation))
    yield f'photo: EXIF orientation {orientation} (accepted)', lambda path=path: read(path)
  long_name = photo_dir / ('x' * 246 + '.jpg')  # 250 characters
  long_name.write_bytes(encode(photo()))
  yield 'photo: a 250-character file name (accepted)', lambda: read(long_name)
  yield 'photo: /dev/zero named directly', lambda: read('/dev/zero')
  yield 'photo: a name with a NUL byte', lambda: read(str(photo_dir / 'a\0b.jpg'))
  yield 'photo: a 300-character name', lambda: read(photo_dir / ('y' * 296 + '.jpg'))
  figures = folder / 'figures'
  figures.mkdir()
  figure_path = predict._figure_path  # pylint: disable=protected-access
  yield ('figure of a photo with a 250-character name',
         lambda: open(figure_path(str(figures), 7, str(long_name)), 'wb').close())


def tries(folder: pathlib.Path):
  """Yields (description, thunk); each thunk returns when the image was accepted and raises
  the project's error (ImageFileError, ImageDecodeError) when it was refused."""
  folder = pathlib.Path(folder)
  outside = folder / 'outside'
  outside.mkdir()
  makers = _hostile_files(outside)
  yield from _source_tries(folder, makers, outside)
  yield from _photo_tries(folder, makers)
