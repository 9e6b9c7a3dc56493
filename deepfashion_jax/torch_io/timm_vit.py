"""timm's VisionTransformer state dicts (vit_small_patch16_224, vit_base_patch16_224, ...)
into a ViT backbone (`models/vit.py`).

Keys: `patch_embed.proj.{weight,bias}`, `cls_token` (1, 1, D), `pos_embed` (1, 1 + g * g,
D), per block `blocks.<i>.{norm1, attn.qkv (query, key and value packed), attn.proj, norm2,
mlp.fc1, mlp.fc2}`, `norm` (the final norm, over all tokens) and the classifier `head.*`,
dropped. LayerNorms' eps 1e-6 and the exact GELU: vit.Architecture's defaults. Other
variants' keys (`fc_norm` of the mean-pooled ones, layer scale, register tokens) have no
place here: refused as unexpected. The position embedding is resampled to the model's grid.
Which pixel normalisation the weights expect depends on the checkpoint (the augreg ones:
--config.data.normalization=baseline, mean and std 0.5).
"""

from flax import nnx
import numpy as np

from deepfashion_jax.models import vit
from deepfashion_jax.torch_io import common
from deepfashion_jax.torch_io import vit_common

NAME = 'timm_vit'
WHAT = 'a timm ViT'
_CLASSIFIER = 'head.'
_BLOCK = {'norm1': ('ln1',), 'norm2': ('ln2',), 'attn.proj': ('attention', 'out'),
          'mlp.fc1': ('mlp', 'fc1'), 'mlp.fc2': ('mlp', 'fc2')}
_NORMS = ('norm1', 'norm2')


def matches(content) -> bool:
  """A state dict with timm's ViT patch embedding, position embedding and blocks."""
  if not isinstance(content, dict):
    return False
  keys = {k[len('module.'):] if k.startswith('module.') else k
          for k in content if isinstance(k, str)}
  return ({'patch_embed.proj.weight', 'pos_embed'} <= keys
          and any(k.startswith('blocks.') and '.attn.qkv.' in k for k in keys))


def architecture_of(arrays: dict, path: str) -> vit.Architecture:
  """The ViT the keys describe (its heads and native side unknown: 0); CheckpointError
  naming a key whose array has the wrong number of dimensions."""
  fc1 = 'blocks.0.mlp.fc1.weight'
  return vit.Architecture(
      patch_size=int(vit_common.shape(arrays, 'patch_embed.proj.weight', 4, path)[-1]),
      width=int(vit_common.shape(arrays, 'pos_embed', 3, path)[-1]),
      depth=vit_common.numbered(arrays, 'blocks.'), heads=0,
      mlp_dim=int(vit_common.shape(arrays, fc1, 2, path)[0]) if fc1 in arrays else 0,
      image_size=0,
      patch_bias='patch_embed.proj.bias' in arrays, class_token='cls_token' in arrays)


def _block_path(key: str) -> tuple:
  """'blocks.3.mlp.fc1.weight' -> ('blocks', 3, 'mlp', 'fc1', 'kernel')."""
  _, index, rest = key.split('.', 2)
  return vit_common.block_path(int(index), rest, _BLOCK, _NORMS)


def named_arrays(arrays: dict, model: nnx.Module, path: str) -> dict:
  """{key: (path inside the backbone, array)}, the packed projections split (their keys
  suffixed with the part), the position embedding resampled."""
  named = {}
  for key, array in arrays.items():
    if key.endswith('.attn.qkv.weight'):
      attention = ('blocks', int(key.split('.')[1]), 'attention')
      named.update(vit_common.unpacked(arrays, key, attention, path))
    elif key.endswith('.attn.qkv.bias'):
      continue  # split with the weight
    elif key.startswith('patch_embed.proj.'):
      named[key] = (('patch_embed', common.LEAVES.get(key.rsplit('.', 1)[1], key)), array)
    elif key == 'cls_token':
      named[key] = (('class_token',), array)
    elif key == 'pos_embed':
      named[key] = (('position_embedding',),
                    vit_common.position_embedding(array, model, key, path))
    elif key.startswith('norm.'):
      named[key] = (vit_common.layer_norm(('norm',), key.rsplit('.', 1)[1]), array)
    elif key.startswith('blocks.') and key.split('.')[1].isdigit():
      named[key] = (_block_path(key), array)
    else:
      named[key] = (('unknown', key), array)  # refused as unexpected
  return named


def load(model: nnx.Module, content, path: str) -> common.Loaded:
  """Loads a timm ViT state dict into the backbone; its classifier is dropped."""
  arrays = {k: np.asarray(v) for k, v in common.state_dict(content, path).items()
            if not k.startswith(_CLASSIFIER)}
  vit_common.check_architecture(model, architecture_of(arrays, path), WHAT, path)
  vit_common.load_backbone(model, named_arrays(arrays, model, path), path)
  return common.Loaded(NAME, 'backbone')
