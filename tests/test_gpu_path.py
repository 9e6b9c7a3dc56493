"""The GPU's code path, run on CPU: with DEEPFASHION_JAX_XLA_CPU_WORKAROUNDS=0 every XLA:CPU
workaround (models/xla_cpu.py) is off, and the model and the steps are the plain lax program
a GPU compiles. Here it computes what the CPU's program computes.

The switch is read when a function is traced: each run below jits afresh under it. The
on/off comparisons compile both programs with the CPU's compiler options, so that what
differs is the program (the model's workarounds, the rolled or unrolled scan), not XLA's
convolution kernels: with XLA's default options (YNNPACK convolutions, what the switch off
gives on CPU) the forward agrees as closely, but the convolutions' rounding moves a few
pre-ReLU values across zero, and a gradient summed over such a pixel moves by its share
(measured on this file's ResNet step without accumulation: 4e-3 of the largest entry of
layer2's first kernel gradient). The programs with the switch off and XLA's defaults run
in the bfloat16 and end-to-end tests.

Measured (jaxlib 0.10.2), the worst array's max |off - on| over its largest |on| entry:
the ResNet step with 2 micro-batches: loss 0, outputs 6.4e-7, gradients 1.9e-6, updated
parameters 1.9e-6, batch-norm statistics 1.9e-7, metrics 1.2e-7; VGG-16 and the landmark
branch: outputs 5.9e-7, gradients 5.1e-7. The tests allow 2e-5 (float32's epsilon is
1.2e-7; sums of thousands of terms in another order drift by ~1e-6).
"""

import contextlib
import logging

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax import train
from deepfashion_jax.models import landmarks
from deepfashion_jax.models import resnet
from deepfashion_jax.models import vgg
from deepfashion_jax.models import xla_cpu
from tests import helpers

ON, OFF = '1', '0'
FLOAT32_TOLERANCE = 2e-5  # relative to each array's largest entry: see the docstring


@contextlib.contextmanager
def _workarounds(value: str):
  """The switch set to `value` inside the block, restored after it."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv(xla_cpu.SWITCH, value)
    yield


@pytest.fixture(scope='module')
def shrunk_resnet():
  """ResNet-18 with one basic block per stage: every kind of convolution the full one has
  (the stem's 7 x 7 and max pool, 3 x 3 stride 1 and 2, the 1 x 1 stride-2 shortcut), at
  half its compile time."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(resnet.ARCHITECTURES, 18, resnet.Architecture('basic', (1, 1, 1, 1)))
    yield


def _worst_relative_difference(expected, actual) -> tuple:
  """(max |actual - expected| / max |expected| over the arrays, the worst array's path)."""
  worst, worst_path = 0.0, None
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(expected),
                          jax.tree.leaves(actual)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size:
      difference = float(np.max(np.abs(y - x)) / (np.max(np.abs(x)) or 1.0))
      if difference > worst:
        worst, worst_path = difference, jax.tree_util.keystr(path)
  return worst, worst_path


def _assert_close(expected, actual, tolerance, what):
  assert jax.tree.structure(expected) == jax.tree.structure(actual), what
  difference, path = _worst_relative_difference(expected, actual)
  assert difference <= tolerance, f'{what}{path}: {difference:.2e} > {tolerance:.0e}'


# ----------------------------------------------------------------------------- the switch

def test_one_variable_switches_every_workaround_and_a_bad_value_is_named(monkeypatch):
  mesh = sharding.make_mesh(jax.devices()[:1])
  for value in (None, '', ON):
    if value is None:
      monkeypatch.delenv(xla_cpu.SWITCH, raising=False)
    else:
      monkeypatch.setenv(xla_cpu.SWITCH, value)
    assert xla_cpu.workarounds_on() and xla_cpu.workarounds_on('cpu')
    assert not xla_cpu.workarounds_on('gpu')  # elsewhere off, whatever the variable
    assert xla_cpu.compiler_options(mesh) == xla_cpu.CPU_COMPILER_OPTIONS
    assert xla_cpu.init_compiler_options(mesh) == dict(xla_cpu.CPU_COMPILER_OPTIONS,
                                                       **xla_cpu.RUN_ONCE_COMPILER_OPTIONS)
    assert xla_cpu.unroll_loops()
  monkeypatch.setenv(xla_cpu.SWITCH, OFF)
  assert not xla_cpu.workarounds_on() and not xla_cpu.workarounds_on('cpu')
  assert xla_cpu.compiler_options(mesh) is None and not xla_cpu.unroll_loops()
  assert xla_cpu.init_compiler_options(mesh) is None
  for value in ('yes', 'off', 'true', ' 0'):
    monkeypatch.setenv(xla_cpu.SWITCH, value)
    with pytest.raises(ValueError, match=f"{xla_cpu.SWITCH}='{value}'.*1 or unset.*0"):
      xla_cpu.workarounds_on()


def test_with_the_workarounds_off_each_function_is_lax_plain_form(monkeypatch):
  """What the program holds, traced under each setting: the convolution's custom gradient
  (a conditional around x's transpose), the small map's matrix product and the stem
  pool's phases with the workarounds on; lax's convolution, its gradient and
  select-and-scatter with them off."""
  conv = resnet.conv(4, 6, 3, 2, jnp.float32, nnx.Rngs(0))
  graphdef, params = nnx.split(conv)
  x = jnp.ones((2, 8, 8, 4))
  small = jnp.ones((2, 4, 4, 4))  # 2 x 2 output: the matrix product's size

  def programs():
    grad = lambda f, x: jax.jit(jax.grad(lambda p, x: f(nnx.merge(graphdef, p), x).sum()))
    return (grad(lambda m, x: m(x), x).lower(params, x).as_text(),
            jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)).lower(params, small).as_text(),
            jax.jit(jax.grad(lambda x: xla_cpu.max_pool_3x3_stride_2(x).sum()))
            .lower(x).as_text())

  monkeypatch.setenv(xla_cpu.SWITCH, ON)
  conv_grad, small_map, pool_grad = programs()
  assert 'stablehlo.case' in conv_grad
  assert 'stablehlo.convolution' not in small_map and 'stablehlo.dot_general' in small_map
  assert 'select_and_scatter' not in pool_grad
  monkeypatch.setenv(xla_cpu.SWITCH, OFF)
  conv_grad, small_map, pool_grad = programs()
  assert 'stablehlo.case' not in conv_grad
  assert 'stablehlo.convolution' in small_map and 'stablehlo.dot_general' not in small_map
  assert 'select_and_scatter' in pool_grad


