"""--mode=predict: the model's judgement on users' own photos, as JSON lines and figures.

For each image: the top-5 categories with their probabilities (softmax of the logits
divided by config.predict.temperature, as the baseline's test_on_image.py), the top-k
attributes of each type with their sigmoid scores, the box in the image's own pixels and,
with the per-garment-type head, the garment type. The logits of ten crops are averaged
(the baseline's default: the four corners and the centre of the image resized to
img_size, and their mirror images), or one centre crop is used.

The host decodes each image into the canvas, the jitted predict step resizes, crops and
runs the model: every batch has the same shape (the last one padded), so the step
compiles once however many images there are. An unreadable or non-image file gets a line
with an `error` field, and the run goes on.
"""

import concurrent.futures
import dataclasses
import json
import os
from typing import Optional

from absl import logging
import jax
import matplotlib
matplotlib.use('Agg')  # files only, no display
from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
import numpy as np
import tqdm

from deepfashion_jax import checkpoints
from deepfashion_jax import config_checks
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax.data import annotations
from deepfashion_jax.data import folder
from deepfashion_jax.data import transforms
from deepfashion_jax.data import vocabulary

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
FIGURE_INCHES, FIGURE_DPI = (14.0, 7.0), 80  # every figure is 1120 x 560 pixels
TOP_CATEGORIES = 5


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """What the model's outputs are called."""
  category_names: tuple
  attribute_names: tuple
  attribute_groups: tuple  # ((type name, attribute indices), ...)


def find_images(paths: str) -> list:
  """The files of a comma-separated list of files and folders (recursed, image suffixes
  only, sorted by path). A named file is taken whatever its suffix (a bad one is reported
  later)."""
  found = []
  for path in (p.strip() for p in paths.split(',')):
    if not path:
      continue
    if os.path.isdir(path):
      found += sorted(os.path.join(parent, f) for parent, _, files in os.walk(path)
                      for f in files if f.lower().endswith(IMAGE_SUFFIXES))
    else:
      found.append(path)
  if not found:
    raise ValueError(f'--images={paths!r} names no image: give image files and/or folders '
                     'that hold some, separated by commas')
  return found


def _labelled_folder(config, workdir: str) -> Optional[str]:
  """The DeepFashion folder whose lists name the outputs: config.data.data_dir, or the
  workdir's synthetic folder if training wrote one (never written here)."""
  if config.data.data_dir:
    return folder.data_root(config.data, workdir)
  synthetic = os.path.join(workdir, folder.SYNTHETIC_FOLDER)
  return synthetic if os.path.isfile(os.path.join(synthetic, annotations.ATTR_CLOTH)) else None


def load_vocabulary(config, workdir: str) -> Vocabulary:
  """Names from the data folder's list_category_cloth.txt and list_attr_cloth.txt; without
  one, the built-in category names and numbered attributes in one group (their types are
  only known from the list)."""
  root = _labelled_folder(config, workdir)
  if root is None:
    count = vocabulary.NUM_ATTRIBUTES
    return Vocabulary(vocabulary.CATEGORY_NAMES, tuple(f'attribute {i}' for i in range(count)),
                      (('attributes', np.arange(count)),))
  categories, _ = annotations.read_category_cloth(root)
  attributes, types = annotations.read_attr_cloth(root)
  groups = tuple((name, np.flatnonzero(types == t))
                 for t, name in enumerate(vocabulary.ATTRIBUTE_TYPE_NAMES))
  return Vocabulary(tuple(categories), tuple(attributes), groups)


def crops(height: int, width: int, config) -> list:
  """The crops of one image: ten (corners, centre and their mirrors of the image resized
  to img_size) or the centre one, as regions of the image."""
  img_size, crop_size = config.data.img_size, config.data.crop_size
  centre = transforms.eval_crop(height, width, img_size, crop_size, 'center_crop')
  if not config.predict.ten_crop:
    return [centre]
  scale = np.array([width / img_size, height / img_size] * 2, np.float32)
  far = img_size - crop_size
  corners = [transforms.Crop(np.array([x, y, x + crop_size, y + crop_size], np.float32) * scale,
                             False) for x, y in ((0, 0), (far, 0), (0, far), (far, far))]
  unflipped = corners + [centre]
  return unflipped + [dataclasses.replace(c, flip=True) for c in unflipped]


