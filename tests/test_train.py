"""The main job: exact resume, pre-emption, non-finite steps, failed saves, unwritable
workdirs, and its throughput figure."""

import dataclasses
import glob
import logging
import math
import os
import re
import signal
import subprocess
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
from deepfashion_jax import checkpoints
from deepfashion_jax import console
from deepfashion_jax import data
from deepfashion_jax import evaluate
from deepfashion_jax import metrics
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax import train
from tests import helpers


def _scalars(workdir):
  """(step, tag) -> value of every scalar in the workdir's TensorBoard event files."""
  from tensorflow.compat.v1 import train as tf_train  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  values = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf_train.summary_iterator(path):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == 'scalars':
          values[(event.step, value.tag)] = float(tf.make_ndarray(value.tensor))
  return values


def _logged_steps(workdir) -> list:
  """The steps of metrics.jsonl's evaluation rows, in order."""
  return [row['step'] for row in console.evaluation_rows(workdir)]


@pytest.mark.slow  # make test resumes the GPU's program bit for bit: test_gpu_path.py
def test_resumed_run_equals_uninterrupted_run_bit_for_bit(synthetic_folder, tmp_path,
                                                          caplog):
  """In this process (the SIGTERM test below resumes in a new one). With a moving average
  of the weights (its metrics logged as ema_*, the best checkpoint chosen by one): it
  resumes exactly too. (Gradient accumulation adds nothing to the state: test_steps.py.)
  metrics.jsonl then logs each step once: what a run stopped after its checkpoint had
  logged (step 5 here, and a line cut short) is dropped on resume. The longer run is said
  at start."""
  caplog.set_level(logging.INFO)
  data_dir = synthetic_folder[0]
  options = dict(ema_decay=0.9, best_metric='ema_category_top3')
  straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
  train.train_and_evaluate(helpers.tiny_config(data_dir, **options), straight)  # 6 steps
  train.train_and_evaluate(helpers.tiny_config(data_dir, num_train_steps=4, **options), split)
  with open(os.path.join(split, 'metrics.jsonl'), 'a') as f:  # as if killed after step 5
    f.write('{"step": 5, "loss": 1.0}\n{"step": 6, "lo')
  caplog.clear()
  train.train_and_evaluate(helpers.tiny_config(data_dir, **options), split)  # steps 5 and 6
  assert 'Resuming from the checkpoint of step 4' in caplog.text
  assert 'Resuming from step 4 with config.num_train_steps=6 (4 when saved)' in caplog.text
  assert _logged_steps(split) == [3, 4, 6] and _logged_steps(straight) == [3, 6]

  saved = helpers.saved_state(straight, 6)
  assert int(saved['step']) == 6 and 'ema_params' in saved and 'ema_batch_stats' in saved
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(helpers.saved_state(split, 6))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert {'category_top3', 'ema_category_top3', 'ema_loss'} <= set(
      helpers.logged_evaluations(straight)[6])
  straight_scalars, split_scalars = _scalars(straight), _scalars(split)
  train_tags = [key for key in straight_scalars if key[1].startswith('train_')]
  assert {step for step, _ in train_tags} == {2, 4, 6}
  eval_tags = [key for key in straight_scalars if key[1].startswith('eval_')]
  assert {step for step, _ in eval_tags} == {3, 6}
  for key in train_tags + [key for key in eval_tags if key[0] == 6]:
    np.testing.assert_equal(split_scalars[key], straight_scalars[key], err_msg=str(key))
  assert helpers.logged_evaluations(split)[6] == helpers.logged_evaluations(straight)[6]  # the evaluation logged at the end


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_resumed_run_equals_an_uninterrupted_one(
    synthetic_folder, tmp_path):
  data_dir = synthetic_folder[0]
  flags = ('--config.num_train_steps=30', '--config.eval_every_steps=30',
           '--config.checkpoint_every_steps=30')
  straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  process = subprocess.Popen(helpers.main_command(interrupted, data_dir, *flags),
                             cwd=helpers.ROOT, stderr=subprocess.PIPE, text=True,
                             env=helpers.ONE_DEVICE)
  try:
    for line in process.stderr:  # signal once step 4's training metrics are logged
      if '] step 4/30 | loss' in line:
        process.send_signal(signal.SIGTERM)
        break
    rest = process.stderr.read()
    assert process.wait(timeout=300) == train.Preempted.EXIT_STATUS, rest[-3000:]
  finally:
    process.kill()
  stopped_at = int(re.search(r'Pre-empted by SIGTERM after step (\d+)', rest).group(1))
  assert 4 <= stopped_at < 30
  assert os.path.isdir(os.path.join(interrupted, 'checkpoints', str(stopped_at)))

  resumed = helpers.run_main(interrupted, data_dir, *flags)
  helpers.run_main(straight, data_dir, *flags)
  assert f'Resuming from the checkpoint of step {stopped_at}' in resumed.stderr
  for a, b in zip(helpers.saved_params(straight, 30), helpers.saved_params(interrupted, 30)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('processes, stops_after', [(1, 5), (2, 5 + train._TrainMetrics.LAG)])
def test_a_stop_signal_is_honoured_after_its_step_or_lag_steps_later_on_many_hosts(
    synthetic_folder, tmp_path, monkeypatch, processes, stops_after):
  """The signal arrives before step 5 (logs at 4 and 8). One process stops after step 5.
  Several read the step's agreed flag (steps.STOP_REQUESTED) LAG steps late between logs:
  the loop is the real one, told it is one of two processes."""

  class SignalledBeforeStep5(train._StopSignals):  # pylint: disable=protected-access

    def __init__(self):
      super().__init__(processes=processes)
      self.marked = 0

    def mark(self, batch):
      self.marked += 1
      if self.marked == 5:
        self.received = 'SIGTERM'
      return super().mark(batch)

  monkeypatch.setattr(train, '_StopSignals', SignalledBeforeStep5)
  config = helpers.tiny_config(synthetic_folder[0], num_train_steps=8, log_every_steps=4,
                               checkpoint_every_steps=4, eval_every_steps=8)
  workdir = str(tmp_path / 'run')
  with pytest.raises(train.Preempted, match=f'by SIGTERM after step {stops_after}:'):
    train.train_and_evaluate(config, workdir)
  assert checkpoints.create_manager(workdir, read_only=True).all_steps() == [4, stops_after]
  logged = {step for step, tag in _scalars(workdir) if tag == 'train_loss'}
  assert logged == {4, stops_after}  # the steps since the log at 4, merged and written


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    synthetic_folder, tmp_path):
  # Plain SGD with an absurd learning rate: the first step is finite, then it overflows.
  config = helpers.tiny_config(synthetic_folder[0], optimizer='sgd', learning_rate=1e30,
                               num_train_steps=3, log_every_steps=1,
                               checkpoint_every_steps=1, eval_every_steps=3)
  workdir = str(tmp_path / 'run')
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  bad_step = int(re.search(r'Step (\d+): the loss or a gradient is not finite', message).group(1))
  kept = int(re.search(r'the last good checkpoint, step (\d+), is kept', message).group(1))
  assert kept == bad_step - 1 >= 1
  manager = checkpoints.create_manager(workdir, read_only=True)
  assert max(manager.all_steps()) == kept  # nothing saved after it
  assert all(np.all(np.isfinite(np.asarray(x))) for x in helpers.saved_params(workdir, kept))


