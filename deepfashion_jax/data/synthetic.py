"""Writes a synthetic DeepFashion folder in the benchmark's exact on-disk format.

DeepFashion cannot be downloaded on the project's machines, so every path of the project
(parsing, pipeline, training, evaluation) runs on folders this module writes:
the real 50 categories, 1,000 attributes in the five types, all seven lists with their
headers, `Img/img/<Product_Title_Category>/img_XXXXXXXX.jpg` JPEGs whose long side is
300 px, and an official-style partition.

The data is learnable, and not trivially: a garment's category follows from its silhouette
(its geometry: sleeves, length, flare, neckline, legs or skirt), never from its colour;
colours, background, clutter, position and scale are random; the box is the drawn garment's
exact extent, and the landmarks are points of its outline (collar corners, cuffs, waistline
and hem corners, `landmark_points`). The texture attributes named in `VISIBLE_TEXTURES` are
painted in the garment's fill; all other attributes are random, sparse and skewed, with
unknowns, as in the real lists. `--quirks` adds the real release's hazards for robustness tests.

The drawing is flat: filled shapes on a noisy gradient. `--texture=photo` writes the same
drawings (the same lists, boxes and landmarks) with a photograph's structure added over
them: shading at several scales and film grain, saved at a web photo's JPEG quality, so that
a file's size (10-25 KB, as DeepFashion's) and its decode time are those of a photograph
(benchmarks/input_pipeline.py --texture=photo measures both beside the flat files').

  python -m deepfashion_jax.data.synthetic --root DIR --num_images N --seed S [--quirks]
      [--texture flat|photo]
"""

import dataclasses
import io
import itertools
import os
from typing import Optional

from absl import app
from absl import flags
import numpy as np
from PIL import Image
from PIL import ImageDraw

from deepfashion_jax.data import annotations
from deepfashion_jax.data import landmark_slots
from deepfashion_jax.data import vocabulary

IMAGE_LONG_SIDE = 300
# Texture attributes drawn into the garment's fill: the first texture attributes written.
VISIBLE_TEXTURES = ('solid', 'striped', 'dotted', 'plaid', 'diagonal stripe')
# Official partition sizes of the real release: 209,222 / 40,000 / 40,000.
PARTITION_FRACTIONS = (209222 / 289222, 40000 / 289222, 40000 / 289222)
# The real release has no image of these four categories; --quirks does the same.
EMPTY_CATEGORIES = ('Cape', 'Nightdress', 'Shirtdress', 'Sundress')
QUIRKS = ('grayscale', 'cmyk', 'truncated', 'png_as_jpg', 'missing')
# How the pixels are finished (`photographic`); the lists are the same either way.
TEXTURES = ('flat', 'photo')
JPEG_QUALITY = dict(flat=90, photo=80)
# Photo shading: (cells across the image, amplitude in grey levels), coarse to fine.
_SHADING_SCALES = ((4, 10.0), (10, 8.0), (25, 6.0), (60, 4.0))
_GRAIN = 1.5  # grey levels: luminance grain; the colour grain is half of it

