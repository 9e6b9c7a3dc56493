"""What a person sees on the terminal: a short run of main.py read as a user reads it (its
headline lines, its summary, no library noise, a real warning kept), the learning rate
where the metrics are, the progress bar on a terminal only, and predict's bar labels."""

import glob
import io
import json
import logging
import os
import re

import matplotlib
import numpy as np
import pytest

matplotlib.use('Agg')
from matplotlib import pyplot  # pylint: disable=g-import-not-at-top,wrong-import-position

from deepfashion_jax import console  # pylint: disable=wrong-import-position
from deepfashion_jax import predict  # pylint: disable=wrong-import-position
from deepfashion_jax import train  # pylint: disable=wrong-import-position
from tests import helpers  # pylint: disable=wrong-import-position

# Three steps, each logged; a save at step 2 without an evaluation (orbax's tracked-metric
# note) and one at 3 with it; a cosine schedule whose warm-up makes each step's rate differ;
# a profiler window the run never reaches: a warning of the project's own, to be kept.
FLAGS = ('--config.num_train_steps=3', '--config.log_every_steps=1',
         '--config.eval_every_steps=3', '--config.checkpoint_every_steps=2',
         '--config.num_box_images=0', '--config.schedule=cosine', '--config.warmup_steps=1',
         '--config.learning_rate=0.001', '--config.profile_steps=(10, 11)')

NOISE = ('oneDNN custom operations', 'absl::InitializeLog', 'cpu_feature_guard',
         "Unable to initialize backend 'tpu'", 'Requested `tracked_metric`',
         'Given directory is read only', 'read_only=True, setting', 'Setting work unit notes',
         'Got images',
         'logging_writer.py', '[Hyperparameters]')


@pytest.fixture(scope='module')
def short_run(synthetic_folder, tmp_path_factory):
  """(workdir, stdout, stderr, config) of main.py trained for 3 steps, as a user runs it
  (stderr is a pipe here: no progress bar, the log lines only)."""
  workdir = str(tmp_path_factory.mktemp('console') / 'run')
  result = helpers.run_main(workdir, synthetic_folder[0], *FLAGS)
  config = helpers.tiny_config(synthetic_folder[0], num_train_steps=3, schedule='cosine',
                               warmup_steps=1, learning_rate=0.001)
  return workdir, result.stdout, result.stderr, config


def _expected_rates(config) -> dict:
  rates = {step: train.learning_rate_of_step(config, step) for step in (1, 2, 3)}
  assert len(set(rates.values())) == 3, rates  # else an off-by-one would pass
  return rates


@pytest.mark.slow
def test_each_log_is_one_short_line_of_the_headline_figures(short_run):
  _, _, stderr, config = short_run
  rates = _expected_rates(config)
  lines = [line for line in stderr.splitlines() if re.search(r'\] step \d/3 \|', line)]
  assert len(lines) == 3, stderr[-3000:]
  for step, line in enumerate(lines, 1):
    headline = line.split('] ', 1)[1]
    assert re.fullmatch(
        rf'step {step}/3 \| loss [\d.e+]+ \| top-1 [\d.]+% \| top-3 [\d.]+% \| box IoU '
        rf'[\d.]+ \| lr {re.escape(f"{rates[step]:.2e}")} \| [\d.]+ img/s'
        r'( \| ETA \d+:\d\d:\d\d)?', headline)
    assert len(headline) < 120
  assert 'ETA 0:00:00' in lines[-1]
  evaluation = [line for line in stderr.splitlines() if 'evaluation of step 3 on val:' in line]
  assert len(evaluation) == 1 and 'attr recall top-3' in evaluation[0]
  assert 'train_attr_recall_top5_fabric' not in stderr  # the rest: TensorBoard, metrics.jsonl


@pytest.mark.slow
def test_the_run_ends_on_a_summary(short_run):
  workdir, stdout, _, _ = short_run
  summary = stdout.strip().splitlines()
  assert summary[0].startswith('Trained steps 1 to 3 in ')
  assert summary[1].startswith('  last evaluation (step 3, val): loss ')
  assert summary[2].startswith('  best category_top3 at step 3 (checkpoint kept): loss ')
  assert summary[3] == f'  checkpoints: {workdir}/checkpoints (steps 2, 3)'
  assert f'{workdir}/metrics.jsonl' in summary[4] and f'--logdir {workdir}' in summary[4]
  assert f'--mode=evaluate writes {workdir}/report_val_3.html' in summary[5]


