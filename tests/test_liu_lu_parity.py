"""A state dict of Liu & Lu's WholeNetwork (tests/torch_reference_liu_lu.py, their keys)
loads through torch_io.load_into, as --config.init_from does, into
FashionNet(backbone='vgg16', heads='liu_lu', landmarks='attention', normalization='imagenet'),
which then computes what theirs computes: category logits, the two-way attribute logits,
the landmark heatmaps and the attention, in eval mode and in training mode (batch
statistics, and the running statistics they leave). Also the pieces on their own: our
transposed convolution against nn.ConvTranspose2d, the merged landmark map against
nn.Upsample; and the converter's refusals, which name the key.

Random weights scaled to keep the activations of order 1 (PyTorch's default initialisation
would shrink them layer by layer, and with them any difference), random batch-norm
statistics; their extractor's unused conv5 weights differ from their conv5_1..3, so that
loading the wrong ones shows.
"""

import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
from deepfashion_jax import torch_io
from deepfashion_jax.models import fashion_net
from deepfashion_jax.models import landmarks
from tests import torch_reference_liu_lu as reference_lib

NUM_CATEGORIES = 50
STEP = 1234
# The tolerance of every comparison: absolute up to values of 1 (attention), relative to
# the output's largest value above (logits reach about 30). float32 rounding grows with the
# values and differs between CPUs' kernels (RESULTS.md, landmarks); a wrong mapping is off
# by the order of the values. The measured largest values and differences print with -s.
TOLERANCE = 1e-4
# Our U-Net's batch norms -> theirs, below attention_pred_net.model.model. (their nesting of
# UnetSkipConnectionBlocks, each an nn.Sequential `model`).
UNET_NORMS = {'down1_bn': '1.model.2', 'down2_bn': '1.model.3.model.2',
              'inner_bn': '1.model.3.model.3.model.4', 'up2_bn': '1.model.3.model.6',
              'up1_bn': '1.model.6'}


