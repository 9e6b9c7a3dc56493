"""What the families of Vision Transformer files share (torchvision's and timm's ViTs, CLIP's
and SigLIP's image towers): the architecture a file holds checked against the configured
backbone, packed attention projections split, the position embedding resampled to the
model's grid, and the arrays written into the backbone (`models/vit.py`'s names).

A family reads the architecture's sizes from its keys into a `vit.Architecture` (its fixed
traits, CLIP's quick GELU say, from the family) and maps each key onto a path inside the
backbone; `load_backbone` does the rest.
"""

import dataclasses

from flax import nnx
import numpy as np

from deepfashion_jax.models import backbones
from deepfashion_jax.models import vit
from deepfashion_jax.torch_io import common
from deepfashion_jax.torch_io.errors import CheckpointError

# A LayerNorm's parameter names -> Flax's.
LAYER_NORM_LEAVES = {'weight': 'scale', 'bias': 'bias'}
QKV = ('query', 'key', 'value')  # the order of torch's packed in_proj / qkv rows


def describe(what: str, architecture: vit.Architecture) -> str:
  """'a timm ViT 384 wide, 12 deep, patch 16', how messages name what a file holds."""
  return f'{what} {architecture.title}'


def _unsized(architecture: vit.Architecture) -> vit.Architecture:
  """The traits a file's keys tell: not its heads (packed in the projections) nor the side
  its position grid was made for (resampled)."""
  return dataclasses.replace(architecture, heads=0, image_size=0)


def fitting_backbones(held: vit.Architecture) -> tuple:
  """The names in backbones.BACKBONES whose architecture a file holding `held` fits."""
  return tuple(name for name, a in vit.ARCHITECTURES.items() if _unsized(a) == _unsized(held))


def check_architecture(model: nnx.Module, held: vit.Architecture, what: str, path: str):
  """Refuses a file whose architecture (`held`, what: 'a timm ViT') is not the configured
  backbone's, naming both, config.model.backbone and the value that fits."""
  name = model.backbone_name
  architecture = getattr(model.backbone, 'architecture', None)
  if architecture is not None and _unsized(architecture) == _unsized(held):
    return
  fits = fitting_backbones(held)
  advice = (f'set --config.model.backbone={fits[0]} to load it' if fits else
            'no backbone here has that architecture')
  raise CheckpointError(
      f'{path} holds {describe(what, held)}; the configured backbone is '
      f'{backbones.BACKBONES[name].title} (config.model.backbone={name!r}): {advice}'
      f'{_differences(held, architecture)}')


def _differences(held: vit.Architecture, architecture: vit.Architecture | None) -> str:
  """'; the file's tower differs in: width 768 (the backbone's: 32), ...'; '' when the
  backbone is no ViT."""
  if architecture is None:
    return ''
  mine, theirs = (dataclasses.asdict(_unsized(a)) for a in (held, architecture))
  return '; the file\'s tower differs in: ' + ', '.join(
      f'{field} {mine[field]!r} (the backbone\'s: {theirs[field]!r})'
      for field in mine if mine[field] != theirs[field])


def split_packed(prefix: tuple, weight: np.ndarray, bias: np.ndarray | None) -> dict:
  """torch's packed (3D, D) query-key-value projection (and its (3D,) bias) -> {path inside
  the backbone: array} for `prefix` + ('query' | 'key' | 'value', 'kernel' | 'bias')."""
  arrays = {}
  for name, part in zip(QKV, np.split(weight, 3, axis=0)):
    arrays[prefix + (name, 'kernel')] = part
  if bias is not None:
    for name, part in zip(QKV, np.split(bias, 3, axis=0)):
      arrays[prefix + (name, 'bias')] = part
  return arrays


