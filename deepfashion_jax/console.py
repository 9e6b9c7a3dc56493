"""What a person reads on the terminal while a run trains.

- A progress bar (tqdm, on stderr): step, steps/s, ETA and the loss of the last log, on one
  line that updates. Where stderr is not a terminal (CI logs, a file) there is no bar: the
  log lines say the same.
- One short line per log with the headline figures (`headline`) and one per evaluation
  (`evaluation_headline`); every metric goes to TensorBoard and metrics.jsonl.
- A summary at the end of the run (`summary`): the last and the best evaluation, where the
  checkpoints, TensorBoard logs and metrics are, and how to write the report.
- Known library noise silenced where it is emitted (`quiet_library_noise`,
  `import_tensorflow_quietly`); every other warning is kept.
"""

import contextlib
import datetime
import json
import logging
import math
import os
import sys
import tempfile
import time

import tqdm

# (the end of the emitting file's path, the start of its message): INFO and WARNING records
# that say nothing to act on, and come at every start, save or evaluation.
KNOWN_NOISE = (
    # JAX probes for a TPU at start, and says at INFO that there is none.
    ('jax/_src/xla_bridge.py', "Unable to initialize backend 'tpu'"),
    # A save between evaluations has no metrics to rank by config.best_metric: by design.
    ('orbax/checkpoint/checkpoint_manager.py', 'Requested `tracked_metric`; did not provide'),
    # evaluate, predict and export open the checkpoints read-only on purpose; orbax says so,
    # and that it turns off the options of saving (which it defaults on) one by one.
    ('orbax/checkpoint/checkpoint_manager.py', 'Given directory is read only'),
    ('orbax/checkpoint/checkpoint_manager.py', 'CheckpointManagerOptions.read_only=True, setting'),
    # clu's ReportProgress sends its progress note to the platform, which on a machine of
    # one's own is this log line every minute: the progress bar and the log lines say it.
    ('clu/platform/local.py', 'Setting work unit notes'),
)

# What TensorFlow's C++ code prints on stderr as it loads (the oneDNN note twice), before its
# logging can be configured: TF_CPP_MIN_LOG_LEVEL does not reach it in TensorFlow 2.21.
TENSORFLOW_IMPORT_NOISE = (
    'All log messages before absl::InitializeLog() is called are written to STDERR',
    'oneDNN custom operations are on.',
    # The CPU instructions a TensorFlow built for them would use: TensorBoard's writer
    # runs no heavy TensorFlow op.
    'This TensorFlow binary is optimized to use available CPU instructions',
    'To enable the following instructions: ',
)


class _ConsoleFilter(logging.Filter):
  """Drops KNOWN_NOISE and orbax's INFO records (a dozen per save), and clears the progress
  bars before any other record is written, so that a log line never lands after a bar's
  text on its line (the bar draws itself again at its next update)."""

  def filter(self, record: logging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, '/')
    if record.levelno < logging.WARNING and '/orbax/' in path:
      return False
    message = f'{record.msg}'
    if any(path.endswith(origin) and message.startswith(start)
           for origin, start in KNOWN_NOISE):
      return False
    for bar in list(getattr(tqdm.tqdm, '_instances', ())):
      bar.clear()
    return True


def quiet_library_noise(handler: logging.Handler):
  """Installs `_ConsoleFilter` on `handler` (absl's, which writes every log record)."""
  handler.addFilter(_ConsoleFilter())