def box_in_pixels(box: np.ndarray, crop: transforms.Crop, scale_to_original: float):
  """A predicted box in [0, 1] units of a crop -> pixels of the original image."""
  x1, y1, x2, y2 = box
  if crop.flip:
    x1, x2 = 1 - x2, 1 - x1
  x0, y0, x_end, y_end = crop.region
  width, height = x_end - x0, y_end - y0
  return np.array([x0 + x1 * width, y0 + y1 * height, x0 + x2 * width, y0 + y2 * height],
                  np.float64) * scale_to_original


@dataclasses.dataclass
class LoadedImage:
  path: str
  canvas_image: Optional[np.ndarray] = None  # the image as it fits in the canvas
  original_size: tuple = (0, 0)  # height, width of the file's image
  error: str = ''


def load_image(path: str, canvas_size: int) -> LoadedImage:
  try:
    with open(path, 'rb') as f:
      image = transforms.decode_image(f.read())
  except (OSError, transforms.ImageDecodeError) as e:
    return LoadedImage(path, error=f'{type(e).__name__}: {e}')
  fitted, _ = transforms.fit_to_canvas(image, np.zeros(4, np.float32), canvas_size)
  return LoadedImage(path, fitted, image.shape[:2])


def _batch(images: list, crop_count: int, config) -> tuple:
  """The predict step's batch of `crop_count` crops (the images' crops, then padding) and
  each image's crops."""
  canvas_size = config.data.canvas_size
  canvas = np.zeros((crop_count, canvas_size, canvas_size, 3), np.uint8)
  image_size = np.ones((crop_count, 2), np.int32)
  region = np.tile(np.array([0, 0, 1, 1], np.float32), (crop_count, 1))
  flip = np.zeros(crop_count, bool)
  image_crops, row = [], 0
  for image in images:
    height, width = image.canvas_image.shape[:2]
    image_crops.append(crops(height, width, config))
    for crop in image_crops[-1]:
      canvas[row, :height, :width] = image.canvas_image
      image_size[row], region[row], flip[row] = (height, width), crop.region, crop.flip
      row += 1
  return dict(canvas=canvas, image_size=image_size, region=region, flip=flip), image_crops


def _top(scores: np.ndarray, names, indices: np.ndarray, k: int) -> list:
  order = indices[np.argsort(-scores[indices], kind='stable')[:k]]
  return [dict(name=str(names[i]), probability=round(float(scores[i]), 5)) for i in order]


def _softmax(logits: np.ndarray) -> np.ndarray:
  shifted = np.exp(logits - logits.max())
  return shifted / shifted.sum()


def describe_image(image: LoadedImage, outputs: dict, image_crops: list, words: Vocabulary,
                   config) -> dict:
  """One image's JSON line from the model outputs of its crops (rows of `outputs`)."""
  temperature = config.predict.temperature
  category = _softmax(outputs['category_logits'].mean(axis=0) / temperature)
  attributes = 1 / (1 + np.exp(-outputs['attribute_logits'].mean(axis=0)))
  height, width = image.original_size
  scale = max(height, width) / max(image.canvas_image.shape[:2])
  boxes = [box_in_pixels(b, c, scale) for b, c in zip(outputs['box'], image_crops)]
  box = np.clip(np.mean(boxes, axis=0), 0, [width, height, width, height])
  line = dict(path=image.path, width=width, height=height,
              categories=_top(category, words.category_names, np.arange(len(category)),
                              TOP_CATEGORIES),
              attributes={name: _top(attributes, words.attribute_names, indices,
                                     config.predict.top_k_attributes)
                          for name, indices in words.attribute_groups},
              box=[round(float(v), 1) for v in box])
  if 'garment_type_logits' in outputs:
    garment = _softmax(outputs['garment_type_logits'].mean(axis=0))
    line['garment_type'] = _top(garment, vocabulary.GARMENT_TYPE_NAMES,
                                np.arange(len(garment)), 1)[0]
  return line


def _bars(axis, entries: list, title: str, colour: str):
  names = [e['name'] for e in entries][::-1]
  axis.barh(range(len(entries)), [e['probability'] for e in entries][::-1], color=colour)
  axis.set_yticks(range(len(entries)), names, fontsize=8)
  axis.set_xlim(0, 1)
  axis.set_title(title, fontsize=10)
  axis.tick_params(axis='x', labelsize=7)


