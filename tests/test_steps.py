"""The jitted step: the loss falls, nothing is non-finite, 1 and 4 devices agree."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax.data import annotations
from deepfashion_jax.data import pipeline
from deepfashion_jax.data import sources


def _batches(root, config, count):
  index = annotations.read_deepfashion(root)
  source = sources.FolderSource(index, index.split_indices('train'))
  options = pipeline.ImageOptions(img_size=config.data.img_size,
                                  crop_size=config.data.crop_size)
  dataset = pipeline.train_dataset(source, batch_size=config.batch_size, seed=0,
                                   options=options)
  iterator = pipeline.iterate(dataset, threads=1)
  return index, [next(iterator) for _ in range(count)]


def _train(config, index, batches, devices):
  mesh = sharding.make_mesh(devices)
  step_config, state = steps.create_train_state(config, mesh, index.attribute_types)
  train_step, _, _ = steps.jit_steps(step_config, mesh)
  history = []
  for batch in batches:
    state, batch_metrics = train_step(state, sharding.global_batch(batch, mesh))
    history.append({k: float(v) for k, v in batch_metrics.compute().items()})
  return state, history


def test_the_loss_falls_on_a_repeated_batch(synthetic_folder):
  config = test_config.get_config()
  config.learning_rate = 1e-3
  index, batches = _batches(synthetic_folder[0], config, 1)
  _, history = _train(config, index, batches * 8, jax.devices()[:1])
  losses = [h['loss'] for h in history]
  # (Recall of a type no image of the batch has a positive of is 0 / 0: not checked.)
  for name in ('loss', 'attribute_loss', 'category_loss', 'box_loss', 'bbox_iou',
               'category_top1', 'attr_recall_top5'):
    assert all(np.isfinite(h[name]) for h in history), name
  assert losses[-1] < 0.7 * losses[0], losses
  assert 0 <= history[-1]['category_top5'] <= 1 and 0 <= history[-1]['bbox_iou'] <= 1


FOUR_DEVICE_CHECKS = 'one_and_four_devices or dropout_masks_do_not_depend'


def test_the_sharded_checks_pass_on_four_cpu_devices():
  """Runs the two checks below in a fresh process with 4 forced CPU devices (XLA_FLAGS
  only counts before JAX starts; this suite runs on one device, see conftest.py)."""
  if jax.device_count() >= 4:
    pytest.skip('this process has 4 devices: the checks below run in it directly')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                           __file__, '-k', FOUR_DEVICE_CHECKS], env=env, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0 and '2 passed' in result.stdout, result.stdout[-3000:]


@pytest.mark.skipif(jax.device_count() < 4, reason='run by the test above, on 4 devices')
def test_one_and_four_devices_give_the_same_parameters(synthetic_folder):
  """Devices change only the order of float32 sums. One gentle step (plain SGD, mean
  losses) is compared, update by update: XLA:CPU's convolutions sum in another order when
  the batch is split, and a few batch-norm updates are near-cancelling sums whose relative
  error that order moves to ~3e-3 (measured: the median update agrees to 2e-6). A sharding
  error moves every update: batch-norm statistics over each device's share of the batch
  instead of the whole, for one, changes the median update by 120% (measured)."""
  config = test_config.get_config()
  config.optimizer, config.learning_rate, config.momentum = 'sgd', 1e-3, 0.0
  config.loss.reduce_sum = False
  config.data.img_size, config.data.crop_size = 72, 64
  index, batches = _batches(synthetic_folder[0], config, 1)
  mesh = sharding.make_mesh(jax.devices()[:1])
  before = jax.tree.leaves(steps.create_train_state(config, mesh, index.attribute_types)[1])
  one, _ = _train(config, index, batches, jax.devices()[:1])
  four, _ = _train(config, index, batches, jax.devices()[:4])
  relative = []
  for start, a, b in zip(before, jax.tree.leaves(one), jax.tree.leaves(four)):
    update_one, update_four = np.asarray(a) - np.asarray(start), np.asarray(b) - np.asarray(start)
    if np.any(update_one):
      relative.append(np.linalg.norm(update_four - update_one) / np.linalg.norm(update_one))
  assert len(relative) > 50  # parameters, batch-norm statistics and optimiser state
  assert np.median(relative) < 1e-4, np.median(relative)
  assert max(relative) < 1e-2, max(relative)


def _one_step(config, index, batch, state_change):
  """The state before and after one jitted step from the state `state_change` returns."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  step_config, state = steps.create_train_state(config, mesh, index.attribute_types)
  state = state_change(state)
  before = jax.tree.map(np.asarray, state)
  train_step, _, _ = steps.jit_steps(step_config, mesh)
  after, batch_metrics = train_step(state, sharding.global_batch(batch, mesh))
  return before, jax.tree.map(np.asarray, after), batch_metrics.compute()


