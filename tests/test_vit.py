"""The Vision Transformer (models/vit.py) and its torchvision and timm files (torch_io):
parity with both libraries through the loader, position embeddings resampled as timm does,
FLOPs, bfloat16, stochastic depth, the landmark branch at stride 16, refusals."""

import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from deepfashion_jax import config_checks
from deepfashion_jax import errors
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax import torch_io
from deepfashion_jax.models import backbones
from deepfashion_jax.models import fashion_net
from deepfashion_jax.models import vit
from tests import helpers
from tests import reference_libraries

SHRUNK = vit.ARCHITECTURES['vit_test']
NATIVE = 64  # the side the reference models' position embeddings are made for (4 x 4 patches)
OTHER_SIDES = {'torchvision': 96, 'timm': 48}  # 6 x 6 (resampled up), 3 x 3 (down)


def _randomize(model, seed: int):
  """Non-trivial weights: LayerNorm scales ~ N(1, 0.1) and biases ~ N(0, 0.1), embeddings
  ~ N(0, 0.5), weights ~ N(0, 1 / fan_in), other biases ~ N(0, 0.1)."""
  torch = reference_libraries.import_torch()
  generator = torch.Generator().manual_seed(seed)
  norms = {f'{name}.{leaf}' for name, m in model.named_modules()
           if isinstance(m, torch.nn.LayerNorm) for leaf in ('weight', 'bias')}
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name in norms:
        mean, std = (1.0 if name.endswith('weight') else 0.0), 0.1
      elif 'pos' in name or 'token' in name:
        mean, std = 0.0, 0.5
      elif p.ndim == 1:
        mean, std = 0.0, 0.1
      else:
        mean, std = 0.0, p[0].numel() ** -0.5
      p.copy_(torch.randn(p.shape, generator=generator) * std + mean)
  return model.eval()


def _torchvision_model(side: int, architecture=SHRUNK):
  vision_transformer = reference_libraries.import_torchvision().models.vision_transformer
  a = architecture
  return vision_transformer.VisionTransformer(side, a.patch_size, a.depth, a.heads, a.width,
                                              a.mlp_dim, num_classes=10)


