"""The main job: train, evaluate every `eval_every_steps`, checkpoint, resume by itself.

Started again on the same workdir, a run continues from its newest intact checkpoint
(model, optimiser, step, rng and the data iterator's position), so that N steps in one go
and k steps, a restart and N - k more give the same parameters and the same logged
metrics. SIGTERM or SIGINT stops it after the current step with a checkpoint (`Preempted`;
with several processes, all after the same step, up to three steps later: `_StopSignals`);
a non-finite step stops it at the next log without saving (`stop_if_diverged`).
A run holds its workdir's lock throughout (`run_lock`: a second run there is refused). On
resuming, what the stopped run logged into metrics.jsonl after its checkpoint is dropped
(each step is logged once), and a num_train_steps (or other schedule field) changed since
the checkpoint is said at start, with where the learning rate now goes.

With config.ema_decay > 0 each evaluation also evaluates the moving average of the
weights (`steps.ema_weights`) and logs its metrics beside the raw ones, prefixed `ema_`
(TensorBoard `eval_ema_*`, `metrics.jsonl`, and the metrics that config.best_metric may
name); weights loaded by config.init_from restart the average.

Each train log also carries the train step's FLOPs, the TFLOP/s achieved and, on a GPU
whose peak is listed, MFU (throughput.py); config.profile_steps=(a, b) writes a
jax.profiler trace of steps a to b (both included) into WORKDIR/profile.

Every metric and the learning rate go to TensorBoard and metrics.jsonl (a row per log and
per evaluation); the terminal gets a progress bar, a line of headline figures per log and
per evaluation, and a summary at the end (console.py).
"""

import collections
import contextlib
import dataclasses
import os
import signal
import tempfile
import threading
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
import numpy as np

from deepfashion_jax import checkpoints
from deepfashion_jax import config_checks
from deepfashion_jax import console
from deepfashion_jax import convert_torch
from deepfashion_jax import data
from deepfashion_jax import evaluate
from deepfashion_jax import run_lock
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax import throughput as throughput_lib
from deepfashion_jax.data import trained_on


@dataclasses.dataclass
class _Run:
  """What the training loop works with, besides the state it updates."""
  config: Any
  workdir: str
  mesh: Any
  steps: steps.Steps
  data: data.TrainingData
  manager: Any  # orbax CheckpointManager
  writer: Any  # clu MetricWriter
  step_config: Any = None  # steps.StepConfig: counting the train step's FLOPs
  stop: Any = None  # _StopSignals


def _box_images(run: _Run, state, count: int):
  """The first `count` evaluation images with their true and predicted boxes and
  landmarks (`evaluate.box_figure`)."""
  batch = run.data.eval_batches.first()
  outputs = run.steps.predict(state, sharding.global_batch(batch, run.mesh))
  outputs = jax.tree.map(np.asarray, outputs)
  return evaluate.box_figure(outputs['images'][:count], batch, outputs)


def _evaluate_and_report(run: _Run, state, step: int, skipped_in_training: int) -> dict:
  results, skipped = evaluate.evaluate(run.steps.evaluate, state, run.data.eval_batches,
                                       run.mesh, f'evaluating step {step}')
  if steps.has_ema(state):  # the moving average's metrics beside them, named ema_*
    ema_results, _ = evaluate.evaluate(run.steps.evaluate, steps.ema_weights(state),
                                       run.data.eval_batches, run.mesh,
                                       f'evaluating the EMA of step {step}')
    results.update({f'{steps.EMA_PREFIX}{k}': v for k, v in ema_results.items()})
  logging.info('Step %d: %d unreadable images skipped in training since the last '
               'evaluation, %d in this evaluation', step, skipped_in_training, skipped)
  results.update(skipped_images_train=skipped_in_training, skipped_images_eval=skipped)
  run.writer.write_scalars(step, {f'eval_{k}': v for k, v in results.items()})
  logging.info('%s', console.evaluation_headline(step, run.config.eval.split, results))
  if run.config.num_box_images:
    run.writer.write_images(step, {'eval_boxes': _box_images(run, state,
                                                             run.config.num_box_images)})
  if jax.process_index() == 0:
    evaluate.append_jsonl(run.workdir, step, results)
  return results


