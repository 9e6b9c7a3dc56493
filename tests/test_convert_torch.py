"""Baseline and torchvision checkpoints, in both of torch.save's formats, load into the Flax
model and compute the same; files that are not checkpoints, or not for the configured model,
are refused with a message that says why."""

import collections
import dataclasses
import json
import os
import pickle
import re
import struct
import tracemalloc
import subprocess
import sys
import zipfile

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

torch = pytest.importorskip('torch')

from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
from deepfashion_jax import checkpoints
from deepfashion_jax import convert_torch
from deepfashion_jax import errors
from deepfashion_jax import torch_io
from deepfashion_jax.models import fashion_net
from deepfashion_jax.torch_io import reader
from tests import helpers

# torch.save's zip format (PyTorch >= 1.6) and its legacy format (what PyTorch < 1.6 wrote).
FORMATS = ('zip', 'legacy')
NEITHER_FORMAT = re.escape("not a PyTorch checkpoint: neither torch.save's zip format "
                           '(PyTorch >= 1.6) nor its legacy format (PyTorch < 1.6)')
# torch_reference.resnet_layers' positions -> torchvision's ResNet module names.
TORCHVISION_RESNET_MODULES = {'0': 'conv1', '1': 'bn1', '4': 'layer1', '5': 'layer2',
                              '6': 'layer3', '7': 'layer4'}


def _save(obj, path, file_format='zip'):
  torch.save(obj, path, _use_new_zipfile_serialization=file_format == 'zip')
  return path


def _reference_model(depth, feature_size, seed=0):
  """The baseline's model in PyTorch, in eval mode, with non-trivial batch-norm statistics."""
  torch.manual_seed(seed)
  model = torch_reference.FashionResnet(depth, feature_size)
  with torch.no_grad():
    torch_reference.randomise_batch_norm(model, torch.Generator().manual_seed(seed))
  return model.eval()


def _baseline_checkpoint(tmp_path, depth=18, feature_size=3, file_format='zip', *, seed=0,
                         data_parallel=False):
  """The baseline's `epoch_7.pth` ({'model', 'optim', 'epoch'}) written by torch.save."""
  model = _reference_model(depth, feature_size, seed)
  state = (torch.nn.DataParallel(model) if data_parallel else model).state_dict()
  optimiser = torch.optim.Adam(model.parameters(), lr=2e-4)
  checkpoint = {'model': state, 'optim': optimiser.state_dict(), 'epoch': 7}
  return model, _save(checkpoint, str(tmp_path / 'epoch_7.pth'), file_format)


def _relative_error(ours, reference):
  return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


