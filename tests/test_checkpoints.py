"""Checkpoints: damaged ones set aside, another configuration's refused, old names read,
float16 states kept whole, a moving average of the weights kept, refused or chosen."""

import dataclasses
import glob
import logging
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
from deepfashion_jax import checkpoints
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax import train
from deepfashion_jax.data import annotations
from tests import helpers

# Our attribute names -> the ones checkpoints had before the rename (PyTorch's).
OLD_NAMES = {'box_reduce': 'reduce_1x1', 'box_top_left': 'fc_bbox_xy',
             'box_size': 'fc_bbox_offset', 'attribute_classifier': 'fc_bin',
             'category_classifier': 'fc_cls', 'garment_type_classifier': 'fc_garment_type',
             'per_type_category_classifiers': 'fc_cls_per_type'}


def _config(category_head):
  config = test_config.get_config()
  config.model.category_head = category_head
  return config


def _assert_equal_states(restored, saved):
  assert jax.tree.structure(restored) == jax.tree.structure(saved)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _write_old_checkpoint(workdir, category_head):
  """A checkpoint at step 4 whose arrays carry the old names; returns the state it holds,
  under the new names. Its parameters and optimiser moments are moved away from a fresh
  state's, so that a restore that kept the fresh values shows."""
  config = _config(category_head)
  _, state = steps.create_train_state(config, sharding.make_mesh(jax.devices()[:1]))
  moved = lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x
  state = state.replace(params=jax.tree.map(moved, state.params),
                        opt_state=jax.tree.map(moved, state.opt_state))
  manager = checkpoints.create_manager(workdir, best_metric='')
  checkpoints.save(manager, 4, checkpoints.rename_model_attributes(state, OLD_NAMES),
                   config=config)
  manager.wait_until_finished()
  saved = ocp.tree.to_flat_dict(manager.item_metadata(4)['state'], sep='/')
  assert 'params/fc_bin/kernel/value' in saved
  assert any(k.startswith('opt_state/') and '/fc_bin/' in k for k in saved)
  assert not any('attribute_classifier' in k for k in saved)
  return state


def test_a_checkpoint_with_the_old_names_resumes_under_the_new(tmp_path):
  # The per-garment-type head has every renamed attribute but the single head's
  # classifier, which the test below restores.
  workdir, category_head = str(tmp_path), 'per_garment_type'
  saved = _write_old_checkpoint(workdir, category_head)
  _, fresh = steps.create_train_state(_config(category_head),
                                      sharding.make_mesh(jax.devices()[:1]))
  manager = checkpoints.create_manager(workdir, best_metric='')
  abstract = checkpoints.abstract_like(fresh)
  checkpoints.check_compatible(manager, 4, abstract)  # renamed arrays are no difference
  step, restored = checkpoints.restore_newest_intact(manager, abstract)
  assert step == 4
  _assert_equal_states(restored, saved)
  assert not np.array_equal(restored.params['attribute_classifier']['kernel'][...],
                            fresh.params['attribute_classifier']['kernel'][...])


def test_a_checkpoint_with_the_old_names_restores_for_inference(tmp_path):
  workdir = str(tmp_path)
  saved = _write_old_checkpoint(workdir, 'single')
  config = _config('single')
  config.best_metric = ''
  _, step, _, restored = checkpoints.restore_for_inference(
      config, workdir, sharding.make_mesh(jax.devices()[:1]))
  assert step == 4
  _assert_equal_states(restored, saved)


def test_a_checkpoint_whose_config_numbers_the_backbone_restores(tmp_path):
  """Configs saved before backbones were named say `backbone: 18`: such a checkpoint
  restores under 'resnet18', and its 18 is no difference from that name."""
  workdir, config = str(tmp_path), _config('single')
  config.best_metric = ''
  mesh = sharding.make_mesh(jax.devices()[:1])
  _, state = steps.create_train_state(config, mesh)
  old_config = config.to_dict()
  old_config['model']['backbone'] = 18
  manager = checkpoints.create_manager(workdir, best_metric='')
  checkpoints.save(manager, 4, state, config=ml_collections.ConfigDict(old_config))
  manager.wait_until_finished()
  assert checkpoints.create_manager(workdir, read_only=True).restore(
      4, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']['model'][
          'backbone'] == 18
  differences = checkpoints._config_differences  # pylint: disable=protected-access
  assert differences(manager, 4, config) == []
  _, step, _, restored = checkpoints.restore_for_inference(config, workdir, mesh)
  assert step == 4
  _assert_equal_states(restored, state)


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
    adopted = checkpoints.inference_config(manager, 2, other)
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


def _write_checkpoint(workdir, ema_decay):
  """A step-4 checkpoint of the test config with config.ema_decay; its moving average (if
  any) moved away from its weights, so that choosing one or the other shows."""
  config = test_config.get_config()
  config.ema_decay, config.best_metric = ema_decay, ''
  mesh = sharding.make_mesh(jax.devices()[:1])
  _, state = steps.create_train_state(config, mesh)
  if ema_decay:
    state = state.replace(ema_params=jax.tree.map(lambda x: x + 0.5, state.ema_params))
  manager = checkpoints.create_manager(workdir, best_metric='')
  checkpoints.save(manager, 4, state, config=config)
  manager.wait_until_finished()
  return config, mesh, manager, state


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


def test_inference_restores_the_raw_weights_or_their_ema_whatever_ema_decay_says(tmp_path):
  config, mesh, _, saved = _write_checkpoint(str(tmp_path / 'ema'), 0.9)
  config.ema_decay = 0.0  # evaluate and predict take the average's presence from the checkpoint
  for weights, want in (('raw', saved.params), ('ema', saved.ema_params)):
    config.eval.weights = weights
    _, step, _, restored = checkpoints.restore_for_inference(config, str(tmp_path / 'ema'),
                                                             mesh)
    assert step == 4
    _assert_equal_states(restored.params, want)
    _assert_equal_states(restored.ema_params, saved.ema_params)
  plain, *_ = _write_checkpoint(str(tmp_path / 'plain'), 0.0)
  plain.eval.weights = 'ema'
  with pytest.raises(ValueError, match=r'config.eval.weights=ema: the checkpoint of step 4 .* '
                                       r'keeps no moving average of the weights'):
    checkpoints.restore_for_inference(plain, str(tmp_path / 'plain'), mesh)


def test_a_checkpoint_written_before_the_ema_fields_existed_resumes(tmp_path):
  """Such a checkpoint's state has no ema_params / ema_batch_stats at all (orbax would
  refuse the tree as another structure, and the loop set it aside as damaged)."""
  config, mesh, _, saved = _write_checkpoint(str(tmp_path / 'new'), 0.0)
  manager = checkpoints.create_manager(str(tmp_path / 'old'), best_metric='')
  fields = {f.name: getattr(saved, f.name) for f in dataclasses.fields(saved)
            if not f.name.startswith('ema_')}  # the state as it was before them
  manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(fields)))
  manager.wait_until_finished()
  assert 'ema_params' not in manager.item_metadata(4)['state']
  step, restored = checkpoints.restore_newest_intact(
      manager, checkpoints.abstract_like(saved), config=config)
  assert step == 4 and restored.ema_params is None and restored.ema_batch_stats is None
  _assert_equal_states(restored, saved)
  assert manager.all_steps() == [4]  # nothing set aside
