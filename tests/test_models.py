"""The Flax ResNets, VGG-16 and FashionNet: architecture, dtypes, heads and the
box-gradient option. (ConvNeXt: test_convnext.py.)"""

import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepfashion_jax.data import vocabulary
from deepfashion_jax.models import backbones
from deepfashion_jax.models import fashion_net
from deepfashion_jax.models import resnet
from deepfashion_jax.models import vgg
from deepfashion_jax.models import xla_cpu

# torchvision's published parameter counts less the classifier: ResNet's fc (512 or
# 2048 x 1000 + 1000), VGG's (25088 x 4096 + 4096, 4096 x 4096 + 4096, 4096 x 1000 + 1000),
# ConvNeXt's classifier.2 (768 or 1024 x 1000 + 1000). convnext_test has no published
# model: test_convnext.py counts it against torchvision's ConvNeXt of its shape.
TORCHVISION_BACKBONE_PARAMETERS = {
    'resnet18': 11_689_512 - 513_000, 'resnet34': 21_797_672 - 513_000,
    'resnet50': 25_557_032 - 2_049_000, 'resnet101': 44_549_160 - 2_049_000,
    'resnet152': 60_192_808 - 2_049_000, 'vgg16': 138_357_544 - 123_642_856,
    'vgg16_bn': 138_365_992 - 123_642_856, 'vit_b16': 86_567_656 - 769_000,
    'convnext_tiny': 28_589_128 - 769_000, 'convnext_small': 50_223_688 - 769_000,
    'convnext_base': 88_591_464 - 1_025_000}


def _parameter_count(module):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize('name', sorted(TORCHVISION_BACKBONE_PARAMETERS))
def test_parameter_counts_equal_torchvision(name):
  torchvision_names = {n for n in backbones.BACKBONES
                       if n.startswith(('resnet', 'vgg', 'convnext')) and n != 'convnext_test'}
  assert torchvision_names <= set(TORCHVISION_BACKBONE_PARAMETERS) <= set(backbones.BACKBONES)
  model = nnx.eval_shape(lambda: backbones.create(name, dtype=jnp.float32, rngs=nnx.Rngs(0)))
  assert _parameter_count(model) == TORCHVISION_BACKBONE_PARAMETERS[name]


@pytest.mark.parametrize('depth', [18, 50])
def test_parameter_counts_equal_the_torch_reference(depth):
  torch = pytest.importorskip('torch')
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  model = nnx.eval_shape(lambda: fashion_net.FashionNet(backbone=f'resnet{depth}',
                                                        rngs=nnx.Rngs(0)))
  reference = torch_reference.FashionResnet(depth, 7)
  assert _parameter_count(model) == sum(p.numel() for p in reference.parameters())
  del torch


def _flat_parameters(model) -> dict:
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  return {'.'.join(map(str, path)): np.asarray(variable[...])
          for path, variable in nnx.to_flat_state(state)}


def test_initialisation_has_the_moments_of_the_baselines(tmp_path):
  """Every array starts with the spread torch gives it: torchvision's ResNet init for the
  backbone, nn.Linear / nn.Conv2d defaults for the box branch and the heads."""
  torch = pytest.importorskip('torch')
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  from deepfashion_jax import torch_io  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  path = str(tmp_path / 'init.pth')
  torch.save({'model': torch_reference.FashionResnet(18, 7).state_dict()}, path)
  as_torch = fashion_net.FashionNet(roi_pool='baseline_max', rngs=nnx.Rngs(1))
  assert torch_io.load_into(as_torch, path).family == 'baseline'
  ours = _flat_parameters(fashion_net.FashionNet(rngs=nnx.Rngs(0)))
  theirs = _flat_parameters(as_torch)
  # The converted category head moves the baseline's logit i + 1 to our column i.
  for leaf in ('category_classifier.kernel', 'category_classifier.bias'):
    ours[leaf], theirs[leaf] = ours[leaf][..., :49], theirs[leaf][..., :49]
  assert ours.keys() == theirs.keys()
  for name, value in ours.items():
    reference = theirs[name]
    if name.endswith(('.mean', '.var')) or reference.std() == 0:  # constants: equal
      np.testing.assert_array_equal(value, reference, err_msg=name)
      continue
    # Uniform (heads) or normal (convolutions): same largest magnitude and spread.
    if value.size >= 1000:
      assert value.std() == pytest.approx(reference.std(), rel=0.08), name
      assert abs(value.mean() - reference.mean()) < 6 * reference.std() / np.sqrt(value.size)
    if not name.startswith('backbone'):  # uniform in +-1/sqrt(fan_in), both
      kernel = ours[name.rsplit('.', 1)[0] + '.kernel']
      bound = 1 / np.sqrt(np.prod(kernel.shape[:-1]))
      for array in (value, reference):
        assert np.abs(array).max() <= bound, name
        assert value.size < 1000 or np.abs(array).max() > 0.99 * bound, name


