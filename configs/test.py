"""A tiny configuration for the test suite: a few dozen small synthetic images."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.synthetic_images = 60
  config.batch_size = 8
  config.num_train_steps = 6
  # 72, not 64: at 64 px ResNet's last stage runs on 2 x 2 maps, which XLA:CPU convolves
  # slowly (models/xla_cpu.py).
  config.data.img_size = 80
  config.data.crop_size = 72
  config.data.threads = 1
  config.log_every_steps = 2
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 2
  config.eval.batch_size = 8
  config.num_box_images = 2
  return config
