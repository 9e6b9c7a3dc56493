"""The DeepFashion network: backbone features (a ResNet, VGG-16, ConvNeXt or ViT,
`backbones.py`), a box branch, local features pooled from the predicted box, and category
and attribute heads (docs/baseline.md). The box branch, ROI-Align and the heads take the
backbone's last map, its channels, side and stride from the backbone.

Two options bring in Liu & Lu 2018's design (`landmarks.py`):
  landmarks='heatmaps': a landmark branch on the backbone's stride-8 map (`landmark_map`:
    VGG-16's conv4_3, a ResNet's layer2, a ViT block's tokens repeated 2 x 2) predicts one
    heatmap per landmark slot, trained beside the other heads; the rest of the model is
    unchanged.
  landmarks='attention': the same, and the stride-8 map becomes (1 + A) * map, A the
    attention U-Net's output over the map and the heatmaps' maximum, before the rest of
    the backbone reads it.
  heads='liu_lu': instead of the box branch and the global + ROI-pooled local features,
    their heads: the last map max-pooled 2 x 2 (VGG's pool5), flattened, and for the
    categories and for the attributes a fully connected layer to 1024, a ReLU and one to
    the outputs; the attributes' with two logits (negative, positive) per attribute.

Outputs, all float32 whatever the activation dtype:
  category_logits (B, 50), attribute_logits (B, 1000), box (B, 4) as (x1, y1, x2, y2) in
  units of the input side (x2 and y2 can reach 2, as in the baseline);
  with category_head='per_garment_type' also garment_type_logits (B, 3) and
  category_logits_within_type (B, 50): each type's classifier over its own categories, the
  other entries -inf. category_logits is then log p(type) + log p(category | type), so a
  softmax over it is the 50-way distribution p(type) x p(category | type);
  with landmarks: landmark_heatmaps (B, H, W, 8) at the input's side and landmarks
  (B, 8, 2), each heatmap's highest pixel in [0, 1] coordinates of the input;
  with heads='liu_lu': no box; attribute_two_way_logits (B, 2, 1000) (negative, positive),
  and attribute_logits their difference, the log-odds of each attribute.
"""

import typing
from typing import Any, Literal

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from deepfashion_jax.models import backbones
from deepfashion_jax.models import landmarks as landmarks_lib
from deepfashion_jax.models import roi
from deepfashion_jax.models import vgg
from deepfashion_jax.models import vit

BOX_CHANNELS = 32  # box_reduce's output channels (the baseline's)
ROI_OUTPUT_SIZE = 3  # the local features' S x S bins pooled from the box (the baseline's)
# The choices of FashionNet's options: config_checks reads them from its annotations.
RoiPool = Literal['align', 'baseline_max']
CategoryHead = Literal['single', 'per_garment_type']
Heads = Literal['fashionnet', 'liu_lu']
Landmarks = Literal['none', 'heatmaps', 'attention']
# What training changes: every parameter, or all but the backbone's (`frozen_backbone`).
Trainable = Literal['all', 'heads']
# FashionNet's options that change no array but what the weights compute: a checkpoint
# means something only with the values it was trained with (checkpoints.py).
CHANGES_MEANING = ('roi_pool', 'roi_aligned', 'roi_sampling_ratio', 'global_pool',
                   'landmark_block')