def shape(arrays: dict, key: str, ndim: int, path: str) -> tuple:
  """The shape of arrays[key], which must have `ndim` dimensions; CheckpointError naming
  the key otherwise, or when the file lacks it."""
  if key not in arrays:
    raise CheckpointError(f'{path}: it has no {key}, which a ViT has')
  found = np.shape(arrays[key])
  if len(found) != ndim:
    raise CheckpointError(f'{path}: {key} has shape {found}, expected {ndim} dimensions')
  return found


def unpacked(arrays: dict, weight_key: str, attention: tuple, path: str) -> dict:
  """nn.MultiheadAttention's packed `in_proj_weight` (3D, D) at `weight_key` and its
  `in_proj_bias` (3D,) -> {weight_key[query.kernel] ...: (the path of vit.Attention's part
  under `attention`, its third)} (`split_packed`)."""
  weight = arrays[weight_key]
  bias_key = weight_key[:-len('weight')] + 'bias'
  bias = arrays.get(bias_key)
  if weight.ndim != 2 or weight.shape[0] != 3 * weight.shape[1]:
    raise CheckpointError(f'{path}: {weight_key} has shape {weight.shape}, expected the '
                          'query, key and value projections packed: (3 x width, width)')
  if bias is not None and bias.shape != weight.shape[:1]:
    raise CheckpointError(f'{path}: {bias_key} has shape {bias.shape}, expected '
                          f'{weight.shape[:1]}, as {weight_key} packs three projections')
  return {f'{weight_key}[{target[-2]}.{target[-1]}]': (target, part)
          for target, part in split_packed(attention, weight, bias).items()}


def position_embedding(array: np.ndarray, model: nnx.Module, key: str, path: str) -> np.ndarray:
  """The file's (1, prefix + g * g, D) position embedding (or (prefix + g * g, D)) resampled
  to the backbone's grid (`vit.resample_position_embedding`, the class token's row kept)."""
  array = np.asarray(array, np.float32)
  array = array[None] if array.ndim == 2 else array
  prefix = int(model.backbone.architecture.class_token)
  patches = array.shape[1] - prefix
  grid = int(round(np.sqrt(max(patches, 0))))
  if array.ndim != 3 or grid * grid != patches or grid == 0:
    raise CheckpointError(f'{path}: {key} has shape {array.shape}: expected (1, {prefix} + g * g'
                          ', width), one row per patch of a g x g grid')
  return vit.resample_position_embedding(array, model.backbone.grid, prefix)


def load_backbone(model: nnx.Module, named: dict, path: str):
  """Writes {key in the file: (path inside the backbone, array in torch's layout)} into
  model.backbone (`common.load_variables`: missing, unexpected and misshapen keys refused).
  Torch's layout: a 4-D array is a convolution's (out, in, kh, kw) weight and a 2-D one a
  Linear's (out, in), both transposed here; others are written as they are (a (D, P)
  projection stored as `x @ proj` is passed transposed)."""
  common.load_variables(model, {k: (('backbone',) + p, a) for k, (p, a) in named.items()},
                        path, only_prefix=('backbone',))


def numbered(keys, prefix: str) -> int:
  """How many numbered modules `prefix`<i>. the keys hold (a file's blocks)."""
  found = {k[len(prefix):].split('.', 1)[0] for k in keys if k.startswith(prefix)}
  return len({i for i in found if i.isdigit()})


def layer_norm(path: tuple, leaf: str) -> tuple:
  return path + (LAYER_NORM_LEAVES.get(leaf, leaf),)


def block_path(index: int, rest: str, modules: dict, norms: tuple) -> tuple:
  """Block `index`'s key without its block prefix ('mlp.fc1.weight') -> the path inside the
  backbone (('blocks', index, 'mlp', 'fc1', 'kernel')), through the layout's table of
  `modules` (its names -> ours) and its LayerNorms' names, `norms`."""
  module, leaf = rest.rsplit('.', 1)
  target = ('blocks', index) + modules.get(module, tuple(module.split('.')))
  if module in norms:
    return layer_norm(target, leaf)
  return target + (common.LEAVES.get(leaf, leaf),)
