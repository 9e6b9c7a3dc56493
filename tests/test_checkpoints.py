"""Checkpoints: damaged ones set aside, another configuration's or format version's refused,
metadata read once per restore, float16 states kept whole, a moving average of the weights
kept, refused or chosen."""

import glob
import logging
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
from deepfashion_jax import checkpoints
from deepfashion_jax import run_lock
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax import train
from deepfashion_jax.data import annotations
from tests import helpers


def _assert_equal_states(restored, saved):
  assert jax.tree.structure(restored) == jax.tree.structure(saved)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_used(
    synthetic_folder, tmp_path, caplog):
  caplog.set_level(logging.INFO)
  config = helpers.tiny_config(synthetic_folder[0])  # 6 steps, checkpoints at 2, 4 and 6
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
  train.train_and_evaluate(helpers.tiny_config(synthetic_folder[0], num_train_steps=2),
                           workdir)
  other = helpers.tiny_config(synthetic_folder[0], num_train_steps=4)
  other.model.category_head = 'per_garment_type'
  with pytest.raises(checkpoints.CheckpointMismatchError) as error:
    train.train_and_evaluate(other, workdir)
  message = str(error.value)
  assert "config.model.category_head: 'single' in the checkpoint, 'per_garment_type' here" \
      in message
  assert 'params/category_classifier/kernel/value: only in the checkpoint' in message
  assert checkpoints.create_manager(workdir, read_only=True).all_steps() == [2]


def test_a_checkpoint_is_used_only_with_the_pooling_and_scaling_it_was_trained_with(
    synthetic_folder, tmp_path, caplog):
  """Same arrays, other meaning: resuming is refused; evaluation and prediction take the
  checkpoint's values and say so."""
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(helpers.tiny_config(synthetic_folder[0], num_train_steps=2),
                           workdir)
  other = helpers.tiny_config(synthetic_folder[0], num_train_steps=4)
  other.data.normalization = 'imagenet'
  other.model.roi_pool = 'baseline_max'
  with pytest.raises(checkpoints.CheckpointMismatchError) as error:
    train.train_and_evaluate(other, workdir)
  assert ("trained with config.model.roi_pool='align', config.data.normalization='baseline'"
          in str(error.value))
  assert '--config.model.roi_pool=align --config.data.normalization=baseline' in str(error.value)
  manager = checkpoints.create_manager(workdir, read_only=True)
  with caplog.at_level(logging.WARNING):
    adopted = checkpoints.inference_config(checkpoints.read_metadata(manager, 2), other)
  assert adopted.data.normalization == 'baseline' and adopted.model.roi_pool == 'align'
  assert other.data.normalization == 'imagenet'  # the caller's config is left as it was
  assert "config.data.normalization='imagenet' here" in caplog.text


