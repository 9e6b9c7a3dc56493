"""--mode=predict: the model's judgement on users' own photos, as JSON lines and figures.

For each image: the top-5 categories with their probabilities (softmax of the logits
divided by config.predict.temperature, as the baseline's test_on_image.py), the top-k
attributes of each type with their sigmoid scores, the box in the image's own pixels
(a model with a box branch), with the per-garment-type head the garment type, and with a
landmark branch the eight landmark slots' points in the image's pixels, each with its
heatmap's peak (how sure the branch is; a slot the garment lacks is still answered, with
a low peak as a rule). The logits of the image's crops (ten, the baseline's default, or
one) are averaged, and so are the points and peaks (a mirrored crop's left and right slots
swapped back): `data/ten_crop.py`, in `photo_outputs`, which --mode=export also runs.

A model trained on ground-truth-box crops (config.data.crop='gt_box', the published
protocol) expects a photo cut to its garment, as the benchmark's inputs are, and reads
each photo whole as such a cut. It cannot cut a larger photo itself: its box branch only
ever learnt the box of its crops, about the whole frame, and so answers the whole photo
on any photo: a second pass on the photo cut to that box would read the same pixels. Cut
photos to the garment first, or find boxes with a model trained the baseline's way
(config.data.crop='none').

config.eval.weights='ema' predicts with the moving average of the weights that a run with
config.ema_decay > 0 keeps (refused on a checkpoint without one; `checkpoints`).

`photo_outputs` cuts the crops, runs the model's jitted step and averages on batches of
one shape, so the step compiles once however many images there are. An unreadable or
non-image file, one that is not a regular file (a FIFO, /dev/zero, never read) or one over
config.data.max_image_bytes or max_image_pixels gets a line with an `error` field, logged,
and the run goes on; so does a photo whose figure cannot be written (`figure_error`).
Photos are read upright (their EXIF orientation applied): sizes, boxes and landmarks are
in the upright photo's pixels.
"""

import functools
import hashlib
import json
import os

from absl import logging
import jax
import matplotlib
matplotlib.use('Agg')  # files only, no display
from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
import numpy as np
import tqdm

from deepfashion_jax import checkpoints
from deepfashion_jax import config_checks
from deepfashion_jax import data
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax.data import landmark_slots
from deepfashion_jax.data import ten_crop

FIGURE_INCHES, FIGURE_DPI = (14.0, 7.0), 80  # every figure is 1120 x 560 pixels
TOP_CATEGORIES = 5
_MAX_NAME_BYTES = 255  # a file name's longest (NAME_MAX of Linux's and macOS's filesystems)
# The figure's landmark labels: 'L.col', 'R.sle', ... (Liu & Lu's abbreviations).
SLOT_LABELS = {slot: slot[0].upper() + '.' + slot.split('_')[1][:3]
               for slot in landmark_slots.SLOT_NAMES}


def _top(scores: np.ndarray, names, indices: np.ndarray, k: int) -> list:
  order = indices[np.argsort(-scores[indices], kind='stable')[:k]]
  return [dict(name=str(names[i]), probability=round(float(scores[i]), 5)) for i in order]


def describe_image(image, outputs: dict, names, predict_config) -> dict:
  """One image's JSON line (`data.photos.LoadedImage`) from its `photo_outputs` (NumPy);
  `names`: a `data.photos.OutputNames`."""
  height, width = image.original_size
  category = outputs['category_probabilities']
  line = dict(path=image.path, width=width, height=height,
              categories=_top(category, names.category_names, np.arange(len(category)),
                              TOP_CATEGORIES),
              attributes={name: _top(outputs['attribute_probabilities'],
                                     names.attribute_names, indices,
                                     predict_config.top_k_attributes)
                          for name, indices in names.attribute_groups})
  if 'box' in outputs:
    line['box'] = [round(float(v), 1) for v in outputs['box']]
  if 'landmarks' in outputs:
    line['landmarks'] = {
        slot: dict(x=round(float(x), 1), y=round(float(y), 1), peak=round(float(peak), 4))
        for slot, (x, y), peak in zip(landmark_slots.SLOT_NAMES, outputs['landmarks'],
                                      outputs['landmark_peaks'])}
  if 'garment_type_probabilities' in outputs:
    garment = outputs['garment_type_probabilities']
    line['garment_type'] = _top(garment, names.garment_type_names,
                                np.arange(len(garment)), 1)[0]
  return line


