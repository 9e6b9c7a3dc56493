"""The Vision Transformer, one module for ViT (torchvision's and timm's), CLIP's image tower and
SigLIP's, in Flax NNX (NHWC), configured by an `Architecture`.

The image is cut into patch_size x patch_size patches (`patch_embed`, a convolution), a class
token is put first (`class_token`; SigLIP has none), the position embedding added
(`position_embedding`, one row per token, the class token's first), LayerNorm'd where CLIP
does (`ln_pre`), and run through `depth` pre-norm blocks:
  x = x + drop_path(attention(ln1(x)));  x = x + drop_path(mlp(ln2(x)))
with attention's query, key, value and out projections apart (torch packs the first three),
and the MLP fc1, activation, fc2. The final LayerNorm (`norm`) applies to every token
(torchvision, timm, open_clip, SigLIP: final_norm='tokens') or to the pooled feature only
(Hugging Face CLIP's post_layernorm: 'pooled'; open_clip's final_ln_after_pool). The pooled
feature is the class token ('token'), the patch tokens' mean ('mean'), or SigLIP's
attention-pooling head ('map', `map_head`: a learnt probe attends over the tokens, then
probe + mlp(norm(probe))); CLIP's `projection` (no bias) maps it to the joint space.

Outputs (`__call__`): 'tokens', the patch tokens after the final norm (where it applies to
all) as a (B, H/p, W/p, width) map, FashionNet's last map (stride p); 'global', the pooled
feature (config.model.global_pool picks the pool; 'default' is the architecture's), then
the projection; and 'landmark_tokens', the output of block `landmark_block` (0: the middle
one, depth // 2) as a map with each token repeated 2 x 2, at stride p / 2 = 8, which the
landmark branch (`landmarks.py`, built for stride-8 maps) reads. With at_landmark_map=f the
later blocks read the 2 x 2 means of f(that map) as the patch tokens (the class token
unchanged): the landmark attention's re-weighting, at the tokens.

The module is built for one input side (`image_size`, the run's crop side): the position
embedding holds one row per patch of that grid. Weights made at another grid are resampled
when loaded (`resample_position_embedding`, timm's bicubic resampling, in NumPy).

Precision: parameters float32, activations in `dtype`; the LayerNorms and the attention's
softmax run in float32 (as big_vision does), so bfloat16 activations keep their statistics.

Stochastic depth (drop path, timm's linear rule: block k of n drops its residual branches
with rate drop_path * k / (n - 1), the last at drop_path): each residual branch is an
nnx.Dropout broadcast over tokens and channels (one draw per example, kept ones scaled by
1 / (1 - rate)), switched by the model's train() / eval() like FashionNet's dropout, and
drawn from the key FashionNet passes down (`dropout_rng`, folded in per block and branch).
"""

import dataclasses
import typing
from typing import Any, Literal

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from deepfashion_jax import errors
from deepfashion_jax.models import layer_norm as layer_norm_lib

Activation = Literal['gelu', 'quick_gelu', 'gelu_tanh']
Pool = Literal['token', 'mean', 'map']
GlobalPool = Literal['default', 'token', 'mean', 'map']  # config.model.global_pool's choices
GLOBAL_POOLS = typing.get_args(GlobalPool)
LANDMARK_UPSAMPLING = 2  # tokens at stride 16 -> the landmark branch's stride-8 map


@dataclasses.dataclass(frozen=True)
class Architecture:
  patch_size: int
  width: int
  depth: int
  heads: int
  mlp_dim: int
  image_size: int  # the side the published weights were made at (their position grid's)
  patch_bias: bool = True  # CLIP's patch convolution has no bias
  class_token: bool = True  # SigLIP has none
  ln_pre: bool = False  # CLIP's LayerNorm before the blocks
  activation: Activation = 'gelu'  # exact GELU; CLIP's x * sigmoid(1.702 x); SigLIP's tanh GELU
  norm_eps: float = 1e-6  # torchvision, timm, SigLIP; CLIP 1e-5
  pool: Pool = 'token'  # the architecture's own pool ('map': SigLIP's attention pooling)
  projection: int = 0  # CLIP's projection's output size (0: none)
  final_norm: Literal['tokens', 'pooled'] = 'tokens'  # what the final LayerNorm applies to

  @property
  def title(self) -> str:
    return f'{self.width} wide, {self.depth} deep, patch {self.patch_size}'


