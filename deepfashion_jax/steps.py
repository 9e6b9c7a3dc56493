"""The training state and the jitted, sharded train, evaluation and prediction steps.

This is where data and model meet (docs/design.md). The model is split once into a static
graph definition and pure pytrees (parameters, batch-norm statistics), so the jitted step
is a pure function of (state, batch): no Python work per step, and the state is donated.
Data parallelism: one mesh axis `data` over every device; the batch is split along it and
the state is replicated, so XLA inserts the gradient and batch-norm reductions.

A step whose loss or gradients are not finite changes nothing but the step count: in
float16 that is dynamic loss scaling's normal skip (the scale halves); in float32 and
bfloat16 the training loop stops on it (see train.py).

config.ema_decay > 0 keeps an exponential moving average of the parameters and of the
batch-norm statistics in the state (`ema_params`, `ema_batch_stats`; None when off, so a
state without it keeps its old structure), updated in the jitted step after the optimiser:
ema = decay * ema + (1 - decay) * new; a skipped non-finite step leaves it unchanged.

config.grad_accum_steps = k > 1 splits the global batch into k micro-batches inside the
jitted step (`jax.lax.scan`: one compiled step), averages their gradients and makes one
optimiser update, so the step count and the learning-rate schedule count optimiser steps.
Micro-batch j holds the examples j, j + k, j + 2k, ... of the batch (each device's share of
the batch holds its share of every micro-batch). Batch-norm statistics follow the
micro-batches in order, as k smaller steps would: each micro-batch is normalised by its
own statistics and updates the running ones in turn, so with batch-norm in training mode
the gradient is close to, not equal to, a single big batch's. The reported metrics are the
micro-batches' merged: the whole batch's.

Fine-tuning (`create_optimizer`): config.layer_decay < 1 scales each backbone layer's
updates by layer_decay ** (num_layers + 1 - layer) (the backbone's `layer_id`), and
config.model.trainable='heads' freezes the backbone: FashionNet runs it in inference mode
behind stop_gradient (`FashionNet.frozen_backbone`), so the step has no backward pass
through it, and the optimiser gives it no update and keeps no state for it.
"""

import collections
import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

from absl import logging
import flax
from flax import nnx
from flax.training import dynamic_scale as dynamic_scale_lib
import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepfashion_jax import losses
from deepfashion_jax import metrics
from deepfashion_jax import sharding
from deepfashion_jax.data import device_transforms
from deepfashion_jax.data import vocabulary
from deepfashion_jax.models import backbones
from deepfashion_jax.models import fashion_net
from deepfashion_jax.models import xla_cpu

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
OPTIMIZERS = ('adam', 'sgd')
SCHEDULES = ('constant', 'cosine', 'step_decay')
WEIGHTS = ('raw', 'ema')  # config.eval.weights: the trained weights or their moving average
EMA_PREFIX = 'ema_'  # the evaluation metrics of the moving average (config.ema_decay > 0)
# A batch entry the training loop adds, (B,) bool: whether the process that holds the row
# has received a stop signal. The train step ORs it over the global batch into its metrics'
# stop_requested, so that every process learns of a signal from the same step, without a
# round trip between the hosts of its own (train.py).
STOP_REQUESTED = 'stop_requested'
# The batch entries the host reads and no step does: the training loop leaves them off the
# devices (each array put there costs the host time; the unknowns are 1,000 bytes a row).
HOST_ONLY = ('attribute_unknown', 'index', 'skipped')


