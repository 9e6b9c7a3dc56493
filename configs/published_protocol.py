"""The benchmark's published setting (docs/protocols.md), beside the baseline's (default.py).

Its numbers are meant to be set beside the published table, measured the same way
(category top-3 / top-5 accuracy, attribute recall@3 / @5 on the test split, on inputs
cut to the ground-truth box): FashionNet (Liu et al. 2016) 82.58 / 90.17 and
45.52 / 54.61; Liu & Lu 2018 (landmark-driven attention) 91.16 / 96.12 and 54.69 / 63.74.

Taken from Liu & Lu 2018's public code (src/conf/whole.py, src/const.py, src/dataset.py):
VGG-16 from an ImageNet start with ImageNet pixel scaling; each image cut to its
ground-truth box (no margin) and resized to 224 x 224, aspect not kept, in training and
evaluation alike, without random crop or flip; Adam at 1e-4, x0.8 after every epoch, for
20 epochs of batch 16; evaluation on the test split.

Not in this config, so do not expect Liu & Lu's numbers from it: the landmarks and the
landmark-driven attention, and their heads and losses (fully connected layers on the
flattened conv5 features; a two-way cross-entropy per attribute weighted 0.1 / 1; loss
weights category 1, attributes 20): configs/landmark_attention.py has them. This config
keeps this codebase's FashionNet heads (global and ROI-Align local features on the
predicted box) and losses (BCE summed over attributes, box loss). Their training also restarts Adam's moments every epoch; ours
carries them over. mmfashion enlarges the box by 10 px: --config.data.crop_margin=10.

The ImageNet start: torchvision's VGG-16 weights (vgg16-397923af.pth, downloaded once)
as --config.init_from=PATH. Without them the backbone starts from scratch and the
figures are not comparable with the table's; from scratch, plain VGG-16 stayed at the
category prior on a synthetic folder at this learning rate while VGG-16-BN
(--config.model.backbone=vgg16_bn) learnt (benchmarks/RESULTS.md).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.backbone = 'vgg16'
  config.data.normalization = 'imagenet'  # what torchvision's ImageNet weights expect
  config.data.crop = 'gt_box'  # cut to the ground-truth box first ...
  config.data.crop_margin = 0.0  # ... as it is (Liu & Lu's BBOXRESIZE)
  config.data.img_size = 224  # ... then resized to 224 x 224: no random crop
  config.data.crop_size = 224
  config.data.random_flip = False
  config.data.eval_crop = 'resize'
  config.batch_size = 16
  config.optimizer = 'adam'
  config.learning_rate = 1e-4
  config.schedule = 'step_decay'
  config.decay_rate = 0.8
  config.decay_every_steps = 13_077  # one epoch: 209,222 training images / 16
  config.num_train_steps = 20 * 13_077  # 20 epochs
  config.eval_every_steps = 13_077  # after every epoch
  config.checkpoint_every_steps = 13_000
  config.eval.split = 'test'
  config.eval.batch_size = 32
  return config
