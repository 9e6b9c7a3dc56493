"""ConvNeXt (models/convnext.py) against torchvision's own: the same maps and global feature
from the same state dict file (loaded by torch_io.load_into, the product path), stochastic
depth's rule and rows, bfloat16, its FLOPs, a train step; and files for another backbone
refused."""

import functools
import math
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax import torch_io
from deepfashion_jax.data import annotations
from deepfashion_jax.data import pipeline
from deepfashion_jax.data import sources
from deepfashion_jax.models import backbones
from deepfashion_jax.models import convnext
from deepfashion_jax.models import fashion_net
from tests import reference_libraries

torchvision = reference_libraries.import_torchvision()
import torch  # pylint: disable=g-import-not-at-top,wrong-import-order
# pylint: disable-next=g-import-not-at-top
from torchvision.models import convnext as torchvision_convnext

SIZES = {'tiny': 'T', 'small': 'S', 'base': 'B', 'test': 'test'}


def _block_setting(size):
  """torchvision's CNBlockConfigs for convnext.ARCHITECTURES[size]."""
  architecture = convnext.ARCHITECTURES[size]
  channels = architecture.channels
  return [torchvision_convnext.CNBlockConfig(c, channels[i + 1] if i + 1 < len(channels)
                                             else None, blocks)
          for i, (c, blocks) in enumerate(zip(channels, architecture.blocks_per_stage))]


def _reference(size, seed=0, stochastic_depth_prob=0.0):
  """torchvision's ConvNeXt of `size` with random weights that make every part count:
  LayerNorm scales ~ N(1, 0.1), biases ~ N(0, 0.1), layer_scale ~ N(0, 0.5) (its 1e-6
  start would hide the blocks), kernels ~ N(0, 1 / fan_in)."""
  torch.manual_seed(seed)
  model = torchvision_convnext.ConvNeXt(_block_setting(size),
                                        stochastic_depth_prob=stochastic_depth_prob)
  generator = torch.Generator().manual_seed(seed)
  normal = lambda shape, mean, std: mean + std * torch.randn(shape, generator=generator)
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if name.endswith('layer_scale'):
        parameter.copy_(normal(parameter.shape, 0.0, 0.5))
      elif name.endswith('bias'):
        parameter.copy_(normal(parameter.shape, 0.0, 0.1))
      elif parameter.ndim == 1:  # a LayerNorm's weight
        parameter.copy_(normal(parameter.shape, 1.0, 0.1))
      else:
        fan_in = math.prod(parameter.shape[1:])
        parameter.copy_(normal(parameter.shape, 0.0, fan_in ** -0.5))
  return model


def _reference_outputs(model, images_nchw) -> dict:
  """torchvision's stage outputs (features.1, 3, 5, 7) as NHWC, and its avgpool +
  classifier.0 as 'global'."""
  outputs, x = {}, images_nchw
  with torch.no_grad():
    for index, layer in enumerate(model.features):
      x = layer(x)
      if index in convnext.STAGE_INDICES:
        outputs[convnext.STAGES[convnext.STAGE_INDICES.index(index)]] = (
            x.numpy().transpose(0, 2, 3, 1))
    outputs['global'] = model.classifier[0](model.avgpool(x)).flatten(1).numpy()
  return outputs


def _fashion_net(size, path, image_size=64, **options):
  """FashionNet(backbone=f'convnext_{size}') with the file at `path` loaded into its
  backbone. It is built without running its initialisers (nnx.eval_shape, then zeros):
  the file fills the backbone, which is all these tests run, and initialising the heads
  would compile dozens of small programs."""
  abstract = nnx.eval_shape(lambda: fashion_net.FashionNet(
      backbone=f'convnext_{size}', image_size=image_size, normalization='imagenet',
      rngs=nnx.Rngs(0), **options))
  graphdef, state = nnx.split(abstract)
  model = nnx.merge(graphdef, jax.tree.map(
      lambda v: jax.device_put(np.zeros(v.shape, v.dtype)), state))
  assert torch_io.load_into(model, path) == torch_io.Loaded('torchvision', 'backbone')
  return model


