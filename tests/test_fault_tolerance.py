"""Pre-emption, non-finite losses, damaged checkpoints, another configuration's checkpoint,
and workdirs that cannot be written: each fails loudly and loses nothing."""

import glob
import logging
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
from deepfashion_jax import checkpoints
from deepfashion_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# One CPU device: what is tested here does not depend on the device count, and a long
# run on 4 forced host devices is what XLA:CPU's collectives are least reliable at.
_ONE_DEVICE = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')


def _command(workdir, data_dir, *flags):
  return [sys.executable, os.path.join(ROOT, 'main.py'), '--config=configs/test.py',
          f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *flags]


def _params(workdir, step):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return jax.tree.leaves(restored['state']['params'])


def _config(data_dir, **fields):
  config = test_config.get_config()
  config.data.data_dir = data_dir
  for name, value in fields.items():
    config[name] = value
  return config


def test_sigterm_checkpoints_and_the_resumed_run_equals_an_uninterrupted_one(
    synthetic_folder, tmp_path):
  data_dir = synthetic_folder[0]
  flags = ('--config.num_train_steps=30', '--config.eval_every_steps=30',
           '--config.checkpoint_every_steps=30')
  straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  process = subprocess.Popen(_command(interrupted, data_dir, *flags), cwd=ROOT,
                             stderr=subprocess.PIPE, text=True, env=_ONE_DEVICE)
  try:
    for line in process.stderr:  # signal once step 4's training metrics are logged
      if '] [4] train_' in line:
        process.send_signal(signal.SIGTERM)
        break
    rest = process.stderr.read()
    assert process.wait(timeout=300) == train.Preempted.EXIT_STATUS, rest[-3000:]
  finally:
    process.kill()
  stopped_at = int(re.search(r'Pre-empted by SIGTERM after step (\d+)', rest).group(1))
  assert 4 <= stopped_at < 30
  assert os.path.isdir(os.path.join(interrupted, 'checkpoints', str(stopped_at)))

  runs = {}
  for workdir in (interrupted, straight):
    runs[workdir] = subprocess.run(_command(workdir, data_dir, *flags), cwd=ROOT, text=True,
                                   capture_output=True, timeout=600, env=_ONE_DEVICE)
    assert runs[workdir].returncode == 0, runs[workdir].stderr[-3000:]
  assert f'Resuming from the checkpoint of step {stopped_at}' in runs[interrupted].stderr
  for a, b in zip(_params(straight, 30), _params(interrupted, 30)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    synthetic_folder, tmp_path):
  # Plain SGD with an absurd learning rate: the first step is finite, then it overflows.
  config = _config(synthetic_folder[0], optimizer='sgd', learning_rate=1e30,
                   num_train_steps=6, log_every_steps=1, checkpoint_every_steps=1,
                   eval_every_steps=6)
  workdir = str(tmp_path / 'run')
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  bad_step = int(re.search(r'Step (\d+): the loss or a gradient is not finite', message).group(1))
  kept = int(re.search(r'the last good checkpoint, step (\d+), is kept', message).group(1))
  assert kept == bad_step - 1 >= 1
  manager = checkpoints.create_manager(workdir, read_only=True)
  assert max(manager.all_steps()) == kept  # nothing saved after it
  assert all(np.all(np.isfinite(np.asarray(x))) for x in _params(workdir, kept))


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_used(
    synthetic_folder, tmp_path, caplog):
  caplog.set_level(logging.INFO)
  config = _config(synthetic_folder[0])  # 6 steps, checkpoints at 2, 4 and 6
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  folder = os.path.join(workdir, 'checkpoints')
  for path in glob.glob(os.path.join(folder, '6', 'state', '**', '*'), recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 1000:
      with open(path, 'r+b') as f:  # a crash in the middle of writing
        f.truncate(os.path.getsize(path) // 2)
  # A half-written save of a later step, as a crash during saving leaves it.
  os.makedirs(os.path.join(folder, '8.orbax-checkpoint-tmp-1234567', 'state'))

  config.num_train_steps = 8
  train.train_and_evaluate(config, workdir)
  assert 'The checkpoint of step 6 is damaged' in caplog.text
  assert 'Resuming from the checkpoint of step 4' in caplog.text
  assert glob.glob(os.path.join(workdir, 'damaged_checkpoints', '6-*'))
  assert 8 in checkpoints.create_manager(workdir, read_only=True).all_steps()


def test_a_checkpoint_of_another_configuration_is_refused_naming_the_difference(
    synthetic_folder, tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(synthetic_folder[0], num_train_steps=2), workdir)
  other = _config(synthetic_folder[0], num_train_steps=4)
  other.model.category_head = 'per_garment_type'
  with pytest.raises(checkpoints.CheckpointMismatchError) as error:
    train.train_and_evaluate(other, workdir)
  message = str(error.value)
  assert "config.model.category_head: 'single' in the checkpoint, 'per_garment_type' here" \
      in message
  assert 'params/fc_cls/kernel/value: only in the checkpoint' in message
  assert checkpoints.create_manager(workdir, read_only=True).all_steps() == [2]


def test_a_checkpoint_is_used_only_with_the_pooling_and_scaling_it_was_trained_with(
    synthetic_folder, tmp_path, caplog):
  """Same arrays, other meaning: resuming is refused; evaluation and prediction take the
  checkpoint's values and say so."""
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(synthetic_folder[0], num_train_steps=2), workdir)
  other = _config(synthetic_folder[0], num_train_steps=4)
  other.data.normalization = 'imagenet'
  other.model.roi_pool = 'baseline_max'
  with pytest.raises(checkpoints.CheckpointMismatchError) as error:
    train.train_and_evaluate(other, workdir)
  assert ("trained with config.model.roi_pool='align', config.data.normalization='baseline'"
          in str(error.value))
  assert '--config.model.roi_pool=align --config.data.normalization=baseline' in str(error.value)
  manager = checkpoints.create_manager(workdir, read_only=True)
  with caplog.at_level(logging.WARNING):
    adopted = checkpoints.inference_config(manager, 2, other)
  assert adopted.data.normalization == 'baseline' and adopted.model.roi_pool == 'align'
  assert other.data.normalization == 'imagenet'  # the caller's config is left as it was
  assert "config.data.normalization='imagenet' here" in caplog.text


def test_a_workdir_that_cannot_be_written_fails_at_start(synthetic_folder, tmp_path):
  a_file = tmp_path / 'file'
  a_file.write_text('')
  with pytest.raises(OSError, match='is not a writable folder'):
    train.train_and_evaluate(_config(synthetic_folder[0]), str(a_file / 'run'))


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
    train.train_and_evaluate(_config(synthetic_folder[0]), workdir)
  assert len(_params(workdir, 2)) > 0


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
    train._stop_if_diverged(config, logged, _Manager())  # pylint: disable=protected-access
    return
  with pytest.raises(FloatingPointError, match='Step 43: .* the last good checkpoint, '
                                               'step 40, is kept in /runs/x/checkpoints'):
    train._stop_if_diverged(config, logged, _Manager())  # pylint: disable=protected-access
