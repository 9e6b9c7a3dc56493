"""Fine-tuning as modern backbones are fine-tuned: layer-wise learning-rate decay over every
registered backbone's layers, no weight decay on norms, biases, position embeddings and
class tokens, and a frozen backbone (config.model.trainable='heads') whose backward pass,
updates and optimiser state are gone."""

import functools
import re

from flax import nnx
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import test as test_config
from deepfashion_jax import checkpoints
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax.models import backbones
from tests import helpers


def _module_kind(name):
  """What makes a backbone's code: its build function and keyword arguments, not its
  depth (ResNet-18 and ResNet-152 share one layer_id; VGG-16 and VGG-16-BN do not)."""
  build = backbones.BACKBONES[name].build
  if isinstance(build, functools.partial):
    return build.func, tuple(sorted(build.keywords.items()))
  return build, ()


def _first_of_each_kind():
  kinds = {}
  for name in backbones.BACKBONES:
    kinds.setdefault(_module_kind(name), name)
  return list(kinds.values())


def _check_layer_ids(name):
  """Every parameter of the backbone has a layer id in [0, num_layers]; taken in the order
  the forward pass first reads them, the ids never go down, from 0 to num_layers. Shapes
  only: nnx.eval_shape and a jaxpr of the forward pass at 224 px."""
  backbone = nnx.eval_shape(lambda: backbones.create(name, dtype=jnp.float32,
                                                     rngs=nnx.Rngs(0), image_size=224))
  graphdef, params, rest = nnx.split(backbone, nnx.Param, ...)
  paths = [steps.parameter_path(key_path)
           for key_path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  # The optimiser's names for the parameters are nnx's.
  assert sorted(map(str, paths)) == sorted(str(p) for p, _ in nnx.to_flat_state(params))
  ids = [backbone.layer_id(path) for path in paths]
  assert all(isinstance(i, int) and 0 <= i <= backbone.num_layers for i in ids), ids
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  forward = lambda p, r, x: nnx.merge(graphdef, p, r)(x)['global']
  jaxpr = jax.make_jaxpr(forward)(params, rest, images).jaxpr
  inputs = jaxpr.invars[:len(paths)]  # params' leaves first, in the order of `paths`
  first_use = {}
  for index, equation in enumerate(jaxpr.eqns):
    for var in equation.invars:
      if isinstance(var, jax.extend.core.Var):
        first_use.setdefault(var, index)
  order = sorted((first_use[v], i) for v, i in zip(inputs, ids) if v in first_use)
  by_depth = [i for _, i in order]
  assert by_depth == sorted(by_depth), by_depth
  assert (by_depth[0], by_depth[-1]) == (0, backbone.num_layers)


@pytest.mark.parametrize('name', _first_of_each_kind())
def test_layer_ids_cover_every_parameter_and_grow_with_depth(name):
  _check_layer_ids(name)


@pytest.mark.slow  # tracing every deep backbone (ResNet-101, -152) is long on CPU
@pytest.mark.parametrize('name', sorted(set(backbones.BACKBONES) - set(_first_of_each_kind())))
def test_layer_ids_of_every_registered_backbone(name):
  _check_layer_ids(name)


def test_resnet_and_vgg_layers_are_their_stages_and_blocks():
  resnet = nnx.eval_shape(lambda: backbones.create('resnet50', dtype=jnp.float32,
                                                   rngs=nnx.Rngs(0)))
  assert resnet.num_layers == 4
  assert [resnet.layer_id(p) for p in (('conv1', 'kernel'), ('bn1', 'scale'),
                                       ('layer1', 0, 'conv1', 'kernel'),
                                       ('layer3', 5, 'downsample_bn', 'bias'),
                                       ('layer4', 2, 'conv3', 'kernel'))] == [0, 0, 1, 3, 4]
  vgg = nnx.eval_shape(lambda: backbones.create('vgg16_bn', dtype=jnp.float32,
                                                rngs=nnx.Rngs(0)))
  assert vgg.num_layers == 4  # five blocks of convolutions, the first in the stem's place
  # vgg16_bn's features: conv1_1 at 0, conv2_1 at 7, conv5_3 at 40 (torchvision's indices)
  assert [vgg.layer_id(('features', i, 'kernel')) for i in (0, 3, 7, 40)] == [0, 0, 1, 4]
  with pytest.raises(ValueError, match='not a parameter of a ResNet'):
    resnet.layer_id(('fc', 'kernel'))


def _random_like(shapes, seed):
  """Random values in a tree of `shapes`' structure, each leaf 2 x ... x 2 with as many
  dimensions as its shape: the optimiser's arithmetic is elementwise and its decay mask
  reads the names and dimensions alone."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=(2,) * len(s.shape)), s.dtype),
                      shapes)


@pytest.mark.parametrize('optimizer', ['adam', 'sgd'])
def test_layer_decay_scales_each_update_by_its_layer_under_every_other_option(optimizer):
  """FashionNet's ResNet-18's parameters (`_random_like`), three steps with
  warm-up, cosine decay, clipping and weight decay: with layer_decay 0.5 every update is
  the same run's without it times 0.5 ** (5 - layer), the stem's 1/32, layer4's 1/2, the
  heads' 1 (AdamW's decoupled decay scaled with the rate, as in BEiT); the optimiser
  state has the same structure (a run resumes with another layer_decay)."""
  config = test_config.get_config()
  config.optimizer, config.weight_decay, config.grad_clip_norm = optimizer, 0.1, 1.0
  config.schedule, config.warmup_steps, config.learning_rate = 'cosine', 2, 0.1
  shapes = nnx.state(nnx.eval_shape(lambda: steps.create_model(config, nnx.Rngs(0))),
                     nnx.Param)
  params = _random_like(shapes, 0)
  updates = {}
  for layer_decay in (1.0, 0.5):
    config.layer_decay = layer_decay
    optimizer_fn = steps.create_optimizer(config)
    update = jax.jit(optimizer_fn.update)
    opt_state = optimizer_fn.init(params)
    for step in range(3):
      step_updates, opt_state = update(_random_like(shapes, step + 1), opt_state, params)
    updates[layer_decay] = step_updates
    if layer_decay == 1.0:
      structure = jax.tree.structure(opt_state)
  assert jax.tree.structure(opt_state) == structure
  expected_scale = {('backbone', 'conv1'): 0.5 ** 5, ('backbone', 'bn1'): 0.5 ** 5,
                    ('backbone', 'layer1'): 0.5 ** 4, ('backbone', 'layer2'): 0.5 ** 3,
                    ('backbone', 'layer3'): 0.5 ** 2, ('backbone', 'layer4'): 0.5}
  flat = lambda tree: dict(nnx.to_flat_state(tree))
  plain, decayed = flat(updates[1.0]), flat(updates[0.5])
  assert plain.keys() == decayed.keys()
  for path, value in plain.items():
    scale = expected_scale.get(path[:2], 1.0)
    assert path[0] == 'backbone' or scale == 1.0
    np.testing.assert_allclose(decayed[path][...], scale * value[...], rtol=1e-6,
                               err_msg=str(path))
    assert np.any(value[...] != 0), path


def test_the_default_optimizer_state_keeps_its_structure():
  """layer_decay 1 and trainable 'all': the state of the optimiser built before either
  existed (AdamW with its decay mask), which older checkpoints hold."""
  config = test_config.get_config()
  config.grad_clip_norm = 1.0
  params = {'conv': {'kernel': jnp.zeros((3, 3, 2, 4)), 'bias': jnp.zeros((4,))}}
  before = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      config.learning_rate, eps=config.adam_eps, weight_decay=config.weight_decay,
      mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
  assert (jax.tree.structure(steps.create_optimizer(config).init(params))
          == jax.tree.structure(before.init(params)))


class _VitLike(nnx.Module):
  """A ViT's and a ConvNeXt's kinds of parameters, named as ours are."""

  def __init__(self, rngs):
    self.patch_embedding = nnx.Conv(3, 8, (4, 4), strides=4, rngs=rngs)
    self.class_token = nnx.Param(jnp.ones((1, 1, 8)))
    self.position_embedding = nnx.Param(jnp.ones((1, 5, 8)))
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.layer_scale = nnx.Param(jnp.full((8,), 0.5))
    self.head = nnx.Linear(8, 2, rngs=rngs)


@pytest.mark.parametrize('optimizer', ['adam', 'sgd'])
def test_weight_decay_leaves_out_norms_biases_embeddings_and_tokens(optimizer):
  """With a zero gradient the update is the decay alone: -lr * decay * p for the kernels,
  0 for the rest; with decay_norms_and_biases, everything decays."""
  config = test_config.get_config()
  config.optimizer, config.learning_rate, config.weight_decay = optimizer, 0.5, 0.1
  params = nnx.state(_VitLike(nnx.Rngs(0)), nnx.Param)
  names = ['.'.join(map(str, path)) for path, _ in nnx.to_flat_state(params)]
  mask = jax.tree.leaves(steps.decayed_parameters(params))
  decayed = {name for name, decays in zip(names, mask) if decays}
  assert decayed == {'patch_embedding.kernel', 'head.kernel'}
  for everything in (False, True):
    config.decay_norms_and_biases = everything
    optimizer_fn = steps.create_optimizer(config)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(optimizer_fn.update)(zeros, optimizer_fn.init(params), params)
    for (path, value), (_, update) in zip(nnx.to_flat_state(params),
                                          nnx.to_flat_state(updates)):
      name = '.'.join(map(str, path))
      expected = -0.05 * value[...] if everything or name in decayed else 0 * value[...]
      np.testing.assert_allclose(update[...], expected, rtol=1e-6, err_msg=name)


# --- a frozen backbone ------------------------------------------------------------------


def _heads_config():
  config = test_config.get_config()
  config.model.trainable = 'heads'
  return config


@pytest.fixture(scope='module')
def frozen_run(synthetic_folder):
  """Two steps of the test config with trainable='heads' and a moving average: (config,
  initial state, final state), on the host. (Gradient accumulation adds nothing here: the
  backbone's gradients are zeros that XLA never computes, whatever the micro-batches.)"""
  config = _heads_config()
  config.ema_decay = 0.8
  index, batches = helpers.train_batches(synthetic_folder[0], config, 2)
  mesh = sharding.make_mesh(jax.devices()[:1])
  facts = index.attribute_facts()
  # The test config's initial weights, whose initialisation the suite compiles anyway
  # (test_steps.py), with this configuration's optimiser state and moving average.
  _, state = steps.create_train_state(test_config.get_config(), mesh, facts)
  step_config = steps.create_step_config(config, facts)
  state = steps.restart_ema(state.replace(opt_state=step_config.optimizer.init(state.params)))
  state = jax.device_put(state, sharding.replicated(mesh))  # as the step leaves it: one compile
  initial = jax.tree.map(np.asarray, state)
  train_step = steps.jit_steps(step_config, mesh).train
  for batch in batches:
    state, batch_metrics = train_step(state, sharding.global_batch(batch, mesh))
    assert np.isfinite(float(batch_metrics.compute()['loss']))
  return config, initial, jax.tree.map(np.asarray, state)


def _same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_frozen_backbone_keeps_its_weights_and_statistics_while_the_heads_train(
    frozen_run):
  _, initial, final = frozen_run
  assert int(final.step) == 2
  assert _same(initial.params['backbone'], final.params['backbone'])
  assert _same(initial.batch_stats['backbone'], final.batch_stats['backbone'])
  for head in ('category_classifier', 'attribute_classifier', 'box_top_left', 'box_reduce'):
    for before, after in zip(jax.tree.leaves(initial.params[head]),
                             jax.tree.leaves(final.params[head])):
      assert not np.array_equal(before, after), head
  # The moving average follows the heads and stays at the backbone's weights.
  for average, start in zip(jax.tree.leaves(final.ema_params['backbone']),
                            jax.tree.leaves(initial.params['backbone'])):
    np.testing.assert_allclose(average, start, rtol=1e-6, atol=1e-7)
  assert not _same(final.ema_params['category_classifier'],
                   initial.params['category_classifier'])


def test_a_frozen_backbone_has_no_optimiser_state(frozen_run):
  """Adam's moments cover the parameters outside the backbone, none of its own; its step
  count counts optimiser steps."""
  _, _, final = frozen_run
  size = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree))
  heads = {k: v for k, v in final.params.items() if k != 'backbone'}
  assert size(final.params['backbone']) > 2 * size(heads)  # ResNet-18: 11M of 16M
  for moment in ('mu', 'nu'):
    assert size(optax.tree.get(final.opt_state, moment)) == size(heads)
  assert size(final.opt_state) == 2 * size(heads) + 1  # and the count
  assert int(optax.tree.get(final.opt_state, 'count')) == 2