def _randomise(model, seed):
  """Every weight normal with variance 2 / fan-in (a transposed convolution's fan-in
  divided by its stride squared, the inputs each output sees), biases N(0, 0.1^2), batch
  norms' statistics and affine terms random; their `__step`, if any, set."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
        weight = module.weight
        out_axis = 1 if isinstance(module, torch.nn.ConvTranspose2d) else 0
        fan_in = weight.numel() // weight.shape[out_axis]
        if isinstance(module, torch.nn.ConvTranspose2d):
          fan_in //= module.stride[0] ** 2
        weight.copy_(torch.randn(weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
        if module.bias is not None:
          module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    torch_reference.randomise_batch_norm(model, generator)
    if hasattr(model, '__step'):
      getattr(model, '__step').fill_(STEP)
  return model


def _reference(image_size, seed=0):
  torch.manual_seed(seed)
  model = reference_lib.WholeNetwork(NUM_CATEGORIES, image_size)
  return _randomise(model, seed).eval()


def _model(**options):
  """An abstract FashionNet (shapes only: a refusal comes before any value is written)."""
  arguments = dict(backbone='vgg16', heads='liu_lu', landmarks='attention',
                   normalization='imagenet', image_size=64, num_categories=NUM_CATEGORIES)
  arguments.update(options)
  return nnx.eval_shape(lambda: fashion_net.FashionNet(**arguments, rngs=nnx.Rngs(0)))


def _zeros(abstract_model):
  """The abstract model with every variable zero, for a file to fill."""
  graphdef, state = nnx.split(abstract_model)
  return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))


def _converted(reference, image_size, tmp_path):
  """Their state dict saved by torch.save and loaded as --config.init_from does, into
  a model whose every variable is zero: the file must fill them all. (Built with its own
  initialisers, eagerly, the model would take ~20 s on 2 cores: one compiled random draw
  per shape.)"""
  path = str(tmp_path / 'whole.pkl')  # their training's file name
  torch.save(reference.state_dict(), path)
  model = _zeros(_model(image_size=image_size))
  assert torch_io.load_into(model, path) == torch_io.Loaded('liu_lu', 'model', STEP)
  return model


@nnx.jit
def _forward(model, images):
  return model(images)


def _images(batch, image_size, seed=1):
  """ImageNet-normalised images: of mean 0 and deviation 1 per channel."""
  return torch.randn(batch, 3, image_size, image_size,
                     generator=torch.Generator().manual_seed(seed))


def _nhwc(tensor):
  return jnp.asarray(tensor.detach().numpy().transpose(0, 2, 3, 1))


@nnx.jit
def _our_attention(model, images):
  """Our attention map A (B, s, s, 512), from our modules on our conv4_3."""
  conv4_3 = model.backbone(images)['conv4_3']
  return model.landmark_attention(conv4_3, model.landmark_branch(conv4_3))[1]


def _differences(ours, theirs) -> dict:
  """{output: (max |ours - theirs|, max |theirs|)}; theirs (NCHW) made NHWC as ours."""
  pairs = {
      'category logits': (ours['category_logits'], theirs['category_output']),
      'attribute two-way logits': (ours['attribute_two_way_logits'], theirs['attr_output']),
      'heatmaps': (ours['landmark_heatmaps'], theirs['lm_pos_map'].permute(0, 2, 3, 1)),
  }
  if 'attention' in ours:
    pairs['attention'] = (ours['attention'], theirs['attention_map'].permute(0, 2, 3, 1))
  result = {}
  for name, (mine, reference) in pairs.items():
    reference = reference.detach().numpy()
    assert np.shape(mine) == reference.shape, name
    result[name] = (float(np.abs(np.asarray(mine) - reference).max()),
                    float(np.abs(reference).max()))
  return result


def _assert_close(differences, what):
  print(f'\n{what}: ' + '; '.join(f'{name} max |diff| {diff:.2e} (max |value| {size:.2f})'
                                  for name, (diff, size) in differences.items()))
  for name, (diff, size) in differences.items():
    assert size > 0.1, f'{name}: too small to tell a wrong mapping ({size})'
    assert diff < TOLERANCE * max(1.0, size), f'{what}: {name} differs by {diff}'


# ---------------------------------------------------------------------------------- parity


@pytest.mark.parametrize('image_size, batch',
                         [(64, 2), pytest.param(224, 1, marks=pytest.mark.slow)])
def test_converted_whole_network_computes_theirs(tmp_path, image_size, batch):
  """At 64 px (conv4_3 8 x 8, pool5 2 x 2) and at their 224 px (28 x 28, 7 x 7)."""
  reference = _reference(image_size)
  model = _converted(reference, image_size, tmp_path)
  model.eval()
  images = _images(batch, image_size)
  with torch.no_grad():
    theirs = reference(images)
  ours = dict(_forward(model, _nhwc(images)),
              attention=_our_attention(model, _nhwc(images)))
  _assert_close(_differences(ours, theirs), f'eval, {image_size} px')
  two_way = np.asarray(ours['attribute_two_way_logits'])
  np.testing.assert_allclose(ours['attribute_logits'], two_way[:, 1] - two_way[:, 0])
  # The same highest pixels, in each one's convention: ours its centre over the side,
  # theirs its index over side - 1.
  ours_pixels = np.rint(np.asarray(ours['landmarks']) * image_size - 0.5)
  their_pixels = np.rint(theirs['lm_pos_output'].numpy() * (image_size - 1))
  np.testing.assert_array_equal(ours_pixels, their_pixels)


def test_training_mode_computes_theirs(tmp_path):
  """The U-Net's batch norms on batch statistics, and the running statistics they update
  (PyTorch's: momentum 0.1, the unbiased variance)."""
  image_size = 64
  reference = _reference(image_size, seed=3)
  model = _converted(reference, image_size, tmp_path)
  images = _images(2, image_size, seed=4)
  reference.train()
  with torch.no_grad():
    theirs = reference(images)
  model.train()
  # (The attention from our modules would update the statistics a second time: it has a
  # test of its own, below.)
  _assert_close(_differences(_forward(model, _nhwc(images)), theirs), 'train, 64 px')
  statistics = reference.state_dict()
  for ours_name, theirs_name in UNET_NORMS.items():
    norm = getattr(model.landmark_attention.unet, ours_name)
    for leaf, torch_leaf in (('mean', 'running_mean'), ('var', 'running_var')):
      expected = statistics[f'attention_pred_net.model.model.{theirs_name}.{torch_leaf}']
      np.testing.assert_allclose(getattr(norm, leaf)[...], expected.numpy(), atol=1e-5,
                                 err_msg=f'{ours_name}.{leaf}')


def test_training_mode_attention_computes_theirs(tmp_path):
  """The attention map itself under batch statistics, from our modules."""
  image_size = 64
  reference = _reference(image_size, seed=5)
  model = _converted(reference, image_size, tmp_path)
  images = _images(2, image_size, seed=6)
  reference.train()
  with torch.no_grad():
    theirs = reference(images)['attention_map'].permute(0, 2, 3, 1).numpy()
  model.train()
  ours = np.asarray(_our_attention(model, _nhwc(images)))
  difference = float(np.abs(ours - theirs).max())
  print(f'\ntrain, 64 px: attention max |diff| {difference:.2e} '
        f'(max |value| {np.abs(theirs).max():.2f})')
  assert difference < TOLERANCE


# ------------------------------------------------------------------------------ the pieces


@pytest.mark.parametrize('kernel, stride, padding', [(4, 2, 1), (1, 1, 0)])
@pytest.mark.parametrize('bias', [True, False])
def test_conv_transpose_is_torchs(kernel, stride, padding, bias):
  theirs = torch.nn.ConvTranspose2d(6, 5, kernel, stride, padding, bias=bias)
  ours = landmarks.ConvTranspose(6, 5, kernel, stride=stride, padding=padding, use_bias=bias,
                                 dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert ours.kernel[...].shape == (kernel, kernel, 6, 5)
  ours.kernel[...] = jnp.asarray(theirs.weight.detach().numpy().transpose(2, 3, 0, 1))
  if bias:
    ours.bias[...] = jnp.asarray(theirs.bias.detach().numpy())
  else:
    assert ours.bias is None
  x = torch.randn(2, 6, 7, 9, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    expected = theirs(x).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(ours(_nhwc(x)))
  assert got.shape == expected.shape == (2, (7 - 1) * stride - 2 * padding + kernel,
                                         (9 - 1) * stride - 2 * padding + kernel, 5)
  np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize('side, map_side', [(224, 28), (64, 8)])
def test_merged_landmark_map_is_their_upsample(side, map_side):
  heatmaps = torch.randn(2, 8, side, side, generator=torch.Generator().manual_seed(0))
  upsample = torch.nn.Upsample((map_side, map_side), mode='bilinear', align_corners=False)
  with torch.no_grad():
    expected = upsample(heatmaps.max(dim=1, keepdim=True)[0]).numpy().transpose(0, 2, 3, 1)
  got = landmarks.merged_landmark_map(_nhwc(heatmaps), (map_side, map_side))
  assert got.shape == expected.shape == (2, map_side, map_side, 1)
  np.testing.assert_allclose(got, expected, atol=1e-6)


# -------------------------------------------------------------------------------- refusals


def _their_keys(num_categories=48, image_size=64, **replaced):
  """Their state dict's keys and shapes, zeros for values (`replaced`: key -> tensor, or
  None to drop it)."""
  with torch.device('meta'):
    shapes = {k: v.shape for k, v in
              reference_lib.WholeNetwork(num_categories, image_size).state_dict().items()}
  state = {k: torch.zeros(shape) for k, shape in shapes.items()}
  for key, value in replaced.items():
    if value is None:
      del state[key]
    else:
      state[key] = value
  return state


def test_their_48_categories_load_with_never_winning_49_and_50(tmp_path):
  """Their head has 48 outputs; logit j is category j + 1 for them as for us."""
  torch.manual_seed(0)
  reference = _randomise(reference_lib.WholeNetwork(48, 64), 0).eval()
  path = str(tmp_path / 'whole.pkl')
  torch.save(reference.state_dict(), path)
  model = _zeros(_model())
  assert torch_io.load_into(model, path) == torch_io.Loaded('liu_lu', 'model', STEP)
  model.eval()
  images = _images(2, 64)
  with torch.no_grad():
    theirs = reference(images)['category_output'].numpy()
  ours = np.asarray(_forward(model, _nhwc(images))['category_logits'])
  np.testing.assert_allclose(ours[:, :48], theirs,
                             atol=TOLERANCE * max(1.0, float(np.abs(theirs).max())))
  assert (ours[:, 48:] < torch_io.common.NO_LOGIT_BIAS / 2).all()
  with pytest.raises(torch_io.CheckpointError, match=re.escape(
      f'{path}: category_fc2.weight has shape (48, 1024): 48 categories; the model has 40 '
      'categories, its category_classifier expects category_fc2.weight of shape (40, 1024)')):
    torch_io.load_into(_model(num_categories=40), path)


def test_a_wrong_shape_is_refused_naming_the_key_and_both_shapes(tmp_path):
  path = str(tmp_path / 'whole.pkl')
  torch.save(_their_keys(50, **{'lm_branch.conv10.weight': torch.zeros(7, 16, 1, 1)}), path)
  with pytest.raises(torch_io.CheckpointError, match=re.escape(
      f'{path}: lm_branch.conv10.weight has shape (7, 16, 1, 1) ((1, 1, 16, 7) in Flax '
      'layout), the model expects (1, 1, 16, 8) in Flax layout '
      '(landmark_branch.layers.12.kernel)')):
    torch_io.load_into(_model(), path)


def test_missing_and_unexpected_keys_are_named_as_theirs(tmp_path):
  path = str(tmp_path / 'whole.pkl')
  missing = 'attention_pred_net.model.model.1.model.3.model.3.model.4.running_var'
  state = _their_keys(50, **{missing: None, 'lm_branch.conv11.weight': torch.zeros(1)})
  torch.save({'module.' + k: v for k, v in state.items()}, path)  # from nn.DataParallel
  with pytest.raises(torch_io.CheckpointError, match=re.escape(
      f"{path}: keys do not match the model: unexpected ['lm_branch.conv11.weight']; "
      f"missing ['{missing}']")):
    torch_io.load_into(_model(), path)


def test_a_model_unlike_theirs_is_refused_saying_what_to_set(tmp_path):
  path = str(tmp_path / 'whole.pkl')
  torch.save({'model': _their_keys(50)}, path)  # under a key: found there too
  with pytest.raises(torch_io.CheckpointError, match=re.escape(
      f"{path} is a state dict of Liu & Lu's WholeNetwork: its heads are theirs; set "
      "--config.model.heads=liu_lu (config.model.heads is 'fashionnet'); and it has their "
      'landmark branch and landmark-driven attention; set --config.model.landmarks=attention '
      "(config.model.landmarks is 'heatmaps'); and it was trained on pixels normalised "
      "with ImageNet's mean and std; set "
      "--config.data.normalization=imagenet (config.data.normalization is 'baseline')")):
    torch_io.load_into(_model(heads='fashionnet', landmarks='heatmaps',
                              normalization='baseline'), path)
  with pytest.raises(torch_io.CheckpointError, match=re.escape(
      'set --config.data.crop_size=64 (config.data.crop_size gives 3x3)')):
    torch_io.load_into(_model(image_size=96), path)
  # Under 'model', where the baseline keeps its state dict, the file is still theirs: it
  # fills the whole network, never only a backbone or a baseline's model.
  assert torch_io.load_into(_zeros(_model()), path) == torch_io.Loaded('liu_lu', 'model', 0)
