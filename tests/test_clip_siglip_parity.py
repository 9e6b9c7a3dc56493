"""CLIP and SigLIP image towers saved by their own libraries load through torch_io.load_into
(the product's path) into the ViT backbone, which then computes what theirs computes:
- open_clip's CLIP (a whole CLIP model's state dict, torch.save): image features
  (ln_post(class token) @ proj), and the patch tokens after ln_post;
- Hugging Face's CLIPModel (model.safetensors): its image features
  (visual_projection(post_layernorm(class token))); CLIPVisionModel (no projection): its
  pooler_output, the backbone's projection kept as it was;
- Hugging Face's SiglipModel and SiglipVisionModel: pooler_output (the attention-pooling
  head's) and last_hidden_state (post_layernorm over every token);
in eval and training mode (no drop path), at the shrunk towers' native side (32 px) and at
48 px, where their position embeddings are resampled by timm's resample_abs_pos_embed and
ours by the loader. Files of another tower are refused, naming what they hold and the flag.

Random weights (`_randomise`): every weight normal with variance 1 / fan-in, biases and
the class token N(0, 0.1^2), position embeddings N(0, 0.5^2), LayerNorms' scales
N(1, 0.1^2) and biases N(0, 0.1^2), so that a wrong mapping shows. Each comparison
prints its largest difference and value (-s).
"""

import functools
import importlib
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepfashion_jax import torch_io
from deepfashion_jax.models import fashion_net
from deepfashion_jax.models import vit
from tests import reference_libraries

torch = reference_libraries.import_torch()

TOLERANCE = 1e-4  # max |ours - theirs| < TOLERANCE * max |theirs|
OTHER_SIDE = 48  # the shrunk towers' native side is 32: 2 x 2 patches of 16, then 3 x 3
BATCH = 2


def _randomise(module, seed: int):
  """The module's parameters drawn as the module docstring says, in place."""
  generator = torch.Generator().manual_seed(seed)
  norms = {name for name, m in module.named_modules() if isinstance(m, torch.nn.LayerNorm)}
  with torch.no_grad():
    for name, parameter in module.named_parameters():
      owner, _, leaf = name.rpartition('.')
      noise = torch.randn(parameter.shape, generator=generator)
      if owner in norms:
        parameter.copy_((1.0 if leaf == 'weight' else 0.0) + 0.1 * noise)
      elif parameter.ndim == 0:  # logit_scale
        continue
      elif 'position' in name:
        parameter.copy_(0.5 * noise)
      elif parameter.ndim == 1:
        parameter.copy_(0.1 * noise)
      else:
        fan_in = parameter.shape[0] if leaf == 'proj' else parameter[0].numel()
        parameter.copy_(noise / fan_in ** 0.5)
  return module


def _resampled(position_embedding, prefix_tokens: int, side: int, patch: int):
  """timm's resample_abs_pos_embed of a (tokens, D) or (1, tokens, D) position embedding to
  the grid of `side`, in its own shape."""
  timm_layers = reference_libraries.import_timm().layers
  embedding = position_embedding.reshape(1, -1, position_embedding.shape[-1])
  resampled = timm_layers.resample_abs_pos_embed(embedding, [side // patch] * 2,
                                                 num_prefix_tokens=prefix_tokens)
  return resampled.reshape(-1, position_embedding.shape[-1]) if position_embedding.ndim == 2 \
      else resampled


def _images(side: int, seed: int = 0):
  return torch.randn(BATCH, 3, side, side, generator=torch.Generator().manual_seed(seed))


@functools.cache
def _abstract_model(backbone: str, side: int):
  """(graph definition, variables' shapes) of FashionNet(backbone=...) for `side` px inputs,
  traced once."""
  return nnx.split(nnx.eval_shape(
      lambda: fashion_net.FashionNet(backbone=backbone, image_size=side, rngs=nnx.Rngs(0))))


def _model(backbone: str, side: int, abstract: bool = False):
  """FashionNet(backbone=...) for `side` px inputs: abstract (shapes only: a refusal comes
  before any value is written), or with every variable drawn from N(0, 1) by NumPy (its own
  initialisers, run eagerly, compile one random draw per shape: seconds on 2 cores)."""
  graphdef, shapes = _abstract_model(backbone, side)
  if abstract:
    return nnx.merge(graphdef, shapes)
  rng = np.random.default_rng(0)
  draw = lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32), s.dtype)
  return nnx.merge(graphdef, jax.tree.map(draw, shapes))


