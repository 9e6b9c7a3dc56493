"""The training loop's step time with two processes: this tree's loop against a reference
commit's, measured in one run.

Two processes on this machine (JAX's distributed runtime, loopback coordinator, gloo
collectives, --devices CPU devices each) train configs/test.py's model on one synthetic
folder for --steps steps, logging every --log_every. The figure is process 0's seconds per
step over every log interval but the first (which includes compiling), from the
images_per_sec the loop logs. The sides alternate, --repeats times each, so that the
machine's noise shows beside the difference. The reference is a `git archive` of
--reference run from a temporary folder (its own main.py, package and configs).

  python -m benchmarks.multihost [--reference COMMIT] [--steps 60] [--log_every 20]
      [--devices 1] [--repeats 2] [--json OUT]
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile

from deepfashion_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The last commit whose loop agreed on stop signals with a process_allgather every step and
# merged the train metrics as global arrays on the device.
BEFORE_HOST_MERGE = '86ac29d'
BATCH_SIZE = 8  # configs/test.py's
TIMEOUT_S = 900
# clu's logging writer prints a step's scalars sorted: "[20] flops_per_step=1e+09, images_..."
_RATE = r'\] \[\d+\] [^\n]*?\bimages_per_sec=([0-9.e+-]+)'


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--reference', default=BEFORE_HOST_MERGE, help='a git commit')
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--log_every', type=int, default=20)
  parser.add_argument('--devices', type=int, default=1, help='CPU devices per process')
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--workdir', default='', help='default: a temporary folder')
  parser.add_argument('--json', default='')
  return parser.parse_args(argv)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _extract(commit: str, into: str) -> str:
  """The commit's tree, unpacked into `into`."""
  os.makedirs(into)
  archive = subprocess.run(['git', 'archive', commit], cwd=ROOT, check=True,
                           capture_output=True).stdout
  subprocess.run(['tar', '-x', '-C', into], input=archive, check=True)
  return into


def run_pair(tree: str, workdir: str, data_dir: str, args) -> list:
  """Process 0's seconds per step in each log interval but the first."""
  flags = [f'--config.num_train_steps={args.steps}',
           f'--config.log_every_steps={args.log_every}',
           f'--config.eval_every_steps={args.steps}',
           f'--config.checkpoint_every_steps={args.steps}', '--config.num_box_images=0']
  env = dict(os.environ,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={args.devices}')
  port, processes = _free_port(), []
  log_0 = os.path.join(workdir, 'process_0.log')
  for process_id in range(2):
    log = open(os.path.join(workdir, f'process_{process_id}.log'), 'w')
    command = [sys.executable, os.path.join(tree, 'main.py'),
               f'--config={os.path.join(tree, "configs", "test.py")}',
               f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *flags,
               f'--coordinator_address=localhost:{port}', '--num_processes=2',
               f'--process_id={process_id}']
    processes.append((subprocess.Popen(command, cwd=tree, env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
  try:
    statuses = [p.wait(timeout=TIMEOUT_S) for p, _ in processes]
  finally:
    for p, log in processes:
      if p.poll() is None:
        p.kill()
      log.close()
  with open(log_0) as f:
    output = f.read()
  if statuses != [0, 0]:
    raise RuntimeError(f'{tree}: exit statuses {statuses}\n{output[-3000:]}')
  rates = [float(rate) for rate in re.findall(_RATE, output)]
  if len(rates) != args.steps // args.log_every:
    raise RuntimeError(f'{tree}: {len(rates)} throughput logs, expected '
                       f'{args.steps // args.log_every}')
  return [BATCH_SIZE / rate for rate in rates[1:]]


def main(argv=None):
  args = parse_args(argv)
  root = args.workdir or tempfile.mkdtemp(prefix='multihost_benchmark_')
  data_dir = os.path.join(root, 'data')
  synthetic.write_synthetic_deepfashion(data_dir, num_images=80, seed=0)
  trees = {f'reference {args.reference}': _extract(args.reference,
                                                   os.path.join(root, 'reference')),
           'this tree': ROOT}
  seconds = {side: [] for side in trees}
  for repeat in range(args.repeats):
    for side, tree in trees.items():
      workdir = os.path.join(root, f'{side.split()[0]}_{repeat}')
      os.makedirs(workdir)
      seconds[side].append(run_pair(tree, workdir, data_dir, args))
  print(f'two processes x {args.devices} CPU device(s), configs/test.py, batch {BATCH_SIZE}, '
        f'{args.steps} steps, logs every {args.log_every} (the first interval left out)')
  print(f'{"loop":<28}{"s/step, each run":>28}{"mean":>10}')
  for side, runs in seconds.items():
    per_run = [statistics.mean(run) for run in runs]
    print(f'{side:<28}{", ".join(f"{s:.4f}" for s in per_run):>28}'
          f'{statistics.mean(per_run):>10.4f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({side: runs for side, runs in seconds.items()}, f, indent=1)


if __name__ == '__main__':
  main()
