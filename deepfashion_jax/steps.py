"""The training state and the jitted, sharded train, evaluation and prediction steps.

This is where data and model meet (DESIGN.md). The model is split once into a static
graph definition and pure pytrees (parameters, batch-norm statistics), so the jitted step
is a pure function of (state, batch): no Python work per step, and the state is donated.
Data parallelism: one mesh axis `data` over every device; the batch is split along it and
the state is replicated, so XLA inserts the gradient and batch-norm reductions.
"""

import dataclasses
import functools
from typing import Any

from absl import logging
import flax
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepfashion_jax import convert_torch
from deepfashion_jax import losses
from deepfashion_jax import metrics
from deepfashion_jax import sharding
from deepfashion_jax.data import device_transforms
from deepfashion_jax.data import vocabulary
from deepfashion_jax.models import fashion_net

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nnx.State of nnx.Param
  batch_stats: Any  # nnx.State of nnx.BatchStat
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static part of a step: what the compiled function closes over."""
  graphdef: Any
  optimizer: optax.GradientTransformation
  crop_size: int
  beta: float
  attribute_loss: str
  reduce_sum: bool
  attribute_types: np.ndarray


def create_model(config, rngs: nnx.Rngs) -> fashion_net.FashionNet:
  model = config.model
  return fashion_net.FashionNet(
      backbone=model.backbone, image_size=config.data.crop_size,
      roi_pool=model.roi_pool, roi_sampling_ratio=model.roi_sampling_ratio,
      roi_aligned=model.roi_aligned, box_gradient_into_roi=model.box_gradient_into_roi,
      category_head=model.category_head, category_types=vocabulary.CATEGORY_TYPES,
      dtype=DTYPES[config.dtype], rngs=rngs)


def create_optimizer(config) -> optax.GradientTransformation:
  """Adam (the baseline's) or SGD with momentum; optional warm-up, cosine decay, decay."""
  peak = config.learning_rate
  if config.schedule == 'cosine':
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, max(config.warmup_steps, 1),
                                                  max(config.num_train_steps, 2))
  elif config.warmup_steps > 0:
    schedule = optax.linear_schedule(0.0, peak, config.warmup_steps)
  else:
    schedule = peak
  if config.optimizer == 'adam':
    return optax.adamw(schedule, eps=config.adam_eps, weight_decay=config.weight_decay)
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, momentum=config.momentum))


def create_train_state(config, mesh, attribute_types: np.ndarray):
  """(StepConfig, TrainState): the state is initialised by a jitted function whose outputs
  land already replicated on the mesh (shapes first, then shardings, then values).

  attribute_types: (A,) type of each attribute, as the dataset's list_attr_cloth.txt says.
  """
  optimizer = create_optimizer(config)

  def init():
    model = create_model(config, nnx.Rngs(config.seed))
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=optimizer.init(params))

  abstract_model = nnx.eval_shape(lambda: create_model(config, nnx.Rngs(config.seed)))
  graphdef = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)[0]
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), jax.eval_shape(init))
  state = jax.jit(init, out_shardings=shardings)()
  step_config = StepConfig(
      graphdef=graphdef, optimizer=optimizer, crop_size=config.data.crop_size,
      beta=config.loss.beta, attribute_loss=config.loss.attribute,
      reduce_sum=config.loss.reduce_sum, attribute_types=np.asarray(attribute_types))
  return step_config, state


def _forward(step_config: StepConfig, params, batch_stats, batch, train: bool):
  # copy: fresh Variables in this trace (the state's own belong to the caller's trace).
  model = nnx.merge(step_config.graphdef, params, batch_stats, copy=True)
  if train:
    model.train()
  else:
    model.eval()
  outputs = model(device_transforms.batch_images(batch, step_config.crop_size))
  loss, parts = losses.total_loss(outputs, batch, beta=step_config.beta,
                                  attribute_kind=step_config.attribute_loss,
                                  reduce_sum=step_config.reduce_sum)
  return loss, (outputs, parts, nnx.state(model, nnx.BatchStat))


def train_step(step_config: StepConfig, state: TrainState, batch: dict):
  """One optimiser step on a global batch; returns the new state and the batch's metrics."""
  grad_fn = jax.value_and_grad(
      lambda params: _forward(step_config, params, state.batch_stats, batch, train=True),
      has_aux=True)
  (loss, (outputs, parts, batch_stats)), grads = grad_fn(state.params)
  updates, opt_state = step_config.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state)
  batch_metrics = metrics.batch_metrics(outputs, batch, dict(parts, loss=loss),
                                        jnp.asarray(step_config.attribute_types))
  return new_state, batch_metrics


def eval_step(step_config: StepConfig, state: TrainState, batch: dict):
  """The metrics of one evaluation batch (batch-norm in inference mode)."""
  loss, (outputs, parts, _) = _forward(step_config, state.params, state.batch_stats, batch,
                                       train=False)
  return metrics.batch_metrics(outputs, batch, dict(parts, loss=loss),
                               jnp.asarray(step_config.attribute_types))


def jit_steps(step_config: StepConfig, mesh):
  """The train, eval and predict steps compiled for the mesh: batch split on `data`,
  state replicated and, for training, donated."""
  replicated = sharding.replicated(mesh)
  train = jax.jit(functools.partial(train_step, step_config), donate_argnums=0,
                  out_shardings=replicated)
  evaluate = jax.jit(functools.partial(eval_step, step_config), out_shardings=replicated)
  predict = jax.jit(functools.partial(predict_step, step_config), out_shardings=replicated)
  return train, evaluate, predict


def predict_step(step_config: StepConfig, state: TrainState, batch: dict) -> dict:
  """The model's input images and outputs in inference mode (for figures and prediction)."""
  model = nnx.merge(step_config.graphdef, state.params, state.batch_stats, copy=True)
  model.eval()
  images = device_transforms.batch_images(batch, step_config.crop_size)
  return dict(model(images), images=images)


def with_torch_weights(step_config: StepConfig, state: TrainState, path: str, mesh) -> TrainState:
  """The state with weights from a PyTorch file: a baseline checkpoint sets the whole
  model, a torchvision state dict the backbone; the optimiser starts afresh."""
  model = nnx.merge(step_config.graphdef, state.params, state.batch_stats, copy=True)
  kind = convert_torch.load_into(model, path)
  logging.info('Initialised %s from the %s checkpoint %s',
               'the model' if kind == 'baseline' else 'the backbone', kind, path)
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  new_state = TrainState(step=state.step, params=params, batch_stats=batch_stats,
                         opt_state=step_config.optimizer.init(params))
  return jax.device_put(new_state, sharding.replicated(mesh))
