"""Hostile and careless workdirs: a second run on a locked one, stale and odd lock files, a
workdir that is a file, read-only or a dangling link, evaluation beside a training run,
odd checkpoint folders, a mangled metrics.jsonl, odd saved schedule values.

Each try calls what a run calls: `train.train_and_evaluate` and `convert_torch.convert`
(which refuse before loading any data when the workdir is taken or unusable),
`run_lock.hold` (where a run would otherwise go on to train), `checkpoints.
restore_for_inference` (evaluate, predict, export), `evaluate.drop_jsonl_rows_after` and
the schedule note (a resumed run). None needs a GPU or the network.
"""

import fcntl
import itertools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np

from configs import test as test_config
from deepfashion_jax import checkpoints
from deepfashion_jax import convert_torch
from deepfashion_jax import evaluate
from deepfashion_jax import run_lock
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax import train

SURFACE = 'workdir'

# Takes the lock of argv[1] as a run of another process would, writes argv[2] as its
# description, says so and waits to be killed.
_OTHER_RUN = textwrap.dedent('''
    import fcntl, os, sys, time
    descriptor = os.open(os.path.join(sys.argv[1], '.lock'), os.O_RDWR | os.O_CREAT)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    os.ftruncate(descriptor, 0)
    os.write(descriptor, sys.argv[2].encode('utf-8', 'surrogateescape'))
    print('held', flush=True)
    time.sleep(120)
''')
_DESCRIPTION = json.dumps(dict(host='other-host', pid=4242, mode='train', since='noon'))


