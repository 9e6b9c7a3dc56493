"""Where the data comes from: the configured DeepFashion folder, or a synthetic one.

`config.data.data_dir` names a real (or synthetic) DeepFashion folder. When it is empty and
`config.data.synthetic_images` is positive (the demo and test configs), a synthetic folder
is written into the workdir once and reused on later runs.
"""

import os
import shutil

from absl import logging

from deepfashion_jax import errors
from deepfashion_jax.data import annotations
from deepfashion_jax.data import synthetic

SYNTHETIC_FOLDER = 'synthetic_deepfashion'
_COMPLETE_MARKER = '.complete'


class UnwritableFolderError(errors.DeepFashionError, OSError):
  """A folder that the run writes (the workdir, the annotation cache next to it) cannot be
  created or written; the message names it and the flag that moves it."""


def _check_deepfashion_folder(root: str):
  missing = [name for name in annotations.REQUIRED_FILES
             if not os.path.isfile(os.path.join(root, name))]
  if missing:
    raise errors.ConfigError(
        f'config.data.data_dir={root!r} does not hold DeepFashion: missing '
        f'{", ".join(missing)}. Point it at the folder that holds Anno/, Eval/ and Img/ '
        '(see docs/dataset.md), or use configs/demo.py for synthetic data.')
  annotations.find_image_dir(root)


def _write_synthetic_once(root: str, data_config) -> str:
  """Writes the synthetic folder unless a complete one is there; crash-safe by renaming."""
  if os.path.isfile(os.path.join(root, _COMPLETE_MARKER)):
    return root
  partial = root + '.partial'
  shutil.rmtree(partial, ignore_errors=True)
  logging.info('Writing %d synthetic DeepFashion images into %s', data_config.synthetic_images,
               root)
  synthetic.write_synthetic_deepfashion(partial, data_config.synthetic_images,
                                        seed=data_config.synthetic_seed,
                                        quirks=data_config.synthetic_quirks)
  open(os.path.join(partial, _COMPLETE_MARKER), 'w').close()
  shutil.rmtree(root, ignore_errors=True)
  os.replace(partial, root)
  return root


def data_root(data_config, workdir: str) -> str:
  """The DeepFashion folder to read, writing the synthetic one first when configured."""
  if data_config.data_dir:
    root = os.path.abspath(os.path.expanduser(data_config.data_dir))
    _check_deepfashion_folder(root)
    return root
  if data_config.synthetic_images > 0:
    return _write_synthetic_once(os.path.join(workdir, SYNTHETIC_FOLDER), data_config)
  raise errors.ConfigError('config.data.data_dir is empty: set it to your DeepFashion folder '
                           '(--config.data.data_dir=/path/to/DeepFashion), or set '
                           'config.data.synthetic_images > 0 to write a synthetic one.')


def annotation_cache_dir(data_config, workdir: str) -> str:
  """The parsed-index cache: config.data.cache_dir, else a folder next to the workdir.

  Next to (not inside) the workdir, so that the runs of one parent folder share one parse.
  """
  if data_config.cache_dir:
    return data_config.cache_dir
  return os.path.join(os.path.dirname(os.path.abspath(workdir)), 'annotation_cache')


def tfds_dir(data_config, workdir: str) -> str:
  """Where the prepared TFDS dataset is: config.data.tfds_dir, else `tfds/` next to the
  workdir (like the annotation cache)."""
  if data_config.tfds_dir:
    return os.path.abspath(os.path.expanduser(data_config.tfds_dir))
  return os.path.join(os.path.dirname(os.path.abspath(workdir)), 'tfds')


def load_index(data_config, workdir: str) -> annotations.DeepFashionIndex:
  """The annotation index of the configured data, with the configured split; with
  config.data.strict, boxes and landmarks outside their image are refused."""
  root = data_root(data_config, workdir)
  cache_dir = annotation_cache_dir(data_config, workdir)
  try:
    return annotations.load_deepfashion(root, cache_dir, partition=data_config.partition,
                                        strict=data_config.strict)
  except OSError as e:
    if isinstance(e, errors.DeepFashionError) or not _on_the_way_to(e.filename, cache_dir):
      raise
    reason = e.strerror or f'{e}'
    if data_config.cache_dir:
      raise UnwritableFolderError(f'config.data.cache_dir={cache_dir} cannot be written '
                                  f'({reason}): set it to a writable folder') from e
    raise UnwritableFolderError(
        f'--workdir={workdir}: the annotation cache goes next to it, in {cache_dir}, which '
        f'cannot be written ({reason}): put the workdir in a writable folder, or set '
        '--config.data.cache_dir to one') from e


def _on_the_way_to(path, folder: str) -> bool:
  """Whether `path` is `folder`, inside it, or a folder above it (which creating it makes)."""
  if not isinstance(path, str):
    return False
  path, folder = os.path.abspath(path), os.path.abspath(folder)
  return os.path.commonpath([path, folder]) in (path, folder)
