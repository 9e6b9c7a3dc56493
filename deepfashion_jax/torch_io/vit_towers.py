"""What the families of ViT image towers (open_clip's, Hugging Face's CLIP and SigLIP) share:
the tower a file holds, read from its weights' shapes; the check that it is the configured
backbone's; and its arrays written into the backbone (models/vit.py), the position
embedding resampled to the backbone's grid.

A file tells a tower's patch size, width, depth, MLP size, projection and which parts it
has (class token, LayerNorm before the blocks, patch bias, attention-pooling head), not its
number of heads, activation or LayerNorm epsilon: those are the configured backbone's.
"""

import dataclasses
import re

from absl import logging
from flax import nnx
import numpy as np

from deepfashion_jax.models import backbones
from deepfashion_jax.models import fashion_net
from deepfashion_jax.models import vit
from deepfashion_jax.torch_io import common
from deepfashion_jax.torch_io.errors import CheckpointError

# The pixel normalisation each kind of tower was trained with, as config.data.normalization
# names it: CLIP's own mean and std, SigLIP's (x / 255 - 0.5) / 0.5.
NORMALIZATIONS = {'CLIP': 'clip', 'SigLIP': 'baseline'}
_CLIP_STATISTICS = '(0.481, 0.458, 0.408) and std (0.269, 0.261, 0.276)'


@dataclasses.dataclass(frozen=True)
class Tower:
  """A ViT image tower as a file holds it: the fields of `vit.Architecture` that its
  weights tell, and its position embedding's grid (grid x grid patches)."""
  library: str  # how messages name the file's kind: 'an open_clip', 'a Hugging Face SigLIP'
  kind: str  # 'CLIP' or 'SigLIP': the pixel normalisation it expects (NORMALIZATIONS)
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  grid: int
  patch_bias: bool
  class_token: bool
  ln_pre: bool
  map_head: bool
  projection: int  # 0: none

  def __str__(self) -> str:
    return f'{self.library} ViT {self.width} wide, {self.depth} deep, patch {self.patch_size}'

  def differences(self, architecture: vit.Architecture) -> list:
    """What differs between this tower and `architecture`, as 'name file's (backbone's)'."""
    mine = dict(patch_size=self.patch_size, width=self.width, depth=self.depth,
                mlp_dim=self.mlp_dim, patch_bias=self.patch_bias,
                class_token=self.class_token, ln_pre=self.ln_pre,
                attention_pooling=self.map_head, projection=self.projection)
    theirs = dict(patch_size=architecture.patch_size, width=architecture.width,
                  depth=architecture.depth, mlp_dim=architecture.mlp_dim,
                  patch_bias=architecture.patch_bias, class_token=architecture.class_token,
                  ln_pre=architecture.ln_pre, attention_pooling=architecture.pool == 'map',
                  projection=architecture.projection)
    if not self.projection:  # a tower saved without its projection fits one with (`load`)
      del mine['projection'], theirs['projection']
    return [f'{name} {mine[name]} (the backbone: {theirs[name]})'
            for name in mine if mine[name] != theirs[name]]


def leaf(name: str, is_norm: bool) -> str:
  """A torch parameter's name ('weight', 'bias') as the Flax variable's: a LayerNorm's
  scale and bias, a linear layer's or convolution's kernel and bias."""
  return (common.NORM_LEAVES if is_norm else common.LEAVES).get(name, name)


def shape(arrays: dict, key: str, ndim: int, path: str) -> tuple:
  """The shape of arrays[key], which must have `ndim` dimensions; CheckpointError naming
  the key otherwise, or when the file lacks it."""
  if key not in arrays:
    raise CheckpointError(f'{path}: it has no {key}, which a ViT image tower has')
  found = np.shape(arrays[key])
  if len(found) != ndim:
    raise CheckpointError(f'{path}: {key} has shape {found}, expected {ndim} dimensions')
  return found


def patch_embedding(arrays: dict, key: str, path: str) -> tuple:
  """(width, patch size) from a patch convolution's weight (width, 3, p, p)."""
  width, channels, height, side = shape(arrays, key, 4, path)
  if channels != 3 or height != side:
    raise CheckpointError(f'{path}: {key} has shape {(width, channels, height, side)}, '
                          'expected (width, 3, patch, patch): square patches of RGB images')
  return width, side


def depth(arrays: dict, pattern: str) -> int:
  """The number of blocks: the distinct numbers N in keys matching `pattern` (a regex with
  one group for N)."""
  return len({m.group(1) for m in map(re.compile(pattern).match, arrays) if m})


def grid(arrays: dict, key: str, width: int, prefix_tokens: int, path: str) -> int:
  """The side of the square grid of patches that the position embedding arrays[key]
  (tokens, width) holds, after `prefix_tokens` rows (the class token's)."""
  tokens, found_width = shape(arrays, key, 2, path)
  if found_width != width:
    raise CheckpointError(f'{path}: {key} has shape {(tokens, found_width)}, expected '
                          f'(tokens, {width}): the patch embedding is {width} wide')
  patches = tokens - prefix_tokens
  side = int(round(np.sqrt(max(patches, 0))))
  if patches < 1 or side * side != patches:
    raise CheckpointError(f'{path}: {key} holds {tokens} positions: {prefix_tokens} for the '
                          'class token and a square grid of patches expected')
  return side