# float16 starts its loss scale at 2^15 and doubles it after 2,000 finite steps in a row.
INITIAL_LOSS_SCALE = 2.0 ** 15


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nnx.State of nnx.Param
  batch_stats: Any  # nnx.State of nnx.BatchStat
  opt_state: Any
  rng: jax.Array  # raw key; step s uses fold_in(rng, s)
  nonfinite_in_a_row: jax.Array  # steps skipped in a row up to this one
  dynamic_scale: Optional[dynamic_scale_lib.DynamicScale]  # float16 only, else None
  # config.ema_decay > 0 only, else None: the moving averages of params and batch_stats
  ema_params: Any = None
  ema_batch_stats: Any = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static part of a step: what the compiled function closes over."""
  graphdef: Any
  optimizer: optax.GradientTransformation
  crop_size: int
  loss: dict  # config.loss: `losses.total_loss`'s keyword arguments but pos_weight
  attribute_types: Optional[np.ndarray]  # (A,); None: a state for prediction only
  pos_weight: Optional[np.ndarray]  # (A,) BCE weight of positives, or None
  ema_decay: float = 0.0  # > 0: the state keeps a moving average of the weights
  grad_accum_steps: int = 1  # micro-batches per optimiser step


class Gradients(NamedTuple):
  """A batch's gradients and what its forward pass gave on the way (`accumulated_gradients`)."""
  dynamic_scale: Optional[dynamic_scale_lib.DynamicScale]  # updated (float16), else None
  finite: jax.Array  # whether the step is finite: the loss, and in float16 the gradients
  loss: jax.Array  # per example: that of its micro-batch (a scalar with one micro-batch)
  outputs: dict  # the model's, in the batch's order
  parts: dict  # the loss's parts, as `loss`
  batch_stats: Any  # the batch-norm statistics the forward passes left
  grads: Any


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted steps of one model on one mesh (`jit_steps`)."""
  train: Callable  # (state, global batch) -> (state, metrics); donates the state
  evaluate: Callable  # (state, global batch) -> metrics
  # (state, global batch) -> (metrics, per-example scores and labels); --mode=evaluate's
  # breakdowns. Compiled only when called: training never pays for it.
  evaluate_examples: Callable
  predict: Callable  # (state, global batch) -> the model's inputs and outputs
  # (running metrics or None, a step's metrics) -> the two merged, packed
  # (`merge_train_metrics`): the training loop accumulates the steps' metrics on the device
  # with it. Donates nothing: the loop still holds a step's metrics after merging them (its
  # stop flag).
  merge_metrics: Callable


def create_model(config, rngs: nnx.Rngs) -> fashion_net.FashionNet:
  """FashionNet with config.model's fields as its keyword arguments, and the rest."""
  return fashion_net.FashionNet(**config.model, **model_arguments_from_elsewhere(config, rngs))


def model_arguments_from_elsewhere(config, rngs: Optional[nnx.Rngs]) -> dict:
  """FashionNet's keyword arguments that are not config.model's fields: the input side and
  the pixel scaling are the data's, the activation dtype the run's, the categories and
  attributes DeepFashion's."""
  return dict(image_size=config.data.crop_size, normalization=config.data.normalization,
              dtype=DTYPES[config.dtype], category_types=vocabulary.CATEGORY_TYPES,
              num_categories=vocabulary.NUM_CATEGORIES,
              num_attributes=vocabulary.NUM_ATTRIBUTES, rngs=rngs)


# `losses.total_loss`'s keyword arguments that are not config.loss's fields.
LOSS_ARGUMENTS_FROM_ELSEWHERE = ('pos_weight',)


# The warm-up takes at most this fraction of the run (`warmup_steps`).
MAX_WARMUP_FRACTION = 0.5


def warmup_steps(config) -> int:
  """config.warmup_steps, or half of config.num_train_steps when it is longer, with a logged
  note: a warm-up longer than half the run was meant for a longer one (the demo's 50 steps
  in a run shortened with --config.num_train_steps=10), and the cosine decay needs steps
  after it."""
  longest = int(config.num_train_steps * MAX_WARMUP_FRACTION)
  if config.warmup_steps <= longest:
    return config.warmup_steps
  logging.info('config.warmup_steps=%d is more than half of config.num_train_steps=%d: the '
               'learning rate warms up over %d steps instead', config.warmup_steps,
               config.num_train_steps, longest)
  return longest


