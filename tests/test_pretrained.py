"""Pretrained weights by name (pretrained.py): downloaded once into the cache, resumed,
checked by size and hash, refused when wrong; against an HTTP server on 127.0.0.1 that
these tests run (nothing here reaches the internet)."""

import dataclasses
import errno
import hashlib
import http.server
import io
import logging
import os
import re
import socket
import threading

from flax import nnx
import jax
import numpy as np
import pytest

from configs import test as test_config
from deepfashion_jax import config_checks
from deepfashion_jax import convert_torch
from deepfashion_jax import errors
from deepfashion_jax import pretrained
from deepfashion_jax import torch_io
from deepfashion_jax.models import fashion_net

# The backbones the registry's weights are for (models/backbones.py's names).
BACKBONE_NAMES = ('convnext_tiny', 'convnext_small', 'convnext_base', 'vit_b16', 'vit_s16',
                  'clip_vit_b16', 'siglip_b16')
CONTENT = bytes(range(256)) * 40  # 10,240 bytes
DIGEST = hashlib.sha256(CONTENT).hexdigest()
NAME = 'torchvision:tiny'  # the test's own entry (`registered`), served by `server`


@dataclasses.dataclass
class _Behaviour:
  """What the server does: `files` by URL path; Range honoured or not; `cuts`: for the next
  responses, how many bytes of the body each sends before closing the connection; `extra`:
  bytes announced in Content-Length beyond those sent; `requests`: (path, Range header)."""
  files: dict = dataclasses.field(default_factory=dict)
  honour_range: bool = True
  cuts: list = dataclasses.field(default_factory=list)
  extra: int = 0
  requests: list = dataclasses.field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):

  def do_GET(self):  # pylint: disable=invalid-name
    behaviour = self.server.behaviour
    asked = self.headers.get('Range')
    behaviour.requests.append((self.path, asked))
    body = behaviour.files.get(self.path)
    if body is None:
      self.send_error(404)
      return
    start = int(re.fullmatch(r'bytes=(\d+)-', asked).group(1)) if asked else 0
    if asked and behaviour.honour_range and start >= len(body):
      self.send_error(416)
      return
    if asked and behaviour.honour_range:
      self.send_response(206)
      self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
    else:
      start = 0
      self.send_response(200)
    body = body[start:]
    self.send_header('Content-Length', str(len(body) + behaviour.extra))
    self.end_headers()
    cut = behaviour.cuts.pop(0) if behaviour.cuts else None
    self.wfile.write(body if cut is None else body[:cut])

  def log_message(self, *args):  # pylint: disable=arguments-differ
    pass


@pytest.fixture(scope='module')
def http_server():
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield server
  server.shutdown()
  server.server_close()


@pytest.fixture
def server(http_server):
  """The server with a fresh `_Behaviour` serving CONTENT at /files/tiny.pth; its base URL
  is server.url."""
  http_server.behaviour = _Behaviour(files={'/files/tiny.pth': CONTENT})
  http_server.url = f'http://127.0.0.1:{http_server.server_address[1]}'
  return http_server


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  """Every test's own cache folder, no mirror and no proxy."""
  monkeypatch.setenv(pretrained.CACHE_VARIABLE, str(tmp_path / 'cache'))
  for variable in (pretrained.MIRROR_VARIABLE, 'http_proxy', 'HTTP_PROXY', 'all_proxy',
                   'ALL_PROXY'):
    monkeypatch.delenv(variable, raising=False)
  return tmp_path / 'cache'


def _register(monkeypatch, url, sha256=DIGEST[:8], name=NAME, backbone='resnet18'):
  weights = pretrained.Weights('a test file', url, 'tiny-0123.pth', sha256, backbone)
  monkeypatch.setitem(pretrained.REGISTRY, name, weights)
  return weights


def _read(path):
  with open(path, 'rb') as f:
    return f.read()


def _cache_files(cache):
  return sorted(os.listdir(cache / 'torchvision')) if (cache / 'torchvision').exists() else []


def test_a_name_is_downloaded_once_then_read_from_the_cache(server, monkeypatch, cache):
  _register(monkeypatch, server.url + '/files/tiny.pth')
  path = pretrained.resolve(NAME)
  assert path == str(cache / 'torchvision' / 'tiny-0123.pth')
  assert _read(path) == CONTENT
  assert pretrained.resolve(NAME) == path
  assert server.behaviour.requests == [('/files/tiny.pth', None)]  # no second request
  assert _cache_files(cache) == ['tiny-0123.pth', 'tiny-0123.pth.lock']  # no .partial


def test_a_path_is_returned_as_it_is_and_nothing_is_requested(server):
  for path in ('weights/resnet18.pth', '/abs/epoch_200.pth', 'C:\\weights.pth', './timm:x',
               'vgg16-397923af.pth', ''):
    assert not pretrained.is_name(path)
    assert pretrained.resolve(path) == path
  assert not server.behaviour.requests