def _assert_same_model(a, b):
  for x, y in zip(jax.tree.leaves((a.params, a.batch_stats, a.opt_state)),
                  jax.tree.leaves((b.params, b.batch_stats, b.opt_state))):
    np.testing.assert_array_equal(x, y)


def test_float16_skips_an_overflowing_step_and_halves_the_loss_scale(synthetic_folder):
  config = test_config.get_config()
  config.dtype = 'float16'
  index, batches = _batches(synthetic_folder[0], config, 1)
  huge = lambda state: state.replace(dynamic_scale=state.dynamic_scale.replace(
      scale=jax.numpy.asarray(2.0 ** 100, jax.numpy.float32)))  # float16 gradients overflow
  before, after, computed = _one_step(config, index, batches[0], huge)
  _assert_same_model(before, after)
  assert int(after.step) == 1 and int(after.nonfinite_in_a_row) == 1
  assert float(after.dynamic_scale.scale) == 2.0 ** 99
  assert int(computed['nonfinite_steps']) == 1 and int(computed['first_nonfinite_step']) == 1

  # From the initial scale, the summed attribute loss overflows float16 a few times; each
  # skipped step halves the scale until a step is finite and changes every parameter.
  mesh = sharding.make_mesh(jax.devices()[:1])
  step_config, state = steps.create_train_state(config, mesh, index.attribute_types)
  train_step, _, _ = steps.jit_steps(step_config, mesh)
  for skipped in range(20):
    before = jax.tree.map(np.asarray, state.params)
    state, batch_metrics = train_step(state, sharding.global_batch(batches[0], mesh))
    if not int(batch_metrics.compute()['nonfinite_steps']):
      break
  assert float(state.dynamic_scale.scale) == steps.INITIAL_LOSS_SCALE / 2 ** skipped
  assert np.isfinite(float(batch_metrics.compute()['loss']))
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
    assert np.all(np.isfinite(y)) and not np.array_equal(x, y)


def test_a_nonfinite_float32_step_changes_nothing_but_the_step(synthetic_folder):
  config = test_config.get_config()
  index, batches = _batches(synthetic_folder[0], config, 1)

  def poisoned(state):  # a NaN box weight: the loss and every gradient are NaN
    params = jax.tree.map(lambda x: x, state.params)
    params['fc_bbox_xy']['bias'][...] = jax.numpy.full((2,), jax.numpy.nan)
    return state.replace(params=params)

  before, after, computed = _one_step(config, index, batches[0], poisoned)
  _assert_same_model(before, after)
  assert int(after.step) == 1 and int(computed['nonfinite_steps']) == 1
  assert int(computed['first_nonfinite_step']) == 1 and float(computed['loss_scale']) == 1.0


def test_dropout_draws_a_new_mask_each_step_and_the_same_one_on_a_restart(synthetic_folder):
  config = test_config.get_config()
  config.model.dropout = 0.5
  index, batches = _batches(synthetic_folder[0], config, 1)
  at_step = lambda s: lambda state: state.replace(step=jax.numpy.asarray(s, jax.numpy.int32))
  losses = [float(_one_step(config, index, batches[0], at_step(s))[2]['loss'])
            for s in (3, 3, 4)]
  assert losses[0] == losses[1] != losses[2], losses


