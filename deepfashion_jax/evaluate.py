"""Evaluation over a whole split, every example exactly once, and its reports.

The loop merges the clu metrics of every padded batch (padding and unreadable images carry
`valid` False and count nowhere) and counts the unreadable images met. Training's reports:
one line per evaluation in `metrics.jsonl`, and an image of ground-truth (green) and
predicted (red) boxes and landmarks on a few images for TensorBoard (`box_figure`).

--mode=evaluate also keeps every example's logits and labels, to show where the model
fails (`breakdown.py`), and writes into the workdir:
- `eval_<split>_<step>.json`: `step`, `split`, the metrics of metrics.py, the
  `skipped_images_eval`, `mean_attribute_average_precision`, and `per_category`,
  `per_garment_type`, `confusion_matrix` (counts), `most_confused_pairs` and
  `per_attribute` (breakdown.py's docstring says what each holds), and `data`: the folder
  and its lists' SHA-256, and whether the run was trained on those lists
  (`trained_on.warn_if_other_data`),
  and `measured` (`measured_facts`: the folder, partition, split, crop protocol, step,
  weights, images scored and unreadable ones), which the printed table also heads;
- `confusion_<split>_<step>.png`: the confusion matrix, rows normalised, 1000 x 1000
  pixels, also in TensorBoard as the image `eval_<split>_confusion` at the step;
- `examples_<split>_<step>.npz` (`write_examples`): one row per image of the split (the
  padding of the last batch left out), for comparing runs image by image:
    image (N,) str: the file, as the lists name it ('img/<Product>/img_XXXXXXXX.jpg',
      relative to the folder's image directory): the image's identity across runs;
    index (N,) int32: its row in the annotation index;
    valid (N,) bool: False for an unreadable image (its other rows mean nothing);
    category (N,) int32: the true category; category_logits (N, C) float32;
    top5 (N, 5) int32: the five highest logits' categories, highest first (equal
      logits: the lower index); correct (N,) bool: top5[:, 0] is the true category (and
      the image valid);
    region (N, 4) float32: x0, y0, x1, y1 of the crop the model saw, in pixels of the
      image as it fits in a config.data.canvas_size canvas (`report.read_fitted_image`);
    true_box (N, 4) float32, box_valid (N,) bool: the true box in [0, 1] coordinates of
      the crop, and whether there is one; predicted_box (N, 4) float32, a model with a
      box branch;
    true_landmarks (N, 8, 2) float32, landmark_visible (N, 8) bool: the true landmarks
      (crop coordinates, `landmark_slots.SLOT_NAMES` order); predicted_landmarks
      (N, 8, 2) float32, a model with landmarks;
- `report_<split>_<step>.html` (config.eval.report): the page of `report.evaluation_page`,
  with config.eval.report_examples images in each of its two galleries;
- with config.eval.checkpoint=all, each kept checkpoint's files above, then
  `eval_<split>_all.json` ({split, checkpoints: [{step, <HEADLINE_METRICS>}, ...]}, in step
  order, also printed as a table) and `eval_<split>_<metric>_vs_step.png` for each of
  HEADLINE_METRICS.
With config.eval.weights='ema' it evaluates the moving average of the weights that a run
with config.ema_decay > 0 keeps (refused on a checkpoint without one) and names its files
`<split>_ema` for `<split>` (e.g. `eval_val_ema_6.json`); every JSON says its `weights`.
During training, such a run's evaluations carry both: the EMA model's metrics prefixed
`ema_` (e.g. `ema_category_top1`) in TensorBoard and `metrics.jsonl`.
It prints the metrics and the most confused pairs. The logits are kept in float32 (a
40,000-image split's attribute scores take 160 MB): float16 would tie close scores and so
change the rankings that average precision measures (a bfloat16 model's logits come coarse
already; breakdown.py says how ties count).
"""

import io
import json
import math
import os
import tempfile

from absl import logging
from clu import metric_writers
import jax
import matplotlib
matplotlib.use('Agg')  # files only, no display
from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
import numpy as np
from PIL import Image
from PIL import ImageDraw
import tqdm