def test_a_download_with_another_hash_is_refused_and_not_kept(server, monkeypatch, cache):
  url = server.url + '/files/tiny.pth'
  _register(monkeypatch, url, sha256='ffff' + DIGEST[4:8])
  with pytest.raises(errors.DeepFashionError, match=f'{re.escape(url)} has SHA-256 {DIGEST}, '
                     'but the published one starts with ffff.*removed, not used'):
    pretrained.resolve(NAME)
  assert _cache_files(cache) == ['tiny-0123.pth.lock']


def test_an_interrupted_download_is_resumed_from_where_it_stopped(server, monkeypatch):
  _register(monkeypatch, server.url + '/files/tiny.pth')
  server.behaviour.cuts = [3000]
  assert _read(pretrained.resolve(NAME)) == CONTENT
  assert server.behaviour.requests == [('/files/tiny.pth', None),
                                       ('/files/tiny.pth', 'bytes=3000-')]


def test_a_server_that_ignores_range_restarts_the_download(server, monkeypatch):
  _register(monkeypatch, server.url + '/files/tiny.pth')
  server.behaviour.honour_range, server.behaviour.cuts = False, [3000]
  assert _read(pretrained.resolve(NAME)) == CONTENT  # not 3000 bytes twice
  assert [asked for _, asked in server.behaviour.requests] == [None, 'bytes=3000-']


def test_a_partial_file_left_by_an_earlier_run_is_resumed(server, monkeypatch, cache):
  _register(monkeypatch, server.url + '/files/tiny.pth')
  os.makedirs(cache / 'torchvision')
  (cache / 'torchvision' / 'tiny-0123.pth.partial').write_bytes(CONTENT[:5000])
  assert _read(pretrained.resolve(NAME)) == CONTENT
  assert server.behaviour.requests == [('/files/tiny.pth', 'bytes=5000-')]


def test_a_corrupt_partial_file_is_never_used(server, monkeypatch, cache):
  """A .partial whose bytes are not the file's: resumed, the hash tells, and it is removed;
  the next run downloads the whole file."""
  _register(monkeypatch, server.url + '/files/tiny.pth')
  os.makedirs(cache / 'torchvision')
  (cache / 'torchvision' / 'tiny-0123.pth.partial').write_bytes(b'\0' * 5000)
  with pytest.raises(errors.DeepFashionError, match='removed, not used'):
    pretrained.resolve(NAME)
  assert _cache_files(cache) == ['tiny-0123.pth.lock']
  assert _read(pretrained.resolve(NAME)) == CONTENT


def test_a_partial_file_longer_than_the_file_is_dropped_and_the_download_restarted(
    server, monkeypatch, cache):
  _register(monkeypatch, server.url + '/files/tiny.pth')
  os.makedirs(cache / 'torchvision')
  (cache / 'torchvision' / 'tiny-0123.pth.partial').write_bytes(b'\0' * 20000)
  assert _read(pretrained.resolve(NAME)) == CONTENT
  assert [asked for _, asked in server.behaviour.requests] == ['bytes=20000-', None]  # 416


def test_a_download_says_its_progress_on_a_terminal_and_in_the_log(server, monkeypatch,
                                                                    caplog):
  class Terminal(io.StringIO):
    def isatty(self):
      return True

  _register(monkeypatch, server.url + '/files/tiny.pth')
  monkeypatch.setattr(pretrained, '_PROGRESS_EVERY_S', 0)
  monkeypatch.setattr(pretrained, '_CHUNK', 4096)
  monkeypatch.setattr(pretrained.sys, 'stderr', Terminal())
  with caplog.at_level(logging.INFO):
    path = pretrained.resolve(NAME)
  lines = pretrained.sys.stderr.getvalue()
  assert f'\r{NAME}: 0.0 / 0.0 MB (40%) ' in lines and f'\r{NAME}: 0.0 / 0.0 MB (80%) ' in lines
  assert ' MB/s ' in lines and lines.endswith('\n')
  assert (f'Downloading {NAME} from {server.url}/files/tiny.pth into {path} (0.0 MB)'
          in caplog.text)
  assert f'{NAME}: received 0.0 MB in ' in caplog.text


def test_fewer_bytes_than_content_length_are_refused(server, monkeypatch, cache):
  """A server announcing 10 bytes more than it sends: each try comes up short, and the
  file is never put in place; what came is kept for the next run."""
  url = server.url + '/files/tiny.pth'
  _register(monkeypatch, url, sha256=None)  # the size alone must refuse it
  server.behaviour.honour_range, server.behaviour.extra = False, 10
  with pytest.raises(errors.DeepFashionError,
                     match=f'the download of {re.escape(url)} stopped 3 times, the last one '
                     f'at 10,240 bytes .*10,240 of 10,250 bytes.*the next run resumes it'):
    pretrained.resolve(NAME)
  assert len(server.behaviour.requests) == 3
  assert _cache_files(cache) == ['tiny-0123.pth.lock', 'tiny-0123.pth.partial']


