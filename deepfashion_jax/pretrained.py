"""Pretrained weights by name: `--config.init_from=torchvision:convnext_tiny` (and
--mode=convert's --torch_checkpoint) names a published file, downloaded once into a cache.

`resolve(value)` turns such a name into the local path of its file; any other value is a
path and is returned as it is. A name is `scheme:name` (the scheme two or more lowercase
letters, digits or underscores, so that a Windows drive letter stays a path; a file whose
name looks like one is given as `./timm:x`), and must be one of REGISTRY.

The cache is `$DEEPFASHION_JAX_CACHE` (default ~/.cache/deepfashion_jax), one subfolder per
scheme: `<cache>/torchvision/convnext_tiny-983f1562.pth`. A file is downloaded into
`<file>.partial` and renamed to its name only when it is complete: its size is the
response's Content-Length and its SHA-256 the publisher's (when the publisher gives one),
so a corrupt or partial file is never used. A `.partial` left by an interrupted download is
resumed with an HTTP Range request when the server answers 206, else restarted. A file in
the cache is checked against its SHA-256 (when known) at each use, so one put there by hand
is checked too.

Several processes (a multi-host run, several runs on one machine) each resolve the name
themselves: the one that takes `<file>.lock` (an flock) downloads, the others wait for it
and then find the file; the rename into place is atomic, so no process reads a
half-written file. A cache shared by hosts thus needs a filesystem with locks (NFSv4,
Lustre mounted with flock); where there are none, a warning says so, as two processes
could then write one `.partial` at once: give each host its own cache.

`$DEEPFASHION_JAX_WEIGHTS_URL`, when set, is a mirror that replaces every publisher: a name
is downloaded from `<mirror>/<scheme>/<file>`, the cache's own layout (a copy of a cache
folder served over HTTP is such a mirror), and checked as from its publisher.
"""

import contextlib
import dataclasses
import difflib
import fcntl
import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request

from absl import logging

from deepfashion_jax import errors

CACHE_VARIABLE = 'DEEPFASHION_JAX_CACHE'
MIRROR_VARIABLE = 'DEEPFASHION_JAX_WEIGHTS_URL'
DEFAULT_CACHE = os.path.join('~', '.cache', 'deepfashion_jax')


@dataclasses.dataclass(frozen=True)
class Weights:
  title: str  # what the weights are, for the docs and messages
  url: str  # where the publisher serves the file
  file_name: str  # its name in the cache's subfolder of its scheme
  # The file's SHA-256, or the prefix of it that the publisher gives; None where it gives
  # none (the file is then checked by its size only).
  sha256: str | None
  backbone: str  # the config.model.backbone it fits (models/backbones.py)


# torch.hub's convention (HASH_REGEX and check_hash in torch/hub.py, which torchvision's
# builders call with check_hash=True): the part of the file name between the last '-'
# and the extension is a prefix of the file's SHA-256.
_TORCH_HUB_HASH = re.compile(r'-([a-f0-9]*)\.')


def _torchvision(title: str, url: str, backbone: str) -> Weights:
  file_name = url.rsplit('/', 1)[1]
  return Weights(title, url, file_name, _TORCH_HUB_HASH.search(file_name).group(1), backbone)


def _hugging_face(title: str, repo: str, file_in_repo: str, file_name: str,
                  backbone: str) -> Weights:
  """A file of a Hugging Face Hub repository. The Hub publishes no hash in the libraries
  that name these files (it serves one in an HTTP header only), so sha256 is None."""
  return Weights(title, f'https://huggingface.co/{repo}/resolve/main/{file_in_repo}',
                 file_name, None, backbone)


