"""A linear probe of CLIP's ViT-B/16 image tower (OpenAI's weights): the tower frozen, the
heads trained on its features.

What CLIP's features know about clothes without being taught: meant to be set beside
configs/clip_vit_b16_finetune.py (the same tower fine-tuned: what training it adds) and
configs/convnext_tiny.py (an ImageNet backbone fine-tuned), in the same protocol as
configs/published_protocol.py (ground-truth box crops at 224, the test split).

Frozen (config.model.trainable='heads'): no gradient is computed through the tower and it
runs in inference mode, so a step costs about a forward pass of the tower. The heads are
this codebase's: the box branch and the category and attribute classifiers on the tower's
global feature (the class token after ln_post and CLIP's projection, 512 wide) joined with
ROI-Align features pooled from the patch-token map. Pixels are scaled with CLIP's own
statistics. Weights: downloaded once by name (docs/pretrained.md).
"""

from configs import published_protocol


def get_config():
  config = published_protocol.get_config()
  config.init_from = 'open_clip:ViT-B-16/openai'
  config.model.backbone = 'clip_vit_b16'
  config.model.trainable = 'heads'
  config.data.normalization = 'clip'  # what CLIP's image tower was trained on
  config.batch_size = 64
  config.learning_rate = 1e-3  # only the heads train: a probe's rate
  config.weight_decay = 0.0
  config.schedule = 'cosine'
  config.warmup_steps = 500
  config.num_train_steps = 10 * 3_269  # 10 epochs of 209,222 training images at batch 64
  config.eval_every_steps = 3_269  # after every epoch
  config.checkpoint_every_steps = 3_200
  return config
