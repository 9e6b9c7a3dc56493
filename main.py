"""deepfashion-jax entry point: flags in, one call per mode.

  python main.py --config=configs/demo.py --workdir=runs/demo            # train (or resume)
  python main.py --config=configs/demo.py --workdir=runs/demo --mode=evaluate
  python main.py --config=configs/default.py --workdir=DIR --mode=convert \\
      --torch_checkpoint=epoch_200.pth
  python main.py --config=configs/demo.py --workdir=runs/demo --mode=predict \\
      --images=photo.jpg,more_photos/ --output_dir=predictions
  python main.py --config=configs/demo.py --workdir=runs/demo --mode=export \\
      --output_dir=serving/deepfashion/1    # a TensorFlow SavedModel (docs/command_line.md)
  python main.py --config=configs/demo.py --workdir=runs/compared --mode=compare \\
      --workdirs=runs/demo,runs/other    # two runs' evaluations side by side
  python main.py --config=configs/demo.py --workdir=runs/demo --mode=describe
  python main.py --config=configs/default.py --workdir=DIR --mode=prepare \\
      --config.data.data_dir=/path/to/DeepFashion [--config.data.tfds_dir=OUT]
  python main.py --config=... --workdir=SHARED_DIR --coordinator_address=host0:1234 \\
      --num_processes=2 --process_id=0    # and =1 on the second host (docs/multihost.md)
"""

import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from deepfashion_jax import console

console.import_tensorflow_quietly()  # before the modules below import it, noisily

# pylint: disable=g-import-not-at-top,wrong-import-position
from deepfashion_jax import compare
from deepfashion_jax import config_checks
from deepfashion_jax import convert_torch
from deepfashion_jax import data
from deepfashion_jax import errors
from deepfashion_jax import evaluate
from deepfashion_jax import predict
from deepfashion_jax import run_lock
from deepfashion_jax import sharding
from deepfashion_jax import train
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and generated data.')
flags.DEFINE_enum('mode', 'train',
                  ['train', 'evaluate', 'convert', 'predict', 'export', 'compare', 'describe',
                   'prepare'],
                  'train: train and evaluate, resuming from the newest checkpoint; '
                  'evaluate: a checkpoint on config.eval.split; convert: a PyTorch checkpoint '
                  'into the workdir; predict: a checkpoint on your own photos; export: a '
                  'checkpoint as a TensorFlow SavedModel for serving; compare: the '
                  'evaluations of --workdirs side by side, written into --workdir; describe: load '
                  '(or write) the dataset and summarise it; prepare: write the dataset as '
                  'TFDS ArrayRecord files (config.data.tfds_dir) for config.data.source=tfds.')
flags.DEFINE_string('torch_checkpoint', None, '--mode=convert: the .pth file to convert, or '
                    'a pretrained name such as torchvision:convnext_tiny (docs/pretrained.md).')
flags.DEFINE_string('images', None, '--mode=predict: comma-separated image files and/or '
                    'folders (searched recursively for images).')
flags.DEFINE_string('output_dir', None, '--mode=predict: where predictions.jsonl and the '
                    'figures go; --mode=export: the SavedModel folder (saved_model.pb, '
                    'variables/).')
flags.DEFINE_string('workdirs', None, '--mode=compare: the runs to compare, comma-separated '
                    '(A,B[,C]), each against the first.')
flags.DEFINE_bool('allow_protocol_differences', False, '--mode=compare: compare runs '
                  'evaluated another way (partition, split, crop, data folder, images) with a '
                  'warning and a banner on the page, instead of refusing them.')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0, where '
                    "JAX's coordinator listens (with --num_processes and --process_id).")
flags.DEFINE_integer('num_processes', None, 'Multi-host: how many processes in all.')
flags.DEFINE_integer('process_id', None, 'Multi-host: this process, from 0.')
flags.DEFINE_bool('verbose', False, "A wrong input (configuration, data, checkpoint) is one "
                  'message and exit status 2; with --verbose, its Python traceback too.')
flags.mark_flags_as_required(['config', 'workdir'])