_ATTRIBUTE_WORDS = (
    ('abstract', 'animal', 'argyle', 'baroque', 'bird', 'camo', 'check', 'chevron', 'cross',
     'diamond', 'ditsy', 'dot', 'floral', 'geo', 'graphic', 'grid', 'heart', 'houndstooth',
     'ikat', 'leaf', 'leopard', 'marble', 'medallion', 'mosaic', 'ombre', 'paisley', 'palm',
     'print', 'scale', 'snake', 'speckle', 'star', 'stripe', 'swirl', 'tartan', 'tile'),
    ('cotton', 'denim', 'lace', 'leather', 'linen', 'silk', 'satin', 'chiffon', 'knit', 'wool',
     'fleece', 'jersey', 'velvet', 'suede', 'mesh', 'tweed', 'crochet', 'corduroy', 'sheer',
     'chambray', 'faux-fur', 'organza', 'poplin', 'ribbed', 'sequin', 'terry', 'twill'),
    ('a-line', 'bodycon', 'boxy', 'cropped', 'flared', 'fitted', 'maxi', 'midi', 'mini',
     'oversized', 'pleated', 'skinny', 'slim', 'straight', 'wide-leg', 'wrap', 'peplum',
     'shift', 'skater', 'tiered', 'longline', 'draped', 'relaxed', 'tapered'),
    ('button', 'collar', 'cuff', 'drawstring', 'hem', 'hood', 'pocket', 'sleeve', 'strap',
     'zipper', 'v-neck', 'crew-neck', 'cowl', 'ruffle', 'fringe', 'belt', 'lace-up', 'cutout',
     'keyhole', 'off-shoulder', 'racerback', 'split', 'tie-front', 'yoke'),
    ('boho', 'casual', 'classic', 'chic', 'edgy', 'festival', 'glam', 'grunge', 'minimalist',
     'preppy', 'retro', 'romantic', 'sporty', 'street', 'vintage', 'western', 'workwear',
     'party', 'beach', 'lounge', 'office', 'holiday', 'folk', 'utility'),
)
_TITLE_WORDS = ('Sheer', 'Pleated-Front', 'Striped', 'Floral', 'Classic', 'Cropped', 'Knit',
                'Faux_Leather', 'Lace', 'Denim', 'Relaxed', 'Slim', 'Boxy', 'Longline',
                'Ribbed', 'Crinkled', 'Satin', 'Embroidered', 'Sleek', 'Crochet', 'Boho',
                'Classic_Fit', 'Marled', 'Drapey', 'Quilted', 'Paisley', 'Woven')


def attribute_vocabulary():
  """1,000 attribute names (many with spaces, as in the real list) and 0-based types."""
  names, types = [], []
  for attribute_type, (count, words) in enumerate(
      zip(vocabulary.ATTRIBUTE_TYPE_COUNTS, _ATTRIBUTE_WORDS)):
    fixed = VISIBLE_TEXTURES if attribute_type == 0 else ()
    pairs = (f'{a} {b}' for a, b in itertools.permutations(words, 2))
    candidates = itertools.chain(fixed, words, pairs)
    chosen = list(dict.fromkeys(itertools.islice(candidates, count + len(fixed))))[:count]
    names += chosen
    types += [attribute_type] * count
  return names, np.array(types, np.int8)


# ----------------------------------------------------------------------------- silhouettes

# A silhouette is a list of (polygon, hole) pairs in a unit frame (x right, y down); holes
# are cut out of the garment. Each category has its own combination of features that
# survive the anisotropic resizing of the pipeline: sleeves (none, short, long), neckline
# (round, V, high collar, hood), hem (straight or zigzag), legs or skirt, length (short
# or long), a belt slot cut through the waist. That geometry is the only signal of the
# category.

_TORSO_TOP, _TORSO_HEM = 0.12, 0.92


def _hem(x_from: float, x_to: float, y: float, zigzag: bool):
  """The hem from x_from to x_to at height y: its two ends, or a zigzag between them."""
  if not zigzag:
    return [(x_from, y), (x_to, y)]
  xs = np.linspace(x_from, x_to, 13)
  return [(x, y - 0.07 * (i % 2)) for i, x in enumerate(xs)]


def _torso(neck: str, hem_y: float, zigzag: bool):
  top = _TORSO_TOP
  points = [(0.3, top), (0.42, top)]
  if neck == 'hood':
    points += [(0.38, top - 0.1), (0.5, top - 0.14), (0.62, top - 0.1)]
  elif neck == 'high':
    points += [(0.42, top - 0.08), (0.58, top - 0.08)]
  else:
    points += [(0.5, top + (0.22 if neck == 'v' else 0.07))]
  points += [(0.58, top), (0.7, top), (0.69, top + 0.3)]
  points += _hem(0.7, 0.3, hem_y, zigzag)
  points += [(0.31, top + 0.3)]
  corners = dict(left_collar=(0.42, top), right_collar=(0.58, top), left_hem=(0.3, hem_y),
                 right_hem=(0.7, hem_y))
  return [(points, False)], corners


