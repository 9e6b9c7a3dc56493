"""PyTorch files into the Flax model, without PyTorch: `load_into(model, path)`.

It reads the file (`reader.read_pth`: either of torch.save's formats, no code in the file
runs) and hands it to the first family in `FAMILIES` that recognises it:
- `liu_lu`: a state dict of Liu & Lu 2018's WholeNetwork: the whole
  FashionNet(backbone='vgg16', heads='liu_lu', landmarks='attention');
- `baseline`: the PyTorch baseline's `epoch_N.pth`: the whole model;
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
the others leave. A family whose files are not torch.save's (.safetensors, say) also needs
its reader, beside `reader`, chosen in `load_into` by the file's first bytes.
"""

from flax import nnx

from deepfashion_jax.torch_io import baseline
from deepfashion_jax.torch_io import liu_lu
from deepfashion_jax.torch_io import reader
from deepfashion_jax.torch_io import torchvision
from deepfashion_jax.torch_io.common import Loaded
from deepfashion_jax.torch_io.errors import CheckpointError

# Tried in order; the first whose `matches` is true loads the file.
FAMILIES = (
    liu_lu,  # before the baseline: their state dict may sit under 'model' too
    baseline,
    torchvision,  # last: any state dict
)


def read(path: str):
  """What the PyTorch file at `path` holds (`reader.read_pth`), for `load_into` and
  `fitting_config`."""
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