# Keyed by their names in backbones.BACKBONES. The *_test ones are shrunk, for tests and CPU
# demos: no weights are published for them.
_CLIP = dict(patch_bias=False, ln_pre=True, activation='quick_gelu', norm_eps=1e-5)
_SIGLIP = dict(class_token=False, activation='gelu_tanh', norm_eps=1e-6, pool='map')
_SHRUNK = dict(patch_size=16, width=32, depth=2, heads=2, mlp_dim=64, image_size=32)
ARCHITECTURES = {
    'vit_s16': Architecture(16, 384, 12, 6, 1536, 224),
    'vit_b16': Architecture(16, 768, 12, 12, 3072, 224),
    'clip_vit_b16': Architecture(16, 768, 12, 12, 3072, 224, projection=512, **_CLIP),
    'siglip_b16': Architecture(16, 768, 12, 12, 3072, 224, **_SIGLIP),
    'vit_test': Architecture(**_SHRUNK),
    'clip_vit_test': Architecture(**_SHRUNK, projection=24, **_CLIP),
    'siglip_test': Architecture(**_SHRUNK, **_SIGLIP),
}


def effective_pool(architecture: Architecture, global_pool: str) -> str:
  """The pool config.model.global_pool picks: 'default' is the architecture's own."""
  return architecture.pool if global_pool == 'default' else global_pool


def check_options(architecture: Architecture, side=None, global_pool: str = 'default',
                  landmark_block: int = 0, title: str = 'this ViT'):
  """Raises ConfigError naming the field when config.model.global_pool,
  config.model.landmark_block or the input side (config.data.crop_size, when given) do not
  fit `architecture`."""
  if global_pool not in GLOBAL_POOLS:
    raise errors.ConfigError(f'config.model.global_pool={global_pool!r}: expected one of '
                             f'{GLOBAL_POOLS}')
  pool = effective_pool(architecture, global_pool)
  if pool == 'token' and not architecture.class_token:
    raise errors.ConfigError(f'config.model.global_pool={global_pool!r}: {title} has no class '
                             "token; expected 'default', 'mean' or 'map'")
  if pool == 'map' and architecture.pool != 'map':
    raise errors.ConfigError(f'config.model.global_pool={global_pool!r}: {title} has no '
                             "attention-pooling head; expected 'default', 'token' or 'mean'")
  if (isinstance(landmark_block, bool) or not isinstance(landmark_block, int)
      or not 0 <= landmark_block <= architecture.depth):
    raise errors.ConfigError(
        f'config.model.landmark_block={landmark_block!r}: expected 0 (the middle block) or a '
        f'block number in [1, {architecture.depth}] ({title} has {architecture.depth})')
  if side is not None and side % architecture.patch_size:
    raise errors.ConfigError(
        f'config.data.crop_size={side}: {title} cuts the input into {architecture.patch_size}'
        f' x {architecture.patch_size} patches; expected a multiple of '
        f'{architecture.patch_size}')


def layer_norm(width: int, architecture: Architecture,
               rngs: nnx.Rngs) -> layer_norm_lib.LayerNorm:
  return layer_norm_lib.LayerNorm(width, epsilon=architecture.norm_eps, rngs=rngs)


