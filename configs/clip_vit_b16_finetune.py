"""CLIP's ViT-B/16 image tower (OpenAI's weights) fine-tuned the way CLIP towers are.

Meant to be set beside configs/clip_vit_b16_probe.py (the same tower frozen: what
fine-tuning adds over CLIP's own features) and configs/convnext_tiny.py, in the same
protocol as configs/published_protocol.py (ground-truth box crops at 224, the test split).

The recipe follows the published fine-tuning of CLIP towers (FT-CLIP, Dong et al. 2022, and
BEiT's): AdamW with weight decay 0.05 (none on norms, biases, position embeddings and the
class token), layer-wise learning-rate decay 0.65 (the patch embedding learns at
0.65^14 of the heads' rate, the last block at 0.65^2), stochastic depth 0.1, a cosine
schedule after a warm-up, and a moving average of the weights evaluated beside them; the
batch and the rate scaled down to one GPU's. Pixels are scaled with CLIP's statistics.
Weights: downloaded once by name (docs/pretrained.md).
"""

from configs import published_protocol


def get_config():
  config = published_protocol.get_config()
  config.init_from = 'open_clip:ViT-B-16/openai'
  config.model.backbone = 'clip_vit_b16'
  config.model.drop_path = 0.1
  config.data.normalization = 'clip'  # what CLIP's image tower was trained on
  config.layer_decay = 0.65
  config.batch_size = 64
  config.learning_rate = 3e-4  # the heads'; each block below gets 0.65x the one above
  config.weight_decay = 0.05
  config.schedule = 'cosine'
  config.warmup_steps = 1_000
  config.num_train_steps = 10 * 3_269  # 10 epochs of 209,222 training images at batch 64
  config.eval_every_steps = 3_269  # after every epoch
  config.checkpoint_every_steps = 3_200
  config.ema_decay = 0.9998
  return config