# Every name, read from the libraries that publish the weights:
REGISTRY = {
    # torchvision 0.28.0: the IMAGENET1K_V1 weights' urls in torchvision/models/convnext.py
    # and vision_transformer.py (acc@1 from their meta).
    'torchvision:convnext_tiny': _torchvision(
        'ConvNeXt-T, ImageNet-1k (torchvision IMAGENET1K_V1, 82.5% top-1)',
        'https://download.pytorch.org/models/convnext_tiny-983f1562.pth', 'convnext_tiny'),
    'torchvision:convnext_small': _torchvision(
        'ConvNeXt-S, ImageNet-1k (torchvision IMAGENET1K_V1, 83.6% top-1)',
        'https://download.pytorch.org/models/convnext_small-0c510722.pth', 'convnext_small'),
    'torchvision:convnext_base': _torchvision(
        'ConvNeXt-B, ImageNet-1k (torchvision IMAGENET1K_V1, 84.1% top-1)',
        'https://download.pytorch.org/models/convnext_base-6075fbad.pth', 'convnext_base'),
    'torchvision:vit_b_16': _torchvision(
        'ViT-B/16, ImageNet-1k (torchvision IMAGENET1K_V1, 81.1% top-1)',
        'https://download.pytorch.org/models/vit_b_16-c867db91.pth', 'vit_b16'),
    # timm 1.0.31: default_cfgs in timm/models/vision_transformer.py; hf_hub_id 'timm/' is
    # the repository timm/<name.tag>, whose model.safetensors timm loads
    # (HF_SAFE_WEIGHTS_NAME in timm/models/_hub.py).
    'timm:vit_small_patch16_224.augreg_in21k_ft_in1k': _hugging_face(
        'ViT-S/16, AugReg: ImageNet-21k, fine-tuned on ImageNet-1k (timm)',
        'timm/vit_small_patch16_224.augreg_in21k_ft_in1k', 'model.safetensors',
        'vit_small_patch16_224.augreg_in21k_ft_in1k.safetensors', 'vit_s16'),
    'timm:vit_base_patch16_224.augreg2_in21k_ft_in1k': _hugging_face(
        'ViT-B/16, AugReg: ImageNet-21k, fine-tuned on ImageNet-1k again (timm augreg2)',
        'timm/vit_base_patch16_224.augreg2_in21k_ft_in1k', 'model.safetensors',
        'vit_base_patch16_224.augreg2_in21k_ft_in1k.safetensors', 'vit_b16'),
    # open_clip 3.3.0: _VITB16['openai'] in open_clip/pretrained.py lists the Hub repository
    # timm/vit_base_patch16_clip_224.openai/, from which open_clip loads
    # open_clip_model.safetensors (HF_SAFE_WEIGHTS_NAME in open_clip/constants.py) before
    # its .bin. (Its other url, OpenAI's ViT-B-16.pt, is a TorchScript archive, which carries
    # its SHA-256 in its path but is not a state dict.)
    'open_clip:ViT-B-16/openai': _hugging_face(
        "CLIP ViT-B/16, OpenAI's WIT-400M weights (open_clip's layout; image and text towers)",
        'timm/vit_base_patch16_clip_224.openai', 'open_clip_model.safetensors',
        'ViT-B-16-openai.safetensors', 'clip_vit_b16'),
    # transformers 5.24.0: the repositories' model.safetensors (SAFE_WEIGHTS_NAME in
    # transformers/utils/__init__.py).
    'hf:openai/clip-vit-base-patch16': _hugging_face(
        "CLIP ViT-B/16, OpenAI's weights (transformers' CLIPModel layout)",
        'openai/clip-vit-base-patch16', 'model.safetensors',
        'openai--clip-vit-base-patch16.safetensors', 'clip_vit_b16'),
    'hf:google/siglip-base-patch16-224': _hugging_face(
        "SigLIP B/16 at 224 px, Google's WebLI weights (transformers' SiglipModel layout)",
        'google/siglip-base-patch16-224', 'model.safetensors',
        'google--siglip-base-patch16-224.safetensors', 'siglip_b16'),
}