@nnx.jit
def _backbone_outputs(backbone, images, dropout_rng):
  """The backbone's outputs, compiled once per tower, side and mode (eagerly, each
  operation compiles on its own: slower here)."""
  return backbone(images, dropout_rng=dropout_rng)


def _ours(backbone: str, path: str, side: int, train: bool):
  """FashionNet(backbone=...) for `side` px inputs (`_model`), loaded from `path`; its
  backbone in eval or training mode (drop path 0) and a function of NCHW torch images ->
  its outputs as NumPy arrays."""
  model = _model(backbone, side)
  loaded = torch_io.load_into(model, path)
  assert loaded.part == 'backbone'
  if train:
    model.train()
  else:
    model.eval()

  def run(images):
    nhwc = jnp.asarray(images.numpy().transpose(0, 2, 3, 1))
    outputs = _backbone_outputs(model.backbone, nhwc, jax.random.key(1) if train else None)
    return {k: np.asarray(v) for k, v in outputs.items()}

  return model, loaded, run


def _check(what: str, ours, theirs):
  theirs = np.asarray(theirs)
  assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
  error, scale = np.abs(ours - theirs).max(), np.abs(theirs).max()
  print(f'{what}: max |ours - theirs| {error:.2e}, max |theirs| {scale:.2f}')
  assert error < TOLERANCE * scale, (what, error, scale)


def _tokens_as_map(tokens, prefix_tokens: int):
  """(B, prefix + g * g, D) torch tokens -> the (B, g, g, D) map of the patch tokens."""
  patches = tokens[:, prefix_tokens:].detach().numpy()
  side = int(round(patches.shape[1] ** 0.5))
  return patches.reshape(patches.shape[0], side, side, -1)


# open_clip ------------------------------------------------------------------------------

def _open_clip_model(side: int, seed: int = 0):
  """open_clip's CLIP with clip_vit_test's image tower (QuickGELU, as OpenAI's CLIP) and a
  small text tower, random weights."""
  open_clip = reference_libraries.import_open_clip()
  a = vit.ARCHITECTURES['clip_vit_test']
  vision = open_clip.CLIPVisionCfg(layers=a.depth, width=a.width, head_width=a.width // a.heads,
                                   patch_size=a.patch_size, image_size=side,
                                   mlp_ratio=a.mlp_dim / a.width)
  text = open_clip.CLIPTextCfg(context_length=8, vocab_size=50, width=16, heads=2, layers=1)
  model = open_clip.CLIP(embed_dim=a.projection, vision_cfg=vision, text_cfg=text,
                         quick_gelu=True)
  return _randomise(model, seed).eval()


@pytest.fixture(scope='module')
def open_clip_file(tmp_path_factory):
  """A whole open_clip CLIP model's state dict, as torch.save writes it: `visual.*`
  beside the text tower's keys."""
  model = _open_clip_model(vit.ARCHITECTURES['clip_vit_test'].image_size)
  path = str(tmp_path_factory.mktemp('open_clip') / 'open_clip_pytorch_model.bin')
  torch.save(model.state_dict(), path)
  return model, path


def _open_clip_at(model, side: int):
  """The reference at another side: the same weights, its position embedding resampled."""
  if side == model.visual.image_size[0]:
    return model
  other = _open_clip_model(side, seed=1)
  state = dict(model.state_dict())
  state['visual.positional_embedding'] = _resampled(state['visual.positional_embedding'], 1,
                                                    side, model.visual.patch_size[0])
  other.load_state_dict(state)
  return other.eval()


