"""A PyTorch reference of Liu & Lu 2018's `WholeNetwork` ("Deep Fashion Analysis with
Feature Map Upsampling and Landmark-driven Attention", their public code: GitHub
fdjingyuan/Deep-Fashion-Analysis-ECCV2018, src/networks.py, src/lm_networks.py,
src/base_networks.py), written from the facts of that code, without torchvision.

The modules carry their names and nest as theirs do, so that a state dict of this model has
exactly the keys of a checkpoint their training writes (`torch.save(net.state_dict())`):
  __step                                    ModuleWithAttr's training-step buffer
  vgg16_extractor.vgg.<i>.weight / .bias    torchvision's vgg16().features, all 13 convs
  lm_branch.conv1 .. conv10, upconv1 .. 3   LandmarkBranchUpsample(512)
  attention_pred_net.model.model.<i>...     CustomUnetGenerator(513, 512, num_downs=2,
                                            ngf=32, last_act='tanh'), nested blocks
  conv5_1, conv5_2, conv5_3                 their own conv5 (initialised from vgg.24/26/28)
  category_fc1, category_fc2, attr_fc1, attr_fc2
  attr_loss_func.weight                     the attribute loss's class weights (0.1, 1)
and the U-Net's batch norms' `num_batches_tracked` (written by PyTorch 0.4.1 and later).

What they compute, for an ImageNet-normalised image (B, 3, S, S), S = 224 in their code:
  conv4_3 = features[0..22] (the extractor runs features[23..30] too, and nothing reads it)
  lm_pos_map = lm_branch(conv4_3), (B, 8, S, S)
  merged = max over the 8 maps, bilinear (align_corners=False) to conv4_3's side (28)
  attention_map = U-Net(cat([merged, conv4_3])), tanh, (B, 512, S/8, S/8)
  x = (1 + attention_map) * conv4_3; pool; ReLU(conv5_1..3); pool; flattened (NCHW)
  category_output = category_fc2(ReLU(category_fc1(x))), (B, num_categories; 48 in theirs)
  attr_output = attr_fc2(ReLU(attr_fc1(x))) as (B, 2, 1000): [:, 0] negative, [:, 1] positive
`image_size` and `num_categories` are parameters here (their 224 and 48 fixed); the
attribute reshape divides by 2 with `//` (theirs: `/`, a float, which PyTorch 2.13 refuses).

The U-Net's blocks activate their input in place (LeakyReLU(0.2, inplace=True)) before
saving it for the skip connection, so the skip carries the activated tensor; that is kept
here by the same in-place modules.
"""

import torch
from torch import nn
import torch.nn.functional as F

from benchmarks import torch_reference

# torchvision's vgg16().features indices of the maps their VGG16Extractor names.
EXTRACTOR_MAPS = {1: 'conv1_1', 3: 'conv1_2', 4: 'pooled_1', 6: 'conv2_1', 8: 'conv2_2',
                  9: 'pooled_2', 11: 'conv3_1', 13: 'conv3_2', 15: 'conv3_3', 16: 'pooled_3',
                  18: 'conv4_1', 20: 'conv4_2', 22: 'conv4_3', 23: 'pooled_4', 25: 'conv5_1',
                  27: 'conv5_2', 29: 'conv5_3', 30: 'pooled_5'}
LANDMARKS = 8
HIDDEN = 1024
ATTRIBUTES = 1000
UNET_FILTERS = 32  # their ngf
ATTRIBUTE_CLASS_WEIGHTS = (0.1, 1.0)  # their const.WEIGHT_ATTR_NEG, WEIGHT_ATTR_POS