_NAME = re.compile(r'([a-z][a-z0-9_]+):(.+)')
_CHUNK = 1 << 20
_TIMEOUT_S = 60  # a connection that sends nothing for this long counts as lost
_ATTEMPTS = 3  # tries per resolve when a download is cut off, each resuming the last
_PROGRESS_EVERY_S = 0.5


def is_name(value) -> bool:
  """Whether `value` (config.init_from, --torch_checkpoint) is a `scheme:name`, not a
  path."""
  return isinstance(value, str) and _NAME.fullmatch(value) is not None


def lookup(value: str, field: str = 'config.init_from') -> Weights:
  """REGISTRY[value]; ConfigError naming `field`, the nearest name and every name when it
  has none."""
  if value in REGISTRY:
    return REGISTRY[value]
  close = difflib.get_close_matches(value, REGISTRY, n=1)
  hint = f'did you mean {close[0]!r}? ' if close else ''
  raise errors.ConfigError(
      f'{field}={value!r}: no pretrained weights of that name; {hint}the names are '
      f'{", ".join(REGISTRY)} (docs/pretrained.md). A file whose name starts with '
      f'"scheme:" is given as ./{value}')


def check_backbone(value, backbone: str, field: str = 'config.init_from'):
  """When `value` is a name: ConfigError unless it is registered and its weights fit
  `backbone`, config.model.backbone; the message names both fields. A path passes (its
  file is checked when it is loaded)."""
  if not is_name(value):
    return
  weights = lookup(value, field)
  if weights.backbone != backbone:
    fitting = [name for name, w in REGISTRY.items() if w.backbone == backbone]
    also = f', or name weights for {backbone!r}: {", ".join(fitting)}' if fitting else ''
    raise errors.ConfigError(
        f'{field}={value!r} holds {weights.backbone!r} weights ({weights.title}), which '
        f'config.model.backbone={backbone!r} cannot take: set '
        f'--config.model.backbone={weights.backbone}{also}')


def cache_dir() -> str:
  """The cache's folder, absolute: $DEEPFASHION_JAX_CACHE, else ~/.cache/deepfashion_jax."""
  return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_VARIABLE) or DEFAULT_CACHE))


def cached_path(name: str) -> str:
  """Where the registered `name`'s file lies in the cache (whether or not it is there)."""
  return os.path.join(cache_dir(), name.split(':', 1)[0], REGISTRY[name].file_name)


def url_of(name: str) -> str:
  """Where `name` is downloaded from: its publisher, or the mirror in
  $DEEPFASHION_JAX_WEIGHTS_URL (`<mirror>/<scheme>/<file>`)."""
  mirror = os.environ.get(MIRROR_VARIABLE)
  if mirror:
    return f'{mirror.rstrip("/")}/{name.split(":", 1)[0]}/{REGISTRY[name].file_name}'
  return REGISTRY[name].url


def resolve(value: str, field: str = 'config.init_from') -> str:
  """The local file of `value`: a registered name's cached file, downloaded first when
  absent (ConfigError naming `field` for an unregistered name; DeepFashionError when the
  download fails or the file is not the published one); any other value, a path, as it is."""
  if not is_name(value):
    return value
  weights = lookup(value, field)
  path = cached_path(value)
  if os.path.exists(path):
    _check_cached(value, weights, path)
  else:
    _download(value, weights, url_of(value), path)
  return path


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _check_cached(name: str, weights: Weights, path: str):
  """A file in the cache (downloaded, or put there by hand) against the published hash."""
  if weights.sha256 is None:
    return
  digest = _sha256(path)
  if not digest.startswith(weights.sha256):
    raise errors.DeepFashionError(
        f'{path}: SHA-256 {digest}, but {name} ({weights.url}) is the file whose SHA-256 '
        f'starts with {weights.sha256}: this is another file. Delete it, and the next run '
        'downloads the published one (or put that one there by hand)')