class _Big:
  """A big file's content, written in slices: made without holding it in memory, so that
  the memory counted is what the product takes to read it."""

  def __init__(self, head: bytes, fill: bytes, size: int, tail: bytes = b''):
    self.head, self.fill, self.size, self.tail = head, fill, size, tail

  def write(self, descriptor_or_path):
    with (open(descriptor_or_path, 'wb', closefd=False)
          if isinstance(descriptor_or_path, int) else open(descriptor_or_path, 'wb')) as f:
      f.write(self.head)
      slice_ = self.fill * (2**16 // len(self.fill))
      for _ in range(self.size // len(slice_)):
        f.write(slice_)
      f.write(self.tail)


def _write(where, content):
  """`content` (bytes or _Big) into a path or an open descriptor."""
  if isinstance(content, _Big):
    content.write(where)
  elif isinstance(where, int):
    os.write(where, content)
  else:
    pathlib.Path(where).write_bytes(content)


def _config():
  return test_config.get_config()


class _OtherRun:
  """A process holding a workdir's lock (and describing itself with `description`) for the
  `with` block; `kill()` ends it as SIGKILL would."""

  def __init__(self, workdir: pathlib.Path, description: str = _DESCRIPTION):
    workdir.mkdir(parents=True, exist_ok=True)
    self.process = subprocess.Popen([sys.executable, '-c', _OTHER_RUN, str(workdir),
                                     description], stdout=subprocess.PIPE, text=True)
    assert self.process.stdout.readline().strip() == 'held'

  def kill(self):
    self.process.kill()
    self.process.wait(timeout=30)
    self.process.stdout.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.kill()


class _HeldHere:
  """The workdir's lock held by this process through a descriptor of its own (flock
  conflicts between descriptors, in one process too), its file holding `content`."""

  def __init__(self, workdir: pathlib.Path, content: bytes):
    workdir.mkdir(parents=True, exist_ok=True)
    self.descriptor = os.open(workdir / '.lock', os.O_RDWR | os.O_CREAT)
    fcntl.flock(self.descriptor, fcntl.LOCK_EX)
    os.ftruncate(self.descriptor, 0)
    _write(self.descriptor, content)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    os.close(self.descriptor)


def _train(workdir):
  train.train_and_evaluate(_config(), str(workdir))


def _convert(workdir):
  convert_torch.convert(_config(), str(workdir), str(workdir / 'never_read.pth'))


def _hold(workdir):
  """A run's lock taken and released: where a run that gets it would go on to train."""
  with run_lock.hold(str(workdir)):
    pass


def _lock_tries(new):
  """A second run on a locked workdir, and the lock files left behind."""
  def other_process_holds(entry):
    workdir = new()
    with _OtherRun(workdir):
      entry(workdir)

  yield 'train on a workdir another process trains in', lambda: other_process_holds(_train)
  yield 'convert into a workdir another process trains in', lambda: other_process_holds(
      _convert)

  def same_process_holds():
    workdir = new()
    with run_lock.hold(str(workdir)):
      _train(workdir)

  yield 'train on a workdir this process already trains in', same_process_holds

  def killed_holder():
    workdir = new()
    _OtherRun(workdir).kill()  # SIGKILL: its lock file stays, naming it
    _hold(workdir)

  yield 'stale lock file of a SIGKILLed run (free)', killed_holder

  def unlocked_file(content):
    workdir = new()
    _write(workdir / '.lock', content)
    _hold(workdir)

  for name, content in (('naming a live process on another host', _DESCRIPTION.encode()),
                        ('of 10 MB of zeros', _Big(b'', b'\0', 10 * 2**20)),
                        ('of binary garbage', bytes(range(256)) * 16)):
    yield f'unlocked lock file {name} (free)', lambda c=content: unlocked_file(c)

  def held_with(content):
    workdir = new()
    with _HeldHere(workdir, content):
      _train(workdir)

  for name, content in (
      ('empty (not written yet)', b''), ('binary', b'\xff\xfe\x00garbage' * 100),
      ('10 MB long', _Big(b'{"host": "', b'h', 10 * 2**20, b'"}')),
      ('deeply nested JSON', _Big(b'', b'[', 2**20)), ('a JSON list', b'[1, 2, 3]'),
      ('a pid of 2^80 and a host of NULs', b'{"host": "\\u0000\\u0000", "pid": '
       + str(2**80).encode() + b'}'),
      ('a JSON number 1e999', b'1e999'), ('invalid UTF-8 in a string', b'{"host": "\xc3("}')):
    yield f'held lock file {name}', lambda c=content: held_with(c)


def _odd_workdir_tries(new, folder):
  """Workdirs that are not writable folders, and lock files that are not plain files."""
  def a_file():
    path = new(make=False)
    path.write_text('a file, not a folder')
    return path

  yield 'workdir that is a file', lambda: _train(a_file())
  yield 'workdir under a file', lambda: _train(a_file() / 'run')
  yield 'workdir with a NUL byte', lambda: _train(folder / 'nul\0byte')
  yield 'workdir name of 5,000 characters', lambda: _train(folder / ('x' * 5000))
  yield 'empty workdir name', lambda: _train('')

  def dangling_link():
    path = new(make=False)
    path.symlink_to(folder / 'nowhere')
    return path

  yield 'workdir that is a dangling symbolic link', lambda: _train(dangling_link())

  def link_loop():
    path = new(make=False)
    path.symlink_to(path)
    return path

  yield 'workdir that is a symbolic link to itself', lambda: _train(link_loop())

  def read_only():
    path = new()
    path.chmod(0o555)  # root may write it anyway: then it is accepted
    try:
      _hold(path)
    finally:
      path.chmod(0o755)

  yield 'read-only workdir', read_only

  def lock_file_made(make):
    workdir = new()
    make(workdir / '.lock')
    _hold(workdir)

  outside = folder / 'precious.txt'
  outside.write_text('must not be truncated')
  for name, make in (
      ('a folder', lambda p: p.mkdir()), ('a FIFO', lambda p: os.mkfifo(p)),
      ('a link to a file elsewhere', lambda p: p.symlink_to(outside)),
      ('a link to /dev/zero', lambda p: p.symlink_to('/dev/zero')),
      ('a dangling link', lambda p: p.symlink_to(folder / 'nowhere')),
      ('a hard link to a file elsewhere', lambda p: os.link(outside, p))):
    yield f'lock file that is {name}', lambda m=make: lock_file_made(m)


def _inference_tries(new):
  """Evaluation (as predict and export) on odd checkpoint folders, and beside a run."""
  def restore(workdir, **eval_fields):
    config = _config()
    config.eval.update(eval_fields)
    checkpoints.restore_for_inference(config, str(workdir),
                                      sharding.make_mesh(jax.devices()[:1]))

  def in_workdir(make, **eval_fields):
    workdir = new()
    make(workdir)
    restore(workdir, **eval_fields)

  def folder(*names):
    return lambda workdir: (workdir / pathlib.Path(*names)).mkdir(parents=True)

  yield 'evaluate an empty workdir', lambda: in_workdir(lambda w: None)
  yield 'evaluate a missing workdir', lambda: restore(new(make=False))
  yield 'evaluate a workdir that is a file', lambda: in_workdir(
      lambda w: w.rmdir() or w.write_text('x'))
  yield 'evaluate with checkpoints/ a file', lambda: in_workdir(
      lambda w: (w / 'checkpoints').write_text('x'))
  yield 'evaluate an empty step folder', lambda: in_workdir(folder('checkpoints', '5'))
  yield 'evaluate a half-written save only (a run saving)', lambda: in_workdir(
      folder('checkpoints', '7.orbax-checkpoint-tmp-123', 'state'))

  def garbage_metadata(workdir):
    (workdir / 'checkpoints' / '5').mkdir(parents=True)
    (workdir / 'checkpoints' / '5' / '_CHECKPOINT_METADATA').write_bytes(b'\xff' * 100)

  yield 'evaluate a step whose metadata is garbage', lambda: in_workdir(garbage_metadata)
  for choice in ('best', '99', '-1', 'all', '1e3', '٣'):
    yield (f'evaluate config.eval.checkpoint={choice!r} on an empty workdir',
           lambda c=choice: in_workdir(folder('checkpoints'), checkpoint=c))

  def beside_a_run():
    workdir, config = new(), _config()
    config.grad_clip_norm, config.best_metric = 1.0, ''  # evaluated without clipping
    mesh = sharding.make_mesh(jax.devices()[:1])
    shapes = jax.eval_shape(lambda: steps.create_train_state(config, mesh)[1])  # no compiling
    manager = checkpoints.create_manager(str(workdir), best_metric='')
    checkpoints.save(manager, 2, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes),
                     config=config)
    manager.wait_until_finished()
    with _HeldHere(workdir, _DESCRIPTION.encode()):
      restore(workdir)

  yield 'evaluate, trained with clipping, while a run trains in the workdir', beside_a_run


def _resume_tries(new):
  """What a resumed run reads of what the stopped one left: metrics.jsonl, saved values."""

  def metrics(content=None, make=None):
    workdir = new()
    path = workdir / 'metrics.jsonl'
    if make:
      make(path)
    else:
      _write(path, content)
    evaluate.drop_jsonl_rows_after(str(workdir), 3)

  for name, content in (
      ('rows past the step and a cut line', b'{"step": 3}\n{"step": 5}\n{"step": 6, "lo'),
      ('binary garbage', bytes(range(256)) * 64), ('one 20 MB line', _Big(b'', b'7', 20 * 2**20)),
      ('deeply nested JSON', _Big(b'', b'[', 2**20, b'\n{"step": 1}\n')),
      ('steps of every JSON kind', b'\n'.join(
          json.dumps(dict(step=s)).encode() for s in (True, None, 'x', 1.5, [1], {}, -1,
                                                      2**80, -2**80))),
      ('NaN and 1e999', b'{"step": NaN}\n{"step": 1e999}\n{"step": 2}\n'),
      ('CR line ends', b'{"step": 1}\r\n{"step": 9}\r\n'), ('UTF-16', '{"step": 1}'.encode(
          'utf-16'))):
    yield f'metrics.jsonl with {name}', lambda c=content: metrics(c)
  for name, make in (('a folder', lambda p: p.mkdir()), ('a FIFO', lambda p: os.mkfifo(p)),
                     ('a link to /dev/zero', lambda p: p.symlink_to('/dev/zero'))):
    yield f'metrics.jsonl that is {name}', lambda m=make: metrics(make=m)

  config = _config()
  config.schedule, config.warmup_steps, config.num_train_steps = 'cosine', 2, 8
  schedule_note = train._say_if_the_schedule_changed  # pylint: disable=protected-access
  for value in ('abc', None, -3, 0, 2.5, 2**80, [1], float('nan'), float('inf'), True):
    yield (f'resumed with num_train_steps saved as {value!r}',
           lambda v=value: schedule_note(config, dict(num_train_steps=v), 3))
  for name, value in (('learning_rate', 'fast'), ('learning_rate', -1e308),
                      ('warmup_steps', -(2**70)), ('schedule', 'zigzag'),
                      ('decay_every_steps', 0)):
    yield (f'resumed with {name} saved as {value!r}',
           lambda n=name, v=value: schedule_note(config, {n: v}, 3))


def tries(folder: pathlib.Path):
  """Yields (description, thunk): each thunk returns when the product accepts the workdir
  (a clean start or read) and raises its own error (DeepFashionError) when it refuses it."""
  counter = itertools.count()

  def new(make: bool = True) -> pathlib.Path:
    path = folder / f'w{next(counter)}'
    if make:
      path.mkdir()
    return path

  yield from _lock_tries(new)
  yield from _odd_workdir_tries(new, folder)
  yield from _inference_tries(new)
  yield from _resume_tries(new)