def prepare(config, workdir: str):
  """Writes the configured folder's official partition as a TFDS dataset."""
  if config.data.partition != 'official':
    raise app.UsageError('--mode=prepare writes the official partition: drop '
                         f'--config.data.partition={config.data.partition}')
  with run_lock.hold(workdir, 'prepare'):  # it may write the synthetic folder there
    print('prepared', data.prepare_tfds(config, workdir))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  console.quiet_library_noise(logging.get_absl_handler())
  sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
  config, workdir = FLAGS.config, FLAGS.workdir
  config_checks.check(config)  # every mode, describe and prepare too: before anything is read
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
    convert_torch.convert(config, workdir, FLAGS.torch_checkpoint,
                          given=frozenset(config_flags.get_override_values(FLAGS['config'])))
  elif FLAGS.mode == 'predict':
    if FLAGS.images is None or not FLAGS.output_dir:
      raise app.UsageError('--mode=predict needs --images=PATHS and --output_dir=DIR')
    print('written to', predict.predict(config, workdir, FLAGS.images, FLAGS.output_dir))
  elif FLAGS.mode == 'export':
    if not FLAGS.output_dir:
      raise app.UsageError('--mode=export needs --output_dir=DIR')
    from deepfashion_jax import export  # pylint: disable=g-import-not-at-top  (TensorFlow: slow)
    print('written to', export.export(config, workdir, FLAGS.output_dir))
  elif FLAGS.mode == 'compare':
    if not FLAGS.workdirs:
      raise app.UsageError('--mode=compare needs --workdirs=A,B (the runs to compare)')
    compare.compare_runs(config, workdir, compare.parse_workdirs(FLAGS.workdirs),
                         FLAGS.allow_protocol_differences)
  elif FLAGS.mode == 'prepare':
    prepare(config, workdir)
  else:
    print(data.summary(config, workdir))


USER_ERROR_STATUS = 2  # a wrong input, said in one message (as argparse's usage errors)


def _exit_with_user_error(message: str):
  """Prints the project's own error (or a wrong flag) as one message and exits with 2."""
  print(f'main.py: error: {message}', file=sys.stderr, flush=True)
  sys.exit(USER_ERROR_STATUS)


def _user_errors_in_one_line(run_mode):
  """`run_mode`, with the project's own errors (errors.DeepFashionError: a wrong
  configuration, data folder, checkpoint or workdir) printed as their message alone, unless
  --verbose; any other error is a bug and keeps its traceback."""
  def run(argv):
    try:
      return run_mode(argv)
    except errors.DeepFashionError as e:
      if FLAGS.verbose:
        raise
      _exit_with_user_error(f'{e}')
  return run


def _config_argument(argv) -> str | None:
  """The value of --config in `argv` (--config=FILE or --config FILE; the last one, as absl
  takes), None if absent."""
  value = None
  for i, arg in enumerate(argv):
    if re.match(r'--?config=', arg):
      value = arg.split('=', 1)[1]
    elif re.fullmatch(r'--?config', arg) and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _unknown_override(argv) -> str | None:
  """'config.x: no such field in FILE; did you mean y?' for the first --config.x override
  that names no field of the --config file; None when every one names a field (or the file
  does not load: its own error says why)."""
  path = _config_argument(argv)
  try:
    config = FLAGS['config'].parser.parse(path)
    config.keys()
  except Exception:  # pylint: disable=broad-except  (the caller re-raises the first error)
    return None
  overrides = [m.group(1) for m in map(re.compile(r'--?(?:no)?config\.([^=]+)').match, argv)
               if m]
  try:
    config_checks.check_field_names(config, overrides, path)
  except errors.ConfigError as e:
    return f'{e}'
  return None


def parse_flags(argv):
  """absl's flag parsing, with a wrong flag (unknown, of the wrong type, or a --config.x
  override that names no field) as one line and exit status 2 instead of a traceback."""
  try:
    remaining = FLAGS(argv)
  except flags.Error as e:  # an unknown flag, a value of the wrong type
    _exit_with_user_error(f'{e}')
  except (AttributeError, KeyError, IndexError):  # config_flags: an override of no field
    message = _unknown_override(argv)
    if message is None or '--verbose' in argv:
      raise
    _exit_with_user_error(message)
  try:  # config_flags defers a file that does not load to the config's first use
    FLAGS.config.keys()
  except OSError as e:
    path = _config_argument(argv)
    what = ('no such file' if not os.path.isfile(path.split(':', 1)[0]) else
            f'{e}'.splitlines()[-1].strip())
    _exit_with_user_error(f'--config={path}: cannot load the config file ({what})')
  return remaining


if __name__ == '__main__':
  app.run(_user_errors_in_one_line(main), flags_parser=parse_flags)
