"""deepfashion-jax entry point: flags in, one call per mode.

  python main.py --config=configs/demo.py --workdir=runs/demo            # train (or resume)
  python main.py --config=configs/demo.py --workdir=runs/demo --mode=evaluate
  python main.py --config=configs/default.py --workdir=DIR --mode=convert \\
      --torch_checkpoint=epoch_200.pth --config.model.roi_pool=baseline_max
  python main.py --config=configs/demo.py --workdir=runs/demo --mode=predict \\
      --images=photo.jpg,more_photos/ --output_dir=predictions
  python main.py --config=configs/demo.py --workdir=runs/demo --mode=export \\
      --output_dir=serving/deepfashion/1    # a TensorFlow SavedModel (docs/command_line.md)
  python main.py --config=configs/demo.py --workdir=runs/demo --mode=describe
  python main.py --config=configs/default.py --workdir=DIR --mode=prepare \\
      --config.data.data_dir=/path/to/DeepFashion [--config.data.tfds_dir=OUT]
  python main.py --config=... --workdir=SHARED_DIR --coordinator_address=host0:1234 \\
      --num_processes=2 --process_id=0    # and =1 on the second host (docs/multihost.md)
"""

import logging as python_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from deepfashion_jax import convert_torch
from deepfashion_jax import data
from deepfashion_jax import evaluate
from deepfashion_jax import predict
from deepfashion_jax import run_lock
from deepfashion_jax import sharding
from deepfashion_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and generated data.')
flags.DEFINE_enum('mode', 'train',
                  ['train', 'evaluate', 'convert', 'predict', 'export', 'describe', 'prepare'],
                  'train: train and evaluate, resuming from the newest checkpoint; '
                  'evaluate: a checkpoint on config.eval.split; convert: a PyTorch checkpoint '
                  'into the workdir; predict: a checkpoint on your own photos; export: a '
                  'checkpoint as a TensorFlow SavedModel for serving; describe: load '
                  '(or write) the dataset and summarise it; prepare: write the dataset as '
                  'TFDS ArrayRecord files (config.data.tfds_dir) for config.data.source=tfds.')
flags.DEFINE_string('torch_checkpoint', None, '--mode=convert: the .pth file to convert.')
flags.DEFINE_string('images', None, '--mode=predict: comma-separated image files and/or '
                    'folders (searched recursively for images).')
flags.DEFINE_string('output_dir', None, '--mode=predict: where predictions.jsonl and the '
                    'figures go; --mode=export: the SavedModel folder (saved_model.pb, '
                    'variables/).')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0, where '
                    "JAX's coordinator listens (with --num_processes and --process_id).")
flags.DEFINE_integer('num_processes', None, 'Multi-host: how many processes in all.')
flags.DEFINE_integer('process_id', None, 'Multi-host: this process, from 0.')
flags.mark_flags_as_required(['config', 'workdir'])


def prepare(config, workdir: str):
  """Writes the configured folder's official partition as a TFDS dataset."""
  if config.data.partition != 'official':
    raise app.UsageError('--mode=prepare writes the official partition: drop '
                         f'--config.data.partition={config.data.partition}')
  with run_lock.hold(workdir, 'prepare'):  # it may write the synthetic folder there
    print('prepared', data.prepare_tfds(config, workdir))


def _quiet_checkpointing_logs(record) -> bool:
  """Orbax logs a dozen INFO lines per save; keep its warnings and errors only."""
  return record.levelno >= python_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_quiet_checkpointing_logs)
  sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
  config, workdir = FLAGS.config, FLAGS.workdir
  if FLAGS.mode == 'train':
    try:
      train.train_and_evaluate(config, workdir)
    except train.Preempted as e:
      logging.error('%s', e)
      sys.exit(train.Preempted.EXIT_STATUS)
  elif FLAGS.mode == 'evaluate':
    evaluate.evaluate_checkpoint(config, workdir)
  elif FLAGS.mode == 'convert':
    if not FLAGS.torch_checkpoint:
      raise app.UsageError('--mode=convert needs --torch_checkpoint=FILE.pth')
    convert_torch.convert(config, workdir, FLAGS.torch_checkpoint)
  elif FLAGS.mode == 'predict':
    if FLAGS.images is None or not FLAGS.output_dir:
      raise app.UsageError('--mode=predict needs --images=PATHS and --output_dir=DIR')
    print('written to', predict.predict(config, workdir, FLAGS.images, FLAGS.output_dir))
  elif FLAGS.mode == 'export':
    if not FLAGS.output_dir:
      raise app.UsageError('--mode=export needs --output_dir=DIR')
    from deepfashion_jax import export  # pylint: disable=g-import-not-at-top  (TensorFlow: slow)
    print('written to', export.export(config, workdir, FLAGS.output_dir))
  elif FLAGS.mode == 'prepare':
    prepare(config, workdir)
  else:
    print(data.summary(config, workdir))


if __name__ == '__main__':
  app.run(main)