def create_optimizer(config, backbone: Optional[nnx.Module] = None
                     ) -> optax.GradientTransformation:
  """Adam (the baseline's) or SGD with momentum, at `learning_rate(config)`; weight decay
  (AdamW's decoupled decay with Adam, coupled L2 with SGD) on `decayed_parameters` only
  unless config.decay_norms_and_biases; the gradient's global norm clipped to
  config.grad_clip_norm first when that is > 0.

  config.layer_decay < 1: layer-wise learning-rate decay (BEiT's, MAE's and ConvNeXt's
  fine-tuning): each parameter's update, its share of the weight decay included, times
  `layer_scale` (`scaled_by_layer`), under the same schedule, warm-up and clipping.
  config.model.trainable='heads': the backbone's parameters get no update, no weight decay
  and no optimiser state (no moments): optax.multi_transform, the optimiser above for the
  others and set_to_zero for them.
  The state keeps today's structure with layer_decay 1 and trainable 'all', and whatever
  layer_decay is (the scaling keeps no state): a run resumes with another layer_decay as
  with another learning rate, and never with another trainable (checkpoints.py names it).

  backbone: the model's backbone module (its shapes suffice), whose num_layers and
  layer_id the layer decay reads; built from config.model (shapes only) when None.
  """
  schedule = learning_rate(config)
  mask = None if config.decay_norms_and_biases else decayed_parameters
  optimizer = _base_optimizer(config, schedule, mask)
  if config.layer_decay != 1.0:
    backbone = abstract_backbone(config) if backbone is None else backbone
    optimizer = scaled_by_layer(optimizer, functools.partial(layer_scale, config.layer_decay,
                                                             backbone))
  if config.model.trainable == 'heads':
    optimizer = optax.multi_transform({TRAINED: optimizer, FROZEN: optax.set_to_zero()},
                                      trained_or_frozen)
  if config.grad_clip_norm > 0:  # only then: the optimiser state keeps its old structure
    optimizer = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optimizer)
  return optimizer


def abstract_backbone(config) -> nnx.Module:
  """config.model.backbone's module, shapes only (no weights are drawn)."""
  options = {name: config.model[name] for name in backbones.OPTIONS}
  return nnx.eval_shape(lambda: backbones.create(
      config.model.backbone, dtype=DTYPES[config.dtype], rngs=nnx.Rngs(0), **options))


def learning_rate(config) -> optax.ScalarOrSchedule:
  """The learning rate by optimiser step: optional warm-up, then a constant rate, cosine
  decay (to 0 at config.num_train_steps), or a step decay (x config.decay_rate every
  config.decay_every_steps: Liu & Lu's x0.8 per epoch); the warm-up takes at most half the
  run (`warmup_steps`). A plain number when constant: the optimiser state then keeps no
  step count of its own."""
  peak, warmup = config.learning_rate, warmup_steps(config)
  if config.schedule == 'cosine':
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1),
                                                  max(config.num_train_steps, 2))
  elif config.schedule == 'step_decay':
    schedule = optax.exponential_decay(peak, config.decay_every_steps, config.decay_rate,
                                       staircase=True)
    if warmup > 0:
      schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), schedule],
                                      [warmup])
  elif warmup > 0:
    schedule = optax.linear_schedule(0.0, peak, warmup)
  else:
    schedule = peak
  return schedule


def _base_optimizer(config, schedule, mask) -> optax.GradientTransformation:
  if config.optimizer == 'adam':  # AdamW: decay decoupled from the gradient's scaling
    return optax.adamw(schedule, eps=config.adam_eps, weight_decay=config.weight_decay,
                       mask=mask)
  # SGD: decay added to the gradient before momentum, i.e. coupled L2 regularisation
  return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=mask),
                     optax.sgd(schedule, momentum=config.momentum))


# The parameters left out of weight decay by name, whatever their shape: a ViT's position
# embeddings and class token (timm's no_weight_decay(): pos_embed, cls_token).
NO_DECAY_NAMES = ('position_embedding', 'class_token')
# The labels of `trained_or_frozen`: optax.multi_transform's groups.
TRAINED, FROZEN = 'trained', 'frozen'
BACKBONE = 'backbone'  # the backbone's attribute in FashionNet: its parameters' first key