def _by_hand(name: str, weights: Weights, path: str) -> str:
  """What an offline user does instead: where to put the file, and how it is checked."""
  check = (f'its SHA-256 is checked: it must start with {weights.sha256}' if weights.sha256
           else 'its publisher gives no hash, so only its presence is checked')
  return (f'Without a network, download {weights.url} elsewhere and put it at {path} '
          f'({check}), or set {MIRROR_VARIABLE} to a server holding '
          f'<scheme>/<file> as the cache does')


def _lock(descriptor: int, path: str):
  """Takes an flock on the open lock file `descriptor`, waiting while another process holds
  it: one process downloads a file, the others wait for it. A filesystem without locks
  gives none (the module's docstring says what then stays safe)."""
  try:
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    logging.info('Waiting for another process downloading into %s', path)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
  except OSError as e:  # no locks on this filesystem
    logging.warning('%s: cannot lock it (%s): another process may download the same file at '
                    'once. Give each host its own %s', path + '.lock', e.strerror,
                    CACHE_VARIABLE)


class _Interrupted(Exception):
  """A download that stopped before its end; its .partial is kept to resume."""


def _download(name: str, weights: Weights, url: str, path: str):
  """Downloads `url` to `path` through `<path>.partial`, resuming a partial one; renamed
  into place only complete and with the published hash."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    descriptor = os.open(path + '.lock', os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise errors.DeepFashionError(
        f'{name}: cannot write into the cache {os.path.dirname(path)} ({e.strerror}); set '
        f'{CACHE_VARIABLE} to a writable folder. {_by_hand(name, weights, path)}') from e
  try:
    _lock(descriptor, path)
    if os.path.exists(path):  # another process downloaded it while this one waited
      _check_cached(name, weights, path)
      return
    partial = path + '.partial'
    for attempt in range(_ATTEMPTS):
      try:
        _fetch_into(partial, name, weights, url, path)
        break
      except _Interrupted as e:
        stopped = e
        logging.warning('%s: the download of %s stopped (%s)%s', name, url, e,
                        '; trying again' if attempt + 1 < _ATTEMPTS else '')
    else:
      raise errors.DeepFashionError(
          f'{name}: the download of {url} stopped {_ATTEMPTS} times, the last one at '
          f'{_size(partial):,} bytes ({stopped}); {partial} keeps them and the next run '
          f'resumes it. {_by_hand(name, weights, path)}')
    _check_hash(partial, name, weights, url)
    os.replace(partial, path)
  finally:
    os.close(descriptor)  # releases the lock


def _size(path: str) -> int:
  return os.path.getsize(path) if os.path.exists(path) else 0


def _remove(path: str):
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)


def _open_url(name: str, weights: Weights, url: str, path: str, start: int):
  """The response to a GET of `url` (from byte `start` when > 0); DeepFashionError, saying
  what to do offline, when the server cannot be reached or refuses."""
  request = urllib.request.Request(url, headers={'User-Agent': 'deepfashion-jax'})
  if start:
    request.add_header('Range', f'bytes={start}-')
  try:
    return urllib.request.urlopen(request, timeout=_TIMEOUT_S)
  except urllib.error.HTTPError as e:
    if e.code == 416 and start:  # the partial file is not a prefix of this one: restart
      raise _Interrupted(f'the server cannot resume at byte {start:,} (HTTP 416)') from e
    raise errors.DeepFashionError(f'{name}: {url} answered HTTP {e.code} ({e.reason}). '
                                  f'{_by_hand(name, weights, path)}') from e
  except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
    reason = getattr(e, 'reason', None) or e
    raise errors.DeepFashionError(f'{name}: cannot download {url} ({reason}). '
                                  f'{_by_hand(name, weights, path)}') from e


def _content_range(header) -> tuple:
  """(first byte, total size or None) of a 206's Content-Range 'bytes a-b/total'."""
  match = re.fullmatch(r'\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*', header or '')
  if not match:
    return None, None
  return int(match.group(1)), (None if match.group(2) == '*' else int(match.group(2)))