def unpacked(key: str, array: np.ndarray, attention: tuple, path: str) -> dict:
  """nn.MultiheadAttention's packed `in_proj_weight` (3D, D) or `in_proj_bias` (3D,) at
  `key` -> {key[query|key|value]: (the path of vit.Attention's `query`, `key` or `value`
  kernel or bias under `attention`, its third)}."""
  packed = array.ndim in (1, 2) and array.shape[0] % 3 == 0
  if not packed or (array.ndim == 2 and array.shape[0] != 3 * array.shape[1]):
    raise CheckpointError(f'{path}: {key} has shape {array.shape}, expected the query, key '
                          'and value projections packed: (3 x width, width) or (3 x width,)')
  name = leaf(key.rpartition('_')[2], is_norm=False)  # in_proj_weight -> kernel
  return {f'{key}[{part}]': (attention + (part, name), third)
          for part, third in zip(('query', 'key', 'value'), np.split(array, 3))}


def linear_weight(projection: np.ndarray) -> np.ndarray:
  """A projection used as x @ projection (open_clip's `proj`, (D, P)) as the nn.Linear
  weight (P, D) it amounts to, the layout `common.load_variables` takes."""
  return np.asarray(projection).T


def _vit_backbone(model: nnx.Module, tower: Tower, path: str):
  """The model's backbone, which must be a ViT; CheckpointError naming the flag otherwise."""
  name = getattr(model, 'backbone_name', None)
  backbone = getattr(model, 'backbone', None)
  if not isinstance(backbone, vit.VisionTransformer):
    title = backbones.BACKBONES[name].title if name in backbones.BACKBONES else repr(name)
    raise CheckpointError(f'{path} holds {tower}; the configured backbone is {title} '
                          f'(config.model.backbone={name!r}), not a Vision Transformer'
                          f'{_suggestion(tower)}')
  return name, backbone


def _suggestion(tower: Tower) -> str:
  """Which backbones the tower fits, as the flag to set; '' when none does."""
  fitting = [name for name, a in vit.ARCHITECTURES.items() if not tower.differences(a)]
  if not fitting:
    return ''
  return ': set ' + ' or '.join(f'--config.model.backbone={name}' for name in fitting)


def check(model: nnx.Module, tower: Tower, path: str):
  """Refuses a file whose tower is not the configured backbone's, naming what the file holds,
  config.model.backbone and what differs."""
  name, backbone = _vit_backbone(model, tower, path)
  differences = tower.differences(backbone.architecture)
  if differences:
    title = backbones.BACKBONES[name].title
    raise CheckpointError(
        f'{path} holds {tower}; the configured backbone is {title}, '
        f'{backbone.architecture.title} (config.model.backbone={name!r}): '
        f'{"; ".join(differences)}{_suggestion(tower)}')


def position_embedding(array: np.ndarray, tower: Tower, model: nnx.Module) -> np.ndarray:
  """A file's position embedding (tokens, D) or (1, tokens, D) as the backbone's (1, tokens,
  D): resampled to the backbone's grid when the file's differs (`vit.resample_position_
  embedding`, timm's bicubic resampling), the class token's row kept."""
  array = np.asarray(array, np.float32).reshape(1, -1, tower.width)
  if tower.grid == model.backbone.grid:
    return array
  logging.info('Position embedding resampled from %d x %d to %d x %d patches', tower.grid,
               tower.grid, model.backbone.grid, model.backbone.grid)
  return vit.resample_position_embedding(array, model.backbone.grid, int(tower.class_token))


def _warn_about_normalization(model: nnx.Module, tower: Tower, path: str):
  expected = NORMALIZATIONS[tower.kind]
  if model.normalization == expected:
    return
  if expected in fashion_net.NORMALIZATIONS:
    logging.warning('%s is %s: its weights expect --config.data.normalization=%s, not %r.',
                    path, tower, expected, model.normalization)
  else:
    logging.warning('%s is %s: its weights expect CLIP\'s pixel mean %s, which no '
                    'config.data.normalization offers (%r here).', path, tower,
                    _CLIP_STATISTICS, model.normalization)


def load(model: nnx.Module, tower: Tower, named: dict, path: str) -> None:
  """Writes `named` ({key in the file: (path in the backbone, array in PyTorch's layout)},
  `common.load_variables`) into the backbone, which `check` has found fitting. A tower saved
  without its projection (Hugging Face's CLIPVisionModel) leaves the backbone's as it was
  initialised, with a warning."""
  named = {key: (('backbone',) + target, array) for key, (target, array) in named.items()}
  if model.backbone.architecture.projection and not tower.projection:
    logging.warning('%s holds no projection: the backbone\'s (%d -> %d) stays as initialised.',
                    path, tower.width, model.backbone.architecture.projection)
    kept = np.asarray(model.backbone.projection[...])
    named['(projection, kept)'] = (('backbone', 'projection'), linear_weight(kept))
  common.load_variables(model, named, path, only_prefix=('backbone',))
  _warn_about_normalization(model, tower, path)