def parameter_path(key_path) -> tuple:
  """A jax key path into a parameter tree as nnx.to_flat_state names the parameter:
  ('backbone', 'layer1', 0, 'conv1', 'kernel'), without the `value` attribute of the
  nnx.Variable that holds the array."""
  names = []
  for key in key_path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(key.key)
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(key.idx)
    elif isinstance(key, jax.tree_util.GetAttrKey):
      names.append(key.name)
    else:  # FlattenedIndexKey
      names.append(key.key)
  if key_path and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and names[-1] == 'value':
    names.pop()
  return tuple(names)


def decayed_parameters(params):
  """True for the parameters weight decay shrinks: kernels and embedding tables (2-D or
  more). False for every parameter of fewer dimensions (biases, the scales and offsets of
  batch and layer norms, ConvNeXt's layer scales: timm's and ConvNeXt's fine-tuning rule)
  and for those named in NO_DECAY_NAMES whatever their shape."""
  return jax.tree_util.tree_map_with_path(
      lambda key_path, p: p.ndim > 1 and parameter_path(key_path)[-1] not in NO_DECAY_NAMES,
      params)


def trained_or_frozen(params):
  """FROZEN for the backbone's parameters, TRAINED for the others (config.model.trainable
  'heads': the box branch, the heads, a landmark branch and attention train)."""
  return jax.tree_util.tree_map_with_path(
      lambda key_path, _: FROZEN if parameter_path(key_path)[:1] == (BACKBONE,) else TRAINED,
      params)


def layer_scale(layer_decay: float, backbone: nnx.Module, path: tuple) -> float:
  """The factor of the learning rate of the parameter at `path` (`parameter_path`) of
  FashionNet: layer_decay ** (num_layers + 1 - its layer), its layer being the backbone's
  layer_id of it (0: the stem, num_layers: the last block); a parameter outside the
  backbone is at num_layers + 1 (factor 1)."""
  if path[:1] != (BACKBONE,):
    return 1.0
  layer = backbone.layer_id(path[1:])
  if not 0 <= layer <= backbone.num_layers:
    raise ValueError(f'{path}: layer {layer} is outside [0, {backbone.num_layers}]')
  return float(layer_decay) ** (backbone.num_layers + 1 - layer)


def scaled_by_layer(inner: optax.GradientTransformation,
                    scale: Callable[[tuple], float]) -> optax.GradientTransformation:
  """`inner` with each parameter's update multiplied by scale(its path): a learning rate
  per parameter, applied after the rate, so that AdamW's decoupled decay is scaled with it
  (as BEiT's per-layer parameter groups do) and SGD's momentum is not. The state is
  inner's: the factors are constants of the compiled step."""

  def update(updates, state, params=None):
    updates, state = inner.update(updates, state, params)
    scaled = jax.tree_util.tree_map_with_path(
        lambda key_path, u: u * jnp.asarray(scale(parameter_path(key_path)), u.dtype), updates)
    return scaled, state

  return optax.GradientTransformation(inner.init, update)


def _pos_weight(config, attributes) -> Optional[np.ndarray]:
  """The baseline's BCE pos_weight from the training split's positives, scaled so that its
  largest is config.loss.pos_weights_scale; None when that is 0 (no weighting)."""
  if not config.loss.pos_weights_scale:
    return None
  return losses.attribute_pos_weight(attributes.train_positives, attributes.train_images,
                                     config.loss.pos_weights_scale)


def create_step_config(config, attributes=None) -> StepConfig:
  """The static part of `config`'s steps: the model's graph (from its shapes alone), the
  optimiser, config.loss; `attributes` as in `create_train_state`."""
  abstract_model = nnx.eval_shape(lambda: create_model(config, nnx.Rngs(config.seed)))
  return StepConfig(
      graphdef=nnx.split(abstract_model, nnx.Param, nnx.BatchStat)[0],
      optimizer=create_optimizer(config, abstract_model.backbone),
      crop_size=config.data.crop_size,
      loss=config.loss.to_dict(),
      attribute_types=None if attributes is None else np.asarray(attributes.types),
      pos_weight=None if attributes is None else _pos_weight(config, attributes),
      ema_decay=float(config.ema_decay), grad_accum_steps=int(config.grad_accum_steps))


