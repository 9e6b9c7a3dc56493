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

from deepfashion_jax.torch_io import common
from deepfashion_jax.torch_io import vit_towers

NAME = 'open_clip'
_PREFIX = 'visual.'
_FIRST_BLOCK = 'transformer.resblocks.0.attn.in_proj_weight'
_BLOCK = re.compile(r'transformer\.resblocks\.(\d+)\.(.+)\.(\w+)$')
# A block's modules -> the backbone's, and whether each is a LayerNorm.
_BLOCK_MODULES = {'ln_1': (('ln1',), True), 'ln_2': (('ln2',), True),
                  'attn.out_proj': (('attention', 'out'), False),
                  'mlp.c_fc': (('mlp', 'fc1'), False), 'mlp.c_proj': (('mlp', 'fc2'), False)}
_TOP_MODULES = {'conv1': (('patch_embed',), False), 'ln_pre': (('ln_pre',), True),
                'ln_post': (('norm',), True)}
_IN_PROJECTION = re.compile(r'transformer\.resblocks\.(\d+)\.attn\.in_proj_(?:weight|bias)$')


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


def _tower(arrays: dict, prefix: str, path: str) -> vit_towers.Tower:
  """What the tower's arrays (keys starting with `prefix`) hold."""
  width, patch = vit_towers.patch_embedding(arrays, prefix + 'conv1.weight', path)
  key = prefix + 'transformer.resblocks.0.mlp.c_fc.weight'
  mlp_dim = vit_towers.shape(arrays, key, 2, path)[0]
  key = prefix + 'proj'
  projection = vit_towers.shape(arrays, key, 2, path)[1] if key in arrays else 0
  return vit_towers.Tower(
      'an open_clip', 'CLIP', patch_size=patch, width=width,
      depth=vit_towers.depth(arrays, re.escape(prefix) + r'transformer\.resblocks\.(\d+)\.'),
      mlp_dim=mlp_dim, grid=vit_towers.grid(arrays, prefix + 'positional_embedding', width, 1,
                                            path),
      patch_bias=prefix + 'conv1.bias' in arrays, class_token=True,
      ln_pre=prefix + 'ln_pre.weight' in arrays, map_head=False, projection=projection)


def _target(key: str) -> tuple:
  """The backbone's variable a tower key fills (a path the backbone lacks, for a key it has
  no variable for: load_variables lists it as unexpected)."""
  block = _BLOCK.match(key)
  if block:
    number, module, leaf = block.groups()
    if module in _BLOCK_MODULES:
      target, is_norm = _BLOCK_MODULES[module]
      return ('blocks', int(number)) + target + (vit_towers.leaf(leaf, is_norm),)
  module, _, leaf = key.rpartition('.')
  if module in _TOP_MODULES:
    target, is_norm = _TOP_MODULES[module]
    return target + (vit_towers.leaf(leaf, is_norm),)
  return ('(not in the backbone)', key)


def _named(arrays: dict, prefix: str, tower: vit_towers.Tower, model: nnx.Module,
           path: str) -> dict:
  """{key: (path in the backbone, array in PyTorch's layout)} for the tower's arrays."""
  named = {}
  for key, array in arrays.items():
    name = key[len(prefix):]
    if name == 'class_embedding':
      named[key] = (('class_token',), array.reshape(1, 1, -1))
    elif name == 'positional_embedding':
      named[key] = (('position_embedding',),
                    vit_towers.position_embedding(array, tower, model))
    elif name == 'proj':
      named[key] = (('projection',), vit_towers.linear_weight(array))
    elif _IN_PROJECTION.match(name):
      attention = ('blocks', int(_IN_PROJECTION.match(name).group(1)), 'attention')
      named.update(vit_towers.unpacked(key, array, attention, path))
    else:
      named[key] = (_target(name), array)
  return named


def load(model: nnx.Module, content, path: str) -> common.Loaded:
  """Loads the image tower into the backbone, its text tower left out."""
  state = common.state_dict(_state(content), path)
  prefix = _tower_prefix(state)
  arrays = {k: np.asarray(v) for k, v in state.items() if k.startswith(prefix)}
  tower = _tower(arrays, prefix, path)
  vit_towers.check(model, tower, path)
  vit_towers.load(model, tower, _named(arrays, prefix, tower, model, path), path)
  return common.Loaded(NAME, 'backbone')