def _unused_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]  # closed without listening: connections are refused


def test_offline_the_message_names_the_url_and_where_to_put_the_file(monkeypatch, cache):
  url = f'http://127.0.0.1:{_unused_port()}/files/tiny.pth'
  _register(monkeypatch, url)
  path = cache / 'torchvision' / 'tiny-0123.pth'
  with pytest.raises(errors.DeepFashionError) as raised:
    pretrained.resolve(NAME)
  message = f'{raised.value}'
  assert f'cannot download {url} (' in message
  assert (f'download {url} elsewhere and put it at {path} (its SHA-256 is checked: it must '
          f'start with {DIGEST[:8]})') in message
  assert pretrained.MIRROR_VARIABLE in message
  assert not path.exists()


def test_a_file_put_in_the_cache_by_hand_is_used_and_checked(monkeypatch, cache):
  _register(monkeypatch, 'http://127.0.0.1:1/never-asked')
  os.makedirs(cache / 'torchvision')
  path = cache / 'torchvision' / 'tiny-0123.pth'
  path.write_bytes(CONTENT)
  assert pretrained.resolve(NAME) == str(path)
  path.write_bytes(CONTENT[:-1])
  with pytest.raises(errors.DeepFashionError,
                     match=f'{re.escape(str(path))}: SHA-256 .* starts with {DIGEST[:8]}: this '
                     'is another file. Delete it'):
    pretrained.resolve(NAME)


def test_an_unknown_name_is_refused_with_the_registered_names():
  with pytest.raises(errors.ConfigError) as raised:
    pretrained.resolve('torchvision:convnext_tiyn')
  message = f'{raised.value}'
  assert message.startswith("config.init_from='torchvision:convnext_tiyn': no pretrained "
                            "weights of that name; did you mean 'torchvision:convnext_tiny'?")
  assert all(name in message for name in pretrained.REGISTRY)
  with pytest.raises(errors.ConfigError, match=r"--torch_checkpoint='nope:x'.* the names are "
                     'torchvision:convnext_tiny, '):
    pretrained.resolve('nope:x', field='--torch_checkpoint')


def test_the_cache_variable_is_honoured_and_the_default_is_under_home(server, monkeypatch,
                                                                       tmp_path):
  _register(monkeypatch, server.url + '/files/tiny.pth')
  monkeypatch.setenv(pretrained.CACHE_VARIABLE, str(tmp_path / 'elsewhere'))
  assert pretrained.resolve(NAME) == str(tmp_path / 'elsewhere' / 'torchvision' /
                                         'tiny-0123.pth')
  monkeypatch.delenv(pretrained.CACHE_VARIABLE)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert pretrained.cached_path('open_clip:ViT-B-16/openai') == str(
      tmp_path / 'home' / '.cache' / 'deepfashion_jax' / 'open_clip' /
      'ViT-B-16-openai.safetensors')


def test_a_mirror_serves_the_cache_layout(server, monkeypatch, cache):
  """A registered name without a published hash, from $DEEPFASHION_JAX_WEIGHTS_URL."""
  name = 'hf:google/siglip-base-patch16-224'
  server.behaviour.files['/mirror/hf/google--siglip-base-patch16-224.safetensors'] = CONTENT
  monkeypatch.setenv(pretrained.MIRROR_VARIABLE, server.url + '/mirror/')
  assert pretrained.resolve(name) == str(cache / 'hf' /
                                         'google--siglip-base-patch16-224.safetensors')
  assert server.behaviour.requests == [
      ('/mirror/hf/google--siglip-base-patch16-224.safetensors', None)]


