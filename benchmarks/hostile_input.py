"""Hostile input: hostile inputs fed to the product's real entry points, every outcome counted.

Each module of benchmarks/hostile/ is one surface (the list files, the checkpoint reader,
the images, ...). It names itself and yields its tries:

  SURFACE = 'list files'            # the table's row
  def tries(folder: pathlib.Path):  # an empty temporary folder, the surface's own
    yield 'path ../../etc/passwd in list_category_img.txt', lambda: ...

Each try is a description and a thunk that feeds one hostile input to the function a run
calls. Its outcome is one of:
  accepted          the thunk returned: the input was loaded, cleanly
  refused cleanly   it raised the project's own error (errors.DeepFashionError), which names
                    the file, line or field and what was expected
  not clean         anything else: a bare TypeError, MemoryError, OSError ..., a hang past
                    --timeout, an exit; printed with its type and the first line of its message
Each try's memory is the peak that tracemalloc traces during it (NumPy's arrays included)
above what was traced before it; the table gives the largest per surface, and each
surface's wall time (writing its inputs included).

  python -m benchmarks.hostile_input [--surfaces list_files,images] [--timeout 60]
                                     [--json OUT] [--verbose]

Prints a markdown table (the one benchmarks/RESULTS.md holds) and exits with status 1 if
any try was not clean.
"""

import argparse
import dataclasses
import importlib
import json
import logging
import pathlib
import pkgutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import tracemalloc
from typing import Callable

from absl import logging as absl_logging

from deepfashion_jax import errors

PACKAGE = 'benchmarks.hostile'
_REPOSITORY = pathlib.Path(__file__).resolve().parent.parent
OUTCOMES = ('accepted', 'refused cleanly', 'not clean')


@dataclasses.dataclass
class Outcome:
  """One try: its input, how it came out, its traced memory and (when not accepted) its error,
  as `Type: first line of the message`, and where it was raised (file:line, function)."""
  input: str
  outcome: str  # one of OUTCOMES
  traced_bytes: int
  error: str = ''
  raised_at: str = ''


@dataclasses.dataclass
class SurfaceResult:
  """One surface's tries, in the order they ran, and its wall time."""
  surface: str
  module: str
  outcomes: list
  seconds: float

  def count(self, outcome: str) -> int:
    return sum(o.outcome == outcome for o in self.outcomes)

  @property
  def max_traced_bytes(self) -> int:
    return max((o.traced_bytes for o in self.outcomes), default=0)

  def as_dict(self) -> dict:
    return dict(surface=self.surface, module=self.module, tries=len(self.outcomes),
                accepted=self.count('accepted'), refused_cleanly=self.count('refused cleanly'),
                not_clean=self.count('not clean'), max_traced_bytes=self.max_traced_bytes,
                seconds=self.seconds, outcomes=[dataclasses.asdict(o) for o in self.outcomes])


class TryTimedOut(BaseException):
  """A try ran past the time limit (a read that never ends: a FIFO, /dev/zero). Not an
  Exception, so that the product's `except Exception` does not turn it into a refusal."""


def _timed_out(error: BaseException) -> bool:
  """Whether the error is, or was raised while handling, the time limit's."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, TryTimedOut):
      return True
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return False


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0][:300] if lines else ""}'


def _raised_at(error: BaseException) -> str:
  """The innermost frame of the error's traceback, relative to the repository."""
  frames = traceback.extract_tb(error.__traceback__)
  if not frames:
    return ''
  frame = frames[-1]
  path = pathlib.Path(frame.filename)
  if path.is_relative_to(_REPOSITORY):
    path = path.relative_to(_REPOSITORY)
  return f'{path}:{frame.lineno} in {frame.name}'


def _alarm(seconds: float):
  """Raises TryTimedOut in this thread after `seconds` (where signals allow: the main thread
  of a Unix process); returns the function that cancels it."""
  if seconds <= 0 or threading.current_thread() is not threading.main_thread():
    return lambda: None

  def expire(signum, frame):
    del signum, frame
    raise TryTimedOut(f'still running after {seconds:g} s')

  previous = signal.signal(signal.SIGALRM, expire)
  signal.setitimer(signal.ITIMER_REAL, seconds)

  def cancel():
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)
  return cancel


def run_try(description: str, thunk: Callable[[], object], timeout: float = 60.0) -> Outcome:
  """Runs one thunk and classifies its outcome (tracemalloc must be tracing)."""
  tracemalloc.reset_peak()
  before = tracemalloc.get_traced_memory()[0]
  cancel = _alarm(timeout)
  try:
    thunk()
    outcome, error, raised_at = 'accepted', '', ''
  except KeyboardInterrupt:
    raise
  except errors.DeepFashionError as e:
    outcome = 'not clean' if _timed_out(e) else 'refused cleanly'
    error, raised_at = _first_line(e), _raised_at(e)
  except BaseException as e:  # pylint: disable=broad-except  # SystemExit too: not clean
    outcome, error, raised_at = 'not clean', _first_line(e), _raised_at(e)
  finally:
    cancel()
  traced = max(0, tracemalloc.get_traced_memory()[1] - before)
  return Outcome(description, outcome, traced, error, raised_at)