from deepfashion_jax import breakdown
from deepfashion_jax import checkpoints
from deepfashion_jax import config_checks
from deepfashion_jax import console
from deepfashion_jax import data
from deepfashion_jax import report
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax.data import photos
from deepfashion_jax.data import trained_on
from deepfashion_jax.data import vocabulary

# The columns of config.eval.checkpoint=all's table, each also drawn against the step.
# Those a model does not have (bbox_iou without a box branch, landmark_error without
# landmarks) are left out.
HEADLINE_METRICS = ('category_top1', 'category_top3', 'category_top5', 'attr_recall_top3',
                    'attr_recall_top5', 'mean_attribute_average_precision', 'bbox_iou',
                    'landmark_error')
CONFUSION_INCHES, CONFUSION_DPI = 12.5, 80  # 1000 x 1000 pixels
CURVE_INCHES, CURVE_DPI = (8.0, 5.0), 80  # 640 x 400 pixels


def evaluate(eval_step, state, batches, mesh, description: str = 'evaluating'):
  """(metrics as floats, number of unreadable images) over one pass of `batches`
  (`data.EvalBatches`)."""
  results, skipped, _ = _one_pass(eval_step, state, batches, mesh, description)
  return results, skipped


def evaluate_with_examples(eval_examples_step, state, batches, mesh,
                           description: str = 'evaluating'):
  """`evaluate`'s two values and, third, the examples of the whole split (the logits and
  labels of `Steps.evaluate_examples`, one row per example, padding included)."""
  results, skipped, examples = _one_pass(eval_examples_step, state, batches, mesh,
                                         description, with_examples=True)
  return results, skipped, breakdown.concatenate(examples)


def _one_pass(step, state, batches, mesh, description: str, with_examples: bool = False):
  """(metrics, unreadable images, each batch's examples if `step` returns them too)."""
  merged, skipped, examples = None, 0, []
  for batch in tqdm.tqdm(batches, total=len(batches), desc=description, leave=False,
                         disable=jax.process_index() > 0):
    skipped += int(batch['skipped'].sum())
    # Merged on the host: small computations on the global metric arrays can hang in
    # their collectives with several processes (tests/test_multihost.py). The step's
    # outputs are replicated: every process reads every example of the global batch.
    batch_metrics = sharding.local_copy(step(state, sharding.global_batch(batch, mesh)))
    if with_examples:
      batch_metrics, batch_examples = batch_metrics
      examples.append(batch_examples)
    merged = batch_metrics if merged is None else merged.merge(batch_metrics)
  return {name: float(value) for name, value in merged.compute().items()}, skipped, examples


TRUE_COLOUR, PREDICTED_COLOUR = report.TRUE_COLOUR, report.PREDICTED_COLOUR


def box_figure(images: np.ndarray, batch: dict, outputs: dict):
  """(N, S, S, 3) uint8: each of the N images (the model's inputs) with what is true in
  green and what the model predicts in red: the boxes (a model with a box branch) and the
  landmarks (one with a landmark branch: the visible ones true, every slot predicted, a
  dot each). batch: the pipeline batch's rows of those images; outputs: the model's."""
  drawn = []
  for i, image in enumerate(images):
    picture = Image.fromarray(np.asarray(image))
    draw = ImageDraw.Draw(picture)
    side = picture.size[0]
    if 'box' in outputs:
      for box, colour in ((batch['bbox'][i], TRUE_COLOUR),
                          (outputs['box'][i], PREDICTED_COLOUR)):
        x1, y1, x2, y2 = (float(v) * side for v in box)
        draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=colour, width=2)
    if 'landmarks' in outputs:
      true = batch['landmarks'][i][batch['landmark_visible'][i]]
      for points, colour in ((true, TRUE_COLOUR),
                             (outputs['landmarks'][i], PREDICTED_COLOUR)):
        for x, y in np.asarray(points, np.float64) * side:
          draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    drawn.append(np.asarray(picture))
  return np.stack(drawn)