def _torchvision_tokens(model, images):
  """(B, 1 + N, D) tokens after encoder.ln."""
  x = model._process_input(images)  # pylint: disable=protected-access
  x = reference_libraries.import_torch().cat(
      [model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
  return model.encoder(x)


def _timm_model(side: int, architecture=SHRUNK):
  timm = reference_libraries.import_timm()
  a = architecture
  return timm.models.vision_transformer.VisionTransformer(
      img_size=side, patch_size=a.patch_size, embed_dim=a.width, depth=a.depth,
      num_heads=a.heads, mlp_ratio=a.mlp_dim / a.width, num_classes=10)


LIBRARIES = {  # name -> (model at a side, its tokens after the final norm, pos embedding key)
    'torchvision': (_torchvision_model, _torchvision_tokens, 'encoder.pos_embedding'),
    'timm': (_timm_model, lambda model, images: model.forward_features(images), 'pos_embed'),
}


def _resampled_state(state: dict, key: str, grid: int) -> dict:
  """The state dict with its position embedding resampled by timm's own function."""
  reference_libraries.import_timm()
  from timm.layers import pos_embed  # pylint: disable=g-import-not-at-top
  return dict(state, **{key: pos_embed.resample_abs_pos_embed(state[key], [grid, grid],
                                                              num_prefix_tokens=1)})


@pytest.fixture(scope='module')
def reference_files(tmp_path_factory):
  """library -> (its shrunk model with random weights at NATIVE, the file it is saved in)."""
  torch = reference_libraries.import_torch()
  files = {}
  for seed, (library, (make, _, _)) in enumerate(LIBRARIES.items()):
    model = _randomize(make(NATIVE), seed)
    path = str(tmp_path_factory.mktemp('vit') / f'{library}.pth')
    torch.save(model.state_dict(), path)
    files[library] = (model, path)
  return files


@nnx.jit
def _backbone_outputs(backbone, images):
  return backbone(images)


@pytest.mark.parametrize('library', sorted(LIBRARIES))
def test_the_backbone_computes_what_the_library_does_from_its_file(library, reference_files):
  """Loaded through load_into into FashionNet(backbone='vit_test'): the class token and the
  patch tokens after the final norm equal the library's, at the file's side in eval and in
  training mode (drop path 0), and in eval mode at another side (the library's position
  embedding resampled by timm's function, ours by the loader)."""
  torch = reference_libraries.import_torch()
  make, tokens_of, key = LIBRARIES[library]
  native_model, path = reference_files[library]
  for side in (NATIVE, OTHER_SIDES[library]):
    grid = side // SHRUNK.patch_size
    reference = native_model
    if side != NATIVE:
      reference = make(side)
      reference.load_state_dict(_resampled_state(native_model.state_dict(), key, grid))
    model = fashion_net.FashionNet(backbone='vit_test', image_size=side, rngs=nnx.Rngs(0))
    loaded = torch_io.load_into(model, path)
    assert (loaded.family, loaded.part) == (f'{library}_vit', 'backbone')
    images = np.random.default_rng(side).normal(size=(2, side, side, 3)).astype(np.float32)
    for mode in ('eval', 'train') if side == NATIVE else ('eval',):  # one compile per mode
      getattr(reference, mode)()
      getattr(model, mode)()
      with torch.no_grad():
        expected = tokens_of(reference, torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
      outputs = _backbone_outputs(model.backbone, jnp.asarray(images))
      for name, ours, theirs in (
          ('class token', outputs['global'], expected[:, 0]),
          ('patch tokens', outputs['tokens'], expected[:, 1:].reshape(2, grid, grid, -1))):
        error = float(np.abs(np.asarray(ours) - theirs).max())
        scale = float(np.abs(theirs).max())
        print(f'{library} {side} px {mode} {name}: max |ours - theirs| {error:.3g}, '
              f'max |theirs| {scale:.3g}')
        assert error < 1e-4 * scale, (library, side, mode, name)


@pytest.mark.parametrize('old_grid, new_grid', [(14, 10), (14, 20), (4, 3)])
def test_position_embeddings_are_resampled_as_timm_does(old_grid, new_grid):
  torch = reference_libraries.import_torch()
  reference_libraries.import_timm()
  from timm.layers import pos_embed  # pylint: disable=g-import-not-at-top
  array = np.random.default_rng(0).normal(size=(1, 1 + old_grid ** 2, 8)).astype(np.float32)
  expected = pos_embed.resample_abs_pos_embed(torch.from_numpy(array), [new_grid, new_grid],
                                              num_prefix_tokens=1).numpy()
  ours = vit.resample_position_embedding(array, new_grid)
  assert ours.shape == expected.shape == (1, 1 + new_grid ** 2, 8)
  np.testing.assert_array_equal(ours[:, 0], array[:, 0])
  assert np.abs(ours - expected).max() < 1e-5


@pytest.mark.slow  # a full ViT-B/16 built, saved and run by both
def test_vit_b16_computes_what_torchvisions_vit_b_16_does(tmp_path):
  torch = reference_libraries.import_torch()
  torchvision = reference_libraries.import_torchvision()
  architecture = vit.ARCHITECTURES['vit_b16']
  reference = _randomize(torchvision.models.vit_b_16(), 0)
  path = str(tmp_path / 'vit_b_16.pth')
  torch.save(reference.state_dict(), path)
  model = fashion_net.FashionNet(backbone='vit_b16', image_size=224, rngs=nnx.Rngs(0))
  torch_io.load_into(model, path)
  images = np.random.default_rng(0).normal(size=(1, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    expected = _torchvision_tokens(reference, torch.from_numpy(images.transpose(0, 3, 1, 2)))
  expected = expected.numpy()
  model.eval()
  outputs = _backbone_outputs(model.backbone, jnp.asarray(images))
  grid = 224 // architecture.patch_size
  for ours, theirs in ((outputs['global'], expected[:, 0]),
                       (outputs['tokens'], expected[:, 1:].reshape(1, grid, grid, -1))):
    error, scale = float(np.abs(np.asarray(ours) - theirs).max()), float(np.abs(theirs).max())
    print(f'vit_b16 224 px: max |ours - theirs| {error:.3g}, max |theirs| {scale:.3g}')
    assert error < 1e-4 * scale


def _abstract_forward(name: str, side: int):
  """(the backbone's forward as a function of its state, its state as shapes)."""
  backbone = nnx.eval_shape(lambda: backbones.create(name, dtype=jnp.float32,
                                                     rngs=nnx.Rngs(0), image_size=side))
  graphdef, state = nnx.split(backbone)
  return (lambda state, images: nnx.merge(graphdef, state)(images)['global']), state


def test_vit_b16_forward_costs_the_published_flops():
  """17.6 G multiply-adds at 224 px (35.2 GFLOPs), counted by XLA's cost analysis."""
  forward, state = _abstract_forward('vit_b16', 224)
  lowered = jax.jit(forward).lower(state, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  cost = lowered.cost_analysis()
  flops = (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']
  print(f'vit_b16 forward at 224 px: {flops / 1e9:.2f} GFLOPs')
  assert abs(flops - 35.2e9) < 0.1 * 35.2e9


def test_bfloat16_activations_stay_close_to_float32():
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
  outputs = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    backbone = backbones.create('siglip_test', dtype=dtype, rngs=nnx.Rngs(0), image_size=64)
    outputs[dtype] = {k: np.asarray(v, np.float32)
                      for k, v in _backbone_outputs(backbone, images).items()}
  for name in ('tokens', 'global'):
    low, high = outputs[jnp.bfloat16][name], outputs[jnp.float32][name]
    assert np.isfinite(low).all()
    assert np.abs(low - high).max() < 0.05 * np.abs(high).max(), name


def test_drop_path_draws_one_mask_per_example_in_training_and_none_in_eval():
  backbone = backbones.create('vit_test', dtype=jnp.float32, rngs=nnx.Rngs(0), image_size=32,
                              drop_path=0.5)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32, 32, 3)), jnp.float32)
  backbone.eval()
  plain = backbone(images)['global']
  np.testing.assert_array_equal(backbone(images, dropout_rng=jax.random.key(1))['global'],
                                plain)
  backbone.train()
  first = backbone(images, dropout_rng=jax.random.key(1))['global']
  again = backbone(images, dropout_rng=jax.random.key(1))['global']
  other = backbone(images, dropout_rng=jax.random.key(2))['global']
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)
  assert not np.allclose(first, plain)
  assert [b.drop_path2.rate for b in backbone.blocks] == [0.0, 0.5]  # timm's linear rule


def test_layer_ids_number_the_embeddings_blocks_and_head():
  backbone = nnx.eval_shape(lambda: backbones.create('clip_vit_test', dtype=jnp.float32,
                                                     rngs=nnx.Rngs(0)))
  assert backbone.num_layers == SHRUNK.depth + 1
  ids = {path: backbone.layer_id(path) for path, _ in nnx.to_flat_state(nnx.state(backbone))}
  assert ids[('patch_embed', 'kernel')] == ids[('position_embedding',)] == 0
  assert ids[('class_token',)] == ids[('ln_pre', 'scale')] == 0
  assert ids[('blocks', 1, 'attention', 'query', 'kernel')] == 2
  assert ids[('norm', 'bias')] == ids[('projection',)] == backbone.num_layers
  assert set(ids.values()) == set(range(backbone.num_layers + 1))


def test_the_landmark_branch_reads_a_middle_block_and_attention_goes_back_into_the_tokens():
  """The branch reads block 1 of 2 (the middle one) at stride 8; FashionNet's heatmaps have
  the input's side; what at_landmark_map returns is what the later blocks read."""
  model = nnx.eval_shape(lambda: fashion_net.FashionNet(
      backbone='vit_test', image_size=64, landmarks='attention', rngs=nnx.Rngs(0)))
  outputs = nnx.eval_shape(lambda m, x: m(x), model,
                           jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.uint8))
  assert outputs['landmark_heatmaps'].shape == (2, 64, 64, 8)
  backbone = backbones.create('vit_test', dtype=jnp.float32, rngs=nnx.Rngs(0), image_size=64)
  assert backbone.landmark_block == 1 and backbone.feature_size(64) == 4
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 64, 64, 3)), jnp.float32)
  plain, unchanged, reweighted = nnx.jit(lambda b, x: (
      b(x), b(x, at_landmark_map=lambda m: m * 1.0), b(x, at_landmark_map=lambda m: m * 2.0)))(
          backbone, x)
  assert plain['landmark_tokens'].shape == (2, 8, 8, SHRUNK.width)  # stride 8
  np.testing.assert_allclose(unchanged['global'], plain['global'], rtol=1e-5, atol=1e-5)
  assert not np.allclose(reweighted['global'], plain['global'])