def _sleeves(length: float):
  """The sleeves and their landmarks: the middle of each cuff, or of each armhole when
  there are no sleeves."""
  if length <= 0:
    middle = _TORSO_TOP + 0.15
    return [], dict(left_sleeve=(0.305, middle), right_sleeve=(0.695, middle))
  reach = 0.45 * length
  right = [(0.7, 0.12), (0.7 + 0.5 * reach, 0.12 + reach),
           (0.7 + 0.5 * reach - 0.09, 0.12 + reach + 0.04), (0.69, 0.3)]
  left = [(1.0 - x, y) for x, y in right]
  cuff = lambda sleeve: tuple(np.mean(sleeve[1:3], axis=0))
  return [(right, False), (left, False)], dict(left_sleeve=cuff(left), right_sleeve=cuff(right))


def _legs(top: float, length: float, zigzag: bool):
  hem = top + length
  crotch = top + min(0.2, 0.5 * length)
  points = [(0.3, top), (0.7, top)] + _hem(0.74, 0.52, hem, zigzag) + [(0.5, crotch)]
  points += _hem(0.48, 0.26, hem, zigzag)
  corners = dict(left_waistline=(0.3, top), right_waistline=(0.7, top), left_hem=(0.26, hem),
                 right_hem=(0.74, hem))
  return [(points, False)], corners


def _skirt(top: float, length: float, zigzag: bool):
  hem = top + length
  corners = dict(left_waistline=(0.32, top), right_waistline=(0.68, top),
                 left_hem=(0.22, hem), right_hem=(0.78, hem))
  return [([(0.32, top), (0.68, top)] + _hem(0.78, 0.22, hem, zigzag), False)], corners


def _belt_slot(top: float):
  return [([(0.34, top + 0.04), (0.66, top + 0.04), (0.66, top + 0.11), (0.34, top + 0.11)],
           True)]


_SLEEVES = (0.0, 0.4, 1.0)

# A garment type's builder returns its (polygon, hole) pairs and its landmarks in the same
# frame: {slot name: (x, y)} for each of its type's slots (landmark_slots).