def confusion_image(counts: np.ndarray, names, title: str) -> np.ndarray:
  """(H, W, 3) uint8, 1000 x 1000: the confusion matrix with each row divided by its images
  (`breakdown.row_shares`), true categories down (with their image counts), predicted
  across."""
  figure = pyplot.figure(figsize=(CONFUSION_INCHES, CONFUSION_INCHES), dpi=CONFUSION_DPI)
  axis = figure.add_subplot()
  shown = axis.imshow(breakdown.row_shares(counts), cmap='Blues', vmin=0, vmax=1)
  ticks = np.arange(len(names))
  axis.set_xticks(ticks, names, rotation=90, fontsize=8)
  axis.set_yticks(ticks, [f'{name} ({n})' for name, n in zip(names, counts.sum(axis=1))],
                  fontsize=8)
  # Lines between the garment types: a confusion across them is a different failure (the
  # wrong garment of a photo showing two) from one within a type.
  for boundary in np.flatnonzero(np.diff(vocabulary.CATEGORY_TYPES)) + 0.5:
    axis.axhline(boundary, color='grey', linewidth=0.6)
    axis.axvline(boundary, color='grey', linewidth=0.6)
  axis.set_xlabel('predicted category')
  axis.set_ylabel('true category (images)')
  axis.set_title(title)
  figure.colorbar(shown, fraction=0.046, pad=0.02, label="share of the true category's images")
  figure.tight_layout()
  figure.canvas.draw()
  image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
  pyplot.close(figure)
  return image


def draw_curve(steps_evaluated: list, values: list, metric: str, split: str, path: str):
  """One metric against the step, as a PNG."""
  figure = pyplot.figure(figsize=CURVE_INCHES, dpi=CURVE_DPI)
  axis = figure.add_subplot()
  axis.plot(steps_evaluated, values, marker='o')
  axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  axis.set_xlabel('step')
  axis.set_ylabel(metric)
  axis.set_title(f'{metric} on the {split} split')
  axis.grid(alpha=0.3)
  figure.tight_layout()
  figure.savefig(path)
  pyplot.close(figure)


def format_table(results: dict, title: str, measured: dict = None) -> str:
  """The metrics as an aligned two-column table, grouped (`report.metric_groups`: category,
  attributes, box, landmarks, the baseline's formulas, losses), under what was measured
  (`measured_facts`) when given."""
  width = max(len(name) for name in results)
  lines = [title]
  if measured:  # which counts the unreadable images: not a metric
    lines += [f'  {label}: {measured[key]}' for label, key in MEASURED_LINES]
    results = {k: v for k, v in results.items() if k != 'skipped_images_eval'}
  for group, members in report.metric_groups(results):
    lines.append(f'  {group}:')
    lines += [f'    {name:<{width}}  {value:.4f}' for name, value in members]
  return '\n'.join(lines)


# What the printed table says was measured: (label, `measured_facts` key).
MEASURED_LINES = (('data folder', 'data_dir'), ('partition', 'partition'),
                  ('crop protocol', 'crop_protocol'), ('weights', 'weights'),
                  ('images scored', 'images_scored'),
                  ('unreadable images left out', 'skipped_images'))


def crop_protocol(data_config) -> str:
  """In words, what each evaluated image became before the model saw it."""
  if data_config.crop == 'gt_box':
    first = f'cut to its true box (+{data_config.crop_margin:g} px a side), '
  else:
    first = 'the whole image, '
  if data_config.eval_crop == 'resize':
    then = f'resized to {data_config.crop_size} x {data_config.crop_size}'
  else:
    then = (f'resized to {data_config.img_size} x {data_config.img_size}, then its centre '
            f'{data_config.crop_size} x {data_config.crop_size}')
  return (f'{first}{then} (config.data.crop={data_config.crop}, '
          f'eval_crop={data_config.eval_crop})')