def test_backbone_returns_every_stage_by_name():
  model = resnet.ResNet(18, rngs=nnx.Rngs(0))
  outputs = model(jnp.zeros((1, 64, 64, 3)))
  assert {name: outputs[name].shape for name in resnet.STAGES} == {
      'stem': (1, 16, 16, 64), 'layer1': (1, 16, 16, 64), 'layer2': (1, 8, 8, 128),
      'layer3': (1, 4, 4, 256), 'layer4': (1, 2, 2, 512)}


def test_unknown_depth_is_refused():
  with pytest.raises(ValueError, match='ResNet depth must be one of'):
    resnet.ResNet(26, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('name, final_map, stride, sides', [
    ('resnet18', 'layer4', 32, {224: 7, 100: 4, 72: 3, 40: 2}),  # ceil(side / 32)
    ('vgg16', 'conv5_3', 16, {224: 14, 100: 6, 72: 4, 40: 2}),  # floor(side / 16)
])
def test_each_backbone_says_its_last_map_name_stride_and_side(name, final_map, stride, sides):
  model = nnx.eval_shape(lambda: backbones.create(name, dtype=jnp.float32, rngs=nnx.Rngs(0)))
  assert (model.final_map, model.stride, model.out_features) == (final_map, stride, 512)
  for side, cells in sides.items():
    assert model.feature_size(side) == cells
    outputs = nnx.eval_shape(lambda m, x: m(x), model,
                             jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32))
    assert outputs[final_map].shape == (1, cells, cells, 512)
    assert outputs['global'].shape == (1, model.global_features)
    if name == 'vgg16':  # Liu & Lu's landmark branch reads conv4_3, at stride 8
      assert tuple(outputs) == vgg.STAGES + ('global',)
      assert outputs['conv4_3'].shape == (1, side // 8, side // 8, 512)


@pytest.mark.parametrize('value', [18, '50'])
def test_a_resnet_depth_or_an_unknown_backbone_is_refused_naming_the_backbones(value):
  with pytest.raises(ValueError, match=re.escape(
      f"backbone={value!r}: expected one of {tuple(backbones.BACKBONES)}")):
    fashion_net.FashionNet(backbone=value, image_size=64, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=re.escape("backbone='vgg19': expected one of ('resnet18'")):
    fashion_net.FashionNet(backbone='vgg19', image_size=64, rngs=nnx.Rngs(0))


def test_fashion_net_stands_on_vgg16():
  """The box branch, ROI-Align and the heads read conv5_3: 512 channels, a 3 x 3 map at
  48 px (floor(48 / 16)), boxes in cells of 16 pixels."""
  model = fashion_net.FashionNet(backbone='vgg16', image_size=48, rngs=nnx.Rngs(0))
  assert (model.feature_size, model.feature_stride) == (3, 16)
  assert model.box_top_left.kernel.shape == (fashion_net.BOX_CHANNELS * 3 * 3, 2)
  assert model.attribute_classifier.kernel.shape == (512 * (1 + 3 * 3), 1000)
  images = jax.random.randint(jax.random.PRNGKey(0), (2, 48, 48, 3), 0, 256).astype(jnp.uint8)
  outputs = nnx.jit(lambda model, images: model(images))(model, images)
  assert {k: v.shape for k, v in outputs.items()} == {
      'box': (2, 4), 'category_logits': (2, 50), 'attribute_logits': (2, 1000)}
  assert all(bool(jnp.isfinite(v).all()) for v in outputs.values())
  with pytest.raises(ValueError, match='smaller than one cell'):
    fashion_net.FashionNet(backbone='vgg16', image_size=15, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('shape', [(2, 7, 9, 3), (2, 8, 6, 3), (1, 1, 1, 2), (1, 2, 3, 1)])
def test_vgg_max_pool_value_and_gradient_are_reduce_windows(shape):
  # Many ties (ReLU'd small integers): each window's gradient goes to its first maximum in
  # row-major order, as XLA's select-and-scatter and PyTorch route it; odd sizes floor.
  rng = np.random.default_rng(0)
  x = jnp.asarray(np.maximum(rng.integers(-2, 3, shape), 0), jnp.float32)
  reference = lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
  out = vgg.max_pool_2x2(x)
  np.testing.assert_array_equal(out, reference(x))
  g = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  np.testing.assert_array_equal(jax.vjp(vgg.max_pool_2x2, x)[1](g)[0],
                                jax.vjp(reference, x)[1](g)[0])


def test_small_maps_add_the_bias():
  # VGG's convolutions have a bias; maps of <= 2 x 2 take xla_cpu.Conv's matrix product.
  conv = vgg.conv3x3(4, 5, jnp.float32, nnx.Rngs(0))
  conv.bias[...] = jnp.arange(5.0)
  plain = nnx.Conv(4, 5, (3, 3), padding=((1, 1), (1, 1)), rngs=nnx.Rngs(1))
  plain.kernel[...], plain.bias[...] = conv.kernel[...], conv.bias[...]
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 2, 4)), jnp.float32)
  np.testing.assert_allclose(conv(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_activations_in_dtype_parameters_and_outputs_in_float32(dtype):
  model = fashion_net.FashionNet(image_size=64, dtype=dtype, rngs=nnx.Rngs(0))
  # Jitted: one compilation is quicker than running the model op by op.
  run = nnx.jit(lambda model, images: (model.backbone(jnp.zeros((1, 64, 64, 3), dtype)),
                                       model(images)))
  stages, outputs = run(model, jnp.zeros((2, 64, 64, 3), jnp.uint8))
  assert stages['layer4'].dtype == dtype
  dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Any(nnx.Param,
                                                                      nnx.BatchStat)))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert all(v.dtype == jnp.float32 for v in outputs.values())
  assert all(bool(jnp.isfinite(v).all()) for v in outputs.values())


