"""One run per workdir: a second run is refused naming the holder, a killed holder leaves the
lock free, odd workdirs and lock files are refused by name, and with several processes
process 0 holds it for the run."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from configs import test as test_config
from deepfashion_jax import convert_torch
from deepfashion_jax import errors
from deepfashion_jax import run_lock
from deepfashion_jax import train
from tests import helpers

# Holds the lock of argv[1] with `run_lock.acquire` (no JAX runtime started), forks a child
# that inherits its descriptor and lives on, prints both process ids, and waits.
_HOLDER = textwrap.dedent('''
    import os, sys, time
    from deepfashion_jax import run_lock
    run_lock.acquire(sys.argv[1], 'train')
    child = os.fork()
    if child == 0:
      time.sleep(60)
      os._exit(0)
    print(os.getpid(), child, flush=True)
    time.sleep(60)
''')


def _refused_names(workdir, pid):
  with pytest.raises(run_lock.WorkdirLockedError) as refused:
    with run_lock.hold(workdir):
      pass
  message = str(refused.value)
  assert f'--workdir={workdir} is in use by another run: process {pid} on host ' \
         f'{socket.gethostname()} (train since ' in message
  return refused.value


def test_a_second_run_is_refused_at_once_naming_the_holder_and_a_killed_one_frees_it(
    tmp_path):
  """The holder is another process, killed with SIGKILL: its lock file stays behind, still
  naming it, and is free, though a child it forked (holding a copy of its descriptor, as a
  data worker would) lives on."""
  workdir = str(tmp_path / 'run')
  # Its own process group, which its child shares: the end kills the group, never the
  # child's id alone, which another process may hold by then (the child exits on its own).
  holder = subprocess.Popen([sys.executable, '-c', _HOLDER, workdir], cwd=helpers.ROOT,
                            stdout=subprocess.PIPE, text=True, env=helpers.ONE_DEVICE,
                            start_new_session=True)
  try:
    pid, _ = map(int, holder.stdout.readline().split())
    assert pid == holder.pid
    refusal = _refused_names(workdir, pid)
    assert isinstance(refusal, errors.DeepFashionError) and isinstance(refusal, OSError)
    config = test_config.get_config()  # refused before any data or model is made
    with pytest.raises(run_lock.WorkdirLockedError, match=f'process {pid} on host'):
      train.train_and_evaluate(config, workdir)
    with pytest.raises(run_lock.WorkdirLockedError, match=f'process {pid} on host'):
      convert_torch.convert(config, workdir, str(tmp_path / 'unread.pth'))
    prepare = subprocess.run(helpers.main_command(workdir, '', '--mode=prepare'),
                             cwd=helpers.ROOT, env=helpers.ONE_DEVICE, capture_output=True,
                             text=True, timeout=300)
    assert prepare.returncode != 0 and f'process {pid} on host' in prepare.stderr
    assert os.listdir(workdir) == [run_lock.LOCK_FILE]  # nothing written by the refused runs
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with run_lock.hold(workdir, 'evaluate'):  # free, and now naming this process
      with pytest.raises(run_lock.WorkdirLockedError, match=f'process {os.getpid()} on host'):
        run_lock.acquire(workdir)
  finally:
    holder.kill()
    holder.wait(timeout=30)
    try:
      os.killpg(holder.pid, signal.SIGKILL)  # the child, if still there
    except ProcessLookupError:
      pass


def test_in_one_process_the_lock_is_held_for_the_block_only(tmp_path):
  workdir = str(tmp_path / 'new' / 'run')  # made by the first run
  for _ in range(2):
    with run_lock.hold(workdir):
      _refused_names(workdir, os.getpid())
  with open(os.path.join(workdir, run_lock.LOCK_FILE)) as f:
    assert f'"pid": {os.getpid()}' in f.read()  # the last holder stays named: free anyway


def _make_fifo(path):
  os.mkfifo(path)


def _make_folder(path):
  os.mkdir(path)


@pytest.mark.parametrize('make_lock_file, reason', [
    (_make_folder, 'Is a directory'), (_make_fifo, 'is not a plain file'),
    (lambda path: os.symlink('/etc/hostname', path), 'it is a symbolic link')])
def test_a_lock_file_that_is_not_a_plain_file_is_refused_and_left_alone(tmp_path,
                                                                        make_lock_file,
                                                                        reason):
  path = tmp_path / run_lock.LOCK_FILE
  make_lock_file(str(path))
  with pytest.raises(run_lock.WorkdirError, match=reason):
    with run_lock.hold(str(tmp_path)):
      pass
  assert os.path.lexists(path)


def test_a_workdir_that_is_a_file_or_under_one_is_refused_naming_it(tmp_path):
  a_file = tmp_path / 'file'
  a_file.write_text('not a folder')
  for workdir in (str(a_file), str(a_file / 'run'), str(tmp_path / 'nul\0byte')):
    with pytest.raises(run_lock.WorkdirError, match='is not a writable folder'):
      with run_lock.hold(workdir):
        pass
  with pytest.raises(run_lock.WorkdirError, match='is not a writable folder'):
    train.train_and_evaluate(test_config.get_config(), str(a_file))
  assert a_file.read_text() == 'not a folder'


@pytest.mark.parametrize('content, named', [
    (b'', 'a run that has not written its name yet'),
    (b'\xff\xfe garbage', "a run whose lock file reads '\ufffd\ufffd garbage'"),
    (b'[' * 3000, "a run whose lock file reads '[[["),
    (b'{"host": "' + b'h' * 5000, "a run whose lock file reads '{\"host\": \"hhh"),
    (b'{"host": "h", "pid": 12, "mode": "train", "since": "noon"}',
     'process 12 on host h (train since noon)')])
def test_the_holder_is_named_whatever_its_lock_file_holds(tmp_path, content, named):
  path = tmp_path / run_lock.LOCK_FILE
  path.write_bytes(content)
  descriptor = os.open(path, os.O_RDONLY)
  try:
    assert run_lock.holder(descriptor).startswith(named)
    assert len(run_lock.holder(descriptor)) < 200
  finally:
    os.close(descriptor)


@pytest.mark.parametrize('process_zero_refused', [False, True])
def test_with_several_processes_process_zero_holds_it_and_the_others_follow(
    tmp_path, monkeypatch, process_zero_refused):
  """Process 1's view: it takes no lock of its own (the workdir is shared by every host)
  and stops when process 0 says it could not take it."""
  broadcasts = []
  monkeypatch.setattr(run_lock.jax, 'process_index', lambda: 1)
  monkeypatch.setattr(run_lock.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(run_lock.multihost_utils, 'broadcast_one_to_all',
                      lambda value: broadcasts.append(value) or np.int32(process_zero_refused))
  workdir = str(tmp_path / 'run')
  if process_zero_refused:
    with pytest.raises(run_lock.WorkdirLockedError, match='process 0 could not take'):
      with run_lock.hold(workdir):
        pass
  else:
    with run_lock.hold(workdir):
      assert not os.path.exists(workdir)  # no lock of its own
  assert len(broadcasts) == 1


# One process of a two-process run (argv: process id, coordinator port, workdir): takes the
# run's lock and says whether it held it or was refused.
_PROCESS_OF_A_RUN = textwrap.dedent('''
    import json, os, sys
    from deepfashion_jax import run_lock, sharding
    process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    sharding.initialize_distributed(f'localhost:{port}', 2, process_id)
    try:
      with run_lock.hold(workdir):
        print(json.dumps(['held', os.getpid()]), flush=True)
    except run_lock.WorkdirError as e:
      print(json.dumps([type(e).__name__, str(e)]), flush=True)
''')


def _run_of_two_processes(workdir) -> list:
  """What each process of a two-process run said, in process order."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = str(s.getsockname()[1])
  processes = [subprocess.Popen([sys.executable, '-c', _PROCESS_OF_A_RUN, str(i), port,
                                 workdir], cwd=helpers.ROOT, stdout=subprocess.PIPE,
                                text=True, env=helpers.ONE_DEVICE) for i in range(2)]
  try:
    return [json.loads(p.communicate(timeout=120)[0].splitlines()[-1]) for p in processes]
  finally:
    for p in processes:
      p.kill()


@pytest.mark.slow
def test_the_processes_of_one_run_share_process_zeros_lock(tmp_path):
  """Through JAX's distributed runtime: both processes of a run go on while process 0 holds
  the lock (named in the file); with another run holding it, both stop."""
  workdir = str(tmp_path / 'run')
  (zero, zero_pid), (one, _) = _run_of_two_processes(workdir)
  assert zero == one == 'held'
  with open(os.path.join(workdir, run_lock.LOCK_FILE)) as f:
    assert json.load(f)['pid'] == zero_pid
  with run_lock.hold(workdir):
    (zero, zero_says), (one, one_says) = _run_of_two_processes(workdir)
  assert zero == one == 'WorkdirLockedError'
  assert f'process {os.getpid()} on host' in zero_says
  assert 'process 0 could not take the run\'s lock' in one_says
