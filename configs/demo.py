"""The embedded default: trains a small ResNet-18 on a synthetic DeepFashion written into
the workdir, in under 10 minutes on a 2-core CPU (see README.md for what it reaches)."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.synthetic_images = 6000  # written once into <workdir>/synthetic_deepfashion
  # Small images, for a 2-core CPU (64 px is no cheaper: benchmarks/RESULTS.md).
  # No random crop (img_size = crop_size): flips only, so no crop cuts off the sleeves or
  # the hem that tell the synthetic categories apart.
  config.data.img_size = 72
  config.data.crop_size = 72
  config.batch_size = 32
  config.num_train_steps = 1000
  config.learning_rate = 1e-3
  config.schedule = 'cosine'
  config.warmup_steps = 50
  config.loss.reduce_sum = False  # mean attribute loss, so the category and box also learn
  config.loss.beta = 1.0
  config.log_every_steps = 50
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 500
  config.eval.batch_size = 64
  return config