class Preempted(Exception):
  """Training stopped on SIGTERM or SIGINT after saving a checkpoint; run again to resume."""

  EXIT_STATUS = 75  # EX_TEMPFAIL: a temporary failure, to be retried


class _StopSignals:
  """Turns the first SIGTERM or SIGINT into a request the loop honours after a step (a
  second one acts as usual: Ctrl-C twice interrupts at once).

  One process stops after the step during which it received the signal. Several must stop
  after the same step: each marks its rows of the next batch (`steps.STOP_REQUESTED`), the
  step ORs the marks into its metrics, and the processes read that flag (`_TrainMetrics`):
  at once at a log step, `_TrainMetrics.LAG` steps late between them. So every process
  stops after the same step, at most LAG + 1 steps after the signal, and no step waits for
  a round trip between the hosts.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, processes=None):
    self.received = None
    self.processes = jax.process_count() if processes is None else processes
    self._previous = {}

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.received = signal.Signals(signum).name
    signal.signal(signum, self._previous[signum])
    logging.warning('%s received: stopping after this step, with a checkpoint.', self.received)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def mark(self, batch: dict) -> dict:
    """The process's batch with its rows marked when it has received a signal."""
    rows = len(batch['skipped'])
    return dict(batch, **{steps.STOP_REQUESTED: np.full(rows, self.received is not None)})

  def requested(self, train_metrics: '_TrainMetrics') -> bool:
    """Whether to stop after this step: one process's own signal, or several processes'
    agreement (any process's signal in the steps they have all read)."""
    if self.processes == 1:
      return self.received is not None
    return train_metrics.stop_requested


class _TrainMetrics:
  """The training metrics since the last log: merged on the device, read at a log or a stop.

  Each step's metrics (replicated global arrays) are merged into the running ones by a
  jitted function (`steps.Steps.merge_metrics`: packed into one array per dtype, for a
  cheap dispatch), dispatched after the step like the step itself: the host copies nothing
  per step, and copies the merged metrics from this process's replica only at a log, or
  when stopping. With several processes each process also copies one leaf of each step,
  its stop_requested, LAG steps after the step (when the device has usually finished it,
  so that the host keeps dispatching ahead of the device): every process thus learns of any
  process's stop request after the same step, between logs too. With one process nothing
  is copied per step (the signal is the process's own).

  Why this cannot hang with several processes: the merge runs over every process's devices,
  so every process must call it the same number of times in the same order (evaluation's
  merges once hung because they did not). Each calls it once after each train step (the
  first after a log with no running metrics: the same in every process); the steps, the
  logs (`itstime` of the step number) and the stops (the agreed flag, read after the same
  steps) are the same in every process, so the calls are too. Reading is a copy from the
  local replica, no computation.
  """

  LAG = 2

  def __init__(self, merge, stop_flags: bool):
    self._merge = merge  # steps.Steps.merge_metrics
    self._stop_flags = collections.deque() if stop_flags else None  # on the device, unread
    self._like = None  # a step's metrics: the structure the packed ones unpack to
    self.running = None  # the steps since the last log, merged on the device, packed
    self.merged = None  # the same, copied to the host and unpacked (at a log or a stop)
    self.stop_requested = False  # some process asked to stop in a step read so far

  def add(self, step_metrics):
    self.running, self._like = self._merge(self.running, step_metrics), step_metrics
    if self._stop_flags is not None:
      self._stop_flags.append(step_metrics.stop_requested.value)

  def read(self, keep: int = LAG):
    """Reads the stop flags of every step but the newest `keep`; keep=0 copies the merged
    metrics of every step (whose flags they hold)."""
    if keep == 0:
      if self.running is not None:
        self.merged = steps.unpack_leaves(sharding.local_copy(self.running), self._like)
        self.running = None
        self.stop_requested |= bool(self.merged.stop_requested.value)
      if self._stop_flags is not None:
        self._stop_flags.clear()
      return
    while self._stop_flags and len(self._stop_flags) > keep:
      self.stop_requested |= bool(sharding.local_copy(self._stop_flags.popleft()))

  def take(self):
    """Every step's metrics since the last log, merged, on the host; starts the next log's."""
    self.read(keep=0)
    merged, self.merged = self.merged, None
    return merged


# Read by the loop, not logged: steps and flags are not values to plot.
_BOOKKEEPING = ('first_nonfinite_step', 'nonfinite_in_a_row', 'stop_requested')


