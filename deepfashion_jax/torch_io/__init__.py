"""PyTorch files into the Flax model, without PyTorch: `load_into(model, path)`.

It reads the file, with the reader its first bytes call for (`read`): `reader.read_pth` for
either of torch.save's formats (a zip archive, 'PK'; the legacy pickle stream, 0x80), no
code in the file runs; `safetensors_file.read_safetensors` for a .safetensors file (an
8-byte header length, then the JSON header's '{'), half-precision tensors as float32. Both
return {name: array} for a state dict. It hands what it read to the first family in
`FAMILIES` that recognises it:
- `liu_lu`: a state dict of Liu & Lu 2018's WholeNetwork: the whole
  FashionNet(backbone='vgg16', heads='liu_lu', landmarks='attention');
- `baseline`: the PyTorch baseline's `epoch_N.pth`: the whole model;
- `torchvision_vit`, `timm_vit`: a torchvision or timm ViT state dict: the backbone only
  (`vit_common` has what the ViT families share: the architecture checked, the position
  embedding resampled to the model's grid);
- `open_clip`: an open_clip CLIP model's state dict (OpenAI's CLIP, LAION's, ...): its
  image tower into a CLIP ViT backbone;
- `hugging_face`: a Hugging Face transformers CLIP or SigLIP model (or vision model): its
  image tower into a CLIP or SigLIP ViT backbone (`clip_towers` has what these two share
  beyond `vit_common`);
- `torchvision`: a torchvision ResNet, VGG-16(-BN) or ConvNeXt state dict: the backbone
  only, the ImageNet start.
Any may come from nn.DataParallel (every key prefixed `module.`) and from any device. A
file for another model than the configured one (its backbone, heads, pooling, input size or
pixel normalisation) is refused with a CheckpointError that names each flag to set.
--config.init_from and --mode=convert both load through `load_into`
(convert_torch.py), and so do the tests.

Adding a family of files (a model zoo's ConvNeXt, ViT, CLIP, ...) is one new module here
and its line in `FAMILIES` (with its import); no other module changes. The module holds its
name mapping and constants beside its code (`common` has what families share: PyTorch's
layouts into Flax's, batch-norm leaf names, writing arrays into the model) and provides:
  NAME: str, the family's name in `Loaded.family`;
  matches(content) -> bool: whether `content`, what the reader returned, is one of its
    files; it must not raise, whatever `content` is;
  load(model, content, path) -> common.Loaded: fills the model (or a part of it), raising
    CheckpointError naming `path`, what differs and the flag to set;
  and may provide fitting_config(content, config, path) -> dict: the config fields its
    weights need ({'model.roi_pool': 'baseline_max'}), which --mode=convert sets.
Families are tried in order: put a new one before `torchvision`, which takes any state dict
the others leave. A family whose files are in a format neither reader reads also needs its
reader, beside these two, chosen in `read` by the file's first bytes.
"""

from flax import nnx

from deepfashion_jax.torch_io import baseline
from deepfashion_jax.torch_io import hugging_face
from deepfashion_jax.torch_io import liu_lu
from deepfashion_jax.torch_io import open_clip
from deepfashion_jax.torch_io import reader
from deepfashion_jax.torch_io import safetensors_file
from deepfashion_jax.torch_io import timm_vit
from deepfashion_jax.torch_io import torchvision
from deepfashion_jax.torch_io import torchvision_vit
from deepfashion_jax.torch_io.common import Loaded
from deepfashion_jax.torch_io.errors import CheckpointError

# Tried in order; the first whose `matches` is true loads the file.
FAMILIES = (
    liu_lu,  # before the baseline: their state dict may sit under 'model' too
    baseline,
    torchvision_vit,
    timm_vit,
    open_clip,
    hugging_face,
    torchvision,  # last: any state dict
)


def read(path: str):
  """What the file at `path` holds, for `load_into` and `fitting_config`: a safetensors
  file's tensors by name when it starts as one does (whatever its name), else the object
  torch.save wrote (`reader.read_pth`, which refuses any other file)."""
  if safetensors_file.is_safetensors(path):
    return safetensors_file.read_safetensors(path)
  return reader.read_pth(path)


def _family_of(content, path: str):
  for family in FAMILIES:
    if family.matches(content):
      return family
  raise CheckpointError(f'{path}: expected a state dict, found {type(content).__name__}')


def load_into(model: nnx.Module, path: str, content=None) -> Loaded:
  """Loads the PyTorch file at `path` (or what `read` returned for it, `content`) into
  `model` (the whole model or its backbone, whichever the file holds); returns what it
  loaded."""
  content = read(path) if content is None else content
  return _family_of(content, path).load(model, content, path)


def fitting_config(content, config, path: str) -> tuple[str, dict]:
  """(the file's family, the config fields its weights need with their values:
  {'model.roi_pool': 'baseline_max', ...}); no fields for a family whose files fit any
  configuration of their part (torchvision's backbones)."""
  family = _family_of(content, path)
  fit = getattr(family, 'fitting_config', None)
  return family.NAME, (fit(content, config, path) if fit else {})