@pytest.mark.slow
def test_no_library_noise_and_a_real_warning_kept(short_run):
  _, stdout, stderr, _ = short_run
  for noise in NOISE:
    assert noise not in stderr + stdout, noise
  assert 'config.profile_steps=(10, 11): this run trains steps 1 to 3' in stderr


@pytest.mark.slow
def test_the_learning_rate_and_every_train_metric_are_logged(short_run):
  workdir, _, _, config = short_run
  rates = _expected_rates(config)
  rows = [row for row in _jsonl(workdir) if console.is_training_row(row)]
  assert [row['step'] for row in rows] == [1, 2, 3]
  for row in rows:
    np.testing.assert_allclose(row['train_learning_rate'], rates[row['step']], rtol=1e-6)
    assert {'train_loss', 'train_attr_recall_top5_fabric', 'train_images_per_sec'} <= set(row)
  assert [row['step'] for row in console.evaluation_rows(workdir)] == [3]
  scalars = _tensorboard_scalars(workdir)
  for step, rate in rates.items():
    np.testing.assert_allclose(scalars[(step, 'train_learning_rate')], rate, rtol=1e-6)


def _jsonl(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _tensorboard_scalars(workdir) -> dict:
  from tensorflow.compat.v1 import train as tf_train  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return {(event.step, value.tag): float(tf.make_ndarray(value.tensor))
          for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
          for event in tf_train.summary_iterator(path) for value in event.summary.value
          if value.metadata.plugin_data.plugin_name == 'scalars'}


class _Records(logging.Handler):
  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def test_the_filter_drops_the_known_notes_and_keeps_warnings():
  """Each known note (read-only checkpoints' in --mode=evaluate and predict, the TPU probe,
  ...) is dropped where it comes from; a warning of orbax's own, or another library's,
  passes, and so does a known message from another file. (Whether a real run prints none of
  them: test_no_library_noise_and_a_real_warning_kept, in make test-slow. Orbax says some
  once per process, so a test in a shared worker cannot count on it to say them here.)"""
  records = _Records()
  records.addFilter(console._ConsoleFilter())  # pylint: disable=protected-access
  logger = logging.getLogger('test_console_filter')
  logger.propagate, logger.level = False, logging.INFO
  logger.addHandler(records)
  def say(path, message, level=logging.INFO):
    logger.handle(logging.LogRecord('x', level, f'/site-packages/{path}', 1, message, None,
                                    None))
  try:
    for path, start in console.KNOWN_NOISE:
      say(path, start + ' (and the rest of the message)')
    say('orbax/checkpoint/checkpoint_manager.py', 'Saving checkpoint at step 4')  # orbax INFO
    kept = [('orbax/checkpoint/checkpoint_manager.py',
             'Waiting for previous save to complete took 9 seconds.'),
            ('jax/_src/xla_bridge.py', "Unable to initialize backend 'cuda'"),
            ('deepfashion_jax/train.py', "Unable to initialize backend 'tpu'")]
    for path, message in kept:
      say(path, message, logging.WARNING)
  finally:
    logger.removeHandler(records)
  assert records.messages == [message for _, message in kept]


class _Terminal(io.StringIO):
  def isatty(self):
    return True


class _File(io.StringIO):
  def isatty(self):
    return False


def test_the_progress_bar_shows_on_a_terminal_only():
  shown, hidden = _Terminal(), _File()
  for stream in (shown, hidden):
    progress = console.Progress(3, 10, file=stream)  # resumed after step 2
    for step in (3, 4, 5):
      progress.step_done(step)
      progress.logged(2.5)
    progress.bar.refresh()
    eta = progress.eta_seconds(5)
    progress.close()
  last = shown.getvalue().split('\r')[-2]  # the last drawing, before the bar is closed
  assert re.search(r'training:  50%.*\| 5/10 \[.*step.*loss 2\.5\]', last), last
  assert hidden.getvalue() == '' and eta is not None and eta >= 0


def test_predict_prints_the_probability_on_each_bar():
  figure = pyplot.figure()
  axis = figure.add_subplot()
  entries = [dict(name='Tee', probability=0.82), dict(name='Top', probability=0.125),
             dict(name='Jacket', probability=0.004)]
  predict._bars(axis, entries, 'category', 'tab:blue')  # pylint: disable=protected-access
  labels = {text.get_text(): text for text in axis.texts}
  pyplot.close(figure)
  assert set(labels) == {'82%', '12%', '<1%'}
  assert labels['82%'].get_color() == 'white' and labels['12%'].get_color() == 'black'