def test_a_workdir_that_cannot_be_written_fails_at_start(synthetic_folder, tmp_path):
  a_file = tmp_path / 'file'
  a_file.write_text('')
  with pytest.raises(OSError, match='is not a writable folder'):
    train.train_and_evaluate(helpers.tiny_config(synthetic_folder[0]), str(a_file / 'run'))


def test_a_failed_save_says_so_and_keeps_the_checkpoints_before_it(
    synthetic_folder, tmp_path, monkeypatch):
  save = ocp.CheckpointManager.save

  def full_disk_after_step_2(manager, step, *args, **kwargs):
    if step > 2:
      raise OSError(28, 'No space left on device')
    return save(manager, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', full_disk_after_step_2)
  workdir = str(tmp_path / 'run')
  with pytest.raises(OSError, match=r'Could not save the checkpoint of step 4 .* No space left '
                                    r'on device\. The checkpoints written before are intact: '
                                    r'steps \[2\]'):
    train.train_and_evaluate(helpers.tiny_config(synthetic_folder[0]), workdir)
  assert len(helpers.saved_params(workdir, 2)) > 0


class _Manager:
  directory = '/runs/x/checkpoints'

  def latest_step(self):
    return 40


@pytest.mark.parametrize('dtype, in_a_row, stops', [
    ('float32', 1, True), ('bfloat16', 3, True), ('float16', 3, False),
    ('float16', 25, False), ('float16', 26, True)])
def test_float16_tolerates_a_few_skipped_steps_in_a_row_and_stops_on_many(
    dtype, in_a_row, stops):
  config = test_config.get_config()
  config.dtype = dtype  # config.max_nonfinite_in_a_row = 25
  logged = dict(nonfinite_steps=in_a_row, first_nonfinite_step=43,
                nonfinite_in_a_row=in_a_row, loss_scale=2.0 ** 10)
  if not stops:
    train.stop_if_diverged(config, logged, _Manager())
    return
  with pytest.raises(FloatingPointError, match='Step 43: .* the last good checkpoint, '
                                               'step 40, is kept in /runs/x/checkpoints'):
    train.stop_if_diverged(config, logged, _Manager())


def test_periodic_actions_are_due_every_n_steps_and_after_the_last():
  due = [step for step in range(1, 11) if train.itstime(step, 4, 10)]
  assert due == [4, 8, 10]
  assert [s for s in range(1, 9) if train.itstime(s, 4, 8)] == [4, 8]  # the last once


def test_rows_past_the_resumed_step_and_lines_that_are_not_rows_leave_metrics_jsonl(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  lines = [b'{"step": 2, "loss": 1.5}', b'{"step": 3}', b'{"step": 4, "loss": 1.2}',
           b'x' * (3 * 2**20), b'\xff\xfe', b'[1, 2]', b'{"step": true}', b'{"step": "1"}',
           b'[' * 5000, b'{"step": 1}', b'{"step": 9}', b'{"step": 3, "lo']
  path.write_bytes(b'\n'.join(lines))
  os.chmod(path, 0o644)
  assert evaluate.drop_jsonl_rows_after(str(tmp_path), 3) == 9
  assert path.read_bytes() == b'{"step": 2, "loss": 1.5}\n{"step": 3}\n{"step": 1}\n'
  assert os.stat(path).st_mode & 0o777 == 0o644
  assert os.listdir(tmp_path) == ['metrics.jsonl']  # no temporary file left
  assert evaluate.drop_jsonl_rows_after(str(tmp_path), 3) == 0  # nothing more to drop
  assert evaluate.drop_jsonl_rows_after(str(tmp_path / 'none'), 3) == 0


def test_a_resumed_run_says_how_its_schedule_changed(caplog):
  """Cosine decay over 8 steps instead of 4, resumed at step 3 (2 warm-up steps): the rate at
  step 3 and at the end, under the saved and the new lengths."""
  config = test_config.get_config()
  config.schedule, config.warmup_steps, config.learning_rate = 'cosine', 2, 1e-3
  config.num_train_steps = 8
  saved = dict(num_train_steps=4, schedule='cosine', warmup_steps=2, learning_rate=1e-3)
  cosine = lambda step, total: 1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 2) / (total - 2)))
  with caplog.at_level(logging.INFO):
    train._say_if_the_schedule_changed(config, saved, 3)  # pylint: disable=protected-access
  assert (f'Resuming from step 3 with config.num_train_steps=8 (4 when saved): the '
          f'learning-rate schedule is recomputed. At step 3 the rate is now '
          f'{cosine(3, 8):.3g} ({cosine(3, 4):.3g} under the values saved); it goes to 0 at '
          'step 8 (the saved schedule went to 0 at step 4).') in caplog.text
  caplog.clear()
  with caplog.at_level(logging.INFO):  # the same values: nothing to say
    train._say_if_the_schedule_changed(  # pylint: disable=protected-access
        config, dict(saved, num_train_steps=8), 3)
  assert not caplog.text