def test_a_float16_state_survives_a_checkpoint(synthetic_folder, tmp_path):
  from deepfashion_jax import checkpoints  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.dtype = 'float16'
  index = annotations.read_deepfashion(synthetic_folder[0])
  mesh = sharding.make_mesh(jax.devices()[:1])
  _, state = steps.create_train_state(config, mesh, index.attribute_facts())
  state = state.replace(dynamic_scale=state.dynamic_scale.replace(
      scale=jax.numpy.asarray(4.0, jax.numpy.float32)))
  manager = checkpoints.create_manager(str(tmp_path), best_metric='')
  checkpoints.save(manager, 0, state)
  manager.wait_until_finished()
  restored = checkpoints.restore(manager, 0, checkpoints.abstract_like(state))
  assert float(restored.dynamic_scale.scale) == 4.0
  assert restored.dynamic_scale.growth_interval == state.dynamic_scale.growth_interval
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _write_checkpoint(workdir, ema_decay, **optimizer_fields):
  """A step-4 checkpoint of the test config with config.ema_decay; its moving average (if
  any) moved away from its weights, so that choosing one or the other shows. With
  `optimizer_fields` (grad_clip_norm=1.0, say), saved as trained with them: their config,
  and an optimiser state of their structure."""
  config = test_config.get_config()
  config.ema_decay, config.best_metric = ema_decay, ''
  mesh = sharding.make_mesh(jax.devices()[:1])
  _, state = steps.create_train_state(config, mesh)
  if ema_decay:
    state = state.replace(ema_params=jax.tree.map(lambda x: x + 0.5, state.ema_params))
  if optimizer_fields:
    config.update(optimizer_fields)  # zeros of its state's shapes: no compilation needed
    shapes = jax.eval_shape(steps.create_optimizer(config).init, state.params)
    state = state.replace(opt_state=jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
  manager = checkpoints.create_manager(workdir, best_metric='')
  checkpoints.save(manager, 4, state, config=config)
  manager.wait_until_finished()
  return config, mesh, manager, state


def _files(folder) -> dict:
  """path -> (size, modification time) of every file and folder under `folder`."""
  found = {}
  for root, folders, files in os.walk(folder):
    for name in folders + files:
      path = os.path.join(root, name)
      found[path] = (os.path.getsize(path), os.path.getmtime(path))
  return found


@pytest.mark.parametrize('saved_decay, here_decay, message', [
    (0.9, 0.0, 'keeps a moving average of the weights (config.ema_decay=0.9) and this run '
               'does not (config.ema_decay=0.0); it is not loaded. Set --config.ema_decay=0.9'),
    (0.0, 0.9, 'keeps no moving average of the weights (config.ema_decay=0) and this run '
               'does (config.ema_decay=0.9); it is not loaded. Set --config.ema_decay=0')])
def test_a_checkpoint_with_an_ema_resumes_only_with_one_and_the_other_way_round(
    tmp_path, saved_decay, here_decay, message):
  _, mesh, manager, _ = _write_checkpoint(str(tmp_path), saved_decay)
  config = test_config.get_config()
  config.ema_decay = here_decay
  _, state = steps.create_train_state(config, mesh)
  with pytest.raises(checkpoints.CheckpointMismatchError, match=re.escape(message)):
    checkpoints.restore_newest_intact(manager, checkpoints.abstract_like(state),
                                      config=config)


def test_inference_restores_the_raw_weights_or_their_ema_whatever_the_optimiser_was(tmp_path):
  """Trained with a moving average, clipping and SGD (an optimiser state of another
  structure): evaluation and prediction restore the weights or their average with a config
  that has none of them (config.ema_decay=0, no clipping, Adam). Beside a run training in
  the workdir (holding its lock) they take no lock and change nothing; a damaged
  checkpoint is reported, not set aside."""
  workdir = str(tmp_path / 'ema')
  _, mesh, _, saved = _write_checkpoint(workdir, 0.9, grad_clip_norm=1.0, optimizer='sgd')
  config = test_config.get_config()
  with run_lock.hold(workdir):  # a run training there
    before = _files(workdir)
    for weights, want in (('raw', saved.params), ('ema', saved.ema_params)):
      config.eval.weights = weights
      restored = checkpoints.restore_for_inference(config, workdir, mesh)
      assert restored.step == 4 and restored.config.ema_decay > 0
      _assert_equal_states(restored.state.params, want)
      _assert_equal_states(restored.state.ema_params, saved.ema_params)
    assert _files(workdir) == before
    for path in glob.glob(os.path.join(workdir, 'checkpoints', '4', '**', '*'),
                          recursive=True):
      if os.path.isfile(path) and os.path.getsize(path) > 1000:
        with open(path, 'r+b') as f:  # a disk that lost their second halves
          f.truncate(os.path.getsize(path) // 2)
    before = _files(workdir)
    with pytest.raises(checkpoints.DamagedCheckpointError,
                       match=r'The checkpoint of step 4 in .* cannot be read .* left where'):
      checkpoints.restore_for_inference(config, workdir, mesh)
    assert _files(workdir) == before  # nothing moved, removed or written
  plain, *_ = _write_checkpoint(str(tmp_path / 'plain'), 0.0)
  plain.eval.weights = 'ema'
  with pytest.raises(ValueError, match=r'config.eval.weights=ema: the checkpoint of step 4 .* '
                                       r'keeps no moving average of the weights'):
    checkpoints.restore_for_inference(plain, str(tmp_path / 'plain'), mesh)


@pytest.mark.parametrize('version, named', [
    (None, 'is of checkpoint format version 0 (written before checkpoints carried one); '),
    (checkpoints.FORMAT_VERSION + 1,
     f'is of checkpoint format version {checkpoints.FORMAT_VERSION + 1}; ')])
def test_a_checkpoint_of_another_format_version_is_refused_naming_it(tmp_path, version,
                                                                      named):
  """One written before checkpoints carried a version (None), or by a release that writes
  another: resuming and inference refuse it, though its arrays fit this run's model,
  naming its version and what to do; it is not set aside as damaged."""
  workdir, config = str(tmp_path), test_config.get_config()
  config.best_metric = ''
  mesh = sharding.make_mesh(jax.devices()[:1])
  _, state = steps.create_train_state(config, mesh)
  manager = checkpoints.create_manager(workdir, best_metric='')
  manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          config=ocp.args.JsonSave(config.to_dict())),
               custom_metadata={} if version is None else {'format_version': version})
  manager.wait_until_finished()
  message = (f'The checkpoint of step 4 in {manager.directory} {named}this release reads '
             f'version {checkpoints.FORMAT_VERSION} only, so it is not loaded. Evaluate or '
             'predict with it using the release that wrote it, or retrain in a new --workdir')
  with pytest.raises(checkpoints.CheckpointFormatError, match=re.escape(message)):
    checkpoints.restore_newest_intact(manager, checkpoints.abstract_like(state),
                                      config=config)
  assert manager.all_steps() == [4]  # refused, not set aside
  assert not os.path.exists(os.path.join(workdir, checkpoints.DAMAGED_FOLDER))
  for restore in (checkpoints.restore_for_inference, checkpoints.restore_every_kept):
    with pytest.raises(checkpoints.CheckpointFormatError, match=re.escape(message)):
      list(restore(config, workdir, mesh))


