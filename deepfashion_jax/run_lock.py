"""One run per workdir: an exclusive lock that a run holds on its workdir for its whole life.

`--mode=train`, `convert` and `prepare` write into their workdir (checkpoints through
orbax's temporary folders, the data iterator's position, `metrics.jsonl`, the synthetic
folder); two of them at once on one workdir would collide. So each holds an exclusive
`flock` on `<workdir>/.lock` while it runs (`hold`), and a second one is refused at once
(WorkdirLockedError) naming the workdir and the holder: the host, process id and mode that
the holder wrote into the file.

The kernel releases the lock when the holding process ends, however it ends (SIGKILL, a
crash, a lost host's NFS lease): the file stays behind naming its last holder, but it is
free, and the next run takes it. It is never removed: removing it would let a third run
lock a new file while a second still holds the old one. Child processes forked by the run
(data workers) do not keep it: they close their copy at fork.

With several processes (multi-host), process 0 alone holds it for the run: the workdir is
one folder shared by every host, and one lock taken by one host is what a shared
filesystem locks reliably. The other processes learn whether process 0 got it (one
broadcast) and stop with it when it did not. On a filesystem without locks (some FUSE
mounts) the run warns that it cannot lock and goes on.

`--mode=evaluate`, `predict`, `export` and `describe` take no lock: they read committed
checkpoints only, change nothing in the checkpoint folder (checkpoints.py) and may run
beside a training run.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import stat

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from deepfashion_jax import errors

LOCK_FILE = '.lock'
# The holder's description is a short JSON object; a lock file is read no further than this.
_HOLDER_BYTES = 4096
# Filesystems that cannot lock say so with one of these (NFS without lockd, some FUSE mounts).
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirError(errors.DeepFashionError, OSError):
  """A workdir that cannot be used: not a folder, not writable, or its lock file is not a
  plain file."""


class WorkdirLockedError(WorkdirError):
  """Another run holds the workdir's lock."""


_held = set()  # the descriptors of the locks this process holds


def _close_in_child():
  """A forked child (a data worker) closes its copies: the lock is the run's, not the
  child's, and a child outliving a killed run must not keep it."""
  for descriptor in list(_held):
    try:
      os.close(descriptor)
    except OSError:
      pass
  _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


@contextlib.contextmanager
def hold(workdir: str, mode: str = 'train'):
  """Holds `workdir`'s lock for the `with` block, creating the folder if needed. Raises
  WorkdirLockedError, naming the holder, when another run holds it, and WorkdirError when
  the workdir cannot be used. With several processes, process 0 holds it for all."""
  descriptor = _held_by_process_zero(workdir, mode)
  try:
    yield
  finally:
    if descriptor is not None:
      _held.discard(descriptor)
      os.close(descriptor)  # releases the lock


def _held_by_process_zero(workdir: str, mode: str):
  """Process 0's descriptor of the held lock (None elsewhere, or where locks are not
  supported); every process raises when process 0 could not take it."""
  descriptor, refusal = None, None
  if jax.process_index() == 0:
    try:
      descriptor = acquire(workdir, mode)
    except WorkdirError as e:
      refusal = e
  if jax.process_count() > 1:
    refused = int(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)))
    if refused and refusal is None:
      raise WorkdirLockedError(f'--workdir={workdir}: process 0 could not take the run\'s '
                               'lock on it (its log says why); this process stops too.')
  if refusal is not None:
    raise refusal
  return descriptor


def acquire(workdir: str, mode: str = 'train'):
  """Takes `workdir`'s lock in this process and writes the holder into it; returns the
  open descriptor, whose closing releases it (None where the filesystem cannot lock).
  `hold` is the way to use it."""
  path = os.path.join(workdir, LOCK_FILE)
  descriptor = _open_lock_file(workdir, path)
  try:
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      raise WorkdirLockedError(
          f'--workdir={workdir} is in use by another run: {holder(descriptor)} holds its lock '
          f'({path}). Wait for it to finish, stop it, or use another --workdir; '
          '--mode=evaluate, predict and export may read it meanwhile.') from e
    except OSError as e:
      if e.errno not in _NO_LOCKS:
        raise WorkdirError(f'--workdir={workdir}: cannot lock {path}: {e.strerror}') from e
      logging.warning('--workdir=%s: its filesystem cannot lock files (%s): a second run on '
                      'it would not be refused. Run one at a time.', workdir, e.strerror)
      os.close(descriptor)
      return None
    _write_holder(descriptor, mode)
  except BaseException:
    os.close(descriptor)
    raise
  _held.add(descriptor)
  return descriptor


def _open_lock_file(workdir: str, path: str) -> int:
  """The lock file, opened for writing (created if missing); WorkdirError, naming it, when
  the workdir is not a writable folder or the lock file is not a plain file of its own (a
  symbolic or hard link is refused, not followed: the holder truncates what it opens)."""
  flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
  try:
    os.makedirs(workdir, exist_ok=True)
    descriptor = os.open(path, flags, 0o644)
  except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
    reason = ('it is a symbolic link' if getattr(e, 'errno', None) == errno.ELOOP
              else getattr(e, 'strerror', None) or str(e))
    raise WorkdirError(f'--workdir={workdir!r} is not a writable folder: cannot open its '
                       f'lock file {path!r} ({reason}).') from e
  status = os.fstat(descriptor)
  odd = ('is not a plain file' if not stat.S_ISREG(status.st_mode) else
         'has other names (hard links): it may be another file' if status.st_nlink > 1 else '')
  if odd:
    os.close(descriptor)
    raise WorkdirError(f'--workdir={workdir}: its lock file {path} {odd}; remove it (a run '
                       'makes a new one).')
  return descriptor


def _write_holder(descriptor: int, mode: str):
  """Replaces the file's content by this process's description: the next run refused names
  it."""
  description = dict(host=socket.gethostname(), pid=os.getpid(), mode=mode,
                     since=datetime.datetime.now().astimezone().isoformat(timespec='seconds'))
  os.ftruncate(descriptor, 0)
  os.pwrite(descriptor, (json.dumps(description) + '\n').encode(), 0)


def holder(descriptor: int) -> str:
  """How a message names the run described in the lock file: 'process 123 on host h (train
  since ...)', or what the file holds when it is not such a description."""
  try:
    text = os.pread(descriptor, _HOLDER_BYTES, 0).decode('utf-8', errors='replace')
  except OSError as e:
    return f'a run (its lock file cannot be read: {e.strerror})'
  try:
    description = json.loads(text)
  except (ValueError, RecursionError):
    description = None
  if not isinstance(description, dict) or not {'host', 'pid'} <= set(description):
    return ('a run that has not written its name yet' if not text.strip() else
            f'a run whose lock file reads {text.strip()[:80]!r}')
  named = lambda key: ''.join(c if c.isprintable() else '?'
                              for c in str(description.get(key, '?'))[:80])
  return (f'process {named("pid")} on host {named("host")} ({named("mode")} since '
          f'{named("since")})')