@pytest.mark.parametrize('side', [32, OTHER_SIDE])
@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_open_clip_tower_computes_theirs(open_clip_file, side, train):
  model, path = open_clip_file
  reference = _open_clip_at(model, side).train(train)
  _, loaded, ours = _ours('clip_vit_test', path, side, train)
  assert loaded == torch_io.Loaded('open_clip', 'backbone')
  images = _images(side)
  got = ours(images)
  with torch.no_grad():
    features = reference.encode_image(images)
    tokens = reference.visual.forward_intermediates(images, indices=1)['image_intermediates']
    tokens_after_ln_post = reference.visual.ln_post(
        tokens[-1].flatten(2).transpose(1, 2)).unflatten(1, got['tokens'].shape[1:3])
  _check(f'open_clip {side} px {train=} image features', got['global'], features)
  _check(f'open_clip {side} px {train=} tokens', got['tokens'], tokens_after_ln_post.numpy())



def test_open_clip_safetensors_file_loads_as_its_torch_file(open_clip_file, tmp_path):
  """open_clip_model.safetensors (the hub's other file): the same keys, read by the
  safetensors reader; a training checkpoint ({'state_dict': {'module.visual.*': ...}}) too."""
  model, path = open_clip_file
  safetensors_torch = pytest.importorskip('safetensors.torch')
  safetensors_path = str(tmp_path / 'open_clip_model.safetensors')
  safetensors_torch.save_file(model.state_dict(), safetensors_path)
  checkpoint_path = str(tmp_path / 'epoch_1.pt')
  torch.save({'epoch': 1, 'state_dict': {f'module.{k}': v for k, v in
                                         model.state_dict().items()}}, checkpoint_path)
  images = _images(32)
  expected = _ours('clip_vit_test', path, 32, train=False)[2](images)['global']
  for other in (safetensors_path, checkpoint_path):
    _, loaded, ours = _ours('clip_vit_test', other, 32, train=False)
    assert loaded == torch_io.Loaded('open_clip', 'backbone')
    np.testing.assert_array_equal(ours(images)['global'], expected)


# Hugging Face ---------------------------------------------------------------------------

def _hf_vision_config(kind: str, side: int, **fields):
  transformers = reference_libraries.import_transformers()
  a = vit.ARCHITECTURES['clip_vit_test' if kind == 'clip' else 'siglip_test']
  config = (transformers.CLIPVisionConfig if kind == 'clip' else transformers.SiglipVisionConfig)
  return config(hidden_size=a.width, intermediate_size=a.mlp_dim, num_hidden_layers=a.depth,
                num_attention_heads=a.heads, image_size=side, patch_size=a.patch_size,
                layer_norm_eps=a.norm_eps, **fields)


def _hf_model(class_name: str, side: int, seed: int = 0):
  """transformers' `class_name` (CLIPModel, CLIPVisionModel, SiglipModel, ...) with the
  shrunk tower of the same kind, a small text tower where it has one, random weights."""
  transformers = reference_libraries.import_transformers()
  kind = 'clip' if class_name.startswith('CLIP') else 'siglip'
  vision = _hf_vision_config(kind, side)
  cls = getattr(transformers, class_name)
  if class_name in ('CLIPModel', 'SiglipModel'):
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = getattr(transformers, f'{class_name[:-5]}Config')(
        text_config=text, vision_config=vision.to_dict(),
        **({'projection_dim': vit.ARCHITECTURES['clip_vit_test'].projection}
           if kind == 'clip' else {}))
  else:
    config = vision
  return _randomise(cls(config), seed).eval()


@pytest.fixture(scope='module')
def hf_files(tmp_path_factory):
  """{class name: (model, the model.safetensors its save_pretrained wrote)}."""
  files = {}
  for class_name in ('CLIPModel', 'CLIPVisionModel', 'SiglipModel', 'SiglipVisionModel'):
    model = _hf_model(class_name, 32)
    folder = tmp_path_factory.mktemp(class_name)
    model.save_pretrained(str(folder))
    files[class_name] = model, str(folder / 'model.safetensors')
  return files


def _vision_model(model):
  return getattr(model, 'vision_model', model)