def test_every_restore_reads_a_checkpoint_metadata_once(tmp_path, monkeypatch):
  """Resuming, restore_for_inference and restore_every_kept read each checkpoint's
  metadata once (`read_metadata`: one step-metadata read from disk), and every checkpoint
  saved carries FORMAT_VERSION."""
  config, mesh, manager, state = _write_checkpoint(str(tmp_path), 0.9)
  checkpoints.save(manager, 6, state, config=config)
  manager.wait_until_finished()
  for step in (4, 6):
    assert manager.metadata(step).custom_metadata == {
        'format_version': checkpoints.FORMAT_VERSION}
  reads, disk_reads = [], []
  read_metadata, step_metadata = checkpoints.read_metadata, ocp.CheckpointManager.metadata
  monkeypatch.setattr(checkpoints, 'read_metadata',
                      lambda *args: reads.append(args[1]) or read_metadata(*args))

  def counted_step_metadata(self, step=None):
    if step is not None:  # None: the folder's, not a checkpoint's
      disk_reads.append(step)
    return step_metadata(self, step)

  monkeypatch.setattr(ocp.CheckpointManager, 'metadata', counted_step_metadata)

  def reads_of(restore):
    reads.clear()
    disk_reads.clear()
    restore()
    return reads, disk_reads

  resume = lambda: checkpoints.restore_newest_intact(
      checkpoints.create_manager(str(tmp_path), best_metric=''),
      checkpoints.abstract_like(state), config=config)
  assert reads_of(resume) == ([6], [6])
  for_inference = lambda: checkpoints.restore_for_inference(config, str(tmp_path), mesh)
  assert reads_of(for_inference) == ([6], [6])
  every_kept = lambda: list(checkpoints.restore_every_kept(config, str(tmp_path), mesh))
  assert reads_of(every_kept) == ([4, 6], [4, 6])

