"""Image files read with bounds: regular files only, inside their folder, at most a byte cap.

Every image the project reads from disk comes through `read` (the folder source, the TFDS
preparation, users' photos); the pixel cap is checked from the decoded header before any
pixel is decoded (`transforms.decode_image`). A file is refused before it is opened when it
is not a regular file (a FIFO would block the open and the read, /dev/zero would be read
until memory runs out, a folder cannot be read) or when it is larger than the byte cap; a
listed image whose path, symlinks resolved, leaves its image folder is refused unread too (a
list must not make training read /etc/passwd through a symlink). The open itself does not
block (O_NONBLOCK), and what was opened is checked again (kind, size, where it is), so a
file swapped for a FIFO or a link between the check and the open is refused as well. A
refused file, and one the system cannot read, raise `ImageFileError` naming the file:
callers treat it as an unreadable image (skipped, named in a log line and counted; raised
under config.data.strict).

The caps' defaults (config.data.max_image_bytes, config.data.max_image_pixels):
DeepFashion's images are at most 300 pixels on a side and 10 to 25 KB; users' phone photos
for --mode=predict are up to 48 megapixels (8064 x 6048) and 25 MB. 50 megapixels decode to
150 MB of RGB, held once per decoding thread; 32 MiB of file bytes likewise.
"""

import os
import stat

from deepfashion_jax import errors

DEFAULT_MAX_BYTES = 32 * 2**20  # config.data.max_image_bytes
DEFAULT_MAX_PIXELS = 50_000_000  # config.data.max_image_pixels


class ImageFileError(errors.DeepFashionError, OSError):
  """An image file refused before it is read: not a regular file, outside its folder, or
  larger than the byte cap."""


def resolved_folders(*folders: str) -> tuple:
  """The folders, symlinks resolved: the `inside` argument of `read`."""
  return tuple(os.path.realpath(folder) for folder in folders)


def _kind(mode: int) -> str:
  for test, name in ((stat.S_ISDIR, 'a folder'), (stat.S_ISFIFO, 'a FIFO (named pipe)'),
                     (stat.S_ISCHR, 'a character device'), (stat.S_ISBLK, 'a block device'),
                     (stat.S_ISSOCK, 'a socket')):
    if test(mode):
      return name
  return 'not a regular file'


def _checked(path: str, status: os.stat_result, max_bytes: int):
  """Raises ImageFileError unless `status` is a regular file of at most max_bytes."""
  if not stat.S_ISREG(status.st_mode):
    raise ImageFileError(f'{path}: {_kind(status.st_mode)}, not a regular file: not read')
  if status.st_size > max_bytes:
    raise ImageFileError(f'{path}: {status.st_size:,} bytes, more than '
                         f'config.data.max_image_bytes={max_bytes:,}: not read')


def _opened_path(descriptor: int, path: str) -> str:
  """Where an open file is, every symlink resolved: the kernel's name for the descriptor
  (one system call; Linux), else os.path.realpath of its path."""
  try:
    return os.readlink(f'/proc/self/fd/{descriptor}')
  except OSError:
    return os.path.realpath(path)


def read(path: str, max_bytes: int, inside: tuple = ()) -> bytes:
  """The bytes of the regular file at `path`, at most `max_bytes` of them.

  inside: resolved folders (`resolved_folders`); when given, `path` must resolve (symlinks
  followed) to a file inside one of them. Raises ImageFileError, naming the file, for a
  refused file and for one the system cannot read (missing, no permission, ...).
  """
  try:
    _checked(path, os.stat(path), max_bytes)  # before opening: a device may act on an open
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, 'O_CLOEXEC', 0))
    with open(descriptor, 'rb', closefd=True) as f:
      status = os.fstat(descriptor)
      _checked(path, status, max_bytes)  # the file opened is the file checked
      real = _opened_path(descriptor, path)
      if inside and not any(os.path.commonpath([real, folder]) == folder
                            for folder in inside):
        raise ImageFileError(f'{path}: resolves to {real}, outside the image folder '
                             f'{inside[0]}: not read')
      # Its size, not the cap: read(n) allocates n bytes before it reads.
      data = f.read(status.st_size + 1)
  except ImageFileError:
    raise
  except ValueError as e:  # an embedded NUL byte
    raise ImageFileError(f'{path!r}: not a file name ({e})') from None
  except OSError as e:
    raise ImageFileError(f'{path}: {e.strerror or e}') from None
  if len(data) > status.st_size:
    raise ImageFileError(f'{path}: grew while it was read: not read')
  return data
