"""The embedded default: trains a small ResNet-18 on a synthetic DeepFashion written into
the workdir, in under 10 minutes on a 2-core CPU (see README.md for what it reaches)."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.synthetic_images = 6000  # written once into <workdir>/synthetic_deepfashion
  config.data.img_size = 92  # small images: a 2-core CPU trains ResNet-18 at ~58 images/s at 80 px
  config.data.crop_size = 80
  config.batch_size = 32
  config.num_train_steps = 800
  config.learning_rate = 1e-3
  config.schedule = 'cosine'
  config.warmup_steps = 50
  config.loss.reduce_sum = False  # mean attribute loss, so the category and box also learn
  config.loss.beta = 1.0
  config.log_every_steps = 50
  config.eval_every_steps = 400
  config.checkpoint_every_steps = 400
  config.eval.batch_size = 64
  return config