def photo_outputs(options: ten_crop.Options, predict_step, state, photos: dict) -> dict:
  """Each photo's outputs (`ten_crop.average`) from a batch of photos in the canvas:
  canvas (B, S, S, 3) uint8, each photo at the top left; fitted and size (B, 2), its
  (height, width) in the canvas and in its file. `predict_step`: `steps.predict_step`
  of the model (predict's jitted one, or the plain function that export traces)."""
  regions, flips = ten_crop.crop_regions(photos['fitted'], options)
  batch = ten_crop.crop_batch(photos['canvas'], photos['fitted'], regions, flips)
  outputs = predict_step(state, batch)
  return ten_crop.average(outputs, regions, flips, photos['fitted'], photos['size'],
                          options.temperature)


# A probability above this is printed inside its bar, in white; others just after it.
_LABEL_INSIDE_FROM = 0.75


def _bars(axis, entries: list, title: str, colour: str):
  """Horizontal bars of `entries`' probabilities, the highest on top, each with its
  probability printed on it as a percentage."""
  names = [e['name'] for e in entries][::-1]
  probabilities = [e['probability'] for e in entries][::-1]
  bars = axis.barh(range(len(entries)), probabilities, color=colour)
  axis.set_yticks(range(len(entries)), names, fontsize=8)
  axis.set_xlim(0, 1)
  for bar, p in zip(bars, probabilities):
    inside = p >= _LABEL_INSIDE_FROM
    axis.text(p - 0.02 if inside else p + 0.02, bar.get_y() + bar.get_height() / 2,
              f'{100 * p:.0f}%' if p >= 0.01 else '<1%', va='center',
              ha='right' if inside else 'left', fontsize=7,
              color='white' if inside else 'black')
  axis.set_title(title, fontsize=10)
  axis.tick_params(axis='x', labelsize=7)