def create_train_state(config, mesh, attributes=None):
  """(StepConfig, TrainState): the state is initialised by a jitted function whose outputs
  land already replicated on the mesh (shapes first, then shardings, then values).

  attributes: the dataset's `annotations.AttributeFacts` (their types for the metrics,
  their positives for the BCE's pos_weight); None for a state that only predicts.
  """
  step_config = create_step_config(config, attributes)
  init = functools.partial(initial_state, config, step_config)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), jax.eval_shape(init))
  return step_config, jax.jit(init, out_shardings=shardings,
                             compiler_options=xla_cpu.init_compiler_options(mesh))()


def initial_state(config, step_config: StepConfig) -> TrainState:
  """The train state before the first step (`create_train_state` jits it; jax.eval_shape
  of it gives its shapes without drawing a weight)."""
  model = create_model(config, nnx.Rngs(config.seed))
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  dynamic_scale = None
  if config.dtype == 'float16':
    dynamic_scale = dynamic_scale_lib.DynamicScale(
        fin_steps=jnp.zeros((), jnp.int32), scale=jnp.asarray(INITIAL_LOSS_SCALE, jnp.float32))
  # Its own stream: the parameters' initialisation used nnx.Rngs(seed).
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=step_config.optimizer.init(params), rng=rng,
                     nonfinite_in_a_row=jnp.zeros((), jnp.int32), dynamic_scale=dynamic_scale)
  return restart_ema(state) if config.ema_decay > 0 else state


def restart_ema(state: TrainState) -> TrainState:
  """The state with moving averages equal to its weights: a fresh start, or weights loaded
  from elsewhere (init_from, a converted checkpoint), which are their own average."""
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  return state.replace(ema_params=copy(state.params), ema_batch_stats=copy(state.batch_stats))


def has_ema(state: TrainState) -> bool:
  return state.ema_params is not None


def ema_weights(state: TrainState) -> TrainState:
  """The state with its moving averages as its weights: what evaluates and predicts the
  EMA model (config.eval.weights='ema'). Raises ValueError on a state without them."""
  if not has_ema(state):
    raise ValueError('this state keeps no moving average of the weights '
                     '(config.ema_decay=0)')
  return state.replace(params=state.ema_params, batch_stats=state.ema_batch_stats)


def _update_ema(decay: float, average, new):
  """decay * average + (1 - decay) * new, leaf by leaf, in the average's dtype."""
  return jax.tree.map(lambda a, n: (decay * a + (1.0 - decay) * n).astype(a.dtype),
                      average, new)


def _forward(step_config: StepConfig, params, batch_stats, batch, train: bool,
             dropout_rng=None):
  # copy: fresh Variables in this trace (the state's own belong to the caller's trace).
  model = nnx.merge(step_config.graphdef, params, batch_stats, copy=True)
  if train:
    model.train()
  else:
    model.eval()
  outputs = model(device_transforms.batch_images(batch, step_config.crop_size), dropout_rng)
  pos_weight = None if step_config.pos_weight is None else jnp.asarray(step_config.pos_weight)
  loss, parts = losses.total_loss(outputs, batch, pos_weight=pos_weight, **step_config.loss)
  return loss, (outputs, parts, nnx.state(model, nnx.BatchStat))


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _gradients(state: TrainState, loss_fn):
  """(dynamic_scale, finite, (loss, aux), grads) of loss_fn at state.params, through the
  float16 loss scale when the state has one. Without one, `finite` says only that the
  loss is: a non-finite gradient shows in the updated parameters, checked after."""
  if state.dynamic_scale is not None:
    return state.dynamic_scale.value_and_grad(loss_fn, has_aux=True)(state.params)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return None, jnp.isfinite(loss), (loss, aux), grads