def test_uint8_images_are_normalised_like_the_baseline():
  images = jnp.array([[[[0, 128, 255]]]], jnp.uint8)
  np.testing.assert_allclose(fashion_net.normalize_images(images, jnp.float32),
                             [[[[-1.0, 128 / 255 * 2 - 1, 1.0]]]], atol=1e-6)


def test_imagenet_normalisation_uses_torchvisions_mean_and_std():
  images = jnp.array([[[[0, 128, 255], [10, 20, 30]]]], jnp.uint8)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  expected = (np.asarray(images) / 255.0 - mean) / std
  np.testing.assert_allclose(fashion_net.normalize_images(images, jnp.float32, 'imagenet'),
                             expected, rtol=1e-5, atol=1e-5)
  model = fashion_net.FashionNet(image_size=64, normalization='imagenet', rngs=nnx.Rngs(0))
  model.eval()
  pixels = jax.random.randint(jax.random.PRNGKey(1), (2, 64, 64, 3), 0, 256).astype(jnp.uint8)
  np.testing.assert_allclose(
      model(pixels)['attribute_logits'],
      model(fashion_net.normalize_images(pixels, jnp.float32, 'imagenet'))['attribute_logits'],
      rtol=1e-6)


def test_per_garment_type_head_is_type_times_category_given_type():
  model = fashion_net.FashionNet(image_size=64, category_head='per_garment_type',
                                 category_types=vocabulary.CATEGORY_TYPES, rngs=nnx.Rngs(0))
  images = jax.random.randint(jax.random.PRNGKey(0), (3, 64, 64, 3), 0, 256).astype(jnp.uint8)
  outputs = nnx.jit(lambda model, images: model(images))(model, images)
  p_type = jax.nn.softmax(outputs['garment_type_logits'])
  p_category = jax.nn.softmax(outputs['category_logits'])
  np.testing.assert_allclose(p_category.sum(axis=1), 1.0, rtol=1e-5)
  types = np.array(vocabulary.CATEGORY_TYPES)
  for t in range(3):
    columns = np.flatnonzero(types == t)
    within = jax.nn.softmax(outputs['category_logits_within_type'][:, columns])
    np.testing.assert_allclose(p_category[:, columns], p_type[:, t:t + 1] * within, rtol=1e-5)
    np.testing.assert_allclose(p_category[:, columns].sum(axis=1), p_type[:, t], rtol=1e-5)