def _assert_converts_with_parity(reference, path, depth=18, image_size=72):
  """The file loads into a FashionNet that computes what `reference` computes."""
  model = fashion_net.FashionNet(backbone=f'resnet{depth}', image_size=image_size,
                                 roi_pool='baseline_max', rngs=nnx.Rngs(1))
  assert torch_io.load_into(model, path) == torch_io.Loaded('baseline', 'model', 7)
  model.eval()
  images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    category, attributes, box = (t.numpy() for t in reference(images))
  outputs = model(jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
  # Our category j (0-based) is the baseline's logit j + 1; the last category never wins.
  assert _relative_error(outputs['category_logits'][:, :49], category[:, 1:]) < 1e-4
  assert (np.asarray(outputs['category_logits'][:, 49]) < category.min() - 100).all()
  assert _relative_error(outputs['attribute_logits'], attributes) < 1e-4
  assert _relative_error(outputs['box'], box) < 1e-4


def _assert_same_content(ours, theirs, where='checkpoint'):
  """read_pth's result holds what torch.load's does: the same containers, keys and values."""
  if isinstance(theirs, torch.Tensor):
    expected = theirs.detach().resolve_neg().resolve_conj().numpy()
    assert isinstance(ours, np.ndarray) and ours.dtype == expected.dtype, where
    np.testing.assert_array_equal(ours, expected, err_msg=where)
  elif isinstance(theirs, dict):
    assert list(ours) == list(theirs), where
    for key, value in theirs.items():
      _assert_same_content(ours[key], value, f'{where}[{key!r}]')
  elif isinstance(theirs, (list, tuple)):
    assert type(ours) is type(theirs) and len(ours) == len(theirs), where
    for i, (mine, value) in enumerate(zip(ours, theirs)):
      _assert_same_content(mine, value, f'{where}[{i}]')
  else:
    assert ours == theirs, where


# --------------------------------------------------------------------- conversion and parity


# The baseline's default, ResNet-18, at its 224 px; ResNet-50's bottlenecks at 96 px (at 224 its
# two forward passes cost make test 20 s).
@pytest.mark.parametrize('depth, image_size, file_format', [
    pytest.param(18, 224, 'zip', marks=pytest.mark.slow), (50, 96, 'legacy'), (18, 96, 'zip'),
    (18, 96, 'legacy')])
def test_converted_baseline_computes_what_the_baseline_computes(tmp_path, depth, image_size,
                                                                file_format):
  reference, path = _baseline_checkpoint(tmp_path, depth, -(-image_size // 32), file_format)
  _assert_converts_with_parity(reference, path, depth, image_size)


@pytest.mark.parametrize('file_format', FORMATS)
def test_a_checkpoint_saved_on_a_gpu_converts(tmp_path, saves_as_on_a_gpu, file_format):
  reference, path = _baseline_checkpoint(tmp_path, file_format=file_format)
  with open(path, 'rb') as f:
    content = f.read()
  assert b'X\x06\x00\x00\x00cuda:0' in content and b'X\x03\x00\x00\x00cpu' not in content
  if not torch.cuda.is_available():
    with pytest.raises(RuntimeError, match='CUDA'):
      torch.load(path, weights_only=False)
  _assert_converts_with_parity(reference, path)


@pytest.mark.parametrize('file_format', FORMATS)
def test_a_data_parallel_state_dict_converts(tmp_path, file_format):
  reference, path = _baseline_checkpoint(tmp_path, file_format=file_format, data_parallel=True)
  assert all(k.startswith('module.') for k in reader.read_pth(path)['model'])
  _assert_converts_with_parity(reference, path)


@pytest.mark.parametrize('prefix, file_format', [('', 'zip'), ('module.', 'legacy')])
def test_torchvision_state_dict_initialises_the_backbone(tmp_path, prefix, file_format):
  layers, _ = torch_reference.resnet_layers(18)
  backbone = torch.nn.Sequential(*layers)
  with torch.no_grad():
    torch_reference.randomise_batch_norm(backbone, torch.Generator().manual_seed(0))
  backbone.eval()
  names = TORCHVISION_RESNET_MODULES
  state_dict = {prefix + names[k.split('.', 1)[0]] + '.' + k.split('.', 1)[1]: v
                for k, v in backbone.state_dict().items()}
  state_dict[prefix + 'fc.weight'] = torch.zeros(1000, 512)
  state_dict[prefix + 'fc.bias'] = torch.zeros(1000)
  path = _save(state_dict, str(tmp_path / 'resnet18.pth'), file_format)

  model = fashion_net.FashionNet(backbone='resnet18', image_size=64, rngs=nnx.Rngs(0))
  assert torch_io.load_into(model, path) == torch_io.Loaded('torchvision', 'backbone')
  model.eval()
  images = torch.randn(2, 3, 64, 64)
  with torch.no_grad():
    expected = backbone(images).numpy().transpose(0, 2, 3, 1)
  got = model.backbone(jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))['layer4']
  assert _relative_error(got, expected) < 1e-4


def _torchvision_vgg(name, seed=0):
  """torchvision's `vgg16` or `vgg16_bn` (a small classifier, same keys) in eval mode, with
  random convolution biases and batch-norm statistics, so that a wrong mapping shows."""
  torch.manual_seed(seed)
  model = torch_reference.VGG(batch_norm=name == 'vgg16_bn', hidden=8)
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    torch_reference.randomise_batch_norm(model, generator)
    for module in model.features:
      if isinstance(module, torch.nn.Conv2d):
        module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
  return model.eval()


@pytest.mark.parametrize('name, prefix, file_format', [
    ('vgg16', '', 'zip'), ('vgg16_bn', 'module.', 'legacy')])
def test_torchvision_vgg_state_dict_initialises_the_backbone(tmp_path, name, prefix,
                                                             file_format):
  """A torchvision VGG-16(-BN) state dict, its classifier included, loads as
  --config.init_from does; conv4_3 and conv5_3 are then torchvision's. At 40 px the
  pools floor 5 to 2: conv4_3 is 5 x 5, conv5_3 2 x 2."""
  reference = _torchvision_vgg(name)
  state_dict = {prefix + k: v for k, v in reference.state_dict().items()}
  assert any(k.startswith(prefix + 'classifier.') for k in state_dict)
  path = _save(state_dict, str(tmp_path / f'{name}.pth'), file_format)

  model = fashion_net.FashionNet(backbone=name, image_size=40, rngs=nnx.Rngs(0))
  assert torch_io.load_into(model, path) == torch_io.Loaded('torchvision', 'backbone')
  model.eval()
  images = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    expected = torch_reference.vgg_feature_maps(reference, images)
  got = model.backbone(jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
  for stage, side in (('conv4_3', 5), ('conv5_3', 2)):
    reference_map = expected[stage].numpy().transpose(0, 2, 3, 1)
    assert got[stage].shape == reference_map.shape == (2, side, side, 512)
    # Measured: ~1e-6 in both, the maps' largest values being 0.5 to 3.
    assert np.abs(np.asarray(got[stage]) - reference_map).max() < 1e-4, stage
    assert _relative_error(got[stage], reference_map) < 1e-4, stage


# ------------------------------------------------------------------------ what read_pth reads


@pytest.mark.parametrize('file_format', FORMATS)
@pytest.mark.parametrize('optimiser_class', [torch.optim.Adam, torch.optim.SGD])
def test_optimiser_state_and_extra_keys_are_read_and_ignored(tmp_path, file_format,
                                                             optimiser_class):
  reference = _reference_model(18, 2)
  optimiser = optimiser_class(reference.parameters(), lr=2e-4, **(
      {'momentum': 0.9} if optimiser_class is torch.optim.SGD else {}))
  sum((p ** 2).sum() for p in reference.parameters()).backward()
  optimiser.step()  # so that the state holds exp_avg (Adam) or momentum_buffer (SGD) tensors
  checkpoint = {'model': reference.state_dict(), 'optim': optimiser.state_dict(), 'epoch': 7,
                'args': {'lr': 2e-4, 'name': 'resnet18', 'betas': (0.9, 0.999)}}
  path = _save(checkpoint, str(tmp_path / 'epoch_7.pth'), file_format)
  assert optimiser.state_dict()['state'][0]  # the optimiser state is not empty

  _assert_same_content(reader.read_pth(path), torch.load(path, weights_only=False))
  model = fashion_net.FashionNet(backbone='resnet18', image_size=64, roi_pool='baseline_max',
                                 rngs=nnx.Rngs(0))
  assert torch_io.load_into(model, path) == torch_io.Loaded('baseline', 'model', 7)


@pytest.mark.parametrize('file_format', FORMATS)
def test_every_tensor_torch_pickles_is_read(tmp_path, file_format):
  """Parameters (with and without Python attributes), tensors with attributes, lazily negated
  views, strided views sharing a storage, scalars, empty tensors and other dtypes."""
  linear = torch.nn.Linear(3, 2)
  linear.weight.note = 'a Parameter with Python state'
  grid = torch.arange(24.).reshape(4, 6)
  tagged = torch.ones(2, 2)
  tagged.note = 'a tensor with Python state'
  content = {'parameters': linear.state_dict(keep_vars=True), 'tagged': tagged,
             'views': [grid.T, grid[1:, 2:], grid[::2, ::3]],
             'negated': torch._neg_view(grid[0]),  # pylint: disable=protected-access
             'scalar': torch.tensor(5), 'empty': torch.zeros(0, 3),
             'dtypes': [torch.arange(3, dtype=t) for t in
                        (torch.float16, torch.float64, torch.int8, torch.uint8, torch.int32)]
                       + [torch.tensor([True, False])]}
  path = _save(content, str(tmp_path / 'tensors.pth'), file_format)
  with open(path, 'rb') as f:
    pickled = f.read()
  for rebuild in (b'_rebuild_parameter\n', b'_rebuild_parameter_with_state',
                  b'_rebuild_from_type_v2'):
    assert rebuild in pickled
  _assert_same_content(reader.read_pth(path), torch.load(path, weights_only=False))


@pytest.mark.parametrize('file_format', FORMATS)
def test_broadcasts_and_shared_storages_cost_only_their_storages(tmp_path, file_format):
  """torch.save of an expanded tensor (1 GiB seen, 4 bytes stored) and of 256 slices of one
  1 MiB vector reads as torch.load reads it, each tensor a read-only view into its storage."""
  vector = torch.arange(2.0**18)
  content = {'expanded': torch.zeros(1).expand(16384, 16384), 'vector': vector,
             'slices': [vector[i:] for i in range(256)]}
  path = _save(content, str(tmp_path / 'views.pth'), file_format)
  tracemalloc.start()
  try:
    ours = reader.read_pth(path)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 3 * 2**20  # the vector's storage (1 MiB) and the pickle's objects
  assert ours['expanded'].shape == (16384, 16384) and ours['expanded'].strides == (0, 0)
  assert all(np.shares_memory(ours['vector'], s) for s in ours['slices'])
  assert not any(s.flags.writeable for s in ours['slices'])
  theirs = torch.load(path)
  assert theirs['expanded'].stride() == (0, 0) and not ours['expanded'].any()
  _assert_same_content(ours['slices'] + [ours['vector']], theirs['slices'] + [theirs['vector']])


@dataclasses.dataclass
class _OldTensor:
  """A float tensor as PyTorch 0.4-1.5 pickled it: `_rebuild_tensor` (4 args) or
  `_rebuild_tensor_v2` (6 args), optionally inside `_rebuild_parameter`, its storage a
  `torch.cuda.FloatStorage` on 'cuda:1', optionally through a view (offset, size) into it."""
  rebuild: str
  offset: int
  size: tuple
  stride: tuple
  view: tuple | None = None

  def __reduce__(self):
    rebuilds = torch._utils  # pylint: disable=protected-access
    storage = _OldStorage(self.view)
    if self.rebuild == 'parameter':
      data = dataclasses.replace(self, rebuild='v2')
      return rebuilds._rebuild_parameter, (data, True, collections.OrderedDict())
    if self.rebuild == 'v1':
      return rebuilds._rebuild_tensor, (storage, self.offset, self.size, self.stride)
    return rebuilds._rebuild_tensor_v2, (storage, self.offset, self.size, self.stride, False,
                                         collections.OrderedDict())


@dataclasses.dataclass
class _OldStorage:
  view: tuple | None


def _write_pytorch_1x_legacy_file(path, obj, storage):
  """torch.serialization._legacy_save as PyTorch 1.0-1.5 ran it, for one float storage that
  every `_OldTensor` in `obj` lives in: torch 2.13 no longer pickles these rebuild functions."""

  class Pickler(pickle.Pickler):

    def persistent_id(self, obj):
      if not isinstance(obj, _OldStorage):
        return None
      view = None if obj.view is None else ('140000002', *obj.view)
      return ('storage', torch.cuda.FloatStorage, '140000001', 'cuda:1', storage.size, view)

  sys_info = {'protocol_version': 1001, 'little_endian': True,
              'type_sizes': {'short': 2, 'int': 4, 'long': 8}}
  with open(path, 'wb') as f:
    for header in (0x1950a86a20f9469cfc6c, 1001, sys_info):
      pickle.dump(header, f, protocol=2)
    Pickler(f, protocol=2).dump(obj)
    pickle.dump(['140000001'], f, protocol=2)
    f.write(struct.pack('<q', storage.size) + storage.astype('<f4').tobytes())


def test_a_legacy_file_of_pytorch_1x_is_read(tmp_path):
  storage = np.arange(12, dtype=np.float32)
  obj = {'model': collections.OrderedDict([
      ('v1', _OldTensor('v1', 2, (2, 3), (3, 1))),
      ('v2', _OldTensor('v2', 0, (3, 2), (1, 3))),
      ('parameter', _OldTensor('parameter', 6, (6,), (1,))),
      ('in_a_view', _OldTensor('v2', 1, (2, 2), (1, 2), view=(4, 6)))]), 'epoch': 3}
  path = str(tmp_path / 'old.pth')
  _write_pytorch_1x_legacy_file(path, obj, storage)
  content = reader.read_pth(path)
  expected = {'v1': storage[2:8].reshape(2, 3), 'v2': storage[:6].reshape(2, 3).T,
              'parameter': storage[6:], 'in_a_view': storage[5:9].reshape(2, 2).T}
  assert content['epoch'] == 3 and list(content['model']) == list(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(content['model'][key], value, err_msg=key)


# ------------------------------------------------------------------------------ refusals


class _RunsCode:
  """Unpickles as a call of os.system."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


@pytest.mark.parametrize('file_format', FORMATS)
def test_code_in_a_pickle_is_not_run(tmp_path, file_format):
  """A checkpoint whose pickle names a callable outside the allow-list is refused before
  anything runs."""
  marker = tmp_path / 'ran'
  path = _save({'model': {'x': torch.zeros(1)}, 'epoch': _RunsCode(marker)},
               str(tmp_path / 'evil.pth'), file_format)
  with pytest.raises(torch_io.CheckpointError, match=r'posix\.system is not allowed'):
    reader.read_pth(path)
  assert not marker.exists()


def test_a_pickle_cannot_change_how_the_next_file_is_read(tmp_path):
  """BUILD sets attributes on whatever a pickle names: here the defaults of the function
  that rebuilds tensors, so that, were it shared, every later tensor would come out negated."""
  defaults = pickle.dumps((False, None, {'neg': True}), protocol=2)[2:-1]  # no PROTO, STOP
  poison = (b'\x80\x02ctorch._utils\n_rebuild_tensor_v2\n'  # PROTO 2, GLOBAL
            b'N}X\x0c\x00\x00\x00__defaults__' + defaults +  # None, {'__defaults__': ...
            b's\x86b.')  # SETITEM, TUPLE2: (None, {...}); BUILD; STOP
  path = tmp_path / 'poison.pth'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', poison)
  try:
    reader.read_pth(str(path))
  except torch_io.CheckpointError:
    pass
  good = _save({'x': torch.ones(2)}, str(tmp_path / 'good.pth'))
  np.testing.assert_array_equal(reader.read_pth(good)['x'], [1, 1])


@pytest.mark.parametrize('content', [
    b'not a checkpoint\n', bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8)),
    pickle.dumps({'model': {}, 'epoch': 1}), pickle.dumps(0x1950a86a20f9469cfc6c + 1)],
                         ids=['text', 'random', 'pickle', 'wrong-magic'])
def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, content):
  path = tmp_path / 'notes.pth'
  path.write_bytes(content)
  with pytest.raises(torch_io.CheckpointError, match=NEITHER_FORMAT):
    reader.read_pth(str(path))


@pytest.mark.parametrize('end', [300, -100], ids=['in-the-pickle', 'in-the-storages'])
def test_a_truncated_legacy_file_is_refused(tmp_path, end):
  """The file: 137 bytes of header pickles, the object's pickle to byte ~420, the keys,
  then 40 bytes of `b` and 4,000 of `w` (each after its 8-byte count)."""
  path = _save({'model': {'w': torch.arange(1000.), 'b': torch.zeros(10)}, 'epoch': 1},
               str(tmp_path / 'cut.pth'), 'legacy')
  with open(path, 'rb') as f:
    content = f.read()
  with open(path, 'wb') as f:
    f.write(content[:end])
  with pytest.raises(torch_io.CheckpointError, match='cut.pth: .*truncated'):
    reader.read_pth(path)


def test_wrong_depth_is_named(tmp_path):
  _, path = _baseline_checkpoint(tmp_path, 18, 2)
  model = fashion_net.FashionNet(backbone='resnet34', image_size=64, rngs=nnx.Rngs(0))
  with pytest.raises(torch_io.CheckpointError,
                     match=re.escape("holds a ResNet-18 backbone; the configured model is "
                                     "ResNet-34 (config.model.backbone='resnet34')")):
    torch_io.load_into(model, path)


def _torchvision_keys_only(name):
  """The keys of torchvision's state dict of backbone `name`, classifier included, each
  holding one zero: all a file needs to say what it holds."""
  if name.startswith('vgg'):
    keys = list(torch_reference.VGG(batch_norm=name == 'vgg16_bn', hidden=8).state_dict())
  else:
    layers, _ = torch_reference.resnet_layers(int(name.removeprefix('resnet')))
    keys = [TORCHVISION_RESNET_MODULES[k.split('.', 1)[0]] + '.' + k.split('.', 1)[1]
            for k in torch.nn.Sequential(*layers).state_dict()] + ['fc.weight', 'fc.bias']
  return {key: torch.zeros(1) for key in keys}


@pytest.mark.parametrize('held, configured', [
    ('vgg16', 'resnet18'), ('vgg16_bn', 'vgg16'), ('resnet50', 'resnet18'),
    ('resnet18', 'vgg16_bn')])
def test_a_torchvision_file_of_another_backbone_is_refused(tmp_path, held, configured):
  path = _save(_torchvision_keys_only(held), str(tmp_path / f'{held}.pth'))
  model = nnx.eval_shape(lambda: fashion_net.FashionNet(backbone=configured, image_size=64,
                                                        rngs=nnx.Rngs(0)))
  titles = {'vgg16': 'VGG-16', 'vgg16_bn': 'VGG-16-BN', 'resnet18': 'ResNet-18',
            'resnet50': 'ResNet-50'}
  with pytest.raises(torch_io.CheckpointError, match=re.escape(
      f'{path} holds a {titles[held]} backbone; the configured model is {titles[configured]} '
      f"(config.model.backbone='{configured}'): set --config.model.backbone={held}")):
    torch_io.load_into(model, path)


def _imagenet_normalised(model):
  model.normalization = 'imagenet'
  return model


@pytest.mark.parametrize('roi_pool, image_size, adjust, message', [
    ('align', 72, None, "roi_pool=baseline_max (config.model.roi_pool is 'align')"),
    ('baseline_max', 72, _imagenet_normalised,
     "normalization=baseline (config.data.normalization is 'imagenet')"),
    ('baseline_max', 96, None, 'crop_size=224 (config.data.crop_size gives 3x3'),
], ids=['roi_pool', 'normalization', 'crop_size'])
def test_a_baseline_checkpoint_needs_the_baseline_config(tmp_path, roi_pool, image_size,
                                                         adjust, message):
  _, path = _baseline_checkpoint(tmp_path, feature_size=7 if image_size == 96 else 3)
  model = fashion_net.FashionNet(backbone='resnet18', image_size=image_size, roi_pool=roi_pool,
                                 rngs=nnx.Rngs(0))
  model = adjust(model) if adjust else model
  with pytest.raises(torch_io.CheckpointError, match=f'--config.*{re.escape(message)}'):
    torch_io.load_into(model, path)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
  reference = _reference_model(18, 2)
  state = reference.state_dict()
  del state['fc_bin.bias']
  state['extra_head.weight'] = torch.zeros(3)
  path = _save({'model': state, 'optim': {}, 'epoch': 1}, str(tmp_path / 'edited.pth'))
  model = fashion_net.FashionNet(backbone='resnet18', image_size=64, roi_pool='baseline_max',
                                 rngs=nnx.Rngs(0))
  with pytest.raises(torch_io.CheckpointError,
                     match=r"unexpected \['extra_head.weight'\]; "
                           r"missing \['attribute_classifier.bias'\]"):
    torch_io.load_into(model, path)


@pytest.mark.slow
def test_convert_writes_a_checkpoint_that_holds_the_baseline(tmp_path, saves_as_on_a_gpu,
                                                             synthetic_folder):
  """A checkpoint as the baseline's users have them (PyTorch < 1.6's format, saved from a
  GPU, through nn.DataParallel) converts, evaluates and predicts (on a data folder named
  explicitly: a converted model is never scored on a synthetic stand-in by default)."""
  torch = pytest.importorskip('torch')
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from deepfashion_jax import evaluate  # pylint: disable=g-import-not-at-top
  reference = torch_reference.FashionResnet(18, feature_size=3)  # 72 px
  path = str(tmp_path / 'epoch_3.pth')
  optimiser = torch.optim.Adam(reference.parameters())
  torch.save({'model': torch.nn.DataParallel(reference).state_dict(),
              'optim': optimiser.state_dict(), 'epoch': 3}, path,
             _use_new_zipfile_serialization=False)
  config = test_config.get_config()
  config.ema_decay = 0.9  # the moving average starts from the converted weights
  workdir = str(tmp_path / 'converted')
  # roi_pool='align' as the user's own flag is refused, before anything is written ...
  with pytest.raises(errors.ConfigError, match=re.escape(
      "--config.model.roi_pool=align (its weights need 'baseline_max')")):
    convert_torch.convert(config, workdir, path, given={'model.roi_pool'})
  assert os.listdir(workdir) == ['.lock']  # the lock it held, and nothing else
  # ... and as the config file's default, set to the baseline's by itself.
  assert convert_torch.convert(config, workdir, path) == 0
  config.data.data_dir = synthetic_folder[0]
  assert config.model.roi_pool == 'align'  # the caller's config is left as it was
  saved = checkpoints.read_metadata(checkpoints.create_manager(workdir, read_only=True),
                                   0).config
  assert (saved['model.roi_pool'], saved['data.normalization']) == ('baseline_max', 'baseline')
  results = evaluate.evaluate_checkpoint(config, workdir)
  assert 0 <= results['category_top5'] <= 1 and os.path.isfile(
      os.path.join(workdir, 'eval_val_0.json'))
  state = helpers.saved_state(workdir, 0)
  kernel = np.asarray(state['params']['backbone']['conv1']['kernel']['value'])
  np.testing.assert_array_equal(
      kernel, reference.state_dict()['basemodel.0.weight'].numpy().transpose(2, 3, 1, 0))
  for saved, average in zip(jax.tree.leaves(state['params']),
                            jax.tree.leaves(state['ema_params'])):
    np.testing.assert_array_equal(np.asarray(saved), np.asarray(average))
  # Prediction uses the converted checkpoint directly, with the baseline's pooling even
  # when the config names another (the checkpoint's config wins, with a warning).
  from deepfashion_jax import predict  # pylint: disable=g-import-not-at-top
  photo = str(tmp_path / 'photo.jpg')
  Image.new('RGB', (120, 200), (200, 30, 30)).save(photo)
  config.model.roi_pool = 'align'
  with open(predict.predict(config, workdir, photo, str(tmp_path / 'out'))) as f:
    line = json.loads(f.readline())
  assert line['path'] == photo and len(line['categories']) == 5 and os.path.isfile(line['figure'])


def _imagenet_resnet50_config():
  """The user's config as a baseline checkpoint's would not have it: ImageNet's
  normalisation, ROI-Align, ResNet-50, 72 px crops."""
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.model.backbone, config.data.normalization = 'resnet50', 'imagenet'
  return config


def test_convert_sets_what_a_baseline_checkpoint_needs(tmp_path, caplog):
  """Backbone, pooling, normalisation and a crop size whose maps its box branch reads (a
  7x7 box branch: 224 px), in one log line; the caller's config is left as it was."""
  _, path = _baseline_checkpoint(tmp_path, 18, feature_size=7)
  config = _imagenet_resnet50_config()
  with caplog.at_level('INFO'):
    fitted = convert_torch.fitted_config(config, torch_io.read(path), path)
  assert (fitted.model.backbone, fitted.model.roi_pool, fitted.data.normalization,
          fitted.data.crop_size) == ('resnet18', 'baseline_max', 'baseline', 224)
  assert fitted.data.img_size == 224  # was 80: training's resize is never below its crop
  assert (config.model.backbone, config.data.crop_size) == ('resnet50', 72)
  [line] = [r.getMessage() for r in caplog.records if 'baseline checkpoint' in r.getMessage()]
  assert "config.model.roi_pool='baseline_max'" in line and 'config.data.crop_size=224' in line


@pytest.mark.parametrize('given, refused', [
    ({'model.roi_pool'}, "--config.model.roi_pool=align (its weights need 'baseline_max')"),
    ({'data.crop_size', 'data.normalization'},
     "--config.data.normalization=imagenet (its weights need 'baseline'); "
     '--config.data.crop_size=72 (its weights need 224)'),
])
def test_convert_refuses_a_flag_the_user_gave_that_the_checkpoint_contradicts(tmp_path, given,
                                                                             refused):
  _, path = _baseline_checkpoint(tmp_path, 18, feature_size=7)
  with pytest.raises(errors.ConfigError, match=re.escape(refused)):
    convert_torch.fitted_config(_imagenet_resnet50_config(), torch_io.read(path), path, given)


def test_a_torchvision_file_fits_any_config(tmp_path):
  """torchvision's backbones fill the backbone only: nothing to set."""
  path = _save({'fc.weight': torch.zeros(2, 2)}, str(tmp_path / 'imagenet.pth'))
  config = _imagenet_resnet50_config()
  assert convert_torch.fitted_config(config, torch_io.read(path), path) is config


def test_main_refuses_a_flag_that_contradicts_the_checkpoint_in_one_line(tmp_path):
  """main.py passes the --config.x overrides it was given as the fields the user set; the
  refusal comes before any model is built, as one line and exit status 2."""
  _, path = _baseline_checkpoint(tmp_path, 18, feature_size=3)
  command = [sys.executable, os.path.join(helpers.ROOT, 'main.py'), '--config=configs/test.py',
             f'--workdir={tmp_path / "run"}', '--mode=convert', f'--torch_checkpoint={path}',
             '--config.model.roi_pool=align']
  result = subprocess.run(command, cwd=helpers.ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f'main.py: error: {path} is a baseline checkpoint, which these flags do not fit: '
      "--config.model.roi_pool=align (its weights need 'baseline_max'). Drop them: "
      '--mode=convert sets what the file needs')