def _attribute_types(step_config: StepConfig) -> jax.Array:
  if step_config.attribute_types is None:
    raise ValueError('This state was created without the dataset\'s attribute facts '
                     '(create_train_state(..., attributes=None)): it can only predict.')
  return jnp.asarray(step_config.attribute_types)


def split_micro_batches(tree, k: int):
  """Each (B, ...) leaf as (k, B / k, ...): micro-batch j holds rows j, j + k, j + 2k, ...,
  so that a device's consecutive rows hold rows of every micro-batch."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]),
                                             0, 1), tree)


def merge_micro_batches(tree):
  """`split_micro_batches`' inverse: (k, B / k, ...) leaves back to (B, ...), in order."""
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), tree)


def _updated_loss_scale(dynamic_scale, finite):
  """flax's DynamicScale update for a step whose gradients were `finite`: grow after
  growth_interval finite steps, back off on a non-finite one."""
  grow = dynamic_scale.fin_steps == dynamic_scale.growth_interval
  fin_scale = jnp.where(grow & finite, jnp.minimum(dynamic_scale.scale
                                                   * dynamic_scale.growth_factor,
                                                   jnp.finfo(jnp.float32).max),
                        dynamic_scale.scale)
  inf_scale = dynamic_scale.scale * dynamic_scale.backoff_factor
  if dynamic_scale.minimum_scale is not None:
    inf_scale = jnp.maximum(inf_scale, dynamic_scale.minimum_scale)
  return dynamic_scale.replace(
      fin_steps=jnp.where(grow | ~finite, 0, dynamic_scale.fin_steps + 1),
      scale=jnp.where(finite, fin_scale, inf_scale))