@contextlib.contextmanager
def stderr_without(noise=TENSORFLOW_IMPORT_NOISE):
  """Runs the block with file descriptor 2 captured, then writes on stderr what was written
  there but the lines that contain one of `noise`: for C++ code, whose writes Python's
  sys.stderr does not see."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [line for line in captured.read().decode(errors='replace').splitlines(True)
              if not any(text in line for text in noise)]
      sys.stderr.write(''.join(kept))
      sys.stderr.flush()


def import_tensorflow_quietly():
  """Imports TensorFlow (clu's TensorBoard writer needs it) without its load-time notes.
  Call before anything imports it; a no-op once it is imported."""
  if 'tensorflow' in sys.modules:
    return
  with stderr_without():
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import,import-outside-toplevel


def _duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=round(seconds)))


def _percent(value) -> str:
  return 'n/a' if value is None or math.isnan(value) else f'{100 * value:.1f}%'


def _number(value, digits: int = 4) -> str:
  return 'n/a' if value is None or math.isnan(value) else f'{value:.{digits}g}'


def headline(step: int, total_steps: int, scalars: dict, eta_seconds=None) -> str:
  """The log line of a training log: step, loss, category top-1 and top-3, box IoU,
  learning rate and images/s (of the train_* `scalars` written at the log), and the ETA."""
  fields = [f'step {step}/{total_steps}',
            f"loss {_number(scalars.get('train_loss'))}",
            f"top-1 {_percent(scalars.get('train_category_top1'))}",
            f"top-3 {_percent(scalars.get('train_category_top3'))}",
            f"box IoU {_number(scalars.get('train_bbox_iou'), 3)}",
            f"lr {scalars.get('train_learning_rate', math.nan):.2e}",
            f"{scalars.get('train_images_per_sec', math.nan):.1f} img/s"]
  if eta_seconds is not None:
    fields.append(f'ETA {_duration(eta_seconds)}')
  return ' | '.join(fields)


# (label, metric, format) of an evaluation's line and of the summary.
_EVALUATION_FIELDS = (('loss', 'loss', _number), ('top-1', 'category_top1', _percent),
                      ('top-3', 'category_top3', _percent),
                      ('attr recall top-3', 'attr_recall_top3', _percent),
                      ('box IoU', 'bbox_iou', lambda v: _number(v, 3)))


def _evaluation_figures(results: dict) -> str:
  fields = [f'{label} {show(results.get(name))}' for label, name, show in _EVALUATION_FIELDS]
  if 'ema_category_top3' in results:  # the moving average of the weights
    fields.append(f"EMA top-3 {_percent(results['ema_category_top3'])}")
  return ' | '.join(fields)


def evaluation_headline(step: int, split: str, results: dict) -> str:
  """The log line of an evaluation: its headline metrics (all of them are in TensorBoard
  and metrics.jsonl)."""
  return f'evaluation of step {step} on {split}: {_evaluation_figures(results)}'


class Progress:
  """The training progress bar, and the ETA the log lines give.

  The bar shows on a terminal only (tqdm's disable=None: not where stderr is a file or a
  pipe) and on process 0 only. The ETA counts from the end of the run's first step, so
  that compilation does not skew it; evaluations and saves are in it, as they are in the
  time left."""

  def __init__(self, first_step: int, total_steps: int, show_bar: bool = True, file=None):
    self.total_steps = total_steps
    self.bar = tqdm.tqdm(total=total_steps, initial=first_step - 1, desc='training',
                         unit='step', dynamic_ncols=True, file=file,
                         disable=None if show_bar else True)
    self._started = None  # (step, time) at the end of the first step

  def step_done(self, step: int):
    if self._started is None:
      self._started = (step, time.perf_counter())
    self.bar.update(step - self.bar.n)

  def eta_seconds(self, step: int):
    """Seconds left at the rate since the first step; None before a second step."""
    if self._started is None or step <= self._started[0]:
      return None
    first, start = self._started
    return (self.total_steps - step) * (time.perf_counter() - start) / (step - first)

  def logged(self, loss: float):
    self.bar.set_postfix_str(f'loss {_number(loss)}', refresh=False)

  def close(self):
    self.bar.close()


# Training's and evaluation's rows, one JSON object a line (evaluate.append_jsonl writes
# them); named here, where the summary reads them, so that main.py's first import stays light.
METRICS_JSONL = 'metrics.jsonl'


def is_training_row(row: dict) -> bool:
  """Whether a metrics.jsonl row is a training log (its metrics named train_*), not an
  evaluation (named as --mode=evaluate names them)."""
  return any(name.startswith('train_') for name in row)


def evaluation_rows(workdir: str) -> list:
  """The evaluations in the workdir's metrics.jsonl, in order; lines that are not JSON
  objects (one cut short by a crash) are skipped."""
  rows = []
  try:
    with open(os.path.join(workdir, METRICS_JSONL)) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue
        if isinstance(row, dict) and 'step' in row and not is_training_row(row):
          rows.append(row)
  except FileNotFoundError:
    pass
  return rows


def _best(rows: list, metric: str):
  """The row with the highest `metric` (the checkpoint manager's order), None if none."""
  ranked = [r for r in rows if isinstance(r.get(metric), (int, float))]
  return max(ranked, key=lambda r: r[metric]) if ranked else None


def summary(workdir: str, split: str, evaluations: list, best_metric: str,
            checkpoint_dir: str, kept_steps: list, trained: tuple, seconds: float,
            images_per_sec=None) -> str:
  """The end of a run, in a few lines: what was trained in how long, the last and the best
  evaluation (by `best_metric`) among `evaluations` (metrics.jsonl's rows, every run in the
  workdir), the kept checkpoints, and where the logs and the report are.
  `trained`: (first step, last step) of this run, first > last when there was none."""
  first, last = trained
  if first <= last:
    speed = f', {images_per_sec:.1f} img/s' if images_per_sec else ''
    lines = [f'Trained steps {first} to {last} in {_duration(seconds)}{speed}.']
  else:
    lines = [f'Nothing to train: the workdir holds step {first - 1}.']
  if evaluations:
    final = evaluations[-1]
    lines.append(f"  last evaluation (step {final['step']}, {split}): "
                 f'{_evaluation_figures(final)}')
    best = _best(evaluations, best_metric) if best_metric else None
    if best is not None:
      kept = 'kept' if best['step'] in kept_steps else 'not saved'
      lines.append(f"  best {best_metric} at step {best['step']} (checkpoint {kept}): "
                   f'{_evaluation_figures(best)}')
  steps_kept = ', '.join(map(str, kept_steps)) or 'none'
  report = os.path.join(workdir, f'report_{split}_{max(first - 1, last)}.html')
  lines += [f'  checkpoints: {checkpoint_dir} (steps {steps_kept})',
            f'  every metric: {os.path.join(workdir, METRICS_JSONL)} and '
            f'tensorboard --logdir {workdir}',
            f'  report: python main.py --config=... --workdir={workdir} --mode=evaluate '
            f'writes {report} with its figures']
  return '\n'.join(lines)