def measured_facts(data_config, split: str, step: int, weights: str, data_dir: str,
                   images_scored: int, skipped: int) -> dict:
  """What an evaluation measured: the JSON's `measured`, the printed table's head and the
  report's first table."""
  return dict(data_dir=data_dir, partition=data_config.partition, split=split,
              crop=data_config.crop, eval_crop=data_config.eval_crop,
              crop_margin=data_config.crop_margin, img_size=data_config.img_size,
              crop_size=data_config.crop_size, canvas_size=data_config.canvas_size,
              crop_protocol=crop_protocol(data_config), step=step, weights=weights,
              images_scored=images_scored, skipped_images=skipped)


def format_pairs(pairs: list) -> str:
  """`breakdown.most_confused_pairs` as lines 'true -> predicted: count (share)'."""
  lines = [f'  {p["true"]} -> {p["predicted"]}: {p["count"]} ({p["share"]:.1%})'
           for p in pairs]
  return '\n'.join(['most confused categories (true -> predicted):'] + (lines or ['  none']))


def format_steps_table(rows: list) -> str:
  """Rows of {step, metric: value} as a table, one line per step."""
  width = {name: max(len(name), 8) for name in rows[0]}
  lines = ['  '.join(f'{name:>{w}}' for name, w in width.items())]
  lines += ['  '.join(f'{row[name]:>{w}}' if name == 'step' else f'{row[name]:>{w}.4f}'
                      for name, w in width.items()) for row in rows]
  return '\n'.join(lines)


def _json_values(results: dict) -> dict:
  """NaN (a recall over no positive at all, say) and infinities (a training step's loss or
  gradient norm that overflowed: TensorBoard keeps it) become null: JSON has neither."""
  return {k: None if isinstance(v, float) and not math.isfinite(v) else v
          for k, v in results.items()}


def split_name(split: str, weights: str) -> str:
  """The files' and images' name for a split: `<split>`, or `<split>_ema` for the moving
  average of the weights (config.eval.weights='ema')."""
  return split if weights == 'raw' else f'{split}_{weights}'


def write_json(workdir: str, split: str, step: int, results: dict,
               details: dict = None, weights: str = 'raw') -> str:
  """eval_<split>_<step>.json (eval_<split>_ema_<step>.json for the moving average of the
  weights): the metrics, then `details` (the breakdowns) if given."""
  path = os.path.join(workdir, f'eval_{split_name(split, weights)}_{step}.json')
  with open(path, 'w') as f:
    json.dump(dict(step=step, split=split, weights=weights, **_json_values(results),
                   **(details or {})), f, indent=2, allow_nan=False)
  return path


METRICS_JSONL = console.METRICS_JSONL


def append_jsonl(workdir: str, step: int, results: dict):
  with open(os.path.join(workdir, METRICS_JSONL), 'a') as f:
    f.write(json.dumps(dict(step=step, **_json_values(results)), allow_nan=False) + '\n')


def drop_jsonl_rows_after(workdir: str, step: int) -> int:
  """Removes from metrics.jsonl the rows of steps after `step`, and lines that are not such
  rows (one cut short by a crash), so that a run resumed from `step` logs each step once;
  returns how many lines went. Streamed (the file may be long) into a new file that
  replaces the old one whole."""
  path = os.path.join(workdir, METRICS_JSONL)
  if not os.path.isfile(path):
    return 0
  dropped = 0
  with open(path, 'rb') as rows, tempfile.NamedTemporaryFile(
      'wb', dir=workdir, prefix='.metrics-', suffix='.jsonl', delete=False) as kept:
    try:
      for line in _lines(rows):
        row_step = _row_step(line)
        if row_step is None or row_step > step:
          dropped += 1
        else:
          kept.write(line.rstrip(b'\r\n') + b'\n')
    except BaseException:
      os.remove(kept.name)
      raise
  if dropped:
    os.chmod(kept.name, os.stat(path).st_mode & 0o777)  # the temporary file's is 0600
    os.replace(kept.name, path)
    logging.warning('%s: dropped %d lines of steps after %d, logged before the run stopped and '
                    'trained again from step %d (or unreadable).', path, dropped, step, step)
  else:
    os.remove(kept.name)
  return dropped


# A row is a few kilobytes; a longer line is not one, and is not read whole.
_MAX_ROW_BYTES = 2**20