def draw_figure(image: LoadedImage, line: dict, path: str):
  """The image with its predicted box (left); the top categories and each attribute type's
  top attributes as horizontal bars (right, two rows of three); a 1120 x 560 PNG."""
  figure = pyplot.figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
  grid = figure.add_gridspec(2, 5, wspace=1.0, hspace=0.35, left=0.02, right=0.98)
  photo = figure.add_subplot(grid[:, :2])
  # The canvas image may be a shrunk copy: drawn over the original's pixel coordinates.
  photo.imshow(image.canvas_image, extent=(0, line['width'], line['height'], 0))
  x1, y1, x2, y2 = line['box']
  photo.add_patch(matplotlib.patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False,
                                               edgecolor='red', linewidth=2))
  title = os.path.basename(line['path'])
  if 'garment_type' in line:
    title += f" ({line['garment_type']['name']}, {line['garment_type']['probability']:.2f})"
  photo.set_title(title, fontsize=10)
  photo.axis('off')
  charts = [('category', line['categories'], 'tab:blue')]
  charts += [(name, entries, 'tab:orange') for name, entries in line['attributes'].items()]
  for j, (title, entries, colour) in enumerate(charts[:6]):
    _bars(figure.add_subplot(grid[j // 3, 2 + j % 3]), entries, title, colour)
  figure.savefig(path, dpi=FIGURE_DPI)
  pyplot.close(figure)


def _figure_path(output_dir: str, number: int, image_path: str) -> str:
  """Numbered, so that two photos called front.jpg in two folders keep both figures."""
  stem = os.path.splitext(os.path.basename(image_path))[0]
  return os.path.join(output_dir, f'{number:05d}_{stem}.png')


def predict(config, workdir: str, images: str, output_dir: str) -> str:
  """Writes OUT/predictions.jsonl (one line per image, in order) and one figure per
  readable image; returns the JSONL's path."""
  config_checks.check(config)
  if jax.process_count() > 1:
    raise ValueError('--mode=predict runs on one host: start it without the distributed flags')
  paths = find_images(images)
  words = load_vocabulary(config, workdir)
  mesh = sharding.make_mesh()
  config, step, step_config, state = checkpoints.restore_for_inference(
      config, workdir, mesh, np.zeros(vocabulary.NUM_ATTRIBUTES, np.int8))
  logging.info('Predicting with the checkpoint of step %d in %s', step, workdir)
  _, _, predict_step = steps.jit_steps(step_config, mesh)
  crops_per_image = 10 if config.predict.ten_crop else 1
  per_batch = config.predict.batch_size
  # Whole batches of crops that split evenly over the devices: one compilation.
  crop_count = -(-per_batch * crops_per_image // mesh.size) * mesh.size
  os.makedirs(output_dir, exist_ok=True)
  jsonl = os.path.join(output_dir, 'predictions.jsonl')
  with open(jsonl, 'w') as out, concurrent.futures.ThreadPoolExecutor(
      config.data.threads) as pool, tqdm.tqdm(total=len(paths), desc='predicting') as bar:
    for start in range(0, len(paths), per_batch):
      loaded = list(pool.map(lambda p: load_image(p, config.data.canvas_size),
                             paths[start:start + per_batch]))
      lines = _predict_batch(loaded, predict_step, state, mesh, words, config,
                             crops_per_image, crop_count)
      for number, (image, line) in enumerate(zip(loaded, lines), start):
        if 'error' not in line:
          line['figure'] = _figure_path(output_dir, number, image.path)
          draw_figure(image, line, line['figure'])
        out.write(json.dumps(line) + '\n')
      bar.update(len(loaded))
  return jsonl


def _predict_batch(loaded: list, predict_step, state, mesh, words, config, crops_per_image,
                   crop_count) -> list:
  """The JSON lines of a batch of loaded images (error lines for unreadable ones)."""
  readable = [image for image in loaded if not image.error]
  described = {}
  if readable:
    batch, image_crops = _batch(readable, crop_count, config)
    outputs = predict_step(state, sharding.global_batch(batch, mesh))
    outputs = {k: np.asarray(v) for k, v in outputs.items() if k != 'images'}
    for i, image in enumerate(readable):
      rows = slice(i * crops_per_image, (i + 1) * crops_per_image)
      described[id(image)] = describe_image(
          image, {k: v[rows] for k, v in outputs.items()}, image_crops[i], words, config)
  return [described.get(id(image)) or dict(path=image.path, error=image.error)
          for image in loaded]