def _linear(n_in: int, n_out: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(n_in, n_out, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=nnx.initializers.xavier_uniform(),
                    bias_init=nnx.initializers.zeros_init(), rngs=rngs)


def activate(x, activation: str):
  if activation == 'gelu':
    return jax.nn.gelu(x, approximate=False)
  if activation == 'gelu_tanh':
    return jax.nn.gelu(x, approximate=True)
  return x * jax.nn.sigmoid(1.702 * x)  # 'quick_gelu'


class Attention(nnx.Module):
  """Multi-head attention of queries from `x` over keys and values from `context` (x's own
  tokens by default); the softmax in float32."""

  def __init__(self, width: int, heads: int, *, dtype: Any, rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f'width {width} is not a multiple of heads {heads}')
    self.heads = heads
    self.query, self.key, self.value, self.out = (_linear(width, width, dtype, rngs)
                                                  for _ in range(4))

  def __call__(self, x, context=None):
    context = x if context is None else context
    split = lambda y: y.reshape(*y.shape[:2], self.heads, -1)
    q, k, v = split(self.query(x)), split(self.key(context)), split(self.value(context))
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    attended = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    return self.out(attended.reshape(*attended.shape[:2], -1))


class Mlp(nnx.Module):
  def __init__(self, width: int, hidden: int, activation: str, *, dtype: Any, rngs: nnx.Rngs):
    self.fc1 = _linear(width, hidden, dtype, rngs)
    self.fc2 = _linear(hidden, width, dtype, rngs)
    self.activation = activation

  def __call__(self, x):
    return self.fc2(activate(self.fc1(x), self.activation))


def _drop_path(rate: float) -> nnx.Dropout:
  """Stochastic depth on a residual branch (B, N, D): one draw per example."""
  return nnx.Dropout(rate, broadcast_dims=(1, 2))


class Block(nnx.Module):
  """A pre-norm transformer block."""

  def __init__(self, architecture: Architecture, drop_path: float, *, dtype: Any,
               rngs: nnx.Rngs):
    a = architecture
    self.ln1 = layer_norm(a.width, a, rngs)
    self.attention = Attention(a.width, a.heads, dtype=dtype, rngs=rngs)
    self.ln2 = layer_norm(a.width, a, rngs)
    self.mlp = Mlp(a.width, a.mlp_dim, a.activation, dtype=dtype, rngs=rngs)
    self.drop_path1, self.drop_path2 = _drop_path(drop_path), _drop_path(drop_path)

  def __call__(self, x, dropout_rng=None):
    keys = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    x = x + self.drop_path1(self.attention(self.ln1(x)), rngs=keys[0])
    return x + self.drop_path2(self.mlp(self.ln2(x)), rngs=keys[1])


class MapHead(nnx.Module):
  """SigLIP's attention-pooling head (big_vision's MAPHead): a learnt probe attends over the
  tokens; probe + mlp(norm(probe)) is the pooled feature."""

  def __init__(self, architecture: Architecture, *, dtype: Any, rngs: nnx.Rngs):
    a = architecture
    self.probe = nnx.Param(nnx.initializers.xavier_uniform()(rngs.params(), (1, 1, a.width)))
    self.attention = Attention(a.width, a.heads, dtype=dtype, rngs=rngs)
    self.norm = layer_norm(a.width, a, rngs)
    self.mlp = Mlp(a.width, a.mlp_dim, a.activation, dtype=dtype, rngs=rngs)

  def __call__(self, tokens):
    probe = jnp.broadcast_to(self.probe[...].astype(tokens.dtype),
                             (tokens.shape[0], 1, tokens.shape[-1]))
    pooled = self.attention(probe, tokens)
    return (pooled + self.mlp(self.norm(pooled)))[:, 0]


class VisionTransformer(nnx.Module):
  """The backbone (see the module's docstring); its attributes are those FashionNet reads
  (models/backbones.py)."""

  final_map = 'tokens'
  landmark_map = 'landmark_tokens'

  def __init__(self, architecture: Architecture, image_size: int | None = None, *,
               dtype: Any = jnp.float32, rngs: nnx.Rngs, drop_path: float = 0.0,
               global_pool: str = 'default', landmark_block: int = 0, title: str = 'this ViT'):
    """image_size: the input side it is built for (default: the architecture's)."""
    a = architecture
    side = a.image_size if image_size is None else image_size
    check_options(a, side, global_pool, landmark_block, title)
    self.architecture, self.dtype = a, dtype
    self.pool = effective_pool(a, global_pool)
    self.grid = side // a.patch_size
    self.landmark_block = landmark_block or a.depth // 2
    self.stride = a.patch_size
    self.out_features = self.landmark_features = a.width
    self.global_features = a.projection or a.width
    self.num_layers = a.depth + 1
    self.patch_embed = nnx.Conv(3, a.width, (a.patch_size, a.patch_size),
                                strides=a.patch_size, padding='VALID', use_bias=a.patch_bias,
                                dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    if a.class_token:
      self.class_token = nnx.Param(jnp.zeros((1, 1, a.width), jnp.float32))
    tokens = self.grid ** 2 + int(a.class_token)
    self.position_embedding = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (1, tokens, a.width), jnp.float32))
    if a.ln_pre:
      self.ln_pre = layer_norm(a.width, a, rngs)
    rates = np.linspace(0.0, drop_path, a.depth)  # timm's rule
    self.blocks = nnx.List([Block(a, float(r), dtype=dtype, rngs=rngs) for r in rates])
    self.norm = layer_norm(a.width, a, rngs)
    if a.pool == 'map':
      self.map_head = MapHead(a, dtype=dtype, rngs=rngs)
    if a.projection:
      self.projection = nnx.Param(nnx.initializers.lecun_normal()(
          rngs.params(), (a.width, a.projection), jnp.float32))

  def feature_size(self, side: int) -> int:
    """The token map's side for an input side."""
    return side // self.stride

  def layer_id(self, path: tuple) -> int:
    """A parameter's layer for layer-wise learning-rate decay: 0 the embeddings (patch,
    position, class token, ln_pre), k + 1 block k, num_layers the final norm and what
    follows it (the pooling head, the projection)."""
    if path[0] == 'blocks':
      return int(path[1]) + 1
    if path[0] in ('patch_embed', 'class_token', 'position_embedding', 'ln_pre'):
      return 0
    return self.num_layers

  def _embed(self, images):
    """Patch tokens (B, grid * grid, D), the class token first, position embedding added."""
    x = self.patch_embed(images.astype(self.dtype))
    batch, height, width, channels = x.shape
    if (height, width) != (self.grid, self.grid):
      raise ValueError(f'this ViT was built for {self.grid * self.stride} px inputs '
                       f'({self.grid} x {self.grid} patches), got {images.shape[1:3]}')
    x = x.reshape(batch, height * width, channels)
    if self.architecture.class_token:
      token = jnp.broadcast_to(self.class_token[...].astype(x.dtype), (batch, 1, channels))
      x = jnp.concatenate([token, x], axis=1)
    x = x + self.position_embedding[...].astype(x.dtype)
    return self.ln_pre(x) if self.architecture.ln_pre else x

  def _patch_map(self, x):
    """The patch tokens of (B, N, D) tokens as a (B, grid, grid, D) map."""
    prefix = int(self.architecture.class_token)
    return x[:, prefix:].reshape(x.shape[0], self.grid, self.grid, x.shape[-1])

  def _at_landmark_block(self, x, outputs: dict, at_landmark_map):
    """Offers the landmark branch the tokens as a stride-8 map (each repeated 2 x 2), and
    puts the 2 x 2 means of what at_landmark_map returns back as the patch tokens."""
    n = LANDMARK_UPSAMPLING
    upsampled = jnp.repeat(jnp.repeat(self._patch_map(x), n, axis=1), n, axis=2)
    outputs[self.landmark_map] = upsampled
    if at_landmark_map is None:
      return x
    reweighted = at_landmark_map(upsampled)
    if reweighted is upsampled:  # the branch alone (landmarks='heatmaps'): the tokens as they were
      return x
    batch, side, _, channels = reweighted.shape
    pooled = reweighted.reshape(batch, side // n, n, side // n, n, channels).mean(axis=(2, 4))
    patches = pooled.reshape(batch, -1, channels).astype(x.dtype)
    return jnp.concatenate([x[:, :x.shape[1] - patches.shape[1]], patches], axis=1)

  def _pooled(self, x):
    prefix = int(self.architecture.class_token)
    if self.pool == 'token':
      return x[:, 0]
    if self.pool == 'mean':
      return x[:, prefix:].mean(axis=1)
    return self.map_head(x)

  def __call__(self, images, at_landmark_map=None, dropout_rng=None) -> dict:
    """images (B, H, W, 3), H = W = the side it was built for; at_landmark_map: None or a
    function of the landmark map (see the module's docstring); dropout_rng: the key drop
    path draws from in training mode."""
    x = self._embed(images)
    outputs = {}
    for i, block in enumerate(self.blocks):
      x = block(x, None if dropout_rng is None else jax.random.fold_in(dropout_rng, i))
      if i + 1 == self.landmark_block:
        x = self._at_landmark_block(x, outputs, at_landmark_map)
    if self.architecture.final_norm == 'tokens':
      x = self.norm(x)
    outputs[self.final_map] = self._patch_map(x)
    pooled = self._pooled(x)
    if self.architecture.final_norm == 'pooled':
      pooled = self.norm(pooled)
    if self.architecture.projection:
      pooled = pooled @ self.projection[...].astype(pooled.dtype)
    outputs['global'] = pooled
    return outputs


def _cubic(x, a: float = -0.5):
  """The bicubic kernel with PIL's a = -0.5, which PyTorch's antialiased resize uses."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of F.interpolate(mode='bicubic', align_corners=False,
  antialias=True) along one axis: PIL's resampling, the kernel widened by the shrink factor
  when shrinking, each row's weights over the input's pixels normalised to sum to 1 (no
  padding at the edges)."""
  scale = in_size / out_size
  support = 2.0 * max(scale, 1.0)
  inverse = 1.0 / scale if scale >= 1.0 else 1.0
  matrix = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = scale * (i + 0.5)
    low = max(int(center - support + 0.5), 0)
    high = min(int(center + support + 0.5), in_size)
    weights = _cubic((np.arange(low, high) - center + 0.5) * inverse)
    matrix[i, low:high] = weights / weights.sum()
  return matrix


def resample_position_embedding(array: np.ndarray, new_grid: int,
                                prefix_tokens: int = 1) -> np.ndarray:
  """A (1, prefix + g * g, D) position embedding for a g x g grid of patches resampled to
  new_grid x new_grid, the prefix (class token) rows kept: timm's resample_abs_pos_embed
  (bicubic, align_corners=False, antialias=True), in NumPy, float32 out."""
  array = np.asarray(array, np.float32)
  prefix, patches = array[:, :prefix_tokens], array[:, prefix_tokens:]
  grid = int(round(np.sqrt(patches.shape[1])))
  if grid * grid != patches.shape[1]:
    raise ValueError(f'{patches.shape[1]} position embeddings are no square grid')
  if grid == new_grid:
    return array
  matrix = _resize_matrix(grid, new_grid)
  square = patches[0].reshape(grid, grid, -1).astype(np.float64)
  resized = np.einsum('ij,jkd,lk->ild', matrix, square, matrix)
  resized = resized.reshape(1, new_grid * new_grid, -1).astype(np.float32)
  return np.concatenate([prefix, resized], axis=1)
