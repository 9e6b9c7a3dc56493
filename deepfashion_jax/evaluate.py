"""Evaluation over a whole split, every example exactly once, and its reports.

The loop merges the clu metrics of every padded batch (padding and unreadable images carry
`valid` False and count nowhere) and counts the unreadable images met. Reports: a console
table, `eval_<split>_<step>.json`, one line per evaluation in `metrics.jsonl`, and an image
of ground-truth (green) and predicted (red) boxes on a few images for TensorBoard.
"""

import json
import math
import os

import jax
import numpy as np
from PIL import Image
from PIL import ImageDraw
import tqdm

from deepfashion_jax import checkpoints
from deepfashion_jax import config_checks
from deepfashion_jax import data
from deepfashion_jax import sharding
from deepfashion_jax import steps


def evaluate(eval_step, state, batches, mesh, description: str = 'evaluating'):
  """(metrics as floats, number of unreadable images) over one pass of `batches`
  (`data.EvalBatches`)."""
  merged, skipped = None, 0
  for batch in tqdm.tqdm(batches, total=len(batches), desc=description, leave=False,
                         disable=jax.process_index() > 0):
    skipped += int(batch['skipped'].sum())
    # Merged on the host: small computations on the global metric arrays can hang in
    # their collectives with several processes (tests/test_multihost.py).
    batch_metrics = sharding.local_copy(eval_step(state, sharding.global_batch(batch, mesh)))
    merged = batch_metrics if merged is None else merged.merge(batch_metrics)
  return {name: float(value) for name, value in merged.compute().items()}, skipped


def box_figure(images: np.ndarray, true_boxes: np.ndarray, predicted_boxes: np.ndarray):
  """(N, S, S, 3) uint8: each image with its true box in green and the predicted in red."""
  drawn = []
  for image, true_box, predicted in zip(images, true_boxes, predicted_boxes):
    picture = Image.fromarray(np.asarray(image))
    draw = ImageDraw.Draw(picture)
    side = picture.size[0]
    for box, colour in ((true_box, (0, 220, 0)), (predicted, (230, 0, 0))):
      x1, y1, x2, y2 = (float(v) * side for v in box)
      draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=colour, width=2)
    drawn.append(np.asarray(picture))
  return np.stack(drawn)


def format_table(results: dict, title: str) -> str:
  """The metrics as an aligned two-column table."""
  width = max(len(name) for name in results)
  lines = [title] + [f'  {name:<{width}}  {value:.4f}' for name, value in results.items()]
  return '\n'.join(lines)


def _json_values(results: dict) -> dict:
  """NaN (a recall over no positive at all, say) becomes null: JSON has no NaN."""
  return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in results.items()}


def write_json(workdir: str, split: str, step: int, results: dict) -> str:
  path = os.path.join(workdir, f'eval_{split}_{step}.json')
  with open(path, 'w') as f:
    json.dump(dict(step=step, split=split, **_json_values(results)), f, indent=2,
              allow_nan=False)
  return path


def append_jsonl(workdir: str, step: int, results: dict):
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write(json.dumps(dict(step=step, **_json_values(results)), allow_nan=False) + '\n')


def evaluate_checkpoint(config, workdir: str) -> dict:
  """--mode=evaluate: a checkpoint of the workdir on config.eval.split; prints a table and
  writes eval_<split>_<step>.json."""
  config_checks.check(config)
  eval_data = data.create_eval_data(config, workdir)
  mesh = sharding.make_mesh()
  config, step, step_config, state = checkpoints.restore_for_inference(
      config, workdir, mesh, eval_data.attributes)
  eval_step = steps.jit_steps(step_config, mesh).evaluate
  results, skipped = evaluate(eval_step, state, eval_data.eval_batches, mesh)
  results['skipped_images_eval'] = skipped
  if jax.process_index() == 0:
    print(format_table(results, f'{config.eval.split} split, checkpoint of step {step}:'))
    print('written to', write_json(workdir, config.eval.split, step, results))
  return results
