"""The main job: train, evaluate every `eval_every_steps`, checkpoint, resume by itself.

Started again on the same workdir, a run continues from its newest checkpoint (model,
optimiser, step and the data iterator's position), so that N steps in one go and k steps,
a restart and N - k more give the same parameters and the same logged metrics.
"""

import os

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
import numpy as np

from deepfashion_jax import checkpoints
from deepfashion_jax import config_checks
from deepfashion_jax import evaluate
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax.data import folder
from deepfashion_jax.data import pipeline
from deepfashion_jax.data import sources
from deepfashion_jax.data import vocabulary


def _train_dataset(config, index):
  """This process's share of the endless, shuffled training batches."""
  process_count = jax.process_count()
  return pipeline.train_dataset(
      sources.FolderSource(index, index.split_indices('train')),
      batch_size=pipeline.per_process_batch_size(config.batch_size, process_count),
      seed=config.seed, options=pipeline.image_options(config.data),
      process_index=jax.process_index(), process_count=process_count)


def _box_images(predict_step, state, eval_data, mesh, count: int):
  """The first `count` evaluation images with their true and predicted boxes."""
  batch = eval_data[0]
  outputs = predict_step(state, sharding.global_batch(batch, mesh))
  outputs = jax.tree.map(np.asarray, outputs)
  return evaluate.box_figure(outputs['images'][:count], batch['bbox'][:count],
                             outputs['box'][:count])


def _evaluate_and_report(config, workdir, writer, evaluators, state, eval_data, mesh, step,
                         skipped_in_training):
  eval_step, predict_step = evaluators
  results, skipped = evaluate.evaluate(eval_step, state, eval_data, mesh,
                                       f'evaluating step {step}')
  logging.info('Step %d: %d unreadable images skipped in training since the last '
               'evaluation, %d in this evaluation', step, skipped_in_training, skipped)
  results.update(skipped_images_train=skipped_in_training, skipped_images_eval=skipped)
  writer.write_scalars(step, {f'eval_{k}': v for k, v in results.items()})
  if config.num_box_images:
    writer.write_images(step, {'eval_boxes': _box_images(predict_step, state, eval_data,
                                                         mesh, config.num_box_images)})
  if jax.process_index() == 0:
    evaluate.append_jsonl(workdir, step, results)
  return results


def train_and_evaluate(config, workdir: str):
  """Trains (or resumes) the configured model in `workdir`; returns the final eval metrics."""
  config_checks.check(config)
  os.makedirs(workdir, exist_ok=True)
  index = folder.load_index(config.data, workdir)
  mesh = sharding.make_mesh()
  step_config, state = steps.create_train_state(config, mesh, index.attribute_types)
  train_step, eval_step, predict_step = steps.jit_steps(step_config, mesh)
  eval_data = evaluate.eval_dataset(config, index)
  train_iterator = pipeline.iterate(_train_dataset(config, index), threads=config.data.threads,
                                    processes=config.data.processes)

  manager = checkpoints.create_manager(workdir, config.keep_checkpoints, config.best_metric)
  latest = manager.latest_step()
  if latest is not None:
    logging.info('Resuming from the checkpoint of step %d in %s', latest, workdir)
    # Step 0 is a converted checkpoint: weights only, the data starts from the beginning.
    state = checkpoints.restore(manager, latest, checkpoints.abstract_like(state),
                                train_iterator if latest > 0 else None)
  elif config.model.init_from:
    state = steps.with_torch_weights(step_config, state, config.model.init_from, mesh)
  first_step = int(state.step) + 1
  if first_step > config.num_train_steps:
    logging.info('%s is already trained to step %d (config.num_train_steps); nothing to do. '
                 'Evaluate it with --mode=evaluate.', workdir, first_step - 1)

  writer = metric_writers.create_default_writer(workdir,
                                                just_logging=jax.process_index() > 0)
  if first_step == 1:
    writer.write_hparams({k: v for k, v in config.items() if not hasattr(v, 'items')})
  report_progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                                    writer=writer)
  train_metrics, skipped, results = None, 0, {}
  for step in range(first_step, config.num_train_steps + 1):
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      batch = next(train_iterator)
      skipped += int(batch['skipped'].sum())
      state, batch_metrics = train_step(state, sharding.global_batch(batch, mesh))
    train_metrics = batch_metrics if train_metrics is None else train_metrics.merge(batch_metrics)
    report_progress(step)
    last = step == config.num_train_steps
    if step % config.log_every_steps == 0 or last:
      writer.write_scalars(step, {f'train_{k}': float(v)
                                  for k, v in train_metrics.compute().items()})
      train_metrics = None
    if step % config.eval_every_steps == 0 or last:
      with report_progress.timed('eval'):
        results = _evaluate_and_report(config, workdir, writer, (eval_step, predict_step),
                                       state, eval_data, mesh, step, skipped)
      skipped = 0
    if step % config.checkpoint_every_steps == 0 or last:
      with report_progress.timed('checkpoint'):
        evaluated = step % config.eval_every_steps == 0 or last
        checkpoints.save(manager, step, state, train_iterator,
                         metrics=results if evaluated else None)
  writer.flush()
  manager.wait_until_finished()
  return results


def convert(config, workdir: str, torch_checkpoint: str) -> int:
  """Writes a PyTorch baseline (or torchvision) checkpoint as this project's step-0
  checkpoint in `workdir`, for `--mode=evaluate` and prediction; returns the step."""
  config_checks.check(config)
  mesh = sharding.make_mesh()
  # Attribute types only matter to the metrics, which converting does not compute.
  step_config, state = steps.create_train_state(config, mesh,
                                                np.zeros(vocabulary.NUM_ATTRIBUTES, np.int8))
  state = steps.with_torch_weights(step_config, state, torch_checkpoint, mesh)
  manager = checkpoints.create_manager(workdir, config.keep_checkpoints, config.best_metric)
  checkpoints.save(manager, 0, state)
  manager.wait_until_finished()
  logging.info('Wrote %s as the step-0 checkpoint of %s', torch_checkpoint, workdir)
  return 0
