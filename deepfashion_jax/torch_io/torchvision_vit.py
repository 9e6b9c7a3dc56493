"""torchvision's VisionTransformer state dicts (vit_b_16, ...) into a ViT backbone
(`models/vit.py`).

Keys: `conv_proj.{weight,bias}` (the patch convolution), `class_token` (1, 1, D),
`encoder.pos_embedding` (1, 1 + g * g, D), per block
`encoder.layers.encoder_layer_<i>.{ln_1, self_attention.in_proj_{weight,bias} (query, key
and value packed), self_attention.out_proj, ln_2, mlp.0, mlp.3}`, `encoder.ln` (the final
norm, over all tokens) and the classifier `heads.*`, dropped. LayerNorms' eps 1e-6 and the
exact GELU: vit.Architecture's defaults. The position embedding is resampled to the
model's grid. torchvision's weights expect --config.data.normalization=imagenet.
"""

from absl import logging
from flax import nnx
import numpy as np

from deepfashion_jax.models import vit
from deepfashion_jax.torch_io import common
from deepfashion_jax.torch_io import vit_common

NAME = 'torchvision_vit'
WHAT = 'a torchvision ViT'
_LAYERS = 'encoder.layers.encoder_layer_'
_CLASSIFIER = 'heads.'
# A block's modules -> ours (its packed attention apart).
_BLOCK = {'ln_1': ('ln1',), 'ln_2': ('ln2',), 'self_attention.out_proj': ('attention', 'out'),
          'mlp.0': ('mlp', 'fc1'), 'mlp.3': ('mlp', 'fc2')}
_NORMS = ('ln_1', 'ln_2')


def _keys(content) -> set:
  return {k[len('module.'):] if k.startswith('module.') else k
          for k in content if isinstance(k, str)}


def matches(content) -> bool:
  """A state dict with torchvision's ViT patch convolution and position embedding."""
  return (isinstance(content, dict)
          and {'conv_proj.weight', 'encoder.pos_embedding'} <= _keys(content))


def architecture_of(arrays: dict, path: str) -> vit.Architecture:
  """The ViT the keys describe (its heads and native side unknown: 0); CheckpointError
  naming a key whose array has the wrong number of dimensions."""
  fc1 = f'{_LAYERS}0.mlp.0.weight'
  return vit.Architecture(
      patch_size=int(vit_common.shape(arrays, 'conv_proj.weight', 4, path)[-1]),
      width=int(vit_common.shape(arrays, 'encoder.pos_embedding', 3, path)[-1]),
      depth=vit_common.numbered(arrays, _LAYERS), heads=0,
      mlp_dim=int(vit_common.shape(arrays, fc1, 2, path)[0]) if fc1 in arrays else 0,
      image_size=0, patch_bias='conv_proj.bias' in arrays,
      class_token='class_token' in arrays)


def _block_path(key: str) -> tuple:
  """'encoder.layers.encoder_layer_3.mlp.0.weight' -> ('blocks', 3, 'mlp', 'fc1', 'kernel')."""
  index, rest = key[len(_LAYERS):].split('.', 1)
  return vit_common.block_path(int(index), rest, _BLOCK, _NORMS)


def named_arrays(arrays: dict, model: nnx.Module, path: str) -> dict:
  """{key: (path inside the backbone, array)}, the packed projections split (their keys
  suffixed with the part), the position embedding resampled."""
  named = {}
  for key, array in arrays.items():
    if key.endswith('self_attention.in_proj_weight'):
      attention = ('blocks', int(key[len(_LAYERS):].split('.', 1)[0]), 'attention')
      named.update(vit_common.unpacked(arrays, key, attention, path))
    elif key.endswith('self_attention.in_proj_bias'):
      continue  # split with the weight
    elif key == 'conv_proj.weight' or key == 'conv_proj.bias':
      named[key] = (('patch_embed', common.LEAVES[key.rsplit('.', 1)[1]]), array)
    elif key == 'class_token':
      named[key] = (('class_token',), array)
    elif key == 'encoder.pos_embedding':
      named[key] = (('position_embedding',),
                    vit_common.position_embedding(array, model, key, path))
    elif key.startswith('encoder.ln.'):
      named[key] = (vit_common.layer_norm(('norm',), key.rsplit('.', 1)[1]), array)
    elif key.startswith(_LAYERS):
      named[key] = (_block_path(key), array)
    else:
      named[key] = (('unknown', key), array)  # refused as unexpected
  return named


def load(model: nnx.Module, content, path: str) -> common.Loaded:
  """Loads a torchvision ViT state dict into the backbone; its classifier is dropped."""
  arrays = {k: np.asarray(v) for k, v in common.state_dict(content, path).items()
            if not k.startswith(_CLASSIFIER)}
  vit_common.check_architecture(model, architecture_of(arrays, path), WHAT, path)
  vit_common.load_backbone(model, named_arrays(arrays, model, path), path)
  if model.normalization != 'imagenet':
    logging.warning('%s is a torchvision ViT: its ImageNet weights expect '
                    "--config.data.normalization=imagenet, not %r.", path, model.normalization)
  return common.Loaded(NAME, 'backbone')
