"""Baseline and torchvision checkpoints load into the Flax model and compute the same."""

import os
import sys

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from deepfashion_jax import convert_torch  # pylint: disable=g-import-not-at-top
from deepfashion_jax.models import fashion_net
sys.path.insert(0, os.path.dirname(__file__))
import torch_reference  # pylint: disable=g-import-not-at-top


def _baseline_checkpoint(tmp_path, depth, feature_size, seed=0):
  generator = torch.Generator().manual_seed(seed)
  torch.manual_seed(seed)
  model = torch_reference.FashionResnet(depth, feature_size)
  with torch.no_grad():
    torch_reference.randomise_batch_norm(model, generator)
  model.eval()
  path = str(tmp_path / 'epoch_7.pth')
  optimiser = torch.optim.Adam(model.parameters(), lr=2e-4)
  torch.save({'model': model.state_dict(), 'optim': optimiser.state_dict(), 'epoch': 7}, path)
  return model, path


def _relative_error(ours, reference):
  return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize('depth, image_size', [(18, 224), (50, 224), (18, 96)])
def test_converted_baseline_computes_what_the_baseline_computes(tmp_path, depth, image_size):
  feature_size = -(-image_size // 32)
  reference, path = _baseline_checkpoint(tmp_path, depth, feature_size)
  model = fashion_net.FashionNet(backbone=depth, image_size=image_size,
                                 roi_pool='baseline_max', rngs=nnx.Rngs(1))
  assert convert_torch.load_baseline_into(model, path) == 7
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


def test_torchvision_state_dict_initialises_the_backbone(tmp_path):
  layers, _ = torch_reference.resnet_layers(18)
  backbone = torch.nn.Sequential(*layers)
  with torch.no_grad():
    torch_reference.randomise_batch_norm(backbone, torch.Generator().manual_seed(0))
  backbone.eval()
  names = {'0': 'conv1', '1': 'bn1', '4': 'layer1', '5': 'layer2', '6': 'layer3',
           '7': 'layer4'}
  state_dict = {names[k.split('.', 1)[0]] + '.' + k.split('.', 1)[1]: v
                for k, v in backbone.state_dict().items()}
  state_dict['fc.weight'], state_dict['fc.bias'] = torch.zeros(1000, 512), torch.zeros(1000)
  path = str(tmp_path / 'resnet18.pth')
  torch.save(state_dict, path)

  model = fashion_net.FashionNet(backbone=18, image_size=64, rngs=nnx.Rngs(0))
  convert_torch.load_torchvision_backbone_into(model, path)
  model.eval()
  images = torch.randn(2, 3, 64, 64)
  with torch.no_grad():
    expected = backbone(images).numpy().transpose(0, 2, 3, 1)
  got = model.backbone(jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))['layer4']
  assert _relative_error(got, expected) < 1e-4


def test_wrong_depth_is_named(tmp_path):
  _, path = _baseline_checkpoint(tmp_path, 18, 2)
  model = fashion_net.FashionNet(backbone=34, image_size=64, rngs=nnx.Rngs(0))
  with pytest.raises(convert_torch.CheckpointError,
                     match='holds a ResNet-18 backbone; the configured model is ResNet-34'):
    convert_torch.load_baseline_into(model, path)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
  reference, _ = _baseline_checkpoint(tmp_path, 18, 2)
  state = reference.state_dict()
  del state['fc_bin.bias']
  state['extra_head.weight'] = torch.zeros(3)
  path = str(tmp_path / 'edited.pth')
  torch.save({'model': state, 'optim': {}, 'epoch': 1}, path)
  model = fashion_net.FashionNet(backbone=18, image_size=64, rngs=nnx.Rngs(0))
  with pytest.raises(convert_torch.CheckpointError,
                     match=r"unexpected \['extra_head.weight'\]; missing \['fc_bin.bias'\]"):
    convert_torch.load_baseline_into(model, path)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
  path = tmp_path / 'notes.pth'
  path.write_text('not a checkpoint')
  model = fashion_net.FashionNet(backbone=18, image_size=64, rngs=nnx.Rngs(0))
  with pytest.raises(convert_torch.CheckpointError, match='not a PyTorch checkpoint'):
    convert_torch.load_baseline_into(model, str(path))


def test_code_in_a_pickle_is_not_run(tmp_path):
  """A checkpoint whose pickle names another callable is refused before anything runs."""
  path = str(tmp_path / 'evil.pth')
  torch.save({'model': {'x': torch.zeros(1)}, 'epoch': os.getpid}, path)
  with pytest.raises(convert_torch.CheckpointError, match='posix.getpid is not allowed'):
    convert_torch.read_pth(path)