def test_a_frozen_backbone_has_no_backward_pass(synthetic_folder):
  """XLA's count of the train step's FLOPs (lowered from shapes, not compiled): with the
  backbone frozen, its forward pass alone, well under the whole step's (about 1/3)."""
  flops = {}
  for trainable in ('all', 'heads'):
    config = test_config.get_config()
    config.model.trainable = trainable
    index, batches = helpers.train_batches(synthetic_folder[0], config, 1)
    step_config = steps.create_step_config(config, index.attribute_facts())
    state = jax.eval_shape(functools.partial(steps.initial_state, config, step_config))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batches[0])
    lowered = jax.jit(functools.partial(steps.train_step, step_config)).lower(state, batch)
    flops[trainable] = lowered.cost_analysis()['flops']
  assert flops['heads'] < 0.6 * flops['all'], flops


def test_a_frozen_backbone_resumes_and_refuses_a_checkpoint_of_another_trainable(
    frozen_run, tmp_path):
  """Its optimiser state (without moments for the backbone) saves and restores whole; a
  run with trainable='all' is refused with the field named, not half-loaded."""
  config, _, final = frozen_run
  config = config.copy_and_resolve_references()
  config.best_metric, config.ema_decay = '', 0.0  # without the average: a smaller save
  final = final.replace(ema_params=None, ema_batch_stats=None)
  manager = checkpoints.create_manager(str(tmp_path), best_metric='')
  checkpoints.save(manager, 2, final, config=config)
  manager.wait_until_finished()
  metadata = checkpoints.read_metadata(manager, 2)
  abstract = checkpoints.abstract_like(jax.device_put(final))
  restored = checkpoints.restore_checked(manager, metadata, abstract, config=config)
  assert jax.tree.structure(restored) == jax.tree.structure(final)
  assert _same(restored, final)
  config.model.trainable = 'all'
  step_config = steps.create_step_config(config)
  everything = jax.eval_shape(functools.partial(steps.initial_state, config, step_config))
  with pytest.raises(checkpoints.CheckpointMismatchError, match=re.escape(
      "Config: config.model.trainable: 'heads' in the checkpoint, 'all' here.")):
    checkpoints.check_compatible(metadata, everything, config)