def _hf_at(class_name: str, model, side: int):
  """The reference's vision model at another side: the same weights, its position
  embedding resampled."""
  vision = _vision_model(model)
  if side == vision.config.image_size:
    return vision
  other = _vision_model(_hf_model(class_name, side, seed=1))
  state = dict(vision.state_dict())
  key = 'embeddings.position_embedding.weight'
  prefix = int(class_name.startswith('CLIP'))
  state[key] = _resampled(state[key], prefix, side, vision.config.patch_size)
  other.load_state_dict(state)
  return other.eval()


@pytest.mark.parametrize('side', [32, OTHER_SIDE])
@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_hugging_face_clip_computes_theirs(hf_files, side, train):
  """CLIPModel's file, text tower and all: image features and the tokens."""
  model, path = hf_files['CLIPModel']
  vision = _hf_at('CLIPModel', model, side).train(train)
  _, loaded, ours = _ours('clip_vit_test', path, side, train)
  assert loaded == torch_io.Loaded('hugging_face', 'backbone')
  images = _images(side)
  got = ours(images)
  with torch.no_grad():
    outputs = vision(pixel_values=images)
    features = model.visual_projection(outputs.pooler_output)
    tokens = vision.post_layernorm(outputs.last_hidden_state)
  _check(f'HF CLIP {side} px {train=} image features', got['global'], features)
  _check(f'HF CLIP {side} px {train=} tokens', got['tokens'], _tokens_as_map(tokens, 1))


def test_hugging_face_clip_vision_model_without_projection(hf_files):
  """CLIPVisionModel's file (no projection; keys without `vision_model.`): pooler_output,
  then the backbone's own projection, which the load leaves as it was."""
  model, path = hf_files['CLIPVisionModel']
  initial = np.asarray(_model('clip_vit_test', 32).backbone.projection[...])
  loaded_model, _, ours = _ours('clip_vit_test', path, 32, train=False)
  projection = np.asarray(loaded_model.backbone.projection[...])
  np.testing.assert_array_equal(projection, initial)
  images = _images(32)
  with torch.no_grad():
    pooled = model(pixel_values=images).pooler_output.numpy()
  _check('HF CLIPVisionModel pooled @ our projection', ours(images)['global'],
         pooled @ projection)


@pytest.mark.parametrize('class_name, side, train', [
    ('SiglipVisionModel', 32, False), ('SiglipVisionModel', 32, True),
    ('SiglipVisionModel', OTHER_SIDE, False), ('SiglipVisionModel', OTHER_SIDE, True),
    ('SiglipModel', 32, False)])
def test_hugging_face_siglip_computes_theirs(hf_files, class_name, side, train):
  """The attention-pooling head's output and post_layernorm's tokens; from SiglipModel's
  file (text tower and all, the tower under `vision_model.`) too."""
  model, path = hf_files[class_name]
  vision = _hf_at(class_name, model, side).train(train)
  _, loaded, ours = _ours('siglip_test', path, side, train)
  assert loaded == torch_io.Loaded('hugging_face', 'backbone')
  images = _images(side)
  got = ours(images)
  with torch.no_grad():
    outputs = vision(pixel_values=images)
  _check(f'HF {class_name} {side} px {train=} pooled', got['global'], outputs.pooler_output)
  _check(f'HF {class_name} {side} px {train=} tokens', got['tokens'],
         _tokens_as_map(outputs.last_hidden_state, 0))


# Files of another tower ----------------------------------------------------------------

def _refused(backbone: str, path: str, message: str, content=None, side: int = 32):
  model = _model(backbone, side, abstract=True)
  with pytest.raises(torch_io.CheckpointError) as refusal:
    torch_io.load_into(model, path, content)
  assert str(refusal.value).startswith(f'{path} holds '), str(refusal.value)
  assert re.search(message, str(refusal.value)), str(refusal.value)