def stop_if_diverged(config, train_metrics: dict, manager):
  """Raises FloatingPointError when steps since the last log had a non-finite loss or
  gradient: any in float32 or bfloat16; in float16, whose loss scaling skips a few steps as
  a matter of course, more than config.max_nonfinite_in_a_row in a row. Those steps left
  the model as it was, and nothing has been saved since."""
  skipped = int(train_metrics['nonfinite_steps'])
  if not skipped:
    return
  first = int(train_metrics['first_nonfinite_step'])
  in_a_row = int(train_metrics['nonfinite_in_a_row'])
  if config.dtype == 'float16' and in_a_row <= config.max_nonfinite_in_a_row:
    logging.warning('float16: %d steps skipped for a non-finite loss or gradient since the '
                    'last log (the first at step %d); the loss scale is now %g', skipped,
                    first, train_metrics['loss_scale'])
    return
  last_good = manager.latest_step()
  kept = ('no checkpoint was written before it' if last_good is None else
          f'the last good checkpoint, step {last_good}, is kept in {manager.directory}')
  reason = (f'{in_a_row} float16 steps in a row were skipped (more than '
            f'config.max_nonfinite_in_a_row={config.max_nonfinite_in_a_row})'
            if config.dtype == 'float16' else f'{skipped} step(s) since the last log')
  raise FloatingPointError(f'Step {first}: the loss or a gradient is not finite; {reason}. '
                           f'Training stops; {kept}.')


def _check_writable(workdir: str):
  """Fails at start, not at the first save an hour in, when the workdir cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix='.writable-'):
      pass
  except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
    raise run_lock.WorkdirError(f'--workdir={workdir} is not a writable folder: {e}') from e


# The config fields the learning-rate schedule is computed from (`steps.learning_rate`).
_SCHEDULE_FIELDS = ('num_train_steps', 'learning_rate', 'schedule', 'warmup_steps',
                    'decay_every_steps', 'decay_rate')


def _say_if_the_schedule_changed(config, saved: dict, step: int):
  """A run resumed with another num_train_steps (or other schedule fields) than its
  checkpoint was saved with follows the schedule of the new values from `step` on: says so
  at start, with the old and new values and the rate at `step` and at the end under each.
  `saved`: the checkpoint's flattened config."""
  changed = {name: saved[name] for name in _SCHEDULE_FIELDS
             if name in saved and saved[name] != config[name]}
  if not changed:
    return
  fields = ', '.join(f'config.{name}={config[name]!r} ({repr(value)[:40]} when saved)'
                     for name, value in changed.items())
  old = config.copy_and_resolve_references()
  rate, last = _rate_at(steps.learning_rate(config)), config.num_train_steps
  try:  # the checkpoint's values, as written into its config: a user's file may hold any
    old.update(changed)
    old_rate, old_last = _rate_at(steps.learning_rate(old)), int(old.num_train_steps)
    old_rate(old_last)
  except (TypeError, ValueError, OverflowError, ArithmeticError):
    logging.warning('Resuming from step %d with %s: the saved values do not make a schedule; '
                    'the new one is followed.', step, fields)
    return
  if rate(step) == old_rate(step) and rate(last) == old_rate(old_last):
    logging.info('Resuming from step %d with %s: the learning rate is %.3g at step %d and '
                 '%.3g at the end, as before.', step, fields, rate(step), step, rate(last))
    return
  logging.warning(
      'Resuming from step %d with %s: the learning-rate schedule is recomputed. At step %d '
      'the rate is now %.3g (%.3g under the values saved); it goes to %.3g at step %d (the '
      'saved schedule went to %.3g at step %d).', step, fields, step, rate(step),
      old_rate(step), rate(last), last, old_rate(old_last), old_last)


def _rate_at(schedule):
  """step -> the learning rate of `steps.learning_rate`'s schedule (or constant)."""
  return lambda step: float(schedule(step) if callable(schedule) else schedule)


def train_and_evaluate(config, workdir: str):
  """Trains (or resumes) the configured model in `workdir`; returns the final eval metrics
  and, when the run logged twice or more, its `train_images_per_sec`, with
  `train_flops_per_step`, `train_tflops_per_sec` and `train_mfu` where they are known
  (`throughput.Throughput`). Holds the workdir's lock throughout (`run_lock`): another run
  on it is refused at once."""
  config_checks.check(config)
  _check_writable(workdir)
  with run_lock.hold(workdir, 'train'):
    return _resume_and_train(config, workdir)