def _upper_body(c: int):
  neck = ('round', 'v', 'high', 'hood')[(c // 3) % 4]
  torso, landmarks = _torso(neck, _TORSO_HEM, zigzag=c >= 12)
  sleeves, sleeve_ends = _sleeves(_SLEEVES[c % 3])
  return torso + sleeves, dict(landmarks, **sleeve_ends)


def _lower_body(c: int):
  length, zigzag, slot, legs = (0.35, 1.0)[c % 2], bool((c // 2) % 2), bool((c // 4) % 2), c < 8
  garment, landmarks = _legs(0.0, length, zigzag) if legs else _skirt(0.0, length, zigzag)
  return garment + (_belt_slot(0.0) if slot else []), landmarks


def _full_body(c: int):
  """A torso over legs or a skirt; the waistline's landmarks are the torso's hem corners,
  where the bottom takes over the outline."""
  legs, slot, zigzag = bool((c // 3) % 2), bool((c // 6) % 2), c >= 12
  waist = 0.5
  torso, torso_corners = _torso('round', waist + 0.02, zigzag=False)
  sleeves, sleeve_ends = _sleeves(_SLEEVES[c % 3])
  bottom, landmarks = _legs(waist, 0.75, zigzag) if legs else _skirt(waist, 0.75, zigzag)
  landmarks = dict(landmarks, left_collar=torso_corners['left_collar'],
                   right_collar=torso_corners['right_collar'],
                   left_waistline=torso_corners['left_hem'],
                   right_waistline=torso_corners['right_hem'], **sleeve_ends)
  return torso + sleeves + bottom + (_belt_slot(waist - 0.02) if slot else []), landmarks


def _garment(category: int):
  """A category's (polygon, hole) pairs and landmarks in its builder's frame, and that
  frame's garment extent: lowest (x, y) and (width, height)."""
  garment_type = vocabulary.CATEGORY_TYPES[category]
  first = vocabulary.CATEGORY_TYPES.index(garment_type)
  build = (_upper_body, _lower_body, _full_body)[garment_type]
  parts, landmarks = build(category - first)
  parts = [(np.array(p, np.float64), hole) for p, hole in parts]
  outline = np.concatenate([p for p, hole in parts if not hole])
  low, high = outline.min(axis=0), outline.max(axis=0)
  return parts, landmarks, low, high - low


def silhouette(category: int):
  """The (polygon, hole) pairs of a category's garment, normalised so that the garment
  spans [0, 1] on both axes, and the garment's natural (width, height) before that."""
  parts, _, low, size = _garment(category)
  return [((p - low) / size, hole) for p, hole in parts], size


def landmark_points(category: int) -> np.ndarray:
  """(8, 2) the garment's landmarks in `silhouette`'s normalised frame, in slot order
  (landmark_slots), NaN for slots its type lacks: the collar's corners, the middles of
  the cuffs (of the armholes, sleeveless), the waistline's corners and the hem's outer
  corners, left the side of smaller x."""
  _, landmarks, low, size = _garment(category)
  points = np.full((landmark_slots.NUM_SLOTS, 2), np.nan)
  for name, point in landmarks.items():
    points[landmark_slots.SLOT_NAMES.index(name)] = (np.array(point) - low) / size
  return points


def _on_outline(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
  """(k, 2) int: each point (x, y) moved to the nearest pixel of the mask's outline (a
  garment pixel beside background or the image's edge), column and row.

  The drawn polygons' corners are jittered and overlap one another, so a corner of the
  plan may fall a pixel or two inside the garment or outside it. Points are in PIL's
  drawing coordinates, where (x, y) is the pixel at column x, row y, as in the lists.
  """
  padded = np.pad(mask, 1)
  interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
  rows, cols = np.nonzero(mask & ~interior)
  outline = np.column_stack([cols, rows])
  distances = ((outline[None] - points[:, None]) ** 2).sum(axis=-1)
  return outline[distances.argmin(axis=1)]


# ----------------------------------------------------------------------------- drawing


def _random_colour(rng):
  return tuple(int(v) for v in rng.integers(0, 256, 3))


def _background(rng, width, height):
  """A two-colour gradient with noise: no colour or brightness tells the category."""
  a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
  t = np.linspace(0.0, 1.0, height)[:, None, None]
  image = (1 - t) * a + t * b + rng.normal(0, 8, (height, 1, 3))
  image = np.broadcast_to(image, (height, width, 3)) + rng.normal(0, 6, (height, width, 3))
  return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _draw_clutter(rng, image):
  draw = ImageDraw.Draw(image)
  width, height = image.size
  for _ in range(rng.integers(0, 3)):
    x0, y0 = rng.integers(0, width), rng.integers(0, height)
    x1, y1 = x0 + rng.integers(10, width // 2), y0 + rng.integers(10, height // 2)
    shape = rng.integers(0, 3)
    if shape == 0:
      draw.ellipse((x0, y0, x1, y1), fill=_random_colour(rng))
    elif shape == 1:
      draw.rectangle((x0, y0, x1, y1), fill=_random_colour(rng))
    else:
      draw.line((x0, y0, x1, y1), fill=_random_colour(rng), width=int(rng.integers(2, 8)))


def _texture(rng, texture: str, width: int, height: int):
  """The garment's fill: two random colours in the texture's pattern."""
  yy, xx = np.mgrid[0:height, 0:width]
  period = int(rng.integers(7, 15))
  phase = int(rng.integers(0, period))
  if texture == 'solid':
    pattern = np.zeros((height, width), bool)
  elif texture == 'striped':
    pattern = (yy + phase) % period < period // 2
  elif texture == 'dotted':
    dy, dx = (yy + phase) % period - period / 2, (xx + phase) % period - period / 2
    pattern = dy * dy + dx * dx < (period / 3.5) ** 2
  elif texture == 'plaid':
    pattern = ((yy + phase) % period < period // 3) | ((xx + phase) % period < period // 3)
  elif texture == 'diagonal stripe':
    pattern = (xx + yy + phase) % period < period // 2
  else:
    raise ValueError(f'no drawing for texture {texture!r}')
  first, second = np.array(_random_colour(rng)), np.array(_random_colour(rng))
  while np.abs(first - second).sum() < 120:  # keep the pattern visible
    second = np.array(_random_colour(rng))
  fill = np.where(pattern[..., None], second, first).astype(np.uint8)
  return Image.fromarray(fill)


def photographic(rng, image: Image.Image) -> Image.Image:
  """The image with a photograph's structure over it: smooth random shading at several
  scales (light, folds, fabric) and per-pixel grain.

  A JPEG's decode time follows its entropy-coded size and its spectrum: flat fills code to
  almost nothing, white noise to the most. Shading spread over the scales, with a little
  grain, codes like a photograph; the shapes, colours and textures drawn stay visible
  (amplitudes of a few grey levels, far below the garment's contrast with its background).
  """
  width, height = image.size
  shade = np.zeros((height, width), np.float32)
  for cells, amplitude in _SHADING_SCALES:
    coarse = rng.standard_normal((cells, cells), dtype=np.float32) * amplitude
    shade += np.asarray(Image.fromarray(coarse, mode='F').resize((width, height),
                                                                  Image.BICUBIC))
  shade += rng.standard_normal((height, width), dtype=np.float32) * _GRAIN
  pixels = np.asarray(image, np.float32) + shade[..., None]
  pixels += rng.standard_normal((height, width, 3), dtype=np.float32) * (_GRAIN / 2)
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, image_seed: np.random.SeedSequence, texture: str) -> bytes:
  """The drawn `image` finished as `texture` ('photo': `photographic`, from a generator of
  its own so that the labels drawn with `image_seed` stay the flat folder's) and coded as
  the writer saves it."""
  if texture == 'photo':
    image = photographic(np.random.default_rng(image_seed.spawn(1)[0]), image)
  out = io.BytesIO()
  image.save(out, format='JPEG', quality=JPEG_QUALITY[texture])
  return out.getvalue()


@dataclasses.dataclass
class DrawnGarment:
  image: Image.Image
  bbox: tuple  # x1, y1, x2, y2 pixels; x2, y2 exclusive (one past the last garment pixel)
  landmarks: np.ndarray  # (k, 3) int: visibility, x, y, in the list's order of the type
  mask: np.ndarray  # (H, W) bool: the garment's pixels


def draw_image(rng, category: int, texture: str) -> DrawnGarment:
  """One photo: background, clutter, then the category's silhouette filled with a texture.

  The landmarks are the drawn garment's own points (`landmark_points`), each on its
  outline; about one in ten is marked occluded, all the same drawn.
  """
  short = int(rng.integers(180, IMAGE_LONG_SIDE + 1))
  width, height = ((short, IMAGE_LONG_SIDE) if rng.random() < 0.7
                   else (IMAGE_LONG_SIDE, short))
  image = _background(rng, width, height)
  _draw_clutter(rng, image)

  polygons, natural_size = silhouette(category)
  aspect = natural_size[0] / natural_size[1] * rng.uniform(0.9, 1.1)  # width / height
  fraction = rng.uniform(0.6, 0.95)  # of the image the garment may fill
  garment_h = min(fraction * height, fraction * width / aspect)
  garment_w = garment_h * aspect
  x0 = rng.uniform(0, width - garment_w)
  y0 = rng.uniform(0, height - garment_h)
  to_pixels = lambda p: p * (garment_w, garment_h) + (x0, y0)

  mask = Image.new('L', (width, height), 0)
  mask_draw = ImageDraw.Draw(mask)
  for polygon, hole in sorted(polygons, key=lambda part: part[1]):  # holes last
    jitter = rng.uniform(-0.01, 0.01, polygon.shape)
    mask_draw.polygon([tuple(p) for p in to_pixels(polygon + jitter)], fill=0 if hole else 255)
  image.paste(_texture(rng, texture, width, height), mask=mask)
  mask = np.asarray(mask) > 0
  rows, cols = np.nonzero(mask)
  bbox = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)

  file_order = list(landmark_slots.FILE_ORDER_SLOTS[vocabulary.CATEGORY_TYPES[category]])
  points = _on_outline(mask, to_pixels(landmark_points(category)[file_order]))
  visibility = (rng.random(len(points)) < 0.1).astype(int)  # a few occluded
  return DrawnGarment(image, bbox, np.column_stack([visibility, points]), mask)


# ----------------------------------------------------------------------------- lists


@dataclasses.dataclass
class ListContents:
  """Everything the seven lists say, as arrays; 0-based labels like `DeepFashionIndex`."""
  image_paths: list  # 'img/<Product>/img_XXXXXXXX.jpg'
  category: np.ndarray  # (N,) int
  attribute_values: np.ndarray  # (N, 1000) int8 in {1, -1, 0}
  bbox: np.ndarray  # (N, 4) int
  split: np.ndarray  # (N,) int 0 train, 1 val, 2 test
  landmarks: Optional[list] = None  # per image a (k, 3) int array: visibility, x, y


def _write_list(path: str, column_names: str, rows: list):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(f'{len(rows)}\n{column_names}\n')
    f.writelines(row + '\n' for row in rows)


def _padded(paths, width):
  return [p.ljust(width) for p in paths]


def _write_attr_img(path: str, image_paths, values: np.ndarray, width: int):
  """Writes list_attr_img.txt as the release does: each value right-aligned in 3 columns.

  Built with NumPy a block of rows at a time: the full-size file is ~870 MB.
  """
  tokens = np.frombuffer(b' -1  0  1', np.uint8).reshape(3, 3)  # rows for -1, 0, 1
  with open(path, 'wb') as f:
    f.write(f'{len(image_paths)}\nimage_name  attribute_labels\n'.encode())
    for start in range(0, len(image_paths), 8192):
      block = values[start:start + 8192]
      names = np.array(_padded(image_paths[start:start + 8192], width), dtype=f'S{width}')
      text = np.empty((len(block), width + 3 * values.shape[1] + 1), np.uint8)
      text[:, :width] = names.view(np.uint8).reshape(len(block), width)
      text[:, width:-1] = tokens[block.astype(np.int64) + 1].reshape(len(block), -1)
      text[:, -1] = ord('\n')
      f.write(text.tobytes())


def write_lists(root: str, contents: ListContents, attribute_names, attribute_types):
  """Writes the seven list files of docs/dataset.md, headers and all, under `root`."""
  anno = os.path.join(root, 'Anno')
  os.makedirs(anno, exist_ok=True)
  paths = contents.image_paths
  width = max(len(p) for p in paths) + 2
  column = _padded(paths, width)
  _write_list(os.path.join(anno, 'list_category_cloth.txt'), 'category_name  category_type',
              [f'{name:<26}{t + 1}' for name, t in
               zip(vocabulary.CATEGORY_NAMES, vocabulary.CATEGORY_TYPES)])
  _write_list(os.path.join(anno, 'list_category_img.txt'), 'image_name  category_label',
              [f'{p}{c + 1}' for p, c in zip(column, contents.category.tolist())])
  _write_list(os.path.join(anno, 'list_attr_cloth.txt'), 'attribute_name  attribute_type',
              [f'{name:<44}{t + 1}' for name, t in zip(attribute_names, attribute_types)])
  _write_attr_img(os.path.join(anno, 'list_attr_img.txt'), paths, contents.attribute_values,
                  width)
  _write_list(os.path.join(anno, 'list_bbox.txt'), 'image_name  x_1  y_1  x_2  y_2',
              [f'{p}{x1:03d} {y1:03d} {x2:03d} {y2:03d}'
               for p, (x1, y1, x2, y2) in zip(column, contents.bbox.tolist())])
  split_names = vocabulary.SPLIT_NAMES
  _write_list(os.path.join(root, 'Eval', 'list_eval_partition.txt'),
              'image_name  evaluation_status',
              [f'{p}{split_names[s]}' for p, s in zip(column, contents.split.tolist())])
  if contents.landmarks is not None:
    header = 'image_name  clothes_type  ' + '  '.join(
        f'landmark_visibility_{i}  landmark_location_x_{i}  landmark_location_y_{i}'
        for i in range(1, vocabulary.MAX_LANDMARKS + 1))
    rows = [f'{p}{vocabulary.CATEGORY_TYPES[c] + 1}  ' + ' '.join(
        f'{v} {x:03d} {y:03d}' for v, x, y in points.tolist())
            for p, c, points in zip(column, contents.category.tolist(), contents.landmarks)]
    _write_list(os.path.join(anno, 'list_landmarks.txt'), header, rows)


# ----------------------------------------------------------------------------- the folder


def _product_folders(rng, categories: np.ndarray):
  """Groups images into product folders of 1 to 6 images whose title ends in the category."""
  folders, used = [], set()
  start = 0
  while start < len(categories):
    size = int(rng.integers(1, 7))
    category = categories[start]
    end = start
    while end < len(categories) and end - start < size and categories[end] == category:
      end += 1
    name = vocabulary.CATEGORY_NAMES[category]
    while True:
      words = rng.choice(_TITLE_WORDS, size=2, replace=False)
      title = f'{words[0]}_{words[1]}_{name}'
      if title not in used:
        break
      title = f'{words[0]}_{words[1]}_{rng.integers(2, 99)}_{name}'
      if title not in used:
        break
    used.add(title)
    folders += [(title, number) for number in range(1, end - start + 1)]
    start = end
  return [f'img/{title}/img_{number:08d}.jpg' for title, number in folders]


def _partition(rng, n: int) -> np.ndarray:
  counts = np.round(np.array(PARTITION_FRACTIONS) * n).astype(int)
  counts[0] = n - counts[1:].sum()
  return rng.permutation(np.repeat(np.arange(3), counts)).astype(np.int8)


def _attributes(rng, texture_index: int, num_attributes: int, popularity: np.ndarray,
                visible: np.ndarray) -> np.ndarray:
  """One image's values: its visible texture positive, sparse skewed positives, unknowns."""
  values = np.full(num_attributes, -1, np.int8)
  hidden = np.flatnonzero(~visible)
  weights = popularity[hidden] / popularity[hidden].sum()
  count = min(int(rng.poisson(2.5)), 12)
  values[rng.choice(hidden, size=count, replace=False, p=weights)] = 1
  unknown = rng.choice(hidden, size=int(rng.poisson(4)), replace=False)
  values[unknown[values[unknown] == -1]] = 0
  values[texture_index] = 1
  return values


def write_synthetic_deepfashion(root: str, num_images: int, seed: int = 0,
                                quirks: bool = False, texture: str = 'flat') -> dict:
  """Writes a complete synthetic DeepFashion folder under `root`; returns a summary.

  texture: 'flat' (drawn shapes) or 'photo' (the same drawings, `photographic`, at
  JPEG_QUALITY['photo']); the lists are the same either way.

  With `quirks`, also: the four categories of the real release without images get none;
  one grayscale, one CMYK and one truncated JPEG, one PNG saved as `.jpg`, one listed image
  whose file is missing, and one of the release's known-unreadable images (a file of
  garbage, listed as the real one is). The summary's 'quirks' maps each to its list path.
  """
  if texture not in TEXTURES:
    raise ValueError(f'texture={texture!r}: expected one of {TEXTURES}')
  rng = np.random.default_rng(seed)
  attribute_names, attribute_types = attribute_vocabulary()
  names = list(vocabulary.CATEGORY_NAMES)
  allowed = [c for c in range(vocabulary.NUM_CATEGORIES)
             if not (quirks and names[c] in EMPTY_CATEGORIES)]
  categories = np.sort(rng.permutation(np.resize(allowed, num_images)), kind='stable')
  image_paths = _product_folders(rng, categories)
  fills = rng.integers(0, len(VISIBLE_TEXTURES), num_images)
  visible = np.zeros(len(attribute_names), bool)
  visible[:len(VISIBLE_TEXTURES)] = True
  popularity = 1.0 / (rng.permutation(len(attribute_names)) + 5.0)

  image_dir = os.path.join(root, 'Img')
  bboxes, landmarks, values = [], [], []
  image_seeds = np.random.SeedSequence(seed).spawn(num_images)
  for path, category, fill, image_seed in zip(image_paths, categories, fills, image_seeds):
    image_rng = np.random.default_rng(image_seed)
    drawn = draw_image(image_rng, int(category), VISIBLE_TEXTURES[fill])
    file_path = os.path.join(image_dir, path)
    os.makedirs(os.path.dirname(file_path), exist_ok=True)
    with open(file_path, 'wb') as f:
      f.write(jpeg(drawn.image, image_seed, texture))
    bboxes.append(drawn.bbox)
    landmarks.append(drawn.landmarks)
    values.append(_attributes(image_rng, int(fill), len(attribute_names), popularity,
                              visible))

  contents = ListContents(image_paths=image_paths, category=categories,
                          attribute_values=np.stack(values), bbox=np.array(bboxes),
                          split=_partition(rng, num_images), landmarks=landmarks)
  quirk_paths = _add_quirks(rng, root, contents) if quirks else {}
  write_lists(root, contents, attribute_names, attribute_types)
  return dict(root=os.path.abspath(root), num_images=len(contents.image_paths),
              num_categories_with_images=len(np.unique(contents.category)),
              split_sizes={name: int(np.sum(contents.split == i))
                           for i, name in enumerate(vocabulary.SPLIT_NAMES)},
              quirks=quirk_paths)


def _add_quirks(rng, root: str, contents: ListContents) -> dict:
  """Damages five written images in place and lists one known-unreadable image."""
  chosen = rng.choice(len(contents.image_paths), size=len(QUIRKS), replace=False)
  quirk_paths = {}
  for quirk, i in zip(QUIRKS, chosen.tolist()):
    path = contents.image_paths[i]
    file_path = os.path.join(root, 'Img', path)
    quirk_paths[quirk] = path
    if quirk == 'missing':
      os.remove(file_path)
      continue
    with Image.open(file_path) as image:
      image.load()
    if quirk == 'grayscale':
      image.convert('L').save(file_path, format='JPEG', quality=90)
    elif quirk == 'cmyk':
      image.convert('CMYK').save(file_path, format='JPEG', quality=90)
    elif quirk == 'png_as_jpg':
      image.save(file_path, format='PNG')
    elif quirk == 'truncated':
      with open(file_path, 'rb') as f:
        data = f.read()
      with open(file_path, 'wb') as f:
        f.write(data[:len(data) * 2 // 5])
  # A known-unreadable image of the real release, listed like any other Skirt.
  path = vocabulary.KNOWN_UNREADABLE_IMAGES[0]
  file_path = os.path.join(root, 'Img', path)
  os.makedirs(os.path.dirname(file_path), exist_ok=True)
  with open(file_path, 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0 this is not a JPEG')
  skirt = vocabulary.CATEGORY_NAMES.index('Skirt')
  contents.image_paths.append(path)
  contents.category = np.append(contents.category, skirt)
  contents.attribute_values = np.concatenate(
      [contents.attribute_values, contents.attribute_values[:1]])
  contents.bbox = np.concatenate([contents.bbox, [[10, 10, 100, 200]]])
  contents.split = np.append(contents.split, np.int8(0))
  contents.landmarks.append(np.array([[0, 20, 20], [0, 90, 20], [0, 20, 190], [0, 90, 190]]))
  quirk_paths['known_unreadable'] = path
  return quirk_paths


FLAGS = flags.FLAGS


def _define_flags():
  """This script's flags, defined only when it runs as a script: defined at import, they
  would be accepted (and ignored) by every program that imports this module, main.py's
  --seed among them."""
  flags.DEFINE_string('root', None, 'Folder to write the synthetic DeepFashion into.')
  flags.DEFINE_integer('num_images', 1000, 'Number of images.')
  flags.DEFINE_integer('seed', 0, 'Seed: the same seed writes the same folder.')
  flags.DEFINE_bool('quirks', False, 'Add the real release\'s hazards (bad files, empty '
                    'classes).')
  flags.DEFINE_enum('texture', 'flat', TEXTURES, 'flat: drawn shapes; photo: the same '
                    'drawings coded like photographs (size and decode time).')


def main(argv):
  del argv
  if not FLAGS.root:
    raise app.UsageError('--root is required')
  summary = write_synthetic_deepfashion(FLAGS.root, FLAGS.num_images, FLAGS.seed, FLAGS.quirks,
                                        FLAGS.texture)
  print(annotations.read_deepfashion(FLAGS.root).summary())
  if summary['quirks']:
    print('quirks: ' + ', '.join(f'{k} {v}' for k, v in summary['quirks'].items()))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