def test_processes_resolving_one_name_at_once_download_it_once(server, monkeypatch):
  _register(monkeypatch, server.url + '/files/tiny.pth')
  paths = []
  threads = [threading.Thread(target=lambda: paths.append(pretrained.resolve(NAME)))
             for _ in range(4)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert len(paths) == 4 and len(set(paths)) == 1 and _read(paths[0]) == CONTENT
  assert len(server.behaviour.requests) == 1


def test_a_filesystem_without_locks_downloads_and_warns(server, monkeypatch, caplog, cache):
  def no_locks(descriptor, operation):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

  _register(monkeypatch, server.url + '/files/tiny.pth')
  monkeypatch.setattr(pretrained.fcntl, 'flock', no_locks)
  assert _read(pretrained.resolve(NAME)) == CONTENT
  assert (f'{cache / "torchvision" / "tiny-0123.pth.lock"}: cannot lock it (No locks '
          'available): another process may download the same file at once. Give each host '
          'its own DEEPFASHION_JAX_CACHE') in caplog.text


def test_the_registry_reads_as_its_publishers_name_the_files():
  for name, weights in pretrained.REGISTRY.items():
    assert pretrained.is_name(name), name
    assert weights.url.startswith('https://'), name
    assert weights.backbone in BACKBONE_NAMES, name
    if name.startswith('torchvision:'):  # torch.hub's check_hash: the name's hash part
      assert weights.url.endswith(f'/{weights.file_name}')
      assert re.fullmatch(r'[a-z0-9_]+-([0-9a-f]{8})\.pth', weights.file_name)[1] == \
          weights.sha256
    else:  # the Hugging Face Hub gives no hash in the libraries' sources
      assert weights.url.startswith('https://huggingface.co/') and weights.sha256 is None
  schemes_files = [pretrained.cached_path(name) for name in pretrained.REGISTRY]
  assert len(set(schemes_files)) == len(schemes_files)
  assert pretrained.REGISTRY['torchvision:convnext_tiny'].sha256 == '983f1562'


def test_a_name_for_another_backbone_is_refused_naming_both_fields(tmp_path):
  config = test_config.get_config()
  config.init_from = 'torchvision:convnext_tiny'
  assert config.model.backbone == 'resnet18'
  expected = ("config.init_from='torchvision:convnext_tiny' holds 'convnext_tiny' weights "
              r"\(ConvNeXt-T.*\), which config.model.backbone='resnet18' cannot take: set "
              '--config.model.backbone=convnext_tiny')
  with pytest.raises(errors.ConfigError, match=expected):
    config_checks.check(config)
  config.init_from = 'timm:vit_small_patch16_224'
  with pytest.raises(errors.ConfigError, match="did you mean 'timm:vit_small_patch16_224."):
    config_checks.check(config)
  # --mode=convert refuses it before anything is read or written.
  config.init_from = ''
  with pytest.raises(errors.ConfigError, match="--torch_checkpoint='torchvision:vit_b_16' "
                     "holds 'vit_b16' weights .*config.model.backbone='resnet18'"):
    convert_torch.convert(config, str(tmp_path / 'workdir'), 'torchvision:vit_b_16')
  assert not (tmp_path / 'workdir').exists()


def test_convert_reads_the_file_a_name_resolves_to(server, monkeypatch, tmp_path, cache):
  """--mode=convert's --torch_checkpoint: the name downloaded, then its cached file read."""
  class Read(Exception):
    pass

  def read(path):
    raise Read(path)

  _register(monkeypatch, server.url + '/files/tiny.pth')
  monkeypatch.setattr(convert_torch.torch_io, 'read', read)
  with pytest.raises(Read) as raised:
    convert_torch.convert(test_config.get_config(), str(tmp_path / 'workdir'), NAME)
  assert raised.value.args == (str(cache / 'torchvision' / 'tiny-0123.pth'),)
  assert _read(raised.value.args[0]) == CONTENT


def _zero_model():
  """FashionNet(backbone='resnet18') with zeros for weights: its shapes without the seconds
  that XLA:CPU takes to compile a random initialisation op by op."""
  model = nnx.eval_shape(
      lambda: fashion_net.FashionNet(backbone='resnet18', image_size=64, rngs=nnx.Rngs(0)))
  nnx.update(model, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nnx.state(model)))
  return model


def test_from_a_name_to_weights_in_the_model(server, monkeypatch, tmp_path):
  """A torchvision ResNet-18 state dict written by torch.save, registered, downloaded and
  loaded as config.init_from loads it."""
  torch = pytest.importorskip('torch')
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  layers, _ = torch_reference.resnet_layers(18)
  names = {'0': 'conv1', '1': 'bn1', '4': 'layer1', '5': 'layer2', '6': 'layer3', '7': 'layer4'}
  state_dict = {names[k.split('.', 1)[0]] + '.' + k.split('.', 1)[1]: v
                for k, v in torch.nn.Sequential(*layers).state_dict().items()}
  torch.save(state_dict, tmp_path / 'resnet18.pth')
  content = _read(tmp_path / 'resnet18.pth')
  server.behaviour.files['/models/resnet18.pth'] = content
  _register(monkeypatch, server.url + '/models/resnet18.pth',
            sha256=hashlib.sha256(content).hexdigest()[:8], name='torchvision:resnet18_test')

  model = _zero_model()
  path = pretrained.resolve('torchvision:resnet18_test')
  assert torch_io.load_into(model, path) == torch_io.Loaded('torchvision', 'backbone')
  np.testing.assert_array_equal(model.backbone.conv1.kernel[...],
                                state_dict['conv1.weight'].numpy().transpose(2, 3, 1, 0))