def test_a_clip_tower_is_refused_by_a_siglip_backbone_naming_the_flag(open_clip_file):
  _, path = open_clip_file
  _refused('siglip_test', path, re.escape(
      'holds an open_clip ViT 32 wide, 2 deep, patch 16; the configured backbone is SigLIP '
      "ViT (shrunk, for tests) (config.model.backbone='siglip_test'): set "
      "--config.model.backbone=clip_vit_test to load it; the file's tower differs in: "
      "patch_bias False (the backbone's: True), class_token True (the backbone's: False), "
      "ln_pre True (the backbone's: False), activation 'quick_gelu' (the backbone's: "
      "'gelu_tanh'), norm_eps 1e-05 (the backbone's: 1e-06), pool 'token' (the backbone's: "
      "'map'), projection 24 (the backbone's: 0)") + '$')


def test_a_siglip_tower_is_refused_by_a_clip_backbone(hf_files):
  _, path = hf_files['SiglipModel']
  _refused('clip_vit_test', path, re.escape(
      'holds a Hugging Face SigLIP ViT 32 wide, 2 deep, patch 16; the configured backbone is '
      "CLIP ViT (shrunk, for tests) (config.model.backbone='clip_vit_test'): set "
      '--config.model.backbone=siglip_test to load it; ') + '.*'
      + re.escape("class_token False (the backbone's: True)"))


def test_a_tower_is_refused_by_a_backbone_that_is_no_vit(hf_files):
  _, path = hf_files['CLIPModel']
  _refused('resnet18', path, re.escape(
      'holds a Hugging Face CLIP ViT 32 wide, 2 deep, patch 16; the configured backbone is '
      "ResNet-18 (config.model.backbone='resnet18'): "
      'set --config.model.backbone=clip_vit_test to load it') + '$')


def _open_clip_b16_state() -> dict:
  """The keys and shapes of open_clip's ViT-B-16 (OpenAI's weights), every array a
  broadcast zero: nothing is allocated."""
  width, blocks, mlp, tokens = 768, 12, 3072, 197
  shapes = {'visual.conv1.weight': (width, 3, 16, 16), 'visual.class_embedding': (width,),
            'visual.positional_embedding': (tokens, width), 'visual.proj': (width, 512),
            'positional_embedding': (77, 512), 'logit_scale': ()}
  for norm in ('ln_pre', 'ln_post'):
    shapes.update({f'visual.{norm}.weight': (width,), f'visual.{norm}.bias': (width,)})
  for block in range(blocks):
    prefix = f'visual.transformer.resblocks.{block}.'
    shapes.update({prefix + 'attn.in_proj_weight': (3 * width, width),
                   prefix + 'attn.in_proj_bias': (3 * width,),
                   prefix + 'attn.out_proj.weight': (width, width),
                   prefix + 'attn.out_proj.bias': (width,),
                   prefix + 'mlp.c_fc.weight': (mlp, width), prefix + 'mlp.c_fc.bias': (mlp,),
                   prefix + 'mlp.c_proj.weight': (width, mlp),
                   prefix + 'mlp.c_proj.bias': (width,)})
    for norm in ('ln_1', 'ln_2'):
      shapes.update({f'{prefix}{norm}.weight': (width,), f'{prefix}{norm}.bias': (width,)})
  return {key: np.broadcast_to(np.float32(0), shape) for key, shape in shapes.items()}


def test_a_full_size_tower_is_refused_by_a_shrunk_backbone_naming_both():
  path = 'ViT-B-16/open_clip_pytorch_model.bin'
  _refused('clip_vit_test', path, re.escape(
      'holds an open_clip ViT 768 wide, 12 deep, patch 16; the configured backbone is CLIP '
      "ViT (shrunk, for tests) (config.model.backbone='clip_vit_test'): set "
      "--config.model.backbone=clip_vit_b16 to load it; the file's tower differs in: width "
      "768 (the backbone's: 32), depth 12 (the backbone's: 2), mlp_dim 3072 (the backbone's: "
      "64), projection 512 (the backbone's: 24)") + '$', content=_open_clip_b16_state())


