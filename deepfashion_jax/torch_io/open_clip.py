"""open_clip's CLIP image tower (its VisionTransformer) into the ViT backbone: the weights
of OpenAI's CLIP and of open_clip's own trainings (LAION, DataComp, ...), as
`open_clip_pytorch_model.bin`, `open_clip_model.safetensors` or a training checkpoint.

A whole CLIP model's state dict holds the image tower under `visual.` (`visual.conv1.weight`,
`visual.class_embedding` (D,), `visual.positional_embedding` (tokens, D),
`visual.ln_pre.*`, `visual.transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}`,
`visual.ln_post.*`, `visual.proj` (D, P), used as x @ proj) beside the text tower's keys
(`transformer.*`, `token_embedding.*`, ...), which are left alone; a bare tower's state
dict has the same keys without `visual.`. Each block's attention is nn.MultiheadAttention:
query, key and value packed in `attn.in_proj_weight` (3D, D). A training checkpoint holds
the state dict under 'state_dict', its keys prefixed `module.`.
"""

import re

from flax import nnx
import numpy as np

from deepfashion_jax.models import vit
from deepfashion_jax.torch_io import clip_towers
from deepfashion_jax.torch_io import common
from deepfashion_jax.torch_io import vit_common

NAME = 'open_clip'
WHAT = 'an open_clip ViT'
_PREFIX = 'visual.'
_FIRST_BLOCK = 'transformer.resblocks.0.attn.in_proj_weight'
_BLOCK = re.compile(r'transformer\.resblocks\.(\d+)\.(.+)\.(\w+)$')
# A block's modules -> the backbone's, and whether each is a LayerNorm.
_BLOCK_MODULES = {'ln_1': (('ln1',), True), 'ln_2': (('ln2',), True),
                  'attn.out_proj': (('attention', 'out'), False),
                  'mlp.c_fc': (('mlp', 'fc1'), False), 'mlp.c_proj': (('mlp', 'fc2'), False)}
_TOP_MODULES = {'conv1': (('patch_embed',), False), 'ln_pre': (('ln_pre',), True),
                'ln_post': (('norm',), True)}
_IN_PROJECTION = re.compile(r'transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$')


def _state(content):
  """The state dict in `content` (itself, or under 'state_dict'), `module.` dropped; None
  when there is no dict of string keys."""
  if not isinstance(content, dict):
    return None
  state = content.get('state_dict', content)
  if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
    return None
  return common.without_module_prefix(state)


def _tower_prefix(state: dict) -> str | None:
  """'visual.' for a whole CLIP model's state dict, '' for a bare tower's, None for neither."""
  for prefix in (_PREFIX, ''):
    if prefix + 'conv1.weight' in state and prefix + _FIRST_BLOCK in state:
      return prefix
  return None


def matches(content) -> bool:
  """An open_clip CLIP model's (or its image tower's) state dict."""
  state = _state(content)
  return state is not None and _tower_prefix(state) is not None


def architecture_of(arrays: dict, prefix: str, path: str) -> vit.Architecture:
  """The tower the arrays (keys starting with `prefix`) hold."""
  width, patch = clip_towers.patch_embedding(arrays, prefix + 'conv1.weight', path)
  key = prefix + 'transformer.resblocks.0.mlp.c_fc.weight'
  mlp_dim = vit_common.shape(arrays, key, 2, path)[0]
  key = prefix + 'proj'
  projection = vit_common.shape(arrays, key, 2, path)[1] if key in arrays else 0
  clip_towers.positions(arrays, prefix + 'positional_embedding', width, path)
  return clip_towers.architecture(
      'CLIP', patch_size=patch, width=width, mlp_dim=mlp_dim, projection=projection,
      depth=vit_common.numbered(arrays, prefix + 'transformer.resblocks.'),
      patch_bias=prefix + 'conv1.bias' in arrays, class_token=True,
      ln_pre=prefix + 'ln_pre.weight' in arrays)


def _named(arrays: dict, prefix: str, model: nnx.Module, path: str) -> dict:
  """{key: (path inside the backbone, array in torch's layout)} for the tower's arrays."""
  named = {}
  for key, array in arrays.items():
    name = key[len(prefix):]
    packed = _IN_PROJECTION.match(name)
    if name == 'class_embedding':
      named[key] = (('class_token',), array.reshape(1, 1, -1))
    elif name == 'positional_embedding':
      named[key] = (('position_embedding',),
                    vit_common.position_embedding(array, model, key, path))
    elif name == 'proj':
      named[key] = (('projection',), clip_towers.linear_weight(array))
    elif packed and packed.group(2) == 'weight':
      attention = ('blocks', int(packed.group(1)), 'attention')
      named.update(vit_common.unpacked(arrays, key, attention, path))
    elif not packed:  # a packed bias is split with its weight
      named[key] = (clip_towers.target(name, _BLOCK, _BLOCK_MODULES, _TOP_MODULES), array)
  return named


def load(model: nnx.Module, content, path: str) -> common.Loaded:
  """Loads the image tower into the backbone, its text tower left out."""
  state = common.state_dict(_state(content), path)
  prefix = _tower_prefix(state)
  arrays = {k: np.asarray(v) for k, v in state.items() if k.startswith(prefix)}
  clip_towers.check(model, architecture_of(arrays, prefix, path), WHAT, path)
  clip_towers.load(model, 'CLIP', WHAT, _named(arrays, prefix, model, path), path)
  return common.Loaded(NAME, 'backbone')