def run_surface(module, timeout: float = 60.0) -> SurfaceResult:
  """Every try of one surface module, in a temporary folder of its own. A module that does
  not give the interface, or whose tries() raises between tries, counts as a try not clean."""
  name = module.__name__.rsplit('.', 1)[-1]
  surface = str(getattr(module, 'SURFACE', name))
  outcomes = []
  started_tracing = not tracemalloc.is_tracing()
  if started_tracing:
    tracemalloc.start()
  start = time.perf_counter()
  try:
    if not isinstance(getattr(module, 'SURFACE', None), str) or not callable(
        getattr(module, 'tries', None)):
      outcomes.append(Outcome(f'{module.__name__}: the interface', 'not clean', 0,
                              'a surface module needs SURFACE (a str) and tries(folder)'))
      return SurfaceResult(surface, name, outcomes, time.perf_counter() - start)
    with tempfile.TemporaryDirectory(prefix=f'hostile_{name}_') as folder:
      tries = iter(module.tries(pathlib.Path(folder)))
      while True:
        try:
          description, thunk = next(tries)
        except StopIteration:
          break
        except Exception as e:  # pylint: disable=broad-except
          outcomes.append(Outcome(f'{module.__name__}.tries() itself', 'not clean', 0,
                                  _first_line(e)))
          break
        outcomes.append(run_try(description, thunk, timeout))
  finally:
    if started_tracing:
      tracemalloc.stop()
  return SurfaceResult(surface, name, outcomes, time.perf_counter() - start)


def surface_names(package: str = PACKAGE) -> list:
  """The modules of the package, by name, sorted."""
  path = importlib.import_module(package).__path__
  return sorted(info.name for info in pkgutil.iter_modules(path) if not info.ispkg)


def import_surface(name: str, package: str = PACKAGE):
  """The surface module, or the ImportError's text when it cannot be imported."""
  try:
    return importlib.import_module(f'{package}.{name}')
  except Exception as e:  # pylint: disable=broad-except
    return _first_line(e)


def _unimportable(name: str, error: str) -> SurfaceResult:
  return SurfaceResult(name, name, [Outcome(f'import {name}', 'not clean', 0, error)], 0.0)


def _mib(n: int) -> str:
  return f'{n / 2**20:.1f} MiB'


def table(results: list) -> str:
  """The markdown table, one row per surface and a total."""
  lines = ['| surface | inputs tried | accepted | refused cleanly | not clean | '
           'max traced memory | time |', '|---|---:|---:|---:|---:|---:|---:|']
  for r in results:
    lines.append(f'| {r.surface} | {len(r.outcomes)} | {r.count("accepted")} | '
                 f'{r.count("refused cleanly")} | {r.count("not clean")} | '
                 f'{_mib(r.max_traced_bytes)} | {r.seconds:.1f} s |')
  if len(results) > 1:
    total = lambda outcome: sum(r.count(outcome) for r in results)
    lines.append(f'| all | {sum(len(r.outcomes) for r in results)} | {total("accepted")} | '
                 f'{total("refused cleanly")} | {total("not clean")} | '
                 f'{_mib(max(r.max_traced_bytes for r in results))} | '
                 f'{sum(r.seconds for r in results):.1f} s |')
  return '\n'.join(lines)


def _selected(requested: str, package: str, parser) -> list:
  """The surfaces to run: all, or those named (by module name or SURFACE) in --surfaces."""
  names = surface_names(package)
  if not requested:
    return names
  wanted = [w.strip() for w in requested.split(',') if w.strip()]
  by_surface = {}
  for name in names:
    module = import_surface(name, package)
    if not isinstance(module, str):
      by_surface[getattr(module, 'SURFACE', name)] = name
  unknown = [w for w in wanted if w not in names and w not in by_surface]
  if unknown:
    parser.error(f'--surfaces: no surface {", ".join(unknown)} (there are: {", ".join(names)})')
  return [by_surface.get(w, w) for w in wanted]


def main(argv=None, package: str = PACKAGE) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--surfaces', default='',
                      help='comma-separated module names (or SURFACE names); default: all')
  parser.add_argument('--timeout', type=float, default=60.0,
                      help='seconds a try may run before it counts as not clean (0: no limit)')
  parser.add_argument('--json', default='', help='write the table and every outcome here')
  parser.add_argument('--each', action='store_true',
                      help="print every try's outcome and traced memory, not only those not "
                      'clean')
  parser.add_argument('--verbose', action='store_true',
                      help="keep the product's log lines (hostile inputs log many warnings)")
  args = parser.parse_args(argv)
  if not args.verbose:
    logging.getLogger().setLevel(logging.ERROR)
    absl_logging.set_verbosity(absl_logging.ERROR)
  results = []
  for name in _selected(args.surfaces, package, parser):
    module = import_surface(name, package)
    result = (_unimportable(name, module) if isinstance(module, str)
              else run_surface(module, args.timeout))
    results.append(result)
    for o in result.outcomes:
      if o.outcome == 'not clean':
        print(f'NOT CLEAN  {result.surface}: {o.input}: {o.error}'
              + (f' (raised at {o.raised_at})' if o.raised_at else ''))
      elif args.each:
        print(f'{o.outcome:<15}  {result.surface}: {o.input} ({_mib(o.traced_bytes)})'
              + (f': {o.error[:150]}' if o.error else ''))
  print(table(results))
  clean = all(r.count('not clean') == 0 for r in results)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(all_clean=clean, surfaces=[r.as_dict() for r in results]), f, indent=2)
  return 0 if clean else 1


if __name__ == '__main__':
  sys.exit(main())
