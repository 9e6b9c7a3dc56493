"""The reference libraries the parity tests compare against, imported one way.

torchvision's compiled operators do not load beside the CPU torch of requirements-dev.txt:
its import registers fake kernels for them through `torch.library.register_fake`, which
fails. The model definitions the tests use need none of those operators, so the
registration is replaced by a no-op before the first import of torchvision (which timm and
open_clip import, and transformers may). Each function skips the calling test module when
its library is not installed (requirements-references.txt installs them below Python 3.12).
"""

import pytest


def _torch():
  torch = pytest.importorskip('torch')
  if not getattr(torch.library.register_fake, 'stubbed_for_tests', False):
    def register_fake(*args, **kwargs):
      del args, kwargs
      return lambda function: function
    register_fake.stubbed_for_tests = True
    torch.library.register_fake = register_fake
  return torch


def import_torch():
  return _torch()


def import_torchvision():
  _torch()
  return pytest.importorskip('torchvision')


def import_timm():
  _torch()
  return pytest.importorskip('timm')


def import_open_clip():
  _torch()
  return pytest.importorskip('open_clip')


def import_transformers():
  _torch()
  return pytest.importorskip('transformers')