def _checked(**fields):
  config = test_config.get_config()
  for name, value in fields.items():
    section, _, field = name.rpartition('.')
    (config[section] if section else config)[field] = value
  config_checks.check(config)


@pytest.mark.parametrize('fields, message', [
    ({'model.backbone': 'vit_test'},  # configs/test.py's crop side, 72
     'config.data.crop_size=72: ViT (shrunk, for tests) cuts the input into 16 x 16 patches'),
    ({'model.backbone': 'vit_test', 'data.crop_size': 64, 'model.global_pool': 'map'},
     "config.model.global_pool='map': ViT (shrunk, for tests) has no attention-pooling head"),
    ({'model.backbone': 'siglip_test', 'data.crop_size': 64, 'model.global_pool': 'token'},
     "config.model.global_pool='token': SigLIP ViT (shrunk, for tests) has no class token"),
    ({'model.backbone': 'vit_test', 'data.crop_size': 64, 'model.landmark_block': 3},
     'config.model.landmark_block=3: expected 0 (the middle block) or a block number in [1, 2]'),
    ({'model.global_pool': 'mean'},
     "config.model.global_pool='mean': ResNet-18 has no such option"),
])
def test_config_checks_refuse_what_the_vit_cannot_do(fields, message):
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    _checked(**fields)