# ------------------------------------------------------------------- ResNet's train step

def _resnet_config(**fields):
  """The test config at 64 px (layer3 on 4 x 4 maps, layer4 on 2 x 2: the matrix
  product's), SGD (updates linear in the gradients), 2 micro-batches of 4."""
  config = test_config.get_config()
  config.data.img_size, config.data.crop_size = 72, 64
  config.batch_size, config.grad_accum_steps = 8, 2
  config.optimizer, config.momentum, config.learning_rate = 'sgd', 0.0, 0.1
  for name, value in fields.items():
    config[name] = value
  return config


def _step_and_gradients(step_config, mesh, state, batch, compiler_options):
  """One train step's results beside its forward outputs and gradients (the same
  micro-batches, one compilation), and the program's text."""

  def step(state, batch):
    backward = steps.accumulated_gradients(step_config, state, batch,
                                           jax.random.fold_in(state.rng, state.step),
                                           step_config.grad_accum_steps)
    new_state, batch_metrics = steps.train_step(step_config, state, batch)
    return dict(loss=backward.loss, outputs=backward.outputs, grads=backward.grads,
                params=new_state.params, batch_stats=new_state.batch_stats,
                metrics=batch_metrics.compute())

  lowered = jax.jit(step, compiler_options=compiler_options).lower(state, batch)
  return jax.tree.map(np.asarray, lowered.compile()(state, batch)), lowered.as_text()


@pytest.fixture(scope='module')
def resnet_steps(shrunk_resnet, synthetic_folder):  # pylint: disable=unused-argument
  """(setting -> (results, program text) of `_step_and_gradients` on one batch from one
  state, compiled with the CPU's options; what they ran on)."""
  config = _resnet_config()
  index, batches = helpers.train_batches(synthetic_folder[0], config, 1)
  mesh = sharding.make_mesh(jax.devices()[:1])
  step_config, state = steps.create_train_state(config, mesh, index.attribute_facts())
  batch = sharding.global_batch(batches[0], mesh)
  runs = {}
  for value in (ON, OFF):
    with _workarounds(value):
      runs[value] = _step_and_gradients(step_config, mesh, state, batch,
                                        xla_cpu.CPU_COMPILER_OPTIONS)
  return runs, (config, index, mesh, state, batch)


def test_resnet_step_with_the_workarounds_off_equals_the_step_with_them_on(resnet_steps):
  (on, on_program), (off, off_program) = resnet_steps[0][ON], resnet_steps[0][OFF]
  for name in ('loss', 'outputs', 'grads', 'params', 'batch_stats', 'metrics'):
    _assert_close(on[name], off[name], FLOAT32_TOLERANCE, name)
  assert float(off['metrics']['nonfinite_steps']) == 0 and np.isfinite(off['loss']).all()
  # Accumulation's scan: unrolled with the workarounds on, a loop with them off.
  assert 'stablehlo.while' not in on_program and 'stablehlo.while' in off_program
  assert 'stablehlo.case' in on_program and 'stablehlo.case' not in off_program