def test_a_siglip_tower_without_its_pooling_head_is_refused_saying_so(hf_files):
  """No backbone fits it: none is suggested."""
  _, path = hf_files['SiglipVisionModel']
  content = {k: v for k, v in torch_io.read(path).items() if not k.startswith('head.')}
  _refused('siglip_test', path, re.escape(
      "(config.model.backbone='siglip_test'): no backbone here has that architecture; the "
      "file's tower differs in: pool 'mean' (the backbone's: 'map')") + '$', content=content)


def _damaged(state: dict, damage: str) -> dict:
  """An open_clip state dict (`visual.*`) with one thing wrong."""
  state, tower = dict(state), 'visual.'
  block = tower + 'transformer.resblocks.0.'
  if damage == 'patch-embedding-2d':
    state[tower + 'conv1.weight'] = state[tower + 'conv1.weight'].reshape(32, -1)
  elif damage == 'positions-of-another-width':
    state[tower + 'positional_embedding'] = np.zeros((5, 40), np.float32)
  elif damage == 'positions-no-square':
    state[tower + 'positional_embedding'] = np.zeros((7, 32), np.float32)
  elif damage == 'in-proj-not-packed':
    state[block + 'attn.in_proj_weight'] = np.zeros((32, 32), np.float32)
  elif damage == 'mlp-of-another-shape':
    state[block + 'mlp.c_proj.weight'] = np.zeros((32, 48), np.float32)
  elif damage == 'missing-key':
    del state[block + 'ln_2.bias']
  elif damage == 'unknown-key':
    state[block + 'ls_1.gamma'] = np.ones(32, np.float32)
  elif damage == 'text-not-tensor':
    state['logit_scale'] = 'text'
  return state


@pytest.mark.parametrize('damage, message', [
    ('patch-embedding-2d', r'visual\.conv1\.weight has shape \(32, 768\), expected 4'),
    ('positions-of-another-width', r'positional_embedding has shape \(5, 40\), expected '
                                   r'\(tokens, 32\)'),
    ('positions-no-square', r'positional_embedding has shape \(1, 7, 32\): expected'),
    ('in-proj-not-packed', r'in_proj_weight has shape \(32, 32\), expected the query'),
    ('mlp-of-another-shape', r'mlp\.c_proj\.weight has shape \(32, 48\)'),
    ('missing-key', r"missing \['backbone\.blocks\.0\.ln2\.bias'\]"),
    ('unknown-key', r"unexpected \['visual\.transformer\.resblocks\.0\.ls_1\.gamma'\]"),
    ('text-not-tensor', r"'logit_scale' holds str, expected a tensor"),
])
def test_a_damaged_tower_is_refused_naming_the_file_and_the_key(open_clip_file, damage,
                                                                 message):
  model, path = open_clip_file
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  abstract = _model('clip_vit_test', 32, abstract=True)
  with pytest.raises(torch_io.CheckpointError, match=f'^{re.escape(path)}: .*{message}'):
    torch_io.load_into(abstract, path, _damaged(state, damage))


@pytest.mark.slow
def test_full_size_siglip_base_computes_theirs(tmp_path):
  """transformers' SigLIP base/16 at 224 px (SiglipVisionConfig's defaults, siglip_b16),
  random weights, through its model.safetensors."""
  transformers = reference_libraries.import_transformers()
  initialization = importlib.import_module('transformers.initialization')
  with initialization.no_init_weights():  # `_randomise` draws every weight
    reference = transformers.SiglipVisionModel(transformers.SiglipVisionConfig())
  _randomise(reference, 0).eval().save_pretrained(str(tmp_path))
  _, loaded, ours = _ours('siglip_b16', str(tmp_path / 'model.safetensors'), 224, train=False)
  assert loaded == torch_io.Loaded('hugging_face', 'backbone')
  images = _images(224)
  got = ours(images)
  with torch.no_grad():
    outputs = reference(pixel_values=images)
  _check('HF SigLIP base 224 px pooled', got['global'], outputs.pooler_output)
  _check('HF SigLIP base 224 px tokens', got['tokens'],
         _tokens_as_map(outputs.last_hidden_state, 0))