def test_pos_weight_follows_the_training_split(synthetic_folder):
  config = test_config.get_config()
  index = annotations.read_deepfashion(synthetic_folder[0])
  assert steps.train_pos_weight(config, index) is None
  config.loss.pos_weights_scale = 5.0
  weight = steps.train_pos_weight(config, index)
  train = index.split_indices('train')
  positives = np.maximum(index.attribute_positive[train].sum(axis=0), 1)
  expected = (len(train) - positives) / positives
  np.testing.assert_allclose(weight, 5.0 * expected / expected.max(), rtol=1e-6)


@pytest.mark.skipif(jax.device_count() < 4, reason='run by the test above, on 4 devices')
def test_dropout_masks_do_not_depend_on_the_devices(synthetic_folder):
  """The training forward pass with dropout on 1 and on 4 devices: the same outputs (the
  key is replicated and random bits are generated per global index, not per shard)."""
  config = test_config.get_config()
  config.model.dropout = 0.5
  index, batches = _batches(synthetic_folder[0], config, 1)
  outputs = []
  for count in (1, 4):
    mesh = sharding.make_mesh(jax.devices()[:count])
    step_config, state = steps.create_train_state(config, mesh, index.attribute_types)
    forward = jax.jit(lambda state, batch: steps._forward(  # pylint: disable=protected-access
        step_config, state.params, state.batch_stats, batch, train=True,
        dropout_rng=jax.random.fold_in(state.rng, 7))[1][0])
    outputs.append(forward(state, sharding.global_batch(batches[0], mesh)))
  for name in ('attribute_logits', 'category_logits'):
    # Same masks: a different one would move these logits by ~1; rounding moves them 1e-5.
    np.testing.assert_allclose(outputs[0][name], outputs[1][name], rtol=1e-3, atol=1e-4)


def test_a_float16_state_survives_a_checkpoint(synthetic_folder, tmp_path):
  from deepfashion_jax import checkpoints  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.dtype = 'float16'
  index = annotations.read_deepfashion(synthetic_folder[0])
  mesh = sharding.make_mesh(jax.devices()[:1])
  _, state = steps.create_train_state(config, mesh, index.attribute_types)
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


def test_cpu_steps_compile_with_xla_convolutions():
  # The options must be known to the installed XLA (else training silently runs ~2x
  # slower on CPU), and must not change what a convolution's gradients compute.
  mesh = sharding.make_mesh(jax.devices()[:1])
  options = steps.compiler_options(mesh)
  assert options == steps.CPU_COMPILER_OPTIONS
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 9, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)
  def loss(x, w):
    y = jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return (y ** 2).sum()
  grads = jax.jit(jax.grad(loss, (0, 1)), compiler_options=options)(x, w)
  reference = jax.jit(jax.grad(loss, (0, 1)))(x, w)
  for ours, theirs in zip(grads, reference):
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('optimizer', ['adam', 'sgd'])
@pytest.mark.parametrize('norms_and_biases', [False, True])
def test_weight_decay_shrinks_kernels_and_by_default_only_kernels(optimizer, norms_and_biases):
  """With a zero gradient the update is the decay alone, p <- p (1 - lr * decay), for
  AdamW's decoupled decay and for SGD's coupled L2 alike."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.optimizer, config.learning_rate, config.weight_decay = optimizer, 0.5, 0.1
  config.decay_norms_and_biases = norms_and_biases
  model = steps.create_model(config, nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  optimizer_fn = steps.create_optimizer(config)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer_fn.update(zeros, optimizer_fn.init(params), params)
  for path, (value, update) in zip(
      [p for p, _ in nnx.to_flat_state(params)],
      zip(jax.tree.leaves(params), jax.tree.leaves(updates))):
    decayed = value.ndim > 1 or norms_and_biases
    expected = -0.5 * 0.1 * np.asarray(value) if decayed else np.zeros_like(value)
    np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-8, err_msg=str(path))