def vgg16_features():
  """torchvision's `vgg16().features`: 31 modules, in-place ReLUs, 2 x 2 max pools."""
  layers, channels = [], 3
  for entry in torch_reference.VGG16_LAYOUT:
    if entry == 'M':
      layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      layers += [nn.Conv2d(channels, entry, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
      channels = entry
  return nn.Sequential(*layers)


class ModuleWithAttr(nn.Module):
  """Their base class: integer attributes kept as buffers named '__<key>' (the step)."""

  def __init__(self, keys=('step',)):
    super().__init__()
    for key in keys:
      self.register_buffer('__' + key, torch.tensor(0))


class VGG16Extractor(nn.Module):
  """`vgg` runs whole; the maps of EXTRACTOR_MAPS come back by name."""

  def __init__(self):
    super().__init__()
    self.vgg = vgg16_features()

  def forward(self, x):
    maps = {}
    for index, layer in enumerate(self.vgg):
      x = layer(x)
      if index in EXTRACTOR_MAPS:
        maps[EXTRACTOR_MAPS[index]] = x
    return maps


class LandmarkBranchUpsample(nn.Module):
  """Four convolutions, then three times a 4 x 4 stride-2 transposed convolution and 3 x 3
  convolutions, a 1 x 1 convolution to the 8 maps; ReLU after all but the last."""

  ORDER = ('conv1', 'conv2', 'conv3', 'conv4', 'upconv1', 'conv5', 'conv6', 'upconv2',
           'conv7', 'conv8', 'upconv3', 'conv9', 'conv10')

  def __init__(self, in_channels=256):
    super().__init__()
    conv = lambda i, o, k: nn.Conv2d(i, o, k, 1, k // 2)
    up = lambda i, o: nn.ConvTranspose2d(i, o, 4, 2, 1)
    self.conv1, self.conv2 = conv(in_channels, 64, 1), conv(64, 64, 3)
    self.conv3, self.conv4 = conv(64, 64, 3), conv(64, 128, 3)
    self.upconv1, self.conv5, self.conv6 = up(128, 64), conv(64, 64, 3), conv(64, 64, 3)
    self.upconv2, self.conv7, self.conv8 = up(64, 32), conv(32, 32, 3), conv(32, 32, 3)
    self.upconv3, self.conv9 = up(32, 16), conv(16, 16, 3)
    self.conv10 = conv(16, LANDMARKS, 1)

  def forward(self, x):
    for name in self.ORDER[:-1]:
      x = F.relu(getattr(self, name)(x))
    maps = self.conv10(x)
    # Their lm_pos_output (numpy on the argmax there): the highest pixel's (column, row)
    # divided by (width - 1, height - 1).
    batch, _, height, width = maps.shape
    index = maps.reshape(batch, LANDMARKS, -1).argmax(dim=2)
    rows, cols = index // width, index % width
    positions = torch.stack([cols / (width - 1), rows / (height - 1)], dim=2)
    return maps, positions


class UnetSkipConnectionBlock(nn.Module):
  """One level of their U-Net: `model` is an nn.Sequential whose indices give the state
  dict's keys. Outermost: [conv 1x1, inner block, ReLU, transposed conv 1x1, Tanh] and no
  skip; middle: [LeakyReLU, conv 4x4/2, BN, inner block, ReLU, transposed conv 4x4/2, BN];
  innermost: [LeakyReLU, conv 1x1, ReLU, transposed conv 1x1 (with bias), BN]. Convolutions
  are bias-free (BatchNorm follows) except the two transposed 1 x 1s. Middle and innermost
  return cat([input, model(input)]); their LeakyReLU runs in place, so the input the skip
  joins is the activated one."""

  def __init__(self, outer, inner, *, in_channels=None, submodule=None, kind='middle'):
    super().__init__()
    self.outermost = kind == 'outermost'
    in_channels = outer if in_channels is None else in_channels
    if kind == 'outermost':
      layers = [nn.Conv2d(in_channels, inner, 1, 1, 0, bias=False), submodule,
                nn.ReLU(True), nn.ConvTranspose2d(2 * inner, outer, 1, 1, 0), nn.Tanh()]
    elif kind == 'innermost':
      layers = [nn.LeakyReLU(0.2, True), nn.Conv2d(in_channels, inner, 1, 1, 0, bias=False),
                nn.ReLU(True), nn.ConvTranspose2d(inner, outer, 1, 1, 0),
                nn.BatchNorm2d(outer)]
    else:
      layers = [nn.LeakyReLU(0.2, True), nn.Conv2d(in_channels, inner, 4, 2, 1, bias=False),
                nn.BatchNorm2d(inner), submodule, nn.ReLU(True),
                nn.ConvTranspose2d(2 * inner, outer, 4, 2, 1, bias=False),
                nn.BatchNorm2d(outer)]
    self.model = nn.Sequential(*layers)

  def forward(self, x):
    if self.outermost:
      return self.model(x)
    return torch.cat([x, self.model(x)], 1)


class CustomUnetGenerator(nn.Module):
  """CustomUnetGenerator(in, out, num_downs, ngf, last_act='tanh'): an innermost block of
  ngf * 2^num_downs channels, num_downs middle blocks, the outermost."""

  def __init__(self, in_channels, out_channels, num_downs=2, ngf=UNET_FILTERS):
    super().__init__()
    width = ngf * 2 ** num_downs
    block = UnetSkipConnectionBlock(width, width, kind='innermost')
    for level in range(num_downs, 0, -1):
      block = UnetSkipConnectionBlock(ngf * 2 ** (level - 1), ngf * 2 ** level,
                                      submodule=block)
    self.model = UnetSkipConnectionBlock(out_channels, ngf, in_channels=in_channels,
                                         submodule=block, kind='outermost')

  def forward(self, x):
    return self.model(x)


class WholeNetwork(ModuleWithAttr):
  """Their network; forward takes the normalised images (theirs: sample['image'])."""

  def __init__(self, num_categories=48, image_size=224):
    super().__init__()
    side = image_size // 8  # conv4_3's (their LM_SELECT_VGG_SIZE, 28)
    self.vgg16_extractor = VGG16Extractor()
    self.lm_branch = LandmarkBranchUpsample(512)
    self.downsample = nn.Upsample((side, side), mode='bilinear', align_corners=False)
    self.attention_pred_net = CustomUnetGenerator(512 + 1, 512, num_downs=2,
                                                  ngf=UNET_FILTERS)
    self.pooled_4 = nn.MaxPool2d(kernel_size=2, stride=2)
    self.conv5_1 = nn.Conv2d(512, 512, 3, padding=1)
    self.conv5_2 = nn.Conv2d(512, 512, 3, padding=1)
    self.conv5_3 = nn.Conv2d(512, 512, 3, padding=1)
    for conv, index in ((self.conv5_1, 24), (self.conv5_2, 26), (self.conv5_3, 28)):
      conv.load_state_dict(self.vgg16_extractor.vgg[index].state_dict())
    self.pooled_5 = nn.MaxPool2d(kernel_size=2, stride=2)
    flat = 512 * (side // 4) ** 2  # 512 * 7 * 7 at 224 px
    self.category_fc1 = nn.Linear(flat, HIDDEN)
    self.category_fc2 = nn.Linear(HIDDEN, num_categories)
    self.attr_fc1 = nn.Linear(flat, HIDDEN)
    self.attr_fc2 = nn.Linear(HIDDEN, 2 * ATTRIBUTES)
    self.category_loss_func = nn.CrossEntropyLoss()
    self.attr_loss_func = nn.CrossEntropyLoss(weight=torch.tensor(ATTRIBUTE_CLASS_WEIGHTS))

  def forward(self, image):
    batch = image.shape[0]
    conv4_3 = self.vgg16_extractor(image)['conv4_3']
    lm_pos_map, lm_pos_output = self.lm_branch(conv4_3)
    merged = self.downsample(lm_pos_map.max(dim=1, keepdim=True)[0])
    attention_map = self.attention_pred_net(torch.cat([merged, conv4_3], dim=1))
    x = self.pooled_4((1 + attention_map) * conv4_3)
    for conv in (self.conv5_1, self.conv5_2, self.conv5_3):
      x = F.relu(conv(x))
    x = self.pooled_5(x).reshape(batch, -1)
    category = self.category_fc2(F.relu(self.category_fc1(x)))
    attributes = self.attr_fc2(F.relu(self.attr_fc1(x)))
    return {'category_output': category,
            'attr_output': attributes.reshape(batch, 2, attributes.shape[1] // 2),
            'lm_pos_output': lm_pos_output, 'lm_pos_map': lm_pos_map,
            'attention_map': attention_map}