def _lines(rows):
  """The file's lines, each at most _MAX_ROW_BYTES (a longer one comes as b'')."""
  while line := rows.readline(_MAX_ROW_BYTES):
    if len(line) == _MAX_ROW_BYTES and not line.endswith(b'\n'):
      while (rest := rows.readline(_MAX_ROW_BYTES)) and not rest.endswith(b'\n'):
        pass
      line = b''
    yield line


def _row_step(line: bytes):
  """The step of one metrics.jsonl line, or None when it is not a row with an integer step."""
  try:
    row = json.loads(line)
  except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
    return None
  step = row.get('step') if isinstance(row, dict) else None
  return step if isinstance(step, int) and not isinstance(step, bool) else None


def evaluate_with_breakdown(eval_examples_step, state, eval_data, mesh, names,
                            description: str = 'evaluating') -> tuple:
  """(results, details, examples) over `eval_data` (`data.EvalData`): the metrics with
  skipped_images_eval and mean_attribute_average_precision, the rest of
  `breakdown.breakdown` (named by `names`, a `data.photos.OutputNames`), and the split's
  examples (`evaluate_with_examples`)."""
  results, skipped, examples = evaluate_with_examples(
      eval_examples_step, state, eval_data.eval_batches, mesh, description)
  details = breakdown.breakdown(examples, names.category_names, names.attribute_names,
                                eval_data.attributes.types)
  results.update(skipped_images_eval=skipped, mean_attribute_average_precision=details.pop(
      'mean_attribute_average_precision'))
  return results, details, examples


# The per-example arrays that EXAMPLES_FILE keeps: the examples' own, and those derived.
_KEPT_EXAMPLES = ('index', 'valid', 'category', 'category_logits', 'region', 'true_box',
                  'predicted_box', 'box_valid', 'true_landmarks', 'landmark_visible',
                  'predicted_landmarks')


def write_examples(workdir: str, named: str, step: int, examples: dict,
                   image_paths) -> str:
  """examples_<named>_<step>.npz: one row per image of the split (padding left out), the
  keys the module's docstring lists."""
  rows = np.flatnonzero(examples['index'] >= 0)
  kept = {name: np.asarray(examples[name])[rows] for name in _KEPT_EXAMPLES
          if name in examples}
  logits = kept['category_logits']
  kept.update(image=np.asarray(image_paths)[kept['index']].astype(str),
              top5=np.argsort(-logits, axis=1, kind='stable')[:, :5].astype(np.int32),
              correct=(np.argmax(logits, axis=1) == kept['category']) & kept['valid'])
  path = os.path.join(workdir, f'examples_{named}_{step}.npz')
  np.savez(path, **kept)
  return path


def write_report(workdir: str, named: str, measured: dict, results: dict, details: dict,
                 examples: dict, confusion_png: bytes, config, eval_data, names) -> str:
  """report_<named>_<step>.html (`report.evaluation_page`)."""
  gallery = dict(count=config.eval.report_examples, image_dir=eval_data.image_dir,
                 image_paths=eval_data.image_paths, canvas_size=config.data.canvas_size,
                 category_names=list(names.category_names),
                 attribute_names=list(names.attribute_names))
  text = report.evaluation_page(measured=measured, results=results, details=details,
                                config_text=str(config), confusion_png=confusion_png,
                                examples=examples, gallery=gallery,
                                headline=HEADLINE_METRICS)
  path = os.path.join(workdir, f'report_{named}_{measured["step"]}.html')
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  return path


