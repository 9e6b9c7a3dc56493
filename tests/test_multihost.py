"""Two processes on one machine, through JAX's distributed runtime (loopback coordinator,
gloo collectives, 2 CPU devices each), train, are pre-empted together, resume, and end
with the parameters of one process on 4 devices."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from deepfashion_jax import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300  # for each launch; a process that dies must not hang the suite
# Plain SGD, mean losses and 64 px: 2 x 2 devices and 1 x 4 differ only in the order of
# float32 reductions, which these gentle steps keep at float32 size for a few steps only:
# this tiny model amplifies them to 1e-4 of the loss by step 4 and 1e-2 by step 6.
FLAGS = ('--config.num_train_steps=4', '--config.eval_every_steps=4',
         '--config.checkpoint_every_steps=4', '--config.optimizer=sgd',
         '--config.learning_rate=0.001', '--config.momentum=0.0',
         '--config.loss.reduce_sum=False', '--config.data.crop_size=64',
         '--config.data.img_size=72')
# Opt-in for now: on this 2-core machine a pair of processes now and then hangs in a
# collective (seen once in evaluation after resuming); see the multi-host issue's note.
pytestmark = pytest.mark.skipif(os.environ.get('DEEPFASHION_MULTIHOST_TEST') != '1',
                                reason='set DEEPFASHION_MULTIHOST_TEST=1 to run it')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _environment(devices: int) -> dict:
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def _command(workdir, data_dir, *flags):
  return [sys.executable, os.path.join(ROOT, 'main.py'), '--config=configs/test.py',
          f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *FLAGS, *flags]


def _launch_pair(workdir, data_dir, log_dir, attempt):
  """Two processes of one job; their logs go to files (a full pipe would block them)."""
  port = _free_port()
  processes = []
  for process_id in range(2):
    log = open(os.path.join(log_dir, f'{attempt}_{process_id}.log'), 'w')
    processes.append((subprocess.Popen(
        _command(workdir, data_dir, f'--coordinator_address=localhost:{port}',
                 '--num_processes=2', f'--process_id={process_id}'),
        cwd=ROOT, env=_environment(2), stdout=log, stderr=subprocess.STDOUT), log))
  return processes


def _wait_all(processes, deadline):
  """Exit statuses; every process is killed if any outlives the deadline."""
  try:
    return [p.wait(timeout=max(1, deadline - time.time())) for p, _ in processes]
  finally:
    for p, log in processes:
      if p.poll() is None:
        p.kill()
      log.close()


def _read(path):
  with open(path) as f:
    return f.read()


def _params(workdir, step):
  """The parameters saved at `step`, read onto this process's one device (they were
  written from 4)."""
  manager = checkpoints.create_manager(workdir, read_only=True)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          manager.item_metadata(step)['state'])
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))
  return jax.tree.leaves(restored['state']['params'])


def test_two_processes_preempted_and_resumed_equal_one_process_on_four_devices(
    synthetic_folder, tmp_path):
  data_dir, workdir = synthetic_folder[0], str(tmp_path / 'two')
  logs = str(tmp_path)
  first = _launch_pair(workdir, data_dir, logs, 'first')
  deadline = time.time() + TIMEOUT_S
  log_0 = os.path.join(logs, 'first_0.log')
  while '] [2] train_' not in _read(log_0) and time.time() < deadline:
    if any(p.poll() is not None for p, _ in first):
      break
    time.sleep(0.2)
  for p, _ in first:
    p.send_signal(signal.SIGTERM)
  statuses = _wait_all(first, deadline)
  assert statuses == [75, 75], [_read(os.path.join(logs, f'first_{i}.log'))[-3000:]
                                for i in range(2)]
  assert 'Pre-empted by SIGTERM after step 2' in _read(log_0) or \
      'Pre-empted by SIGTERM after step 3' in _read(log_0)

  second = _launch_pair(workdir, data_dir, logs, 'second')
  statuses = _wait_all(second, time.time() + TIMEOUT_S)
  assert statuses == [0, 0], [_read(os.path.join(logs, f'second_{i}.log'))[-3000:]
                              for i in range(2)]
  assert 'Resuming from the checkpoint of step' in _read(os.path.join(logs, 'second_0.log'))

  alone = str(tmp_path / 'one')
  result = subprocess.run(_command(alone, data_dir), cwd=ROOT, env=_environment(4),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
  assert result.returncode == 0, result.stderr[-3000:]
  for a, b in zip(_params(alone, 4), _params(workdir, 4)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
