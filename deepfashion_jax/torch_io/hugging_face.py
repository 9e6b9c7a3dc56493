"""Hugging Face transformers' CLIP and SigLIP image towers into the ViT backbone: a
`model.safetensors` (or `pytorch_model.bin`) saved by CLIPModel, CLIPVisionModel,
CLIPVisionModelWithProjection, SiglipModel or SiglipVisionModel.

The tower's keys are `embeddings.patch_embedding.{weight, bias}` (SigLIP's has a bias),
`embeddings.class_embedding` (D,) (CLIP's; SigLIP has no class token),
`embeddings.position_embedding.weight` (tokens, D), `pre_layrnorm.*` (CLIP's, so spelt),
`encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}`,
`post_layernorm.*`, and SigLIP's attention-pooling head `head.{probe, attention (packed
nn.MultiheadAttention), layernorm, mlp}`. A whole CLIPModel or SiglipModel holds them
under `vision_model.`, beside `text_model.*`, `logit_scale` (and SigLIP's `logit_bias`),
which are left alone; a vision model alone saves them without the prefix (transformers 5)
or under `vision_model.` (transformers 4). CLIP's projection `visual_projection.weight`
(P, D), an nn.Linear without bias, sits beside `vision_model.`.
"""

import re

from flax import nnx
import numpy as np

from deepfashion_jax.models import vit
from deepfashion_jax.torch_io import clip_towers
from deepfashion_jax.torch_io import common
from deepfashion_jax.torch_io import vit_common

NAME = 'hugging_face'
_PATCH = 'embeddings.patch_embedding.weight'
_FIRST_BLOCK = 'encoder.layers.0.self_attn.q_proj.weight'
_VISION_PREFIX = 'vision_model.'
_PROJECTION = 'visual_projection.weight'
_LAYER = re.compile(r'encoder\.layers\.(\d+)\.(.+)\.(\w+)$')
_HEAD_IN_PROJECTION = re.compile(r'head\.attention\.in_proj_(weight|bias)$')
# A layer's modules -> the backbone's, and whether each is a LayerNorm.
_LAYER_MODULES = {
    'layer_norm1': (('ln1',), True), 'layer_norm2': (('ln2',), True),
    'self_attn.q_proj': (('attention', 'query'), False),
    'self_attn.k_proj': (('attention', 'key'), False),
    'self_attn.v_proj': (('attention', 'value'), False),
    'self_attn.out_proj': (('attention', 'out'), False),
    'mlp.fc1': (('mlp', 'fc1'), False), 'mlp.fc2': (('mlp', 'fc2'), False)}
_TOP_MODULES = {
    'embeddings.patch_embedding': (('patch_embed',), False),
    'pre_layrnorm': (('ln_pre',), True), 'post_layernorm': (('norm',), True),
    'head.attention.out_proj': (('map_head', 'attention', 'out'), False),
    'head.layernorm': (('map_head', 'norm'), True),
    'head.mlp.fc1': (('map_head', 'mlp', 'fc1'), False),
    'head.mlp.fc2': (('map_head', 'mlp', 'fc2'), False)}
# Buffers older transformers saved beside the weights: no weights.
_BUFFERS = ('embeddings.position_ids',)


def _prefix(state: dict) -> str | None:
  """What precedes the vision tower's keys ('', 'vision_model.', ...), when `state` holds
  exactly one CLIP-style vision tower; None otherwise."""
  prefixes = [k[:-len(_PATCH)] for k in state if isinstance(k, str) and k.endswith(_PATCH)]
  if len(prefixes) != 1 or prefixes[0] + _FIRST_BLOCK not in state:
    return None
  return prefixes[0]


def matches(content) -> bool:
  """A Hugging Face CLIP or SigLIP model's state dict (or its vision model's)."""
  if not isinstance(content, dict):
    return False
  return _prefix(common.without_module_prefix(content)) is not None


def _kind(arrays: dict, prefix: str) -> str:
  """'CLIP' (a class token) or 'SigLIP' (none)."""
  return 'CLIP' if prefix + 'embeddings.class_embedding' in arrays else 'SigLIP'


def architecture_of(arrays: dict, prefix: str, projection: int,
                    path: str) -> vit.Architecture:
  """The tower the arrays (keys starting with `prefix`) hold; `projection`: the size of
  the projection beside it (0: none)."""
  width, patch = clip_towers.patch_embedding(arrays, prefix + _PATCH, path)
  key = prefix + 'encoder.layers.0.mlp.fc1.weight'
  mlp_dim = vit_common.shape(arrays, key, 2, path)[0]
  clip_towers.positions(arrays, prefix + 'embeddings.position_embedding.weight', width, path)
  kind = _kind(arrays, prefix)
  has_head = prefix + 'head.probe' in arrays
  return clip_towers.architecture(
      kind, patch_size=patch, width=width, mlp_dim=mlp_dim, projection=projection,
      depth=vit_common.numbered(arrays, prefix + 'encoder.layers.'),
      patch_bias=prefix + 'embeddings.patch_embedding.bias' in arrays,
      class_token=kind == 'CLIP', ln_pre=prefix + 'pre_layrnorm.weight' in arrays,
      pool='map' if has_head else 'token' if kind == 'CLIP' else 'mean')


def _named(arrays: dict, prefix: str, model: nnx.Module, path: str) -> dict:
  """{key: (path inside the backbone, array in torch's layout)} for the tower's arrays."""
  named = {}
  for key, array in arrays.items():
    name = key[len(prefix):]
    packed = _HEAD_IN_PROJECTION.match(name)
    if name == 'embeddings.class_embedding':
      named[key] = (('class_token',), array.reshape(1, 1, -1))
    elif name == 'embeddings.position_embedding.weight':
      named[key] = (('position_embedding',),
                    vit_common.position_embedding(array, model, key, path))
    elif name == 'head.probe':
      named[key] = (('map_head', 'probe'), array)
    elif packed and packed.group(1) == 'weight':
      named.update(vit_common.unpacked(arrays, key, ('map_head', 'attention'), path))
    elif not packed and name not in _BUFFERS:  # a packed bias is split with its weight
      named[key] = (clip_towers.target(name, _LAYER, _LAYER_MODULES, _TOP_MODULES), array)
  return named


def load(model: nnx.Module, content, path: str) -> common.Loaded:
  """Loads the vision tower (and CLIP's projection, when the file has it) into the backbone,
  the text tower left out."""
  state = common.state_dict(content, path)
  prefix = _prefix(state)
  outer = prefix[:-len(_VISION_PREFIX)] if prefix.endswith(_VISION_PREFIX) else prefix
  projection_key = outer + _PROJECTION
  arrays = {k: np.asarray(v) for k, v in state.items()
            if k.startswith(prefix) and k != projection_key}
  projection = 0
  if projection_key in state:
    projection = vit_common.shape(state, projection_key, 2, path)[0]
  kind = _kind(arrays, prefix)
  what = f'a Hugging Face {kind} ViT'
  clip_towers.check(model, architecture_of(arrays, prefix, projection, path), what, path)
  named = _named(arrays, prefix, model, path)
  if projection:
    named[projection_key] = (('projection',), np.asarray(state[projection_key]))
  clip_towers.load(model, kind, what, named, path)
  return common.Loaded(NAME, 'backbone')