LIU_LU_HIDDEN = 1024  # their heads' hidden layer
# Per-channel (mean, std) of x / 255: the baseline's (0.5, 0.5), which SigLIP's weights
# and timm's augreg ViTs expect too; torchvision's ImageNet statistics, which torchvision's
# pretrained backbones expect; and the statistics of CLIP's training images, which CLIP's
# image towers expect (OpenAI's and open_clip's preprocessing).
NORMALIZATIONS = {
    'baseline': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    'clip': ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


def normalize_images(images, dtype, normalization: str = 'baseline'):
  """uint8 RGB in [0, 255] -> (x / 255 - mean) / std, per channel."""
  mean, std = (np.asarray(v, np.float32) for v in NORMALIZATIONS[normalization])
  scale, shift = 1.0 / (255.0 * std), -mean / std
  return images.astype(dtype) * scale.astype(dtype) + shift.astype(dtype)


def torch_default_init(fan_in: int) -> dict:
  """nn.Linear's and nn.Conv2d's own initialisation, so that a from-scratch run starts
  where the baseline's does: weights by kaiming_uniform with a = sqrt(5), and biases, both
  uniform in +-1/sqrt(fan_in)."""
  bound = 1.0 / np.sqrt(fan_in)

  def uniform(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return dict(kernel_init=uniform, bias_init=uniform)


class FashionNet(nnx.Module):
  """The baseline's FashionResnet, with options where it had bugs or shortcuts."""

  def __init__(self, *, backbone: str = 'resnet18', roi_pool: RoiPool = 'align',
               roi_sampling_ratio: int = 2, roi_aligned: bool = True,
               box_gradient_into_roi: bool = False, category_head: CategoryHead = 'single',
               dropout: float = 0.0, heads: Heads = 'fashionnet',
               landmarks: Landmarks = 'none',
               drop_path: float = backbones.OPTIONS['drop_path'],
               global_pool: vit.GlobalPool = backbones.OPTIONS['global_pool'],
               landmark_block: int = backbones.OPTIONS['landmark_block'],
               trainable: Trainable = 'all',
               # Not in config.model: from the data, the run, or the dataset's constants.
               image_size: int = 224, normalization: str = 'baseline',
               dtype: Any = jnp.float32, category_types=None, num_categories: int = 50,
               num_attributes: int = 1000, rngs: nnx.Rngs):
    """The keyword arguments down to `trainable` are config.model's fields, one for one
    (`steps.create_model`); config_checks reads the Literal annotations' choices.

    trainable='heads': a frozen backbone (a linear probe, or heads trained on fixed
    features): see `frozen_backbone`. Everything outside it (the box branch, the heads, a
    landmark branch and attention) trains."""
    for name, value, kind in (('roi_pool', roi_pool, RoiPool), ('heads', heads, Heads),
                              ('landmarks', landmarks, Landmarks),
                              ('category_head', category_head, CategoryHead),
                              ('trainable', trainable, Trainable)):
      if value not in typing.get_args(kind):
        raise ValueError(f'{name} must be one of {typing.get_args(kind)}, got {value!r}')
    if trainable == 'heads' and drop_path != backbones.OPTIONS['drop_path']:
      raise ValueError(f"trainable='heads' runs the backbone in inference mode, without "
                       f'stochastic depth: leave drop_path={backbones.OPTIONS["drop_path"]}')
    self.trainable = trainable
    if normalization not in NORMALIZATIONS:
      raise ValueError(f'normalization must be one of {tuple(NORMALIZATIONS)}, got '
                       f'{normalization!r}')
    self.normalization = normalization
    self.backbone_name = backbone
    # The backbone's options, kept as config.model names them.
    self.drop_path, self.global_pool = drop_path, global_pool
    self.landmark_block = landmark_block
    self.backbone = backbones.create(backbone, dtype=dtype, rngs=rngs, image_size=image_size,
                                     drop_path=drop_path, global_pool=global_pool,
                                     landmark_block=landmark_block)
    # A backbone with stochastic depth draws it from the step's key (`__call__`).
    self.backbone_takes_rng = 'drop_path' in backbones.BACKBONES[backbone].options
    channels = self.backbone.out_features
    self.image_size = image_size
    self.feature_stride = self.backbone.stride  # input pixels per cell of the last map
    self.feature_size = self.backbone.feature_size(image_size)
    if self.feature_size < 1:
      raise ValueError(f'image_size={image_size} is smaller than one cell of '
                       f'{backbone}\'s last feature map ({self.feature_stride} px)')
    self.roi_pool = roi_pool
    self.roi_sampling_ratio, self.roi_aligned = roi_sampling_ratio, roi_aligned
    self.box_gradient_into_roi = box_gradient_into_roi
    self.dtype = dtype
    linear = lambda n_in, n_out: nnx.Linear(n_in, n_out, dtype=dtype, param_dtype=jnp.float32,
                                            rngs=rngs, **torch_default_init(n_in))
    self.heads, self.landmarks, self.category_head = heads, landmarks, category_head
    # Not in the baseline (0 by default); its randomness comes from the step's rng.
    self.dropout = nnx.Dropout(dropout)
    if heads == 'liu_lu':
      self._liu_lu_heads(channels, num_categories, num_attributes, linear)
    else:
      self._fashionnet_heads(channels, self.backbone.global_features, num_categories,
                             num_attributes, category_types, linear, rngs)
    # Made last, so that the rest starts from the same weights with or without them.
    if landmarks != 'none':
      self.landmark_branch = landmarks_lib.LandmarkBranch(self.backbone.landmark_features,
                                                          dtype=dtype, rngs=rngs)
    if landmarks == 'attention':
      self.landmark_attention = landmarks_lib.LandmarkAttention(
          self.backbone.landmark_features, dtype=dtype, rngs=rngs)

  def _fashionnet_heads(self, channels, global_features, num_categories, num_attributes,
                        category_types, linear, rngs):
    """The baseline's: the box branch, and the heads on the joined features: the
    backbone's global feature (a ResNet's: its last map's mean) and the local ones."""
    self.box_reduce = nnx.Conv(channels, BOX_CHANNELS, (1, 1), dtype=self.dtype,
                               param_dtype=jnp.float32, rngs=rngs,
                               **torch_default_init(channels))
    flat = BOX_CHANNELS * self.feature_size ** 2
    self.box_top_left = linear(flat, 2)
    self.box_size = linear(flat, 2)
    joined = global_features + channels * ROI_OUTPUT_SIZE ** 2
    self.attribute_classifier = linear(joined, num_attributes)
    if self.category_head == 'single':
      self.category_classifier = linear(joined, num_categories)
    else:
      if category_types is None:
        raise ValueError("category_head='per_garment_type' needs each category's garment type")
      types = np.asarray(category_types)
      self.num_categories = len(types)
      # Static: the categories (columns of the 50-way logits) of each garment type.
      self.type_columns = tuple(tuple(np.flatnonzero(types == t).tolist())
                                for t in range(int(types.max()) + 1))
      self.garment_type_classifier = linear(joined, len(self.type_columns))
      self.per_type_category_classifiers = nnx.List(
          [linear(joined, len(c)) for c in self.type_columns])

  def _liu_lu_heads(self, channels, num_categories, num_attributes, linear):
    if self.category_head != 'single' or self.dropout.rate:
      raise ValueError("heads='liu_lu' has its own category head and no dropout: leave "
                       "category_head='single' and dropout=0")
    pooled_side = self.feature_size // 2
    if pooled_side < 1:
      raise ValueError(f"heads='liu_lu' max-pools the last map 2 x 2, which needs a side "
                       f"of 2 or more; image_size={self.image_size} gives "
                       f"{self.feature_size}")
    flat = channels * pooled_side ** 2
    self.num_attributes = num_attributes
    self.category_hidden = linear(flat, LIU_LU_HIDDEN)
    self.category_classifier = linear(LIU_LU_HIDDEN, num_categories)
    self.attribute_hidden = linear(flat, LIU_LU_HIDDEN)
    self.attribute_classifier = linear(LIU_LU_HIDDEN, 2 * num_attributes)

  def frozen_backbone(self) -> nnx.Module:
    """A copy of the backbone for trainable='heads': in inference mode whatever the model's
    (batch norm normalises with its running statistics and leaves them as they are; no
    dropout or stochastic depth), its parameters behind jax.lax.stop_gradient.

    On its parameters rather than its outputs, so that what is trained after it still gets
    its gradient: the landmark attention re-weights the stride-8 map inside the backbone,
    and its gradient comes back through the later stages, whose weights get none. Nothing
    else that is differentiated (not the images) reaches the backbone, so without the
    attention the backward pass has no part in it at all (XLA never sees one)."""
    graphdef, params, rest = nnx.split(self.backbone, nnx.Param, ...)
    frozen = nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, params), rest)
    frozen.eval()
    return frozen

  def predict_box(self, features):
    """The baseline's box branch; flattens in PyTorch's NCHW order so its weights map."""
    reduced = self.box_reduce(features)
    flat = jnp.transpose(reduced, (0, 3, 1, 2)).reshape(reduced.shape[0], -1)
    top_left = jax.nn.sigmoid(self.box_top_left(flat).astype(jnp.float32))
    size = jax.nn.sigmoid(self.box_size(flat).astype(jnp.float32))
    return jnp.concatenate([top_left, top_left + size], axis=-1)

  def local_features(self, features, box):
    """(B, C * S * S) features pooled from the box, flattened channel-major like PyTorch.

    ROI-Align takes the box in input pixels with torchvision's `spatial_scale` = 1 / the
    backbone's stride: a feature cell covers 32 pixels of a ResNet's input, though the map
    has ceil(side / 32) cells (its last cell runs past the image when the side is not a
    multiple of 32); 16 of VGG-16's, whose map has floor(side / 16) (the pools drop an
    odd last row: the map can end short of the image).
    """
    if not self.box_gradient_into_roi:
      box = jax.lax.stop_gradient(box)
    if self.roi_pool == 'baseline_max':
      pooled = roi.baseline_max_pool(features, box, ROI_OUTPUT_SIZE)
    else:
      pooled = roi.roi_align(features, box * self.image_size,
                             output_size=ROI_OUTPUT_SIZE,
                             spatial_scale=1.0 / self.feature_stride,
                             sampling_ratio=self.roi_sampling_ratio, aligned=self.roi_aligned)
    return jnp.transpose(pooled, (0, 3, 1, 2)).reshape(pooled.shape[0], -1)

  def __call__(self, images, dropout_rng=None) -> dict:
    """images: (B, H, W, 3) uint8 (normalised here as `self.normalization` says), or floats
    already normalised;
    dropout_rng: a key for the dropout on the joined features (training with dropout > 0)
      and, folded in, for the backbone's stochastic depth (drop_path > 0)."""
    if images.dtype == jnp.uint8:
      images = normalize_images(images, self.dtype, self.normalization)
    found = {}

    def at_landmark_map(features):  # the stride-8 map, on the way through the backbone
      found['heatmaps'] = self.landmark_branch(features)
      if self.landmarks == 'attention':
        features, _ = self.landmark_attention(features, found['heatmaps'])
      return features

    backbone, backbone_rng = self.backbone, {}
    if self.trainable == 'heads':
      backbone = self.frozen_backbone()  # in inference mode: no stochastic depth
    elif self.backbone_takes_rng:
      backbone_rng['dropout_rng'] = (None if dropout_rng is None else
                                     jax.random.fold_in(dropout_rng, 1))
    backbone_outputs = backbone(images.astype(self.dtype),
                                at_landmark_map if self.landmarks != 'none' else None,
                                **backbone_rng)
    features = backbone_outputs[self.backbone.final_map]
    outputs = {}
    if 'heatmaps' in found:
      outputs['landmark_heatmaps'] = found['heatmaps']
      outputs['landmarks'] = landmarks_lib.landmark_positions(found['heatmaps'])
    if self.heads == 'liu_lu':
      return dict(outputs, **self._liu_lu_outputs(features))
    box = self.predict_box(features)
    global_features = backbone_outputs['global']
    joined = jnp.concatenate([global_features, self.local_features(features, box)], axis=-1)
    joined = self.dropout(joined, rngs=dropout_rng)
    outputs.update(box=box,
                   attribute_logits=self.attribute_classifier(joined).astype(jnp.float32))
    if self.category_head == 'single':
      outputs['category_logits'] = self.category_classifier(joined).astype(jnp.float32)
    else:
      outputs.update(self._per_garment_type(joined))
    return outputs

  def _liu_lu_outputs(self, features) -> dict:
    """Their heads on the last map: pool5, flattened in PyTorch's NCHW order (so that
    their weights map), through each head's two fully connected layers."""
    pooled = vgg.max_pool_2x2(features)
    flat = jnp.transpose(pooled, (0, 3, 1, 2)).reshape(pooled.shape[0], -1)
    category = self.category_classifier(jax.nn.relu(self.category_hidden(flat)))
    two_way = self.attribute_classifier(jax.nn.relu(self.attribute_hidden(flat)))
    two_way = two_way.astype(jnp.float32).reshape(-1, 2, self.num_attributes)
    return {'category_logits': category.astype(jnp.float32),
            'attribute_two_way_logits': two_way,
            'attribute_logits': two_way[:, 1] - two_way[:, 0]}

  def _per_garment_type(self, joined) -> dict:
    """A garment-type head and one classifier per type, combined into 50-way logits."""
    type_logits = self.garment_type_classifier(joined).astype(jnp.float32)
    log_type = jax.nn.log_softmax(type_logits)
    within = jnp.full((joined.shape[0], self.num_categories), -jnp.inf, jnp.float32)
    category = within
    for t, (head, columns) in enumerate(zip(self.per_type_category_classifiers,
                                            self.type_columns)):
      logits = head(joined).astype(jnp.float32)
      columns = np.asarray(columns)
      within = within.at[:, columns].set(logits)
      category = category.at[:, columns].set(log_type[:, t:t + 1] + jax.nn.log_softmax(logits))
    return {'garment_type_logits': type_logits, 'category_logits_within_type': within,
            'category_logits': category}