# --- the loop's metrics, merged on the device --------------------------------------------

_NONFINITE_STEPS = (3, 4, 7)  # of the stand-in step below: two in a row, then one


class _StandInState(NamedTuple):
  step: jax.Array
  nonfinite_in_a_row: jax.Array


def _stand_in_train_step(state, batch):
  """A jitted stand-in for the train step, cheap to compile: the training metrics of its
  batch's values, its step non-finite at _NONFINITE_STEPS."""
  batch = sharding.unpacked(batch)  # as the loop packs it (train._device_entries)
  step = state.step + 1
  nonfinite = jnp.isin(step, jnp.asarray(_NONFINITE_STEPS))
  in_a_row = jnp.where(nonfinite, state.nonfinite_in_a_row + 1, 0)
  finite = ~nonfinite[None]
  norm = batch['value'].sum() * step.astype(jnp.float32)
  collection = metrics.train_collection_class(('loss', 'category_top1'))
  return _StandInState(step, in_a_row), collection.single_from_model_output(
      loss=(batch['value'], batch['valid']),
      category_top1=(batch['value'] > 0.5, batch['valid']),
      **{name: (jnp.where(finite, norm + i, 0.0), finite)
         for i, name in enumerate(metrics.NORM_NAMES)},
      loss_scale=step.astype(jnp.float32), nonfinite_steps=nonfinite.astype(jnp.int32),
      first_nonfinite_step=jnp.where(nonfinite, step, metrics.NO_STEP).astype(jnp.int32),
      nonfinite_in_a_row=in_a_row, stop_requested=jnp.any(batch[steps.STOP_REQUESTED]))