@functools.cache
def _jitted(graphdef):
  return jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))


def _run(module, *args):
  """module(*args), jitted: one compilation per module structure and mode."""
  graphdef, state = nnx.split(module)
  return _jitted(graphdef)(state, *args)


def _assert_parity(model, reference, side, mode, seed=1):
  """Every stage and the global feature within 1e-4 of the reference's largest value."""
  images = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(seed))
  if mode == 'train':
    model.train()
    reference.train()
  else:
    model.eval()
    reference.eval()
  expected = _reference_outputs(reference, images)
  got = _run(model.backbone, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)), None,
             jax.random.PRNGKey(seed))
  for name, theirs in expected.items():
    ours = np.asarray(got[name])
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    error, scale = np.abs(ours - theirs).max(), np.abs(theirs).max()
    print(f'ConvNeXt parity {side} px {mode} {name}: max |ours - torchvision| = '
          f'{error:.2e}, max |torchvision| = {scale:.2e}, relative {error / scale:.2e}')
    assert error < 1e-4 * scale, (name, error, scale)


@pytest.fixture(scope='module')
def shrunk(tmp_path_factory):
  """torchvision's ConvNeXt shaped as convnext_test, its state dict file, and a
  FashionNet(backbone='convnext_test') loaded from the file."""
  reference = _reference('test')
  path = str(tmp_path_factory.mktemp('convnext') / 'convnext_test.pth')
  torch.save(reference.state_dict(), path)
  return reference, path, _fashion_net('test', path)


@pytest.mark.parametrize('side', [64, 96])
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_stages_and_global_feature_equal_torchvisions(shrunk, side, mode):
  """In training mode with drop_path 0 (stochastic_depth_prob 0) too. 96 px: odd maps
  (stage4 3 x 3)."""
  reference, _, model = shrunk
  _assert_parity(model, reference, side, mode)


@pytest.mark.slow  # a full ConvNeXt-T at 224 px, run by torchvision and by us
def test_full_size_convnext_tiny_equals_torchvisions(tmp_path):
  reference = _reference('tiny')
  path = str(tmp_path / 'convnext_tiny.pth')
  torch.save(reference.state_dict(), path)
  _assert_parity(_fashion_net('tiny', path, 224), reference, 224, 'eval')


@functools.cache
def _abstract_backbone(size, drop_path=0.3):
  """convnext_{size} as shapes only (nnx.eval_shape): its structure, nothing computed."""
  return nnx.eval_shape(lambda: backbones.create(f'convnext_{size}', dtype=jnp.float32,
                                                 rngs=nnx.Rngs(0), drop_path=drop_path))


def _shapes(module, *args):
  """The shapes module(*args) returns, traced, not compiled."""
  graphdef, state = nnx.split(module)
  return jax.eval_shape(lambda state, *args: nnx.merge(graphdef, state)(*args), state, *args)


