"""The baseline's best recipe on the real DeepFashion folder (set config.data.data_dir)."""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0  # seeds initialisation, data order and augmentation

  config.data = ml_collections.ConfigDict()
  config.data.data_dir = ''  # DeepFashion folder holding Anno/, Eval/ and Img/ (or img/)
  config.data.cache_dir = ''  # parsed-annotation cache; '' = annotation_cache/ next to the workdir
  config.data.split = 'official'  # 'official' partition, or 'baseline' (random 90/5/5, seed 0)
  config.data.synthetic_images = 0  # > 0 and data_dir empty: write a synthetic folder of this size
  config.data.synthetic_seed = 0  # seed of the synthetic folder
  config.data.synthetic_quirks = False  # add the real release's bad files to the synthetic folder
  config.data.img_size = 256  # training: resize to img_size x img_size, then ...
  config.data.crop_size = 224  # ... a random crop_size crop (and flip); the model's input side
  config.data.canvas_size = 300  # side of the uint8 canvas each decoded image is sent in
  config.data.eval_crop = 'resize'  # evaluation: 'resize' to crop_size (baseline) or 'center_crop'
  config.data.strict = False  # raise on an unreadable image instead of skipping it
  config.data.threads = 2  # decoding threads per process (libjpeg-turbo releases the GIL)
  config.data.processes = 0  # grain worker processes (0: decode in the main process)
  return config