def _fetch_into(partial: str, name: str, weights: Weights, url: str, path: str):
  """One GET of `url` into `partial`: appended when the server resumes at its end (206),
  rewritten otherwise. Raises _Interrupted when fewer bytes than announced came, and
  DeepFashionError (the partial file removed) when more came."""
  start = _size(partial)
  try:
    response = _open_url(name, weights, url, path, start)
  except _Interrupted:  # the server cannot resume there: the next try starts from 0
    _remove(partial)
    raise
  with response:
    first, total = _content_range(response.headers.get('Content-Range'))
    if response.status == 206 and first == start:
      mode = 'ab'
    elif response.status == 206:  # resumed elsewhere than asked: start again from 0
      _remove(partial)
      raise _Interrupted(f'asked for byte {start:,} on, the server sent from {first}')
    else:
      start, mode = 0, 'wb'
      length = response.headers.get('Content-Length')
      total = int(length) if length and length.isdigit() else None
    progress = _Progress(name, url, path, start, total)
    with open(partial, mode) as f:
      try:
        while chunk := response.read(_CHUNK):
          f.write(chunk)
          progress.update(len(chunk))
      except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
        raise _Interrupted(f'{type(e).__name__}: {e}') from e
      finally:
        progress.end()
  received = _size(partial)
  if total is not None and received < total:
    raise _Interrupted(f'{received:,} of {total:,} bytes')
  if total is not None and received > total:
    _remove(partial)
    raise errors.DeepFashionError(f'{name}: {url} sent {received:,} bytes, but announced '
                                  f'{total:,}: removed, not used')


def _check_hash(partial: str, name: str, weights: Weights, url: str):
  """The complete download against the published hash; removed when it differs."""
  if weights.sha256 is None:
    return
  digest = _sha256(partial)
  if not digest.startswith(weights.sha256):
    _remove(partial)
    raise errors.DeepFashionError(
        f'{name}: the file downloaded from {url} has SHA-256 {digest}, but the published one '
        f'starts with {weights.sha256}: removed, not used. A mirror ({MIRROR_VARIABLE}) must '
        'serve the published file; a network that rewrites downloads gives this too')


class _Progress:
  """Start and end lines in the log; on a terminal, a progress line on stderr (bytes, %,
  MB/s) rewritten at most twice a second."""

  def __init__(self, name: str, url: str, path: str, start: int, total):
    self.name, self.start, self.total, self.received = name, start, total, start
    self.began = self.shown = time.monotonic()
    self.on_terminal = sys.stderr.isatty()
    size = f'{total / 1e6:.1f} MB' if total is not None else 'size unknown'
    logging.info('Downloading %s from %s into %s (%s%s)', name, url, path, size,
                 f', resuming at {start / 1e6:.1f} MB' if start else '')

  def _rate(self) -> float:
    return (self.received - self.start) / 1e6 / max(time.monotonic() - self.began, 1e-9)

  def update(self, count: int):
    self.received += count
    now = time.monotonic()
    if self.on_terminal and now - self.shown >= _PROGRESS_EVERY_S:
      self.shown = now
      share = f' ({100 * self.received / self.total:.0f}%)' if self.total else ''
      of = f' / {self.total / 1e6:.1f}' if self.total else ''
      sys.stderr.write(f'\r{self.name}: {self.received / 1e6:.1f}{of} MB{share} '
                       f'{self._rate():.1f} MB/s ')
      sys.stderr.flush()

  def end(self):
    if self.on_terminal:
      sys.stderr.write('\n')
    logging.info('%s: received %.1f MB in %.1f s (%.1f MB/s)', self.name,
                 (self.received - self.start) / 1e6, time.monotonic() - self.began,
                 self._rate())