def test_config_checks_accept_a_vit_at_a_multiple_of_its_patch():
  _checked(**{'model.backbone': 'siglip_test', 'data.crop_size': 64,
              'model.global_pool': 'mean', 'model.landmark_block': 2})


def _save(state: dict, path) -> str:
  torch = reference_libraries.import_torch()
  torch.save({k: torch.as_tensor(v) for k, v in state.items()}, str(path))
  return str(path)


def test_files_of_another_backbone_are_refused_naming_what_they_hold(reference_files,
                                                                     tmp_path):
  torch = reference_libraries.import_torch()
  torchvision = reference_libraries.import_torchvision()
  timm_file = reference_files['timm'][1]
  resnet_keys = {k: torch.zeros(1) for k in torchvision.models.resnet18().state_dict()}
  resnet_file = _save(resnet_keys, tmp_path / 'resnet18.pth')
  abstract = lambda name: nnx.eval_shape(lambda: fashion_net.FashionNet(
      backbone=name, image_size=64, rngs=nnx.Rngs(0)))
  cases = [
      (timm_file, 'vit_b16', 'holds a timm ViT 32 wide, 2 deep, patch 16; the configured '
       "backbone is ViT-B/16 (config.model.backbone='vit_b16'): set "
       '--config.model.backbone=vit_test'),
      (timm_file, 'clip_vit_test', "(config.model.backbone='clip_vit_test'): set "
       '--config.model.backbone=vit_test'),
      (timm_file, 'resnet18', "backbone is ResNet-18 (config.model.backbone='resnet18')"),
      (resnet_file, 'vit_b16', "holds a ResNet-18 backbone; the configured model is ViT-B/16 "
       "(config.model.backbone='vit_b16')"),
  ]
  for path, name, message in cases:
    with pytest.raises(torch_io.CheckpointError, match=re.escape(path) + '.*' + re.escape(
        message)):
      torch_io.load_into(abstract(name), path)


@pytest.mark.slow
def test_a_train_step_of_a_vit_with_drop_path_runs(synthetic_folder):
  config = test_config.get_config()
  config.model.backbone = 'vit_test'
  config.model.drop_path = 0.1
  config.data.crop_size = 64
  config_checks.check(config)
  index, batches = helpers.train_batches(synthetic_folder[0], config, 1)
  mesh = sharding.make_mesh(jax.devices()[:1])
  step_config, state = steps.create_train_state(config, mesh, index.attribute_facts())
  query = lambda params: np.array(
      params['backbone']['blocks'][0]['attention']['query']['kernel'][...])
  before = query(state.params)
  state, metrics = steps.jit_steps(step_config, mesh).train(
      state, sharding.global_batch(batches[0], mesh))
  assert np.isfinite(float(metrics.compute()['loss']))
  assert not np.array_equal(query(state.params), before)


@pytest.mark.parametrize('library, key, damaged', [
    ('timm', 'pos_embed', 0.5),  # a scalar where (1, tokens, width) belongs
    ('timm', 'blocks.0.attn.qkv.weight', np.zeros((32, 32), np.float32)),  # not packed
    ('torchvision', 'conv_proj.weight', np.zeros((32, 3), np.float32)),
    ('torchvision', 'encoder.layers.encoder_layer_0.self_attention.in_proj_bias',
     np.zeros((95,), np.float32))])
def test_a_damaged_file_is_refused_naming_the_key(library, key, damaged, reference_files,
                                                  tmp_path):
  """An array of the wrong shape is a CheckpointError naming the file and the key, not an
  IndexError or a ValueError from splitting it."""
  torch = reference_libraries.import_torch()
  state = {k: v.detach().numpy() for k, v in torch.load(reference_files[library][1]).items()}
  state[key] = np.asarray(damaged, np.float32)
  path = _save(state, tmp_path / f'{library}.pth')
  model = nnx.eval_shape(lambda: fashion_net.FashionNet(
      backbone='vit_test', image_size=NATIVE, rngs=nnx.Rngs(0)))
  with pytest.raises(torch_io.CheckpointError, match=re.escape(path) + '.*' + re.escape(key)):
    torch_io.load_into(model, path)
