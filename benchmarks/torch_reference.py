"""A PyTorch reference of the baseline's FashionResnet, written from docs/baseline.md.

Plain torch modules named so that the state-dict keys are the baseline's (`basemodel.0.weight`,
`basemodel.4.0.conv1.weight`, ..., `reduce_1x1.*`, `fc_bbox_xy.*`, `fc_cls.*`, `fc_bin.*`);
torchvision is not needed. Used by the tests, to check the conversion and the model, and by
the benchmarks that run the baseline's step (train_step, compare_baseline). Also torchvision's
VGG-16 and VGG-16-BN (`VGG`), with torchvision's layer names, for the VGG backbone's tests.
"""

import torch
from torch import nn
import torch.nn.functional as F

BLOCKS = {18: ('basic', (2, 2, 2, 2)), 34: ('basic', (3, 4, 6, 3)),
          50: ('bottleneck', (3, 4, 6, 3))}


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = downsample

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


def resnet_layers(depth):
  """torchvision's ResNet as a list: conv1, bn1, relu, maxpool, layer1..layer4."""
  kind, counts = BLOCKS[depth]
  block = BasicBlock if kind == 'basic' else Bottleneck
  layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1)]
  inplanes = 64
  for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), counts)):
    blocks = []
    for i in range(count):
      stride = 2 if stage > 0 and i == 0 else 1
      downsample = None
      if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion))
      blocks.append(block(inplanes, planes, stride, downsample))
      inplanes = planes * block.expansion
    layers.append(nn.Sequential(*blocks))
  return layers, inplanes


def torchvision_resnet_init(module):
  """What torchvision's ResNet does to its modules on construction: convolutions
  kaiming-normal over fan-out, batch norm weight 1 and bias 0."""
  for m in module.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
    elif isinstance(m, nn.BatchNorm2d):
      nn.init.constant_(m.weight, 1)
      nn.init.constant_(m.bias, 0)


class FashionResnet(nn.Module):
  """The baseline model: box branch, integer-box max-pooled local features, two heads.

  Initialised as the baseline's: a torchvision ResNet's own initialisation for the
  backbone, PyTorch's defaults for reduce_1x1 and the linear layers."""

  def __init__(self, depth=18, feature_size=7):
    super().__init__()
    layers, channels = resnet_layers(depth)
    self.basemodel = nn.Sequential(*layers)
    torchvision_resnet_init(self.basemodel)
    self.reduce_1x1 = nn.Conv2d(channels, 32, 1)
    self.fc_bbox_xy = nn.Linear(32 * feature_size ** 2, 2)
    self.fc_bbox_offset = nn.Linear(32 * feature_size ** 2, 2)
    self.fc_cls = nn.Linear(10 * channels, 50)
    self.fc_bin = nn.Linear(10 * channels, 1000)

  def forward(self, x):
    features = self.basemodel(x)
    flat = self.reduce_1x1(features).flatten(1)
    xy = torch.sigmoid(self.fc_bbox_xy(flat))
    box = torch.cat([xy, xy + torch.sigmoid(self.fc_bbox_offset(flat))], 1)
    side = features.shape[-1] - 1
    local = []
    for b in range(x.shape[0]):
      x1, y1, x2, y2 = (int(v) for v in (box[b] * side).tolist())
      crop = features[b:b + 1, :, y1:y2 + 1, x1:x2 + 1]
      local.append(F.adaptive_max_pool2d(crop, 3).flatten(1))
    joined = torch.cat([features.mean(dim=(2, 3)), torch.cat(local, 0)], 1)
    return self.fc_cls(joined), self.fc_bin(joined), box


def randomise_batch_norm(model, generator):
  """Non-trivial running statistics and affine terms, so that a wrong mapping shows."""
  for module in model.modules():
    if isinstance(module, nn.BatchNorm2d):
      n = module.num_features
      module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
      module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
      module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
      module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


# torchvision's cfgs['D'] (VGG-16): a convolution's output channels, or 'M' for a max pool.
VGG16_LAYOUT = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M',
                512, 512, 512, 'M')


class VGG(nn.Module):
  """torchvision's VGG-16 (`vgg16`; with batch_norm `vgg16_bn`), written from
  torchvision/models/vgg.py: the same modules under the same names (`features.<i>`,
  `avgpool`, `classifier.<i>`), so that its state dict has torchvision's keys, and
  torchvision's initialisation. `hidden` sizes the classifier's two hidden layers
  (torchvision: 4096); the tests make it small, which keeps their files 0.5 GB smaller
  and changes no key."""

  def __init__(self, batch_norm=False, num_classes=1000, hidden=4096):
    super().__init__()
    layers, in_channels = [], 3
    for entry in VGG16_LAYOUT:
      if entry == 'M':
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        continue
      layers.append(nn.Conv2d(in_channels, entry, kernel_size=3, padding=1))
      if batch_norm:
        layers.append(nn.BatchNorm2d(entry))
      layers.append(nn.ReLU(inplace=True))
      in_channels = entry
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(0.5),
        nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(0.5),
        nn.Linear(hidden, num_classes))
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        nn.init.constant_(m.bias, 0)
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)
      elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        nn.init.constant_(m.bias, 0)

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg_feature_maps(model, x) -> dict:
  """Each block's last convolution after its ReLU, by name ('conv1_2', ..., 'conv5_3'),
  read off `model.features` as it runs: the map the ReLU before each max pool gives."""
  maps, block, convolution, last = {}, 1, 0, None
  for layer in model.features:
    x = layer(x)
    if isinstance(layer, nn.Conv2d):
      convolution += 1
    elif isinstance(layer, nn.ReLU):
      last = x
    elif isinstance(layer, nn.MaxPool2d):
      maps[f'conv{block}_{convolution}'] = last
      block, convolution = block + 1, 0
  return maps