class _Recorded:
  """A jitted function that keeps what each call returned (and keeps its `lower`)."""

  def __init__(self, function):
    self.function, self.lower, self.outputs = function, function.lower, []

  def __call__(self, *args):
    state, step_metrics = self.function(*args)
    self.outputs.append(step_metrics)
    return state, step_metrics


class _Writer:
  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(step, {}).update(scalars)


@pytest.mark.parametrize('processes', [1, 2])
def test_the_loop_logs_the_metrics_merged_on_the_device_as_merged_on_the_host(
    tmp_path, monkeypatch, processes):
  """10 steps, logs at 4, 8 and 10 (float16: its non-finite steps are logged, not fatal).
  Each log's values, the non-finite bookkeeping included, equal the host's merge of the
  logged steps' metrics, bit for bit; with two processes (each step's stop flag read LAG
  steps late) too."""
  config = test_config.get_config()
  config.dtype, config.num_train_steps, config.log_every_steps = 'float16', 10, 4
  config.eval_every_steps = config.checkpoint_every_steps = 100
  rows = np.random.default_rng(0)
  batches = iter([dict(value=rows.random(8, np.float32), valid=rows.random(8) < 0.8,
                       skipped=np.zeros(8, bool)) for _ in range(10)])
  mesh = sharding.make_mesh()
  train_step = _Recorded(jax.jit(_stand_in_train_step, out_shardings=sharding.replicated(mesh)))
  jitted = steps.jit_steps(None, mesh)
  run = train._Run(  # pylint: disable=protected-access
      config, str(tmp_path), mesh, dataclasses.replace(jitted, train=train_step),
      data.TrainingData(None, batches, None), _Manager(), _Writer(),
      steps.StepConfig(None, None, 0, {}, None, None),
      train._StopSignals(processes))  # pylint: disable=protected-access
  checked = {}
  monkeypatch.setattr(train, 'stop_if_diverged',
                      lambda config, computed, manager: checked.setdefault(len(checked), computed))
  monkeypatch.setattr(checkpoints, 'save', lambda *args, **kwargs: None)
  monkeypatch.setattr(train, '_evaluate_and_report', lambda *args: {})
  state = _StandInState(*jnp.zeros((2,), jnp.int32))
  train._train_loop(run, state)  # pylint: disable=protected-access

  step_metrics = [sharding.local_copy(m) for m in train_step.outputs]
  for log, (first, last) in enumerate([(1, 4), (5, 8), (9, 10)]):
    merged = step_metrics[first - 1]
    for one in step_metrics[first:last]:
      merged = merged.merge(one)
    with np.errstate(invalid='ignore'):
      expected = {k: float(np.asarray(v)) for k, v in merged.compute().items()}
    assert checked[log] == expected
    logged = run.writer.scalars[last]
    assert {k: logged[f'train_{k}'] for k in ('loss', 'category_top1', 'grad_norm',
                                              'nonfinite_steps', 'loss_scale')} == {
        k: expected[k] for k in ('loss', 'category_top1', 'grad_norm', 'nonfinite_steps',
                                 'loss_scale')}
  bookkeeping = [(c['nonfinite_steps'], c['first_nonfinite_step'], c['nonfinite_in_a_row'])
                 for c in checked.values()]
  assert bookkeeping == [(2, 3, 2), (1, 7, 1), (0, metrics.NO_STEP, 0)]
