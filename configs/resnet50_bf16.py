"""A GPU recipe: ResNet-50 in bfloat16, large batch, cosine schedule, ImageNet start.

Set config.data.data_dir, and config.init_from to torchvision's ImageNet ResNet-50
weights (resnet50-*.pth) for the published-style start.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.backbone = 'resnet50'
  config.data.normalization = 'imagenet'  # what torchvision's ImageNet weights expect
  config.dtype = 'bfloat16'  # activations; parameters, statistics and losses stay float32
  config.batch_size = 256
  config.learning_rate = 1e-3  # Adam, scaled up with the batch from the baseline's 2e-4 at 32
  config.schedule = 'cosine'
  config.warmup_steps = 1_000
  config.num_train_steps = 40_000  # ~49 epochs of the official training split
  config.eval_every_steps = 2_000
  config.checkpoint_every_steps = 2_000
  config.eval.batch_size = 512
  config.data.threads = 4  # per worker process
  config.data.processes = 8  # grain worker processes: a GPU host has the cores
  return config