def test_a_bfloat16_step_with_the_workarounds_off_is_the_float32_one_to_bfloat16s_rounding(
    resnet_steps):
  """The GPU's program as it runs there (XLA's default options) with bfloat16 activations,
  from the same state and batch as float32's. The loss (float32 from bfloat16 logits) is
  within bfloat16's epsilon, 2^-8, of float32's (measured: 4e-5). The gradients are
  compared as parts of the model in the L2 norm: a bfloat16 rounding (2^-9) that moves a
  ReLU's input across 0, or a batch-norm backward that subtracts means over 4 x 2 x 2
  values at layer4, moves an entry far, and 20% is bfloat16's own spread in the backbone
  here: bfloat16 with the workarounds on against off differs as much (up to 39% of a
  kernel's largest entry). Measured against float32: backbone 22% (allowed 35%), heads at
  most 2.3% (allowed 5%), cosine of the whole gradient with float32's 0.992 (allowed
  0.98)."""
  config, index, mesh, state, batch = resnet_steps[1]
  float32 = resnet_steps[0][OFF][0]
  with _workarounds(OFF):
    step_config = steps.create_step_config(_resnet_config(dtype='bfloat16'),
                                           index.attribute_facts())
    bfloat16, _ = _step_and_gradients(step_config, mesh, state, batch,
                                      xla_cpu.compiler_options(mesh))
  assert config.dtype == 'float32' and float(bfloat16['metrics']['nonfinite_steps']) == 0
  np.testing.assert_allclose(bfloat16['loss'], float32['loss'], rtol=2.0 ** -8)
  flat = lambda tree: np.concatenate([np.asarray(g, np.float32).ravel()
                                      for g in jax.tree.leaves(tree)])
  cosine = (flat(bfloat16['grads']) @ flat(float32['grads'])
            / np.linalg.norm(flat(bfloat16['grads'])) / np.linalg.norm(flat(float32['grads'])))
  assert cosine > 0.98, cosine
  for part in float32['grads']:
    g32, g16 = flat(float32['grads'][part]), flat(bfloat16['grads'][part])
    error = np.linalg.norm(g16 - g32) / np.linalg.norm(g32)
    assert error < (0.35 if part == 'backbone' else 0.05), (part, error)


# ------------------------------------------------------------ VGG and the landmark branch

def _vgg_and_landmark_branch(value):
  """(outputs, gradients as parameters and input) of VGG-16 at 32 px (conv5 on 2 x 2 maps:
  the matrix product's, with a bias) and the landmark branch on its conv4_3, under the
  switch's `value`, against fixed random output gradients."""
  with _workarounds(value):
    network = nnx.Dict(backbone=vgg.VGG16(rngs=nnx.Rngs(0)),
                       branch=landmarks.LandmarkBranch(512, rngs=nnx.Rngs(1)))
    graphdef, params = nnx.split(network)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)

    def forward(params, x):
      model = nnx.merge(graphdef, params)
      features = model['backbone'](x)
      return dict(features, heatmaps=model['branch'](features['conv4_3']))

    rng = np.random.default_rng(1)
    cotangents = jax.tree.map(lambda o: jnp.asarray(rng.normal(size=o.shape), o.dtype),
                              jax.eval_shape(forward, params, x))

    def outputs_and_gradients(params, x, cotangents):
      outputs, backward = jax.vjp(forward, params, x)
      return outputs, backward(cotangents)

    compiled = jax.jit(outputs_and_gradients, compiler_options=xla_cpu.CPU_COMPILER_OPTIONS)
    return jax.tree.map(np.asarray, compiled(params, x, cotangents))


def test_vgg_and_the_landmark_branch_with_the_workarounds_off_equal_them_on():
  on, off = _vgg_and_landmark_branch(ON), _vgg_and_landmark_branch(OFF)
  _assert_close(on[0], off[0], FLOAT32_TOLERANCE, 'outputs')
  _assert_close(on[1], off[1], FLOAT32_TOLERANCE, 'gradients')


# -------------------------------------------------------------------------- end to end

@pytest.mark.usefixtures('shrunk_resnet')
def test_training_resumes_with_the_workarounds_off(synthetic_folder, tmp_path, monkeypatch,
                                                  caplog):
  """In this process (the variable is read at each trace; the shrunk ResNet is this
  module's): 2 steps, then the same run resumed to 4, checkpoints and evaluation included,
  equal bit for bit to 4 steps in one run. (The CPU's own program resumes the same way, with
  a moving average of the weights and the logs checked too: test_train.py, in
  `make test-slow`.)"""
  caplog.set_level(logging.INFO)
  monkeypatch.setenv(xla_cpu.SWITCH, OFF)
  data_dir = synthetic_folder[0]
  split, straight = str(tmp_path / 'split'), str(tmp_path / 'straight')
  fields = dict(eval_every_steps=2, num_box_images=0)
  train.train_and_evaluate(helpers.tiny_config(data_dir, num_train_steps=2, **fields), split)
  caplog.clear()
  metrics = train.train_and_evaluate(
      helpers.tiny_config(data_dir, num_train_steps=4, **fields), split)
  assert 'Resuming from the checkpoint of step 2' in caplog.text
  train.train_and_evaluate(helpers.tiny_config(data_dir, num_train_steps=4, **fields), straight)
  saved = helpers.saved_state(split, 4)
  assert int(saved['step']) == 4
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(saved['params']))
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(helpers.saved_state(straight, 4))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.isfinite(metrics['loss']) and set(helpers.logged_evaluations(split)) == {2, 4}
  assert helpers.logged_evaluations(split)[4] == helpers.logged_evaluations(straight)[4]