def accumulated_gradients(step_config: StepConfig, state: TrainState, batch: dict,
                          dropout_rng, micro_batches: int = 1,
                          train: bool = True) -> Gradients:
  """The Gradients of a global batch as `micro_batches` micro-batches (`split_micro_batches`): one
  `jax.lax.scan` over them, each forward starting from the batch-norm statistics the one
  before left (train: training mode; else inference mode, as a test compares with one big
  batch), the gradients averaged. The outputs come back in the batch's order; the loss and
  its parts as one value per example, that of its micro-batch (the merged metrics then
  weigh each micro-batch's by its examples). Micro-batch j's dropout draws from
  fold_in(dropout_rng, j). One micro-batch is the plain step, bit for bit."""
  if micro_batches == 1:
    loss_fn = lambda params: _forward(step_config, params, state.batch_stats, batch,
                                      train=train, dropout_rng=dropout_rng)
    dynamic_scale, finite, (loss, (outputs, parts, batch_stats)), grads = _gradients(
        state, loss_fn)
    return Gradients(dynamic_scale, finite, loss, outputs, parts, batch_stats, grads)
  dynamic_scale = state.dynamic_scale
  scale = 1.0 if dynamic_scale is None else dynamic_scale.scale

  def one_micro_batch(carry, inputs):
    batch_stats, grad_sum = carry
    micro_batch, j = inputs

    def scaled_loss(params):
      loss, aux = _forward(step_config, params, batch_stats, micro_batch, train=train,
                           dropout_rng=jax.random.fold_in(dropout_rng, j))
      return loss * scale, (loss, aux)

    (_, (loss, (outputs, parts, new_stats))), grads = jax.value_and_grad(
        scaled_loss, has_aux=True)(state.params)
    grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32) / scale, grad_sum, grads)
    return (new_stats, grad_sum), (loss, outputs, parts)

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
  (batch_stats, grad_sum), (losses_k, outputs, parts) = jax.lax.scan(
      one_micro_batch, (state.batch_stats, zeros),
      (split_micro_batches(batch, micro_batches), jnp.arange(micro_batches)),
      unroll=xla_cpu.unroll_loops())  # XLA:CPU's loops are slow (xla_cpu.py)
  grads = jax.tree.map(lambda s, p: (s / micro_batches).astype(p.dtype), grad_sum,
                       state.params)
  per_example = lambda values: merge_micro_batches(jnp.broadcast_to(
      values[:, None], (micro_batches, batch['valid'].shape[0] // micro_batches)))
  loss, parts = per_example(losses_k), {name: per_example(v) for name, v in parts.items()}
  outputs = merge_micro_batches(outputs)
  if dynamic_scale is None:  # as _gradients: the parameters' check catches the gradients
    return Gradients(None, jnp.all(jnp.isfinite(losses_k)), loss, outputs, parts,
                     batch_stats, grads)
  finite = _all_finite(grads)
  return Gradients(_updated_loss_scale(dynamic_scale, finite), finite, loss, outputs, parts,
                   batch_stats, grads)


def train_step(step_config: StepConfig, state: TrainState, batch: dict):
  """One optimiser step on a global batch; returns the new state and the batch's metrics.

  Randomness (dropout) comes from fold_in(state.rng, step): the same at every restart.
  With step_config.grad_accum_steps = k > 1, the batch is k micro-batches
  (`accumulated_gradients`; batch-norm statistics follow them in order) and still one
  optimiser step. With step_config.ema_decay > 0 the moving averages follow the new
  weights. The batch: a dict of global arrays, or a `sharding.PackedBatch` of them (the
  training loop's).
  """
  batch = sharding.unpacked(batch)
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  backward = accumulated_gradients(step_config, state, batch, dropout_rng,
                                   step_config.grad_accum_steps)
  updates, opt_state = step_config.optimizer.update(backward.grads, state.opt_state,
                                                    state.params)
  params = optax.apply_updates(state.params, updates)
  norms = dict(grad_norm=optax.tree.norm(backward.grads), param_norm=optax.tree.norm(params),
               update_norm=optax.tree.norm(updates))
  # A non-finite step (its loss, a gradient, or an update that overflows a parameter; a
  # NaN or inf gradient makes its parameter's update one) leaves the model and the
  # optimiser as they were: the state never holds a NaN or inf.
  finite = backward.finite & _all_finite(params)
  keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1, params=keep_old(params, state.params),
      batch_stats=keep_old(backward.batch_stats, state.batch_stats),
      opt_state=keep_old(opt_state, state.opt_state), dynamic_scale=backward.dynamic_scale,
      nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1))
  if has_ema(state):
    new_state = new_state.replace(
        ema_params=keep_old(_update_ema(step_config.ema_decay, state.ema_params, params),
                            state.ema_params),
        ema_batch_stats=keep_old(_update_ema(step_config.ema_decay, state.ema_batch_stats,
                                             backward.batch_stats), state.ema_batch_stats))
  batch_metrics = metrics.train_batch_metrics(
      backward.outputs, batch, dict(backward.parts, loss=backward.loss),
      _attribute_types(step_config), norms=norms, step=new_state.step, nonfinite=~finite,
      nonfinite_in_a_row=new_state.nonfinite_in_a_row,
      loss_scale=1.0 if backward.dynamic_scale is None else backward.dynamic_scale.scale,
      stop_requested=jnp.any(batch[STOP_REQUESTED]) if STOP_REQUESTED in batch else False)
  return new_state, batch_metrics


def eval_step(step_config: StepConfig, state: TrainState, batch: dict,
              with_examples: bool = False):
  """The metrics of one evaluation batch (batch-norm in inference mode); with_examples:
  (metrics, examples), the examples being what the breakdowns of `breakdown.py` rank over
  the whole split, from the same forward pass: the logits (float32) and the labels, one
  row per example of the global batch (padding rows included, `valid` False)."""
  loss, (outputs, parts, _) = _forward(step_config, state.params, state.batch_stats, batch,
                                       train=False)
  batch_metrics = metrics.batch_metrics(outputs, batch, dict(parts, loss=loss),
                                        _attribute_types(step_config))
  if not with_examples:
    return batch_metrics
  return batch_metrics, _examples(outputs, batch)


def _examples(outputs: dict, batch: dict) -> dict:
  """eval_step's examples: the logits (float32), the labels, `index` (the row in the
  annotation index, -1 for padding: the image's identity), the crop `region` (in canvas
  pixels, to draw on the image again), the true box and landmarks (crop coordinates) and,
  where the model predicts them, its own (`predicted_box`, `predicted_landmarks`)."""
  examples = {name: outputs[name].astype(jnp.float32)
              for name in ('category_logits', 'attribute_logits')}
  examples.update({name: batch[name] for name in ('category', 'attribute_positive', 'valid',
                                                  'index', 'region', 'box_valid',
                                                  'landmark_visible')})
  examples.update(true_box=batch['bbox'], true_landmarks=batch['landmarks'])
  for name in ('box', 'landmarks'):
    if name in outputs:
      examples[f'predicted_{name}'] = outputs[name].astype(jnp.float32)
  return examples


def jit_steps(step_config: StepConfig, mesh) -> Steps:
  """The train, eval and predict steps compiled for the mesh: batch split on `data`,
  state replicated and, for training, donated; and the merge of the train metrics, whose
  inputs and output are replicated."""
  replicated = sharding.replicated(mesh)
  jit = functools.partial(jax.jit, out_shardings=replicated,
                          compiler_options=xla_cpu.compiler_options(mesh))
  return Steps(train=jit(functools.partial(train_step, step_config), donate_argnums=0),
               evaluate=jit(functools.partial(eval_step, step_config)),
               evaluate_examples=jit(functools.partial(eval_step, step_config,
                                                       with_examples=True)),
               predict=jit(functools.partial(predict_step, step_config)),
               merge_metrics=jit(merge_train_metrics))


def merge_train_metrics(running: Optional[dict], step_metrics) -> dict:
  """The training metrics of the steps in `running` and of one more step, merged as the
  host would merge them (clu's `merge`: sums of totals and counts, the reduced values'
  sums, minima, maxima and ORs, the loss scale of the newer step), packed
  (`pack_leaves`). running: the packed metrics of the steps before, None for the first.

  Packed, because each output array of a jitted call costs the host time at every call:
  three outputs instead of the metrics' ~75 leaves are most of the dispatch's host time
  saved (benchmarks/loop_overhead.py times the dispatch).
  """
  merged = (step_metrics if running is None
            else unpack_leaves(running, step_metrics).merge(step_metrics))
  return pack_leaves(merged)


def pack_leaves(tree) -> dict:
  """dtype name -> the leaves of `tree` of that dtype, flattened and joined in leaf order."""
  groups = {}
  for leaf in jax.tree.leaves(tree):
    groups.setdefault(jnp.dtype(leaf.dtype).name, []).append(jnp.ravel(leaf))
  return {name: jnp.concatenate(leaves) for name, leaves in groups.items()}


def unpack_leaves(packed: dict, like):
  """`pack_leaves`' inverse: a tree shaped as `like` (whose leaves' shapes and dtypes alone
  are read), of slices of `packed`'s arrays: traced arrays in a jitted function, NumPy
  arrays on the host."""
  leaves, treedef = jax.tree.flatten(like)
  offsets, unpacked = collections.Counter(), []
  for leaf in leaves:
    name, size = jnp.dtype(leaf.dtype).name, int(np.prod(leaf.shape))
    start = offsets[name]
    unpacked.append(packed[name][start:start + size].reshape(leaf.shape))
    offsets[name] += size
  return jax.tree.unflatten(treedef, unpacked)


def predict_step(step_config: StepConfig, state: TrainState, batch: dict) -> dict:
  """The model's input images and outputs in inference mode (for figures and prediction);
  a landmark model's heatmaps only by their peaks (landmark_peaks (B, 8), each map's
  highest value: how sure the branch is), which is what the host needs of them."""
  model = nnx.merge(step_config.graphdef, state.params, state.batch_stats, copy=True)
  model.eval()
  images = device_transforms.batch_images(batch, step_config.crop_size)
  outputs = model(images)
  if 'landmark_heatmaps' in outputs:
    outputs['landmark_peaks'] = outputs.pop('landmark_heatmaps').max(axis=(1, 2))
  return dict(outputs, images=images)