def test_feature_sizes_are_the_floors_of_the_stem_and_the_downsamplers():
  backbone = _abstract_backbone('test')
  backbone.eval()
  for side in (31, 32, 63, 64, 95, 100):
    shapes = _shapes(backbone, jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32))
    assert [shapes[name].shape[1] for name in convnext.STAGES] == [
        side // 4, side // 8, side // 16, side // 32]
    assert backbone.feature_size(side) == side // 32 == shapes[backbone.final_map].shape[1]
  assert shapes[backbone.landmark_map].shape[-1] == backbone.landmark_features
  assert shapes['global'].shape == (1, backbone.global_features)


@pytest.mark.parametrize('size, side, landmarks', [
    ('test', 64, 'heatmaps'), ('test', 64, 'attention'), ('tiny', 224, 'none')])
def test_fashion_net_stands_on_convnext(size, side, landmarks):
  """The box branch, ROI-Align on stage4 (stride 32), the heads on the global feature and
  the local ones, and the landmark branch and attention on stage2 (stride 8); traced in
  training mode with drop path, which draws from the key FashionNet hands the backbone
  (without one, nnx.Dropout raises)."""
  model = nnx.eval_shape(lambda: fashion_net.FashionNet(
      backbone=f'convnext_{size}', image_size=side, landmarks=landmarks, drop_path=0.5,
      rngs=nnx.Rngs(0)))
  model.train()
  outputs = _shapes(model, jax.ShapeDtypeStruct((2, side, side, 3), jnp.uint8),
                    jax.random.PRNGKey(0))
  assert outputs['box'].shape == (2, 4) and outputs['category_logits'].shape == (2, 50)
  assert outputs['attribute_logits'].shape == (2, 1000)
  assert model.feature_size == side // 32 and model.feature_stride == 32
  if landmarks != 'none':
    assert outputs['landmark_heatmaps'].shape == (2, side, side, 8)


def _keys_only(size):
  """torchvision's ConvNeXt state dict keys of `size`, each holding a one-element tensor
  but layer_scale, whose shape says the channels: all a file needs to say what it holds."""
  with torch.device('meta'):
    state = torchvision_convnext.ConvNeXt(_block_setting(size)).state_dict()
  return {k: torch.zeros(v.shape if k.endswith('layer_scale') else (1,))
          for k, v in state.items()}


def _resnet18_keys_only():
  with torch.device('meta'):
    state = torchvision.models.resnet18().state_dict()
  return {k: torch.zeros(1) for k in state}


@pytest.mark.parametrize('held, configured', [
    ('convnext_tiny', 'convnext_small'), ('convnext_base', 'convnext_tiny'),
    ('resnet18', 'convnext_tiny'), ('convnext_test', 'resnet18')])
def test_a_file_of_another_backbone_is_refused_naming_file_and_field(tmp_path, held,
                                                                    configured):
  state = (_resnet18_keys_only() if held == 'resnet18'
           else _keys_only(held.removeprefix('convnext_')))
  path = str(tmp_path / f'{held}.pth')
  torch.save(state, path)
  model = nnx.eval_shape(lambda: fashion_net.FashionNet(backbone=configured, image_size=64,
                                                        rngs=nnx.Rngs(0)))
  title = lambda name: backbones.BACKBONES[name].title
  with pytest.raises(torch_io.CheckpointError, match=re.escape(
      f'{path} holds a {title(held)} backbone; the configured model is {title(configured)} '
      f"(config.model.backbone='{configured}'): set --config.model.backbone={held}")):
    torch_io.load_into(model, path)


@pytest.mark.parametrize('change, holds', [
    ('a block fewer', '(1, 1, 1, 1) and channels (8, 16, 32, 64)'),
    ('a scalar layer_scale', '(1, 1, 2, 1) and channels (None, 16, 32, 64)')])
def test_a_convnext_of_no_known_size_is_refused_saying_what_it_holds(tmp_path, change,
                                                                     holds):
  state = _keys_only('test')
  if change == 'a block fewer':
    state = {k: v for k, v in state.items() if not k.startswith('features.5.1.')}
  else:
    state['features.1.0.layer_scale'] = torch.tensor(1.0)
  path = str(tmp_path / 'odd.pth')
  torch.save(state, path)
  model = nnx.eval_shape(lambda: fashion_net.FashionNet(backbone='convnext_test',
                                                        image_size=64, rngs=nnx.Rngs(0)))
  with pytest.raises(torch_io.CheckpointError, match=re.escape(
      f'{path}: the checkpoint holds a ConvNeXt with blocks per stage {holds}, which no '
      'ConvNeXt here has')):
    torch_io.load_into(model, path)


@pytest.mark.parametrize('size', ['tiny', 'base', 'test'])
def test_drop_path_rates_are_torchvisions_linear_rule(size):
  with torch.device('meta'):
    reference = torchvision_convnext.ConvNeXt(_block_setting(size), stochastic_depth_prob=0.3)
  theirs = [m.stochastic_depth.p for m in reference.modules()
            if isinstance(m, torchvision_convnext.CNBlock)]
  model = _abstract_backbone(size, drop_path=0.3)
  ours = [block.stochastic_depth.rate for index in convnext.STAGE_INDICES
          for block in model.features[index]]
  np.testing.assert_allclose(ours, theirs, rtol=1e-12)
  assert len(ours) == sum(convnext.ARCHITECTURES[size].blocks_per_stage)


def test_parameter_counts_equal_torchvisions_without_its_imagenet_linear():
  for size in ('tiny', 'test'):
    with torch.device('meta'):
      reference = torchvision_convnext.ConvNeXt(_block_setting(size))
    theirs = sum(p.numel() for name, p in reference.named_parameters()
                 if not name.startswith('classifier.2.'))
    ours = sum(int(np.prod(x.shape)) for x in
               jax.tree.leaves(nnx.state(_abstract_backbone(size), nnx.Param)))
    assert ours == theirs, size


def test_titles():
  assert [backbones.BACKBONES[f'convnext_{size}'].title for size in SIZES] == [
      'ConvNeXt (shrunk, for tests)' if size == 'test' else f'ConvNeXt-{title}'
      for size, title in SIZES.items()]
  assert all(backbones.BACKBONES[f'convnext_{size}'].options == ('drop_path',)
             for size in SIZES)


@pytest.fixture(scope='module')
def dropping(shrunk):
  """The shrunk model loaded from the same file, with drop_path 0.5 (its last block's
  rate), images, and the model's backbone in eval mode's outputs."""
  _, path, _ = shrunk
  model = _fashion_net('test', path, drop_path=0.5)
  images = jax.random.normal(jax.random.PRNGKey(0), (8, 32, 32, 3))
  return model.backbone, images


def test_stochastic_depth_drops_whole_rows_of_the_residual_and_scales_the_rest(dropping):
  backbone, _ = dropping
  block = backbone.features[convnext.STAGE_INDICES[-1]][-1]
  assert block.stochastic_depth.rate == 0.5
  x = jax.random.normal(jax.random.PRNGKey(1), (32, 2, 2, 64))
  key = jax.random.PRNGKey(2)
  block.eval()
  residual = np.asarray(_run(block, x, key) - x)
  block.train()
  trained = np.asarray(_run(block, x, key) - x)
  dropped = np.all(trained == 0, axis=(1, 2, 3))
  assert 0 < dropped.sum() < len(dropped), dropped
  assert np.all(np.abs(residual[dropped]).max(axis=(1, 2, 3)) > 0)
  np.testing.assert_allclose(trained[~dropped], residual[~dropped] / 0.5, rtol=1e-4,
                             atol=1e-5)


def test_drop_path_acts_in_training_only_and_follows_the_key(dropping):
  backbone, images = dropping
  run = lambda key: np.asarray(_run(backbone, images, None, jax.random.PRNGKey(key))['global'])
  backbone.eval()
  evaluated = run(0)
  np.testing.assert_array_equal(evaluated, run(1))
  backbone.train()
  trained = run(0)
  np.testing.assert_array_equal(trained, run(0))
  assert not np.allclose(trained, evaluated) and not np.allclose(trained, run(1))


def test_every_backbone_parameter_gets_a_gradient_in_training_mode(dropping):
  """Jitted, with stochastic depth on: finite gradients, none identically 0."""
  backbone, images = dropping
  backbone.train()
  graphdef, params, rest = nnx.split(backbone, nnx.Param, ...)

  def loss(params):
    outputs = nnx.merge(graphdef, params, rest)(images, None, jax.random.PRNGKey(3))
    return jnp.mean(outputs['global'] ** 2) + jnp.mean(outputs['stage2'] ** 2)

  gradients = jax.jit(jax.grad(loss))(params)
  for path, gradient in nnx.to_flat_state(gradients):
    gradient = np.asarray(gradient)
    assert np.all(np.isfinite(gradient)) and np.any(gradient != 0), path


def test_bfloat16_is_close_to_float32_with_float32_norms(shrunk):
  _, path, model = shrunk
  low_model = _fashion_net('test', path, dtype=jnp.bfloat16)
  parameters = jax.tree.leaves(nnx.state(low_model.backbone, nnx.Param))
  assert {p.dtype for p in parameters} == {jnp.dtype(jnp.float32)}
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
  model.eval()
  low_model.eval()
  high = _run(model.backbone, images, None, None)
  low = _run(low_model.backbone, images.astype(jnp.bfloat16), None, None)
  for name in ('stage2', 'stage4', 'global'):
    assert low[name].dtype == jnp.bfloat16, name
    ours, reference = np.asarray(low[name].astype(jnp.float32)), np.asarray(high[name])
    assert np.all(np.isfinite(ours)), name
    error = np.abs(ours - reference).max() / np.abs(reference).max()
    print(f'ConvNeXt bfloat16 {name}: max |bf16 - f32| / max |f32| = {error:.2e}')
    assert error < 5e-2, (name, error)


def test_forward_flops_of_convnext_tiny_at_224_px_are_the_published_ones():
  """4.5 G multiply-adds (torchvision's 4.46 GFLOPS, the paper's 4.5G), 9.0 G FLOPs;
  XLA also counts the LayerNorms, GELUs and additions. Lowered, not compiled."""
  backbone = _abstract_backbone('tiny')
  backbone.eval()
  graphdef, state = nnx.split(backbone)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)['global'])
  lowered = forward.lower(state, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  flops = lowered.cost_analysis()['flops']
  print(f'ConvNeXt-T forward at 224 px: {flops / 1e9:.2f} GFLOPs (XLA cost analysis)')
  assert abs(flops / 9.0e9 - 1) < 0.1, flops


def _official_layer_id(path: tuple) -> int:
  """The official ConvNeXt fine-tuning's get_num_layer_for_convnext (12 groups; 13 for
  the final norm and head) on our path, torchvision's layout translated to its names."""
  if path[0] == 'classifier':
    return 13
  index = int(path[1])
  if index % 2 == 0:  # features.0, 2, 4, 6: downsample_layers.0 .. 3
    return {0: 0, 1: 2, 2: 3, 3: 12}[index // 2]
  stage, block = index // 2, int(path[2])
  return {0: 1, 1: 2, 2: 3 + block // 3, 3: 12}[stage]


@pytest.mark.parametrize('size, num_layers', [('tiny', 6), ('base', 12), ('test', 4)])
def test_layer_ids_are_the_official_fine_tunings_groups(size, num_layers):
  backbone = _abstract_backbone(size)
  assert backbone.num_layers == num_layers
  ids = {path: backbone.layer_id(path) for path, _ in
         nnx.to_flat_state(nnx.state(backbone, nnx.Param))}
  assert set(ids.values()) == set(range(num_layers + 1))
  for path, layer in ids.items():
    official = _official_layer_id(path)
    if size == 'base':  # 27 blocks in stage 3: the official grouping, its norm at the top
      assert layer == min(official, num_layers), path
    elif official < 12:  # ConvNeXt-T's last stage: num_layers, the official 12 closed up
      assert layer == official, path
    else:
      assert layer == num_layers, path


@pytest.mark.slow  # compiles a whole train step: heads, losses and optimiser
def test_a_convnext_fashion_net_train_step_runs_with_drop_path(synthetic_folder):
  """configs/test.py with backbone convnext_test and drop_path 0.2: one jitted step, its
  loss finite, every parameter of the backbone moved."""
  config = test_config.get_config()
  config.model.backbone = 'convnext_test'
  config.model.drop_path = 0.2
  index = annotations.read_deepfashion(synthetic_folder[0])
  source = sources.FolderSource(index, index.split_indices('train'))
  options = pipeline.ImageOptions(img_size=config.data.img_size,
                                  crop_size=config.data.crop_size)
  dataset = pipeline.train_dataset(source, batch_size=config.batch_size, seed=0,
                                   options=options)
  batch = next(pipeline.iterate(dataset, threads=1))
  mesh = sharding.make_mesh(jax.devices()[:1])
  step_config, state = steps.create_train_state(config, mesh, index.attribute_facts())
  before = jax.tree.map(np.asarray, state.params)
  after, metrics = steps.jit_steps(step_config, mesh).train(
      state, sharding.global_batch(batch, mesh))
  assert np.isfinite(float(metrics.compute()['loss']))
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before,
                       after.params)
  assert all(jax.tree.leaves(moved['backbone'])), moved['backbone']