def report_checkpoint(workdir: str, config, eval_data, names, step: int, results: dict,
                      details: dict, examples: dict, writer):
  """Process 0: prints the table and the most confused pairs; writes the JSON, the
  confusion PNG (also to TensorBoard), the examples file and, with config.eval.report, the
  HTML report; each named `<split>_ema` for the moving average of the weights."""
  if jax.process_index() > 0:
    return
  split, weights = config.eval.split, config.eval.weights
  named, measured = split_name(split, weights), details['measured']
  of_what = '' if weights == 'raw' else ' (moving average of the weights)'
  print(format_table(results, f'{split} split, checkpoint of step {step}{of_what}:', measured))
  print(format_pairs(details['most_confused_pairs']))
  image = confusion_image(np.array(details['confusion_matrix']), names.category_names,
                          f'{split} split, step {step}{of_what}: rows normalised')
  writer.write_images(step, {f'eval_{named}_confusion': image[None]})
  picture = os.path.join(workdir, f'confusion_{named}_{step}.png')
  encoded = io.BytesIO()
  Image.fromarray(image).save(encoded, 'PNG')
  with open(picture, 'wb') as f:
    f.write(encoded.getvalue())
  written = [write_json(workdir, split, step, results, details, weights), picture,
             write_examples(workdir, named, step, examples, eval_data.image_paths)]
  print('written to', ', '.join(written))
  if config.eval.report:
    print('report:', write_report(workdir, named, measured, results, details, examples,
                                  encoded.getvalue(), config, eval_data, names))


def report_steps(workdir: str, split: str, evaluated: dict, weights: str = 'raw'):
  """config.eval.checkpoint=all, process 0: the HEADLINE_METRICS of each step ({step:
  results}) as a table, eval_<split>_all.json, and one PNG per metric against the step
  (`<split>_ema` in the names for the moving average of the weights)."""
  named = split_name(split, weights)
  names = [name for name in HEADLINE_METRICS if name in next(iter(evaluated.values()))]
  rows = [dict(step=step, **{name: results[name] for name in names})
          for step, results in sorted(evaluated.items())]
  print(f'{split} split, every kept checkpoint ({weights} weights):')
  print(format_steps_table(rows))
  path = os.path.join(workdir, f'eval_{named}_all.json')
  with open(path, 'w') as f:
    json.dump(dict(split=split, weights=weights,
                   checkpoints=[_json_values(row) for row in rows]), f, indent=2,
              allow_nan=False)
  for name in names:
    draw_curve([row['step'] for row in rows], [row[name] for row in rows], name, named,
               os.path.join(workdir, f'eval_{named}_{name}_vs_step.png'))
  print('written to', path, f'and eval_{named}_<metric>_vs_step.png')


def evaluate_checkpoint(config, workdir: str) -> dict:
  """--mode=evaluate: config.eval.checkpoint of the workdir on config.eval.split, with the
  breakdowns; prints and writes what the module's docstring lists. Returns its results;
  with config.eval.checkpoint=all, {step: results} of every kept checkpoint."""
  config_checks.check(config)
  trained_on.refuse_synthetic_stand_in(config.data, workdir, training=False)
  eval_data = data.create_eval_data(config, workdir)
  evaluated_on = trained_on.warn_if_other_data(config.data, workdir)
  mesh = sharding.make_mesh()
  names = photos.load_output_names(config.data, workdir)
  every = config.eval.checkpoint == checkpoints.EVERY_CHECKPOINT
  restored = (checkpoints.restore_every_kept(config, workdir, mesh, eval_data.attributes)
              if every else
              [checkpoints.restore_for_inference(config, workdir, mesh, eval_data.attributes)])
  split, evaluated, eval_examples_step = config.eval.split, {}, None
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  try:
    for _, step, step_config, state in restored:
      if eval_examples_step is None:  # shared by every restored state: compiled once
        eval_examples_step = steps.jit_steps(step_config, mesh).evaluate_examples
      results, details, examples = evaluate_with_breakdown(
          eval_examples_step, state, eval_data, mesh, names, f'evaluating step {step}')
      details['data'] = evaluated_on
      details['measured'] = measured_facts(
          config.data, split, step, config.eval.weights, evaluated_on['path'],
          int(examples['valid'].sum()), results['skipped_images_eval'])
      report_checkpoint(workdir, config, eval_data, names, step, results, details, examples,
                        writer)
      evaluated[step] = results
      del state  # freed before the next checkpoint is restored
  finally:
    writer.close()
  if not every:
    return results
  if jax.process_index() == 0:
    report_steps(workdir, split, evaluated, config.eval.weights)
  return evaluated
