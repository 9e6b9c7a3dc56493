"""What the end-to-end tests share: running main.py on the tiny config, reading back what
a run saved, opening a page in a headless browser."""

import builtins
import os
import shutil
import subprocess
import sys

import jax
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
from deepfashion_jax import console
from deepfashion_jax.data import annotations
from deepfashion_jax.data import pipeline
from deepfashion_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One CPU device whatever the caller's XLA_FLAGS: what these runs test does not depend on
# the device count (tests/test_sharding.py checks that).
ONE_DEVICE = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')


def tiny_config(data_dir: str, **fields):
  """configs/test.py on `data_dir`, with top-level fields changed."""
  config = test_config.get_config()
  config.data.data_dir = data_dir
  for name, value in fields.items():
    config[name] = value
  return config


def main_command(workdir: str, data_dir: str, *flags) -> list:
  return [sys.executable, os.path.join(ROOT, 'main.py'), '--config=configs/test.py',
          f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *flags]


def run_main(workdir: str, data_dir: str, *flags) -> subprocess.CompletedProcess:
  """main.py on the tiny config in a process of its own; it must succeed."""
  result = subprocess.run(main_command(workdir, data_dir, *flags), cwd=ROOT, env=ONE_DEVICE,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def logged_evaluations(workdir: str) -> dict:
  """step -> the evaluation the run logged in metrics.jsonl at that step."""
  return {row['step']: row for row in console.evaluation_rows(workdir)}


def saved_state(workdir: str, step: int) -> dict:
  """The train state saved at `step`, as orbax reads it without a target."""
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  item_names=('state', 'data'))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored['state']


def saved_params(workdir: str, step: int) -> list:
  return jax.tree.leaves(saved_state(workdir, step)['params'])


def forbid_opening(monkeypatch, *paths):
  """Opening one of `paths` (symlinks resolved; by open or os.open) fails the test at once,
  instead of blocking on a FIFO or reading /dev/zero until memory runs out."""
  forbidden = {os.path.realpath(path) for path in paths}
  real_open, real_os_open = builtins.open, os.open

  def check(path):
    if not isinstance(path, int) and os.path.realpath(path) in forbidden:
      raise AssertionError(f'{path} was opened')

  def guarded_open(path, *args, **kwargs):
    check(path)
    return real_open(path, *args, **kwargs)

  def guarded_os_open(path, *args, **kwargs):
    check(path)
    return real_os_open(path, *args, **kwargs)

  monkeypatch.setattr(builtins, 'open', guarded_open)
  monkeypatch.setattr(os, 'open', guarded_os_open)


def train_batches(root, config, count):
  """The folder's index and the first `count` training batches of `config` (one thread)."""
  index = annotations.read_deepfashion(root)
  source = sources.FolderSource(index, index.split_indices('train'))
  options = pipeline.ImageOptions(img_size=config.data.img_size,
                                  crop_size=config.data.crop_size)
  dataset = pipeline.train_dataset(source, batch_size=config.batch_size, seed=0,
                                   options=options)
  iterator = pipeline.iterate(dataset, threads=1)
  return index, [next(iterator) for _ in range(count)]


def chromium_driver():
  """Selenium's Chrome driver on the system's chromium and chromedriver (Debian's
  `chromium` and `chromium-driver`, which .ci/run installs), headless; never
  selenium-manager, which would download a browser."""
  browser = shutil.which('chromium') or shutil.which('chromium-browser')
  driver = shutil.which('chromedriver')
  if not (browser and driver):
    pytest.skip('no chromium and chromedriver on PATH: .ci/run installs them with apt '
                '(packages chromium, chromium-driver) where it can')
  webdriver = pytest.importorskip('selenium.webdriver')
  options = webdriver.ChromeOptions()
  options.binary_location = browser
  for argument in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
                   '--window-size=1280,2000'):
    options.add_argument(argument)
  return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))