def draw_figure(image, line: dict, path: str):
  """The image with its predicted box and landmarks (left); the top categories and each
  attribute type's top attributes as horizontal bars (right, two rows of three); a
  1120 x 560 PNG."""
  figure = pyplot.figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
  grid = figure.add_gridspec(2, 5, wspace=1.0, hspace=0.35, left=0.02, right=0.98)
  photo = figure.add_subplot(grid[:, :2])
  # The canvas image may be a shrunk copy: drawn over the original's pixel coordinates.
  photo.imshow(image.canvas_image, extent=(0, line['width'], line['height'], 0))
  if 'box' in line:
    x1, y1, x2, y2 = line['box']
    photo.add_patch(matplotlib.patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False,
                                                 edgecolor='red', linewidth=2))
  for slot, point in line.get('landmarks', {}).items():
    photo.plot(point['x'], point['y'], 'o', color='yellow', markeredgecolor='black',
               markersize=6)
    photo.annotate(SLOT_LABELS[slot], (point['x'], point['y']), xytext=(4, 4),
                   textcoords='offset points', fontsize=7, color='yellow')
  title = os.path.basename(line['path'])
  if 'garment_type' in line:
    title += f" ({line['garment_type']['name']}, {line['garment_type']['probability']:.2f})"
  photo.set_title(title, fontsize=10, parse_math=False)  # a name may hold a $
  photo.axis('off')
  charts = [('category', line['categories'], 'tab:blue')]
  charts += [(name, entries, 'tab:orange') for name, entries in line['attributes'].items()]
  for j, (title, entries, colour) in enumerate(charts[:6]):
    _bars(figure.add_subplot(grid[j // 3, 2 + j % 3]), entries, title, colour)
  try:
    figure.savefig(path, dpi=FIGURE_DPI)
  finally:
    pyplot.close(figure)


def warn_if_trained_on_box_cuts(config):
  """A gt_box model reads each photo whole, as a cut to its garment: said once."""
  if config.data.crop == 'gt_box':
    logging.warning('This model was trained on images cut to their ground-truth box '
                    "(config.data.crop='gt_box'): each photo is read whole, as such a cut; "
                    'photos showing more than the garment should be cut to it first.')


def _figure_path(output_dir: str, number: int, image_path: str) -> str:
  """Numbered, so that two photos called front.jpg in two folders keep both figures. A name
  longer than a file name may be (_MAX_NAME_BYTES) keeps the start of the photo's name and
  a short hash of all of it."""
  stem = os.path.splitext(os.path.basename(image_path))[0]
  name = f'{number:05d}_{stem}.png'
  if len(os.fsencode(name)) > _MAX_NAME_BYTES:
    digest = hashlib.sha256(os.fsencode(stem)).hexdigest()[:10]
    room = _MAX_NAME_BYTES - len(f'{number:05d}__{digest}.png')
    while len(os.fsencode(stem)) > room:  # whole characters, not bytes, are cut
      stem = stem[:-1]
    name = f'{number:05d}_{stem}_{digest}.png'
  return os.path.join(output_dir, name)


def _write_figure(image, line: dict, path: str):
  """The line's figure at `path` (line['figure']), or line['figure_error'] saying why there
  is none: one photo's figure never ends the run."""
  try:
    draw_figure(image, line, path)
  except (OSError, ValueError, RuntimeError) as e:  # a full disk, a name the system refuses
    logging.error('No figure for %s: %s: %s', image.path, type(e).__name__, e)
    line['figure_error'] = f'{type(e).__name__}: {e}'
    return
  line['figure'] = path


def predict(config, workdir: str, images: str, output_dir: str) -> str:
  """Writes OUT/predictions.jsonl (one line per image, in order) and one figure per
  readable image; returns the JSONL's path."""
  config_checks.check(config)
  if jax.process_count() > 1:
    raise ValueError('--mode=predict runs on one host: start it without the distributed flags')
  mesh = sharding.make_mesh()
  photos = data.create_photos(config, workdir, images, device_count=mesh.size)
  config, step, step_config, state = checkpoints.restore_for_inference(config, workdir, mesh)
  logging.info('Predicting with the checkpoint of step %d in %s', step, workdir)
  warn_if_trained_on_box_cuts(config)
  # Only the model's step is compiled (the crops' geometry and the averaging are a few
  # small operations): compiled with them, XLA rounds some halfway pixels of the crops the
  # other way, and predict's figures would move (benchmarks/RESULTS.md, "One ten-crop").
  outputs_of = functools.partial(photo_outputs,
                                 ten_crop.Options.from_config(config, config.predict.ten_crop),
                                 steps.jit_steps(step_config, mesh).predict)
  os.makedirs(output_dir, exist_ok=True)
  jsonl = os.path.join(output_dir, 'predictions.jsonl')
  with open(jsonl, 'w') as out, tqdm.tqdm(total=len(photos), desc='predicting') as bar:
    number = 0
    for photo_batch in photos.batches():
      lines = _batch_lines(photo_batch, outputs_of, state, mesh, photos.names,
                           config.predict)
      for image, line in zip(photo_batch.images, lines):
        if 'error' in line:
          logging.error('Skipping %s: %s', image.path, line['error'])
        else:
          _write_figure(image, line, _figure_path(output_dir, number, image.path))
        out.write(json.dumps(line) + '\n')
        number += 1
      out.flush()  # the lines so far survive whatever comes next
      bar.update(len(lines))
  return jsonl


def _batch_lines(photo_batch, outputs_of, state, mesh, names, predict_config) -> list:
  """The JSON lines of one `data.photos.PhotoBatch` (error lines for unreadable files);
  `outputs_of`: `photo_outputs` of the model's step."""
  if photo_batch.batch is not None:
    outputs = jax.device_get(outputs_of(state, sharding.global_batch(photo_batch.batch,
                                                                     mesh)))
  lines, row = [], 0
  for image in photo_batch.images:
    if image.error:
      lines.append(dict(path=image.path, error=image.error))
      continue
    lines.append(describe_image(image, {k: v[row] for k, v in outputs.items()}, names,
                                predict_config))
    row += 1
  return lines
