"""The jitted step: the loss falls, non-finite steps change nothing, dropout's randomness,
the moving average of the weights, gradient accumulation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import demo as demo_config
from configs import test as test_config
from deepfashion_jax import config_checks
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax.data import annotations
from deepfashion_jax.models import xla_cpu
from tests import helpers


def _train(config, index, batches, devices):
  mesh = sharding.make_mesh(devices)
  step_config, state = steps.create_train_state(config, mesh, index.attribute_facts())
  train_step = steps.jit_steps(step_config, mesh).train
  history = []
  for batch in batches:
    state, batch_metrics = train_step(state, sharding.global_batch(batch, mesh))
    history.append({k: float(v) for k, v in batch_metrics.compute().items()})
  return state, history


def test_the_loss_falls_on_a_repeated_batch(synthetic_folder):
  config = test_config.get_config()
  config.learning_rate = 1e-3
  index, batches = helpers.train_batches(synthetic_folder[0], config, 1)
  _, history = _train(config, index, batches * 8, jax.devices()[:1])
  losses = [h['loss'] for h in history]
  # (Recall of a type no image of the batch has a positive of is 0 / 0: not checked.)
  for name in ('loss', 'attribute_loss', 'category_loss', 'box_loss', 'bbox_iou',
               'category_top1', 'attr_recall_top5'):
    assert all(np.isfinite(h[name]) for h in history), name
  assert losses[-1] < 0.7 * losses[0], losses
  assert 0 <= history[-1]['category_top5'] <= 1 and 0 <= history[-1]['bbox_iou'] <= 1


_COMPILED = {}  # config as JSON -> (mesh, initial state on the host, jitted train step)


def _initial_state_and_step(config, index):
  """A fresh initial state of `config` and its jitted train step (which donates the
  state it is given), built once per configuration: its tests share one compilation."""
  key = config.to_json()
  if key not in _COMPILED:
    mesh = sharding.make_mesh(jax.devices()[:1])
    step_config, state = steps.create_train_state(config, mesh, index.attribute_facts())
    _COMPILED[key] = (mesh, jax.tree.map(np.asarray, state),
                      steps.jit_steps(step_config, mesh).train)
  mesh, initial, train_step = _COMPILED[key]
  return mesh, jax.device_put(initial, sharding.replicated(mesh)), train_step


def _one_step(config, index, batch, state_change):
  """The state before and after one jitted step from the state `state_change` returns."""
  mesh, state, train_step = _initial_state_and_step(config, index)
  state = state_change(state)
  before = jax.tree.map(np.asarray, state)
  after, batch_metrics = train_step(state, sharding.global_batch(batch, mesh))
  return before, jax.tree.map(np.asarray, after), batch_metrics.compute()


def _assert_same_model(a, b):
  for x, y in zip(jax.tree.leaves((a.params, a.batch_stats, a.opt_state)),
                  jax.tree.leaves((b.params, b.batch_stats, b.opt_state))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow  # 35 s (float16 is a GPU option): run by `make test-slow` and CI
def test_float16_skips_an_overflowing_step_and_halves_the_loss_scale(synthetic_folder):
  config = test_config.get_config()
  config.dtype = 'float16'
  config.loss.reduce_sum = False  # a mean attribute loss: fewer halvings to a finite step
  config.batch_size = 4  # float16 runs slowly on CPU
  index, batches = helpers.train_batches(synthetic_folder[0], config, 1)
  huge = lambda state: state.replace(dynamic_scale=state.dynamic_scale.replace(
      scale=jax.numpy.asarray(2.0 ** 100, jax.numpy.float32)))  # float16 gradients overflow
  before, after, computed = _one_step(config, index, batches[0], huge)
  _assert_same_model(before, after)
  assert int(after.step) == 1 and int(after.nonfinite_in_a_row) == 1
  assert float(after.dynamic_scale.scale) == 2.0 ** 99
  assert int(computed['nonfinite_steps']) == 1 and int(computed['first_nonfinite_step']) == 1

  # From the initial scale, the scaled loss or its gradients overflow float16 at least
  # once; each skipped step halves the scale until a step is finite and changes every
  # parameter.
  mesh, state, train_step = _initial_state_and_step(config, index)
  for skipped in range(20):
    before = jax.tree.map(np.asarray, state.params)
    state, batch_metrics = train_step(state, sharding.global_batch(batches[0], mesh))
    if not int(batch_metrics.compute()['nonfinite_steps']):
      break
  assert skipped >= 1
  assert float(state.dynamic_scale.scale) == steps.INITIAL_LOSS_SCALE / 2 ** skipped
  assert np.isfinite(float(batch_metrics.compute()['loss']))
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
    assert np.all(np.isfinite(y)) and not np.array_equal(x, y)


# make test stops a run on a non-finite loss, keeping its last good checkpoint: test_train.py
@pytest.mark.slow
def test_a_nonfinite_float32_step_changes_nothing_but_the_step(synthetic_folder):
  config = test_config.get_config()
  index, batches = helpers.train_batches(synthetic_folder[0], config, 1)

  def poisoned(state):  # a NaN box weight: the loss and every gradient are NaN
    params = jax.tree.map(lambda x: x, state.params)
    params['box_top_left']['bias'][...] = jax.numpy.full((2,), jax.numpy.nan)
    return state.replace(params=params)

  before, after, computed = _one_step(config, index, batches[0], poisoned)
  _assert_same_model(before, after)
  assert int(after.step) == 1 and int(computed['nonfinite_steps']) == 1
  assert int(computed['first_nonfinite_step']) == 1 and float(computed['loss_scale']) == 1.0


@pytest.mark.slow
def test_dropout_draws_a_new_mask_each_step_and_the_same_one_on_a_restart(synthetic_folder):
  config = test_config.get_config()
  config.model.dropout = 0.5
  index, batches = helpers.train_batches(synthetic_folder[0], config, 1)
  at_step = lambda s: lambda state: state.replace(step=jax.numpy.asarray(s, jax.numpy.int32))
  losses = [float(_one_step(config, index, batches[0], at_step(s))[2]['loss'])
            for s in (3, 3, 4)]
  assert losses[0] == losses[1] != losses[2], losses


def test_a_state_made_for_prediction_only_refuses_to_evaluate(synthetic_folder):
  config = test_config.get_config()
  index, batches = helpers.train_batches(synthetic_folder[0], config, 1)
  mesh = sharding.make_mesh(jax.devices()[:1])
  step_config, state = steps.create_train_state(config, mesh)  # no attribute facts
  with pytest.raises(ValueError, match='it can only predict'):
    steps.jit_steps(step_config, mesh).evaluate(state, sharding.global_batch(batches[0], mesh))


def test_pos_weight_follows_the_training_split(synthetic_folder):
  config = test_config.get_config()
  index = annotations.read_deepfashion(synthetic_folder[0])
  mesh = sharding.make_mesh(jax.devices()[:1])
  assert steps.create_train_state(config, mesh, index.attribute_facts())[0].pos_weight is None
  config.loss.pos_weights_scale = 5.0
  step_config, _ = steps.create_train_state(config, mesh, index.attribute_facts())
  train = index.split_indices('train')
  positives = np.maximum(index.attribute_positive[train].sum(axis=0), 1)
  expected = (len(train) - positives) / positives
  np.testing.assert_allclose(step_config.pos_weight, 5.0 * expected / expected.max(),
                             rtol=1e-6)




def test_cpu_steps_compile_with_xla_convolutions(monkeypatch):
  # The options must be known to the installed XLA (else training silently runs ~2x
  # slower on CPU), and must not change what a convolution's gradients compute.
  monkeypatch.setenv(xla_cpu.SWITCH, '1')  # whatever the suite runs with
  mesh = sharding.make_mesh(jax.devices()[:1])
  options = xla_cpu.compiler_options(mesh)
  assert options == xla_cpu.CPU_COMPILER_OPTIONS
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


@pytest.mark.parametrize('warmup_steps', [0, 2])
def test_step_decay_multiplies_the_rate_by_decay_rate_every_decay_every_steps(warmup_steps):
  """'step_decay' (Liu & Lu's x0.8 per epoch): SGD without momentum on a gradient of ones
  moves each parameter by minus the rate of its step."""
  config = test_config.get_config()
  config.optimizer, config.momentum, config.learning_rate = 'sgd', 0.0, 1.0
  config.schedule, config.decay_rate, config.decay_every_steps = 'step_decay', 0.8, 3
  config.warmup_steps = warmup_steps
  optimizer_fn = steps.create_optimizer(config)
  params = {'w': jnp.zeros(())}
  opt_state = optimizer_fn.init(params)
  rates = []
  for _ in range(8):
    updates, opt_state = optimizer_fn.update({'w': jnp.ones(())}, opt_state, params)
    rates.append(-float(updates['w']))
  if warmup_steps:  # a linear warm-up, then the decay counted from its end
    expected = [0.0, 0.5, 1.0, 1.0, 1.0, 0.8, 0.8, 0.8]
  else:
    expected = [1.0, 1.0, 1.0, 0.8, 0.8, 0.8, 0.64, 0.64]
  np.testing.assert_allclose(rates, expected, rtol=1e-6)


def test_a_shortened_demo_warms_up_over_half_its_run_with_a_note(caplog):
  """--config.num_train_steps=10 on the demo (warmup_steps=50): accepted at start, the
  warm-up clipped to 5 steps with a logged note, then the cosine decay to 0 at step 10."""
  config = demo_config.get_config()
  config.num_train_steps = 10
  config_checks.check(config)
  config.optimizer, config.momentum, config.learning_rate = 'sgd', 0.0, 1.0
  with caplog.at_level('INFO'):
    optimizer_fn = steps.create_optimizer(config)
  assert ('config.warmup_steps=50 is more than half of config.num_train_steps=10: the '
          'learning rate warms up over 5 steps instead') in caplog.text
  params = {'w': jnp.zeros(())}
  opt_state = optimizer_fn.init(params)
  rates = []
  for _ in range(11):
    updates, opt_state = optimizer_fn.update({'w': jnp.ones(())}, opt_state, params)
    rates.append(-float(updates['w']))
  np.testing.assert_allclose(rates[:6], [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], rtol=1e-6)
  assert rates[5] > rates[7] > rates[9] > rates[10] == 0.0


@pytest.mark.parametrize('clip, expected', [(0.0, -1.0), (0.5, -0.25)])
def test_grad_clip_norm_scales_the_gradient_to_that_global_norm(clip, expected):
  """SGD at rate 1 on a gradient of four ones (global norm 2): clipped to 0.5, each
  component moves by 0.5 / 2; unclipped, by 1."""
  config = test_config.get_config()
  config.optimizer, config.momentum, config.learning_rate = 'sgd', 0.0, 1.0
  config.grad_clip_norm = clip
  optimizer_fn = steps.create_optimizer(config)
  params = {'w': jnp.zeros((4,))}
  updates, _ = optimizer_fn.update({'w': jnp.ones((4,))}, optimizer_fn.init(params), params)
  np.testing.assert_allclose(updates['w'], [expected] * 4, rtol=1e-6)


def test_the_train_metrics_carry_the_gradient_parameter_and_update_norms(synthetic_folder):
  config = test_config.get_config()
  index, batches = helpers.train_batches(synthetic_folder[0], config, 1)
  before, after, computed = _one_step(config, index, batches[0], lambda state: state)
  norm = lambda tree: float(np.sqrt(sum(np.sum(np.square(x, dtype=np.float64))
                                        for x in jax.tree.leaves(tree))))
  np.testing.assert_allclose(computed['param_norm'], norm(after.params), rtol=1e-5)
  moved = jax.tree.map(lambda a, b: a - b, after.params, before.params)
  np.testing.assert_allclose(computed['update_norm'], norm(moved), rtol=1e-3)
  assert computed['grad_norm'] > 0 and np.isfinite(computed['grad_norm'])


@pytest.mark.slow
def test_the_ema_follows_its_recurrence_over_accumulated_steps_and_skips_nonfinite_ones(
    synthetic_folder):
  """ema = d * ema + (1 - d) * new after each step, from the initial weights, for the
  parameters and the batch-norm statistics; two micro-batches per step (one compilation
  for both options): still one optimiser step, one schedule step, per train step."""
  config = test_config.get_config()
  config.ema_decay, config.grad_accum_steps = 0.8, 2
  index, batches = helpers.train_batches(synthetic_folder[0], config, 3)
  mesh, state, train_step = _initial_state_and_step(config, index)
  host = lambda tree: jax.tree.map(np.asarray, tree)
  expected = host((state.params, state.batch_stats))
  assert jax.tree.structure(state.ema_params) == jax.tree.structure(state.params)
  for number, batch in enumerate(batches, 1):
    state, batch_metrics = train_step(state, sharding.global_batch(batch, mesh))
    new = host((state.params, state.batch_stats))
    expected = jax.tree.map(lambda e, n: 0.8 * e + 0.2 * n, expected, new)
    assert int(state.step) == number
    assert int(optax.tree.get(state.opt_state, 'count')) == number  # Adam's step count
    assert np.isfinite(float(batch_metrics.compute()['loss']))
  for got, want in zip(jax.tree.leaves(host((state.ema_params, state.ema_batch_stats))),
                       jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  ema = host((state.ema_params, state.ema_batch_stats))
  params = jax.tree.map(lambda x: x, state.params)  # a NaN weight: a skipped step
  params['box_top_left']['bias'][...] = jnp.full((2,), jnp.nan)
  state, batch_metrics = train_step(state.replace(params=params),
                                    sharding.global_batch(batches[0], mesh))
  assert int(batch_metrics.compute()['nonfinite_steps']) == 1
  for got, want in zip(jax.tree.leaves(host((state.ema_params, state.ema_batch_stats))),
                       jax.tree.leaves(ema)):
    np.testing.assert_array_equal(got, want)


def test_accumulated_micro_batches_give_the_gradient_and_update_of_one_big_batch(
    synthetic_folder):
  """Batch-norm in inference mode (in training mode each micro-batch is normalised by its
  own statistics): 4 micro-batches of 2 give the big batch's gradient, SGD update, losses
  and outputs (in the batch's order) to float32 tolerance. Compiled as the steps are
  (`xla_cpu.compiler_options`): under jaxlib 0.12's default XLA:CPU the micro-batches
  fall outside float32 tolerance (RESULTS.md, training tools)."""
  config = test_config.get_config()
  config.optimizer, config.momentum, config.learning_rate = 'sgd', 0.0, 0.1
  index, batches = helpers.train_batches(synthetic_folder[0], config, 1)
  mesh = sharding.make_mesh(jax.devices()[:1])
  step_config, state = steps.create_train_state(config, mesh, index.attribute_facts())
  batch = sharding.global_batch(batches[0], mesh)

  @functools.partial(jax.jit, static_argnums=1,
                     compiler_options=xla_cpu.compiler_options(mesh))
  def update(batch, micro_batches):
    g = steps.accumulated_gradients(step_config, state, batch, jax.random.PRNGKey(0),
                                    micro_batches, train=False)
    updates, _ = step_config.optimizer.update(g.grads, state.opt_state, state.params)
    return g.finite, jnp.mean(g.loss), g.outputs['category_logits'], g.grads, updates

  one, four = update(batch, 1), update(batch, 4)
  assert bool(one[0]) and bool(four[0])
  np.testing.assert_allclose(four[1], one[1], rtol=1e-5)
  np.testing.assert_allclose(four[2], one[2], rtol=1e-4, atol=1e-5)
  for name, big, accumulated in (('grads', one[3], four[3]), ('updates', one[4], four[4])):
    for x, y in zip(jax.tree.leaves(big), jax.tree.leaves(accumulated)):
      scale = float(np.max(np.abs(x))) or 1.0
      np.testing.assert_allclose(y, x, rtol=1e-3, atol=1e-5 * scale, err_msg=name)
  # The split is a permutation: micro-batch j holds rows j, j + k, ...
  rows = np.arange(8)
  split = steps.split_micro_batches(rows, 4)
  np.testing.assert_array_equal(split[1], [1, 5])
  np.testing.assert_array_equal(steps.merge_micro_batches(split), rows)