def _resume_and_train(config, workdir: str) -> dict:
  """`train_and_evaluate` under the workdir's lock."""
  # What the run trains on is recorded, and a resumed run must read what it started on.
  trained_on.refuse_synthetic_stand_in(config.data, workdir, training=True)
  training_data = data.create_datasets(config, workdir)
  trained_on.check_and_record_training_data(config.data, workdir)
  mesh = sharding.make_mesh()
  step_config, state = steps.create_train_state(config, mesh, training_data.attributes)
  manager = checkpoints.create_manager(workdir, config.keep_checkpoints, config.best_metric)
  # Step 0 is a converted checkpoint: weights only, the data starts from the beginning.
  resumed = checkpoints.restore_newest_intact(
      manager, checkpoints.abstract_like(state), training_data.train_batches, config)
  if resumed.step is not None:
    logging.info('Resuming from the checkpoint of step %d in %s', resumed.step, workdir)
    state = resumed.state
  elif config.init_from:
    state = convert_torch.with_torch_weights(step_config, state, config.init_from, mesh)
  if int(state.step) >= config.num_train_steps:
    logging.info('%s is already trained to step %d (config.num_train_steps); nothing to do. '
                 'Evaluate it with --mode=evaluate.', workdir, int(state.step))
  elif resumed.config is not None:
    _say_if_the_schedule_changed(config, resumed.config, int(state.step))
  if jax.process_index() == 0:  # what a stopped run logged after its checkpoint, to redo
    evaluate.drop_jsonl_rows_after(workdir, int(state.step))

  # TensorBoard only: the console gets the headline figures (console.py), not every metric.
  writer = (metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(workdir)])
            if jax.process_index() == 0 else metric_writers.MultiWriter([]))
  if int(state.step) == 0:
    writer.write_hparams({k: v for k, v in config.items() if not hasattr(v, 'items')})
  run = _Run(config, workdir, mesh, steps.jit_steps(step_config, mesh), training_data,
             manager, writer, step_config)
  started, first = time.perf_counter(), int(state.step) + 1
  try:
    with _StopSignals() as run.stop:
      results = _train_loop(run, state)
  finally:  # what was logged and saved before an error or a signal is kept
    writer.flush()
    manager.wait_until_finished()
  if jax.process_index() == 0:
    _print_summary(run, first, time.perf_counter() - started, results)
  return results


def _print_summary(run: _Run, first: int, seconds: float, results: dict):
  """The end of the run on stdout (`console.summary`): its evaluations as metrics.jsonl
  holds them, every run in the workdir included."""
  config = run.config
  print(console.summary(
      run.workdir, config.eval.split, console.evaluation_rows(run.workdir),
      config.best_metric, str(run.manager.directory), sorted(run.manager.all_steps()),
      (first, config.num_train_steps), seconds, results.get('train_images_per_sec')),
        flush=True)


def itstime(step: int, every_n_steps: int, total_steps: int) -> bool:
  """Whether a periodic action (log, evaluation, checkpoint) is due after `step`: every
  `every_n_steps` steps, and after the last step, so that a run ends logged, evaluated
  and saved (big_vision's `u.itstime`)."""
  return step % every_n_steps == 0 or step == total_steps