@pytest.mark.parametrize('flows', [False, True])
def test_box_gradient_into_roi_is_an_option(flows):
  model = fashion_net.FashionNet(image_size=64, box_gradient_into_roi=flows, rngs=nnx.Rngs(0))
  images = jax.random.randint(jax.random.PRNGKey(1), (2, 64, 64, 3), 0, 256).astype(jnp.uint8)

  def category_loss(model):  # reaches the box branch only through the pooled box
    return model(images)['category_logits'].sum()

  grads = nnx.jit(nnx.grad(category_loss))(model)
  box_grad = jnp.abs(grads.box_top_left.kernel[...]).sum()
  assert (box_grad > 0) == flows


def test_bad_options_are_refused():
  with pytest.raises(ValueError, match='roi_pool must be one of'):
    fashion_net.FashionNet(image_size=64, roi_pool='max', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='category_head must be one of'):
    fashion_net.FashionNet(image_size=64, category_head='tree', rngs=nnx.Rngs(0))


def _lax_conv(kernel, x, stride, pad):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('size,kernel,stride', [(1, 3, 1), (2, 3, 1), (2, 1, 1), (3, 3, 2),
                                                (4, 3, 2), (4, 1, 2), (3, 3, 1)])
def test_small_maps_convolve_like_lax_conv(size, kernel, stride):
  # Output maps of <= 2 x 2 take the matrix-product path; 3 x 3 -> 3 x 3 takes lax's.
  conv = resnet.conv(8, 5, kernel, stride, jnp.float32, nnx.Rngs(0))
  graphdef, state = nnx.split(conv)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, size, size, 8)), jnp.float32)
  ours = lambda w, x: nnx.merge(graphdef, jax.tree.map(lambda _: w, state))(x)
  reference = lambda w, x: _lax_conv(w, x, stride, kernel // 2)
  w = conv.kernel[...]
  np.testing.assert_allclose(ours(w, x), reference(w, x), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda w, x: (f(w, x) ** 2 * jnp.arange(5)).sum()
  for g, g_ref in zip(jax.grad(loss(ours), (0, 1))(w, x), jax.grad(loss(reference), (0, 1))(w, x)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size,in_features,kernel,stride', [
    (9, 3, 7, 2), (8, 4, 3, 1), (8, 4, 3, 2), (7, 4, 3, 2), (8, 4, 1, 2), (7, 4, 1, 2),
    (6, 4, 1, 1)])
def test_convolution_gradients_are_lax_convolutions(size, in_features, kernel, stride):
  # Jitted as the training step compiles on CPU. The weight gradient is the same
  # convolution as lax's, on operands laid out for XLA: equal bit for bit. The input
  # gradient of a 3 x 3 stride-2 convolution on even maps is summed by phases: equal up to
  # rounding; every other input gradient is lax's own.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, size, size + 2, in_features)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, in_features, 5)), jnp.float32)
  pad = ((kernel // 2,) * 2,) * 2
  ours = lambda x, w: xla_cpu.conv_general_dilated(x, w, (stride, stride), pad,
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  reference = lambda x, w: _lax_conv(w, x, stride, kernel // 2)
  loss = lambda f: lambda x, w: (jnp.sin(f(x, w)) * jnp.arange(5)).sum()
  jit = lambda f: jax.jit(f, compiler_options=xla_cpu.CPU_COMPILER_OPTIONS)
  grads = [jit(jax.grad(loss(f), (0, 1)))(x, w) for f in (ours, reference)]
  np.testing.assert_array_equal(ours(x, w), reference(x, w))
  np.testing.assert_array_equal(grads[0][1], grads[1][1])
  if kernel == 3 and stride == 2 and size % 2 == 0:
    np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
  else:
    np.testing.assert_array_equal(grads[0][0], grads[1][0])


def test_backbone_convolutions_take_the_custom_gradient(monkeypatch):
  monkeypatch.setenv(xla_cpu.SWITCH, '1')  # whatever the suite runs with
  conv = resnet.conv(4, 5, 3, 2, jnp.bfloat16, nnx.Rngs(0))
  x = jnp.ones((2, 8, 8, 4), jnp.bfloat16)
  assert 'custom_vjp_call' in str(jax.make_jaxpr(conv)(x))
  # bfloat16 too: the gradient stays within bfloat16's rounding of lax's.
  w = conv.kernel[...].astype(jnp.bfloat16)
  f = lambda g: lambda w: (g(x, w).astype(jnp.float32) ** 2).sum()
  ours = jax.grad(f(lambda x, w: xla_cpu.conv_general_dilated(
      x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))))(w)
  theirs = jax.grad(f(lambda x, w: _lax_conv(w, x, 2, 1)))(w)
  np.testing.assert_allclose(ours.astype(np.float32), theirs.astype(np.float32), rtol=2e-2)
  # Anything but a plain NHWC convolution is lax's, untouched.
  dilated = lambda x: xla_cpu.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), lhs_dilation=(2, 2),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert 'custom_vjp_call' not in str(jax.make_jaxpr(dilated)(x))
  assert dilated(x).shape == (2, 15, 15, 5)


@pytest.mark.parametrize('shape', [(2, 7, 9, 3), (2, 8, 6, 3), (1, 1, 1, 2), (1, 2, 3, 1)])
def test_max_pool_value_and_gradient_are_reduce_windows(shape):
  # Inputs with many ties (ReLU'd small integers): the gradient must go to each window's
  # first maximum in row-major order, as XLA's select-and-scatter (and PyTorch) route it.
  rng = np.random.default_rng(0)
  x = jnp.asarray(np.maximum(rng.integers(-2, 3, shape), 0), jnp.float32)
  reference = lambda x: nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  out = xla_cpu.max_pool_3x3_stride_2(x)
  np.testing.assert_array_equal(out, reference(x))
  g = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  ours = jax.vjp(xla_cpu.max_pool_3x3_stride_2, x)[1](g)[0]
  theirs = jax.vjp(reference, x)[1](g)[0]
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
  # Every output's gradient lands on exactly one input: nothing is split between ties.
  ones = jax.vjp(xla_cpu.max_pool_3x3_stride_2, x)[1](jnp.ones_like(out))[0]
  assert set(np.unique(np.asarray(ones))) <= set(range(10))


def test_max_pool_gradient_reaches_every_window_when_xla_recomputes_its_input():
  """Jitted, XLA may compute the pool's input (here a batch norm and ReLU, as the stem's)
  once for the forward and again for the backward, rounded differently: each window's
  gradient must still reach one input, the one lax's own gradient picks."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 56, 56, 16)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(4, 28, 28, 16)), jnp.float32)
  reference = lambda y: nnx.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

  def gradient(pool):
    def loss(x):
      normalised = (x - x.mean(axis=(0, 1, 2))) * jax.lax.rsqrt(x.var(axis=(0, 1, 2)) + 1e-5)
      return jnp.vdot(pool(jax.nn.relu(normalised * 1.3 + 0.1)), g)
    return jax.jit(jax.grad(loss))(x)

  np.testing.assert_allclose(gradient(xla_cpu.max_pool_3x3_stride_2), gradient(reference),
                             rtol=1e-4, atol=1e-5)


def test_batch_norm_running_statistics_follow_pytorchs():
  """After training-mode steps, running mean and variance equal nn.BatchNorm2d's, whose
  variance follows the unbiased batch variance."""
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(0).normal(2.0, 3.0, size=(3, 2, 5, 4)).astype(np.float32)
  theirs = torch.nn.BatchNorm2d(4)
  ours = resnet.batch_norm(4, jnp.float32, nnx.Rngs(0))
  for step in range(2):
    batch = x * (1 + step)
    expected = theirs(torch.from_numpy(batch.transpose(0, 3, 1, 2))).detach().numpy()
    out = ours(jnp.asarray(batch), use_running_average=False)
    np.testing.assert_allclose(out, expected.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ours.mean[...], theirs.running_mean.numpy(), rtol=1e-5)
  np.testing.assert_allclose(ours.var[...], theirs.running_var.numpy(), rtol=1e-5)


def test_a_backbone_option_is_refused_by_a_backbone_that_has_none_naming_the_field():
  with pytest.raises(ValueError, match=re.escape(
      'config.model.drop_path=0.1: ResNet-18 has no such option; leave it at 0.0')):
    fashion_net.FashionNet(backbone='resnet18', drop_path=0.1, image_size=64,
                           rngs=nnx.Rngs(0))
