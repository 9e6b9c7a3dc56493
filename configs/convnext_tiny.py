"""ConvNeXt-T from torchvision's ImageNet weights, in the published protocol's setting.

Meant to be set beside configs/published_protocol.py (VGG-16 from ImageNet weights, the
same crops and test split) and the published table that config cites (FashionNet 2016:
category top-3 82.58; Liu & Lu 2018: 91.16): the same protocol with a 2022 backbone. Each
image is cut to its ground-truth box and resized to 224 x 224; evaluation on the test split.

The recipe is the usual one for fine-tuning ConvNeXt (its paper's fine-tuning settings,
scaled to one GPU's batch): AdamW with weight decay 0.05 (none on norms, biases and layer
scales), a cosine schedule after a warm-up, stochastic depth 0.1, and a moving average of
the weights evaluated beside them. Its weights are downloaded once by name
(docs/pretrained.md); offline, the error says where to put the file.
"""

from configs import published_protocol


def get_config():
  config = published_protocol.get_config()
  config.init_from = 'torchvision:convnext_tiny'
  config.model.backbone = 'convnext_tiny'
  config.model.drop_path = 0.1
  config.data.normalization = 'imagenet'  # what torchvision's ImageNet weights expect
  config.batch_size = 32
  config.learning_rate = 1e-4
  config.weight_decay = 0.05
  config.schedule = 'cosine'
  config.warmup_steps = 2_000
  config.num_train_steps = 20 * 6_538  # 20 epochs of 209,222 training images at batch 32
  config.eval_every_steps = 6_538  # after every epoch
  config.checkpoint_every_steps = 6_500
  config.ema_decay = 0.9998
  return config