def _train_loop(run: _Run, state) -> dict:
  """Steps from the state's step + 1 to config.num_train_steps, with the periodic logs,
  evaluations and checkpoints; returns the last evaluation's metrics."""
  config, train_batches = run.config, run.data.train_batches
  report_progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                                    writer=run.writer)
  first = int(state.step) + 1
  progress = console.Progress(first, config.num_train_steps, show_bar=jax.process_index() == 0)
  train_metrics = _TrainMetrics(run.steps.merge_metrics, stop_flags=run.stop.processes > 1)
  skipped, results = 0, {}
  throughput = throughput_lib.Throughput(
      config.batch_size, int(state.step), peak_per_device=throughput_lib.device_peak(config.dtype))
  profile = throughput_lib.ProfileWindow(config.profile_steps,
                                         throughput_lib.profile_dir(run.workdir))
  _warn_if_outside(profile.window, first, config.num_train_steps)
  with profile, contextlib.closing(progress):  # profile: stops a trace still running
    for step in range(first, config.num_train_steps + 1):
      profile.before(step)
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = next(train_batches)
        skipped += int(batch['skipped'].sum())
        batch = sharding.global_batch(_device_entries(run.stop.mark(batch)), run.mesh)
        if step == first:  # compiles the step (the call below reuses it), counts its FLOPs
          throughput.flops_per_step = throughput_lib.train_step_flops(
              run.steps.train, run.step_config, state, batch)
        state, step_metrics = run.steps.train(state, batch)
      profile.after(step, state)
      train_metrics.add(step_metrics)
      report_progress(step)
      progress.step_done(step)
      last = step == config.num_train_steps
      logged = itstime(step, config.log_every_steps, config.num_train_steps)
      train_metrics.read(keep=0 if logged else _TrainMetrics.LAG)
      stopping = run.stop.requested(train_metrics)
      if logged or stopping:
        _write_train_metrics(run, step, train_metrics.take(),
                             throughput.figures(throughput.measure(step)), progress)
      evaluated = itstime(step, config.eval_every_steps, config.num_train_steps)
      if evaluated:
        with report_progress.timed('eval'):
          results = _evaluate_and_report(run, state, step, skipped)
        skipped = 0
      saved = itstime(step, config.checkpoint_every_steps, config.num_train_steps)
      if saved or stopping:
        with report_progress.timed('checkpoint'):
          checkpoints.save(run.manager, step, state, train_batches,
                           metrics=results if evaluated else None, config=config)
      if evaluated or saved:  # their time is not training's
        throughput.restart(step)
      if stopping and not last:
        raise Preempted(f'Pre-empted by {run.stop.received or "another process"} after step '
                        f'{step}: saved its checkpoint in {run.manager.directory}. Run the '
                        'same command again to resume from it.')
  if throughput.steady() is not None:
    results = dict(results, **{f'train_{name}': value for name, value
                               in throughput.figures(throughput.steady()).items()})
  return results


def _device_entries(batch: dict) -> sharding.PackedBatch:
  """What the train step reads of a batch (`steps.HOST_ONLY` left out), packed into an
  array per dtype: the host's cost of putting a batch on the devices is per array."""
  return sharding.PackedBatch.pack({name: value for name, value in batch.items()
                                    if name not in steps.HOST_ONLY})


def _warn_if_outside(window, first: int, last: int):
  """A config.profile_steps window this run will not reach (resumed past it, or beyond
  num_train_steps) is said at start, not silently skipped."""
  if window and not first <= window[0] <= last:
    logging.warning('config.profile_steps=%s: this run trains steps %d to %d and starts no '
                    'trace (the window must start inside them)', window, first, last)


def _write_train_metrics(run: _Run, step: int, train_metrics, speed: dict,
                         progress: console.Progress):
  """Logs the training metrics merged since the last log, after checking their steps, with
  the learning rate of `step` and the `speed` figures (`Throughput.figures`): every one in
  TensorBoard and as a row of metrics.jsonl (named train_*), the headline ones on the
  console."""
  with np.errstate(invalid='ignore'):  # nan, not a warning: a mean no step counted into
    computed = {k: float(v) for k, v in train_metrics.compute().items()}
  stop_if_diverged(run.config, computed, run.manager)
  scalars = {f'train_{k}': v for k, v in computed.items() if k not in _BOOKKEEPING}
  scalars['train_learning_rate'] = learning_rate_of_step(run.config, step)
  # The writer is asynchronous: it is handed dicts that nothing changes afterwards.
  run.writer.write_scalars(step, scalars)
  run.writer.write_scalars(step, speed)  # TensorBoard's names, without train_
  row = dict(scalars, **{f'train_{k}': v for k, v in speed.items()})
  if jax.process_index() == 0:
    evaluate.append_jsonl(run.workdir, step, row)
  logging.info('%s', console.headline(step, run.config.num_train_steps, row,
                                      progress.eta_seconds(step)))
  progress.logged(row.get('train_loss', float('nan')))


def learning_rate_of_step(config, step: int) -> float:
  """The learning rate train step `step` (from 1) updated the weights with: the schedule
  (`steps.learning_rate`) at the optimiser's count before that update, `step - 1`."""
  return _rate_at(steps.learning_rate(config))(step - 1)
