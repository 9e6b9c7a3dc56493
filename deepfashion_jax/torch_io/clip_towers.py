"""What the CLIP and SigLIP image-tower families (`open_clip`, `hugging_face`) share beyond
`vit_common`: the architecture a file holds, read from its weights' shapes (each checked, so
that a damaged file is a CheckpointError naming the key), the traits its keys cannot tell
taken from the published tower's architecture; and the load, which keeps the backbone's own
projection for a tower saved without one and says which pixel normalisation the weights
expect.

A file tells a tower's patch size, width, depth, MLP size, projection and which parts it has
(class token, LayerNorm before the blocks, patch bias, attention-pooling head), not its
number of heads, activation or LayerNorm epsilon: those are the published architecture's
(`vit.ARCHITECTURES['clip_vit_b16']`, OpenAI's CLIP: quick GELU, eps 1e-5; 'siglip_b16':
tanh GELU, eps 1e-6). open_clip's LAION-trained towers use the exact GELU with the same keys:
nothing in the file tells them apart.
"""

import dataclasses
import re

from absl import logging
from flax import nnx

import numpy as np

from deepfashion_jax.models import fashion_net
from deepfashion_jax.models import vit
from deepfashion_jax.torch_io import common
from deepfashion_jax.torch_io import vit_common
from deepfashion_jax.torch_io.errors import CheckpointError

# The published towers whose untold traits a file's architecture takes, by kind.
PUBLISHED = {'CLIP': 'clip_vit_b16', 'SigLIP': 'siglip_b16'}
# The pixel normalisation each kind was trained with, as config.data.normalization names it:
# CLIP's own mean and std, SigLIP's (x / 255 - 0.5) / 0.5.
NORMALIZATIONS = {'CLIP': 'clip', 'SigLIP': 'baseline'}
_CLIP_STATISTICS = '(0.481, 0.458, 0.408) and std (0.269, 0.261, 0.276)'


def architecture(kind: str, **from_file) -> vit.Architecture:
  """The architecture a file of `kind` ('CLIP', 'SigLIP') holds: the fields its weights
  tell (`from_file`), the others the published tower's; heads and side unknown (0)."""
  return dataclasses.replace(vit.ARCHITECTURES[PUBLISHED[kind]], heads=0, image_size=0,
                             **from_file)


def leaf(name: str, is_norm: bool) -> str:
  """A torch parameter's name ('weight', 'bias') as the Flax variable's: a LayerNorm's
  scale and bias, a linear layer's or convolution's kernel and bias."""
  return (vit_common.LAYER_NORM_LEAVES if is_norm else common.LEAVES).get(name, name)


def target(name: str, block: re.Pattern, block_modules: dict, top_modules: dict) -> tuple:
  """The backbone's variable a tower key (without its prefix) fills, from the layout's
  tables: `block` matches a block's key as (number, module, leaf); `block_modules` and
  `top_modules` map a module to (its path in the backbone, whether it is a LayerNorm). A
  key no table has gives a path the backbone lacks, which load_variables lists as
  unexpected."""
  match = block.match(name)
  if match:
    number, module, leaf_name = match.groups()
    if module in block_modules:
      path, is_norm = block_modules[module]
      return ('blocks', int(number)) + path + (leaf(leaf_name, is_norm),)
  module, _, leaf_name = name.rpartition('.')
  if module in top_modules:
    path, is_norm = top_modules[module]
    return path + (leaf(leaf_name, is_norm),)
  return ('unknown', name)


def patch_embedding(arrays: dict, key: str, path: str) -> tuple:
  """(width, patch size) from a patch convolution's weight (width, 3, p, p)."""
  width, channels, height, side = vit_common.shape(arrays, key, 4, path)
  if channels != 3 or height != side:
    raise CheckpointError(f'{path}: {key} has shape {(width, channels, height, side)}, '
                          'expected (width, 3, patch, patch): square patches of RGB images')
  return width, side


def positions(arrays: dict, key: str, width: int, path: str) -> np.ndarray:
  """The position embedding arrays[key], which must be (tokens, width)."""
  tokens, found_width = vit_common.shape(arrays, key, 2, path)
  if found_width != width:
    raise CheckpointError(f'{path}: {key} has shape {(tokens, found_width)}, expected '
                          f'(tokens, {width}): the patch embedding is {width} wide')
  return arrays[key]


def linear_weight(projection: np.ndarray) -> np.ndarray:
  """A projection used as x @ projection (open_clip's `proj`, (D, P)) as the nn.Linear
  weight (P, D) it amounts to, the layout `vit_common.load_backbone` takes."""
  return np.asarray(projection).T


def _warn_about_normalization(model: nnx.Module, kind: str, what: str, path: str):
  expected = NORMALIZATIONS[kind]
  if model.normalization == expected:
    return
  if expected in fashion_net.NORMALIZATIONS:
    logging.warning('%s is %s: its weights expect --config.data.normalization=%s, not %r.',
                    path, what, expected, model.normalization)
  else:
    logging.warning("%s is %s: its weights expect CLIP's pixel mean %s, which no "
                    'config.data.normalization offers (%r here).', path, what,
                    _CLIP_STATISTICS, model.normalization)


def check(model: nnx.Module, held: vit.Architecture, what: str, path: str) -> vit.Architecture:
  """`vit_common.check_architecture`, a tower saved without its projection (Hugging Face's
  CLIPVisionModel) fitting a backbone with one; returns `held` as it was checked."""
  backbone = getattr(model.backbone, 'architecture', None)
  if backbone is not None and backbone.projection and not held.projection:
    with_projection = dataclasses.replace(held, projection=backbone.projection)
    if dataclasses.replace(with_projection, heads=backbone.heads,
                           image_size=backbone.image_size) == backbone:
      held = with_projection  # all but the projection fits: the backbone keeps its own
  vit_common.check_architecture(model, held, what, path)
  return held


def load(model: nnx.Module, kind: str, what: str, named: dict, path: str):
  """Writes `named` ({key: (path inside the backbone, array in torch's layout)}) into the
  backbone, which `check` found fitting; the backbone's projection stays as initialised,
  with a warning, when `named` has none."""
  architecture_here = model.backbone.architecture
  if architecture_here.projection and ('projection',) not in {p for p, _ in named.values()}:
    logging.warning("%s holds no projection: the backbone's (%d -> %d) stays as initialised.",
                    path, architecture_here.width, architecture_here.projection)
    kept = np.asarray(model.backbone.projection[...])
    named = dict(named, **{'(projection, kept)': (('projection',), linear_weight(kept))})
  vit_common.load_backbone(model, named, path)
  _warn_about_normalization(model, kind, what, path)

