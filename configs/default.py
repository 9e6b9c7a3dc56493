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
  return config
