"""A tiny configuration for the test suite: a few dozen small synthetic images."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.synthetic_images = 60
  return config
