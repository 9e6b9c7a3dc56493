"""deepfashion-jax entry point: flags in, one call per mode.

  python main.py --config=configs/demo.py --workdir=runs/demo --mode=describe
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from deepfashion_jax.data import folder

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and generated data.')
flags.DEFINE_enum('mode', 'describe', ['describe'],
                  'describe: load (or write) the dataset and print its summary.')
flags.mark_flags_as_required(['config', 'workdir'])


def describe(config, workdir: str):
  """Loads the configured DeepFashion folder (writing the synthetic one if need be)."""
  index = folder.load_index(config.data, workdir)
  print(index.summary())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  if FLAGS.mode == 'describe':
    describe(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
