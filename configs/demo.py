"""The embedded default: a small synthetic DeepFashion written into the workdir."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.synthetic_images = 1000  # written once into <workdir>/synthetic_deepfashion
  return config
