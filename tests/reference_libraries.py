"""The reference libraries the parity tests compare with (requirements-references.txt),
imported once, or the test skipped where they are not installed.

torchvision registers fake (meta) kernels for its operators with
torch.library.register_fake when imported, which this torch refuses for them; the parity
tests use none of those operators, so registration is made a no-op first. timm and
open_clip import torchvision, and so need the same.
"""

import functools

import pytest


@functools.cache
def _torch_without_fake_kernels():
  torch = pytest.importorskip('torch')
  torch.library.register_fake = lambda *args, **kwargs: (lambda function: function)
  return torch


def import_torchvision():
  _torch_without_fake_kernels()
  return pytest.importorskip('torchvision')


def import_timm():
  _torch_without_fake_kernels()
  return pytest.importorskip('timm')


def import_open_clip():
  _torch_without_fake_kernels()
  return pytest.importorskip('open_clip')


def import_transformers():
  _torch_without_fake_kernels()
  return pytest.importorskip('transformers')
