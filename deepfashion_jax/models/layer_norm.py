"""The LayerNorm of the transformer-era backbones (ConvNeXt, the ViTs), in one place."""

from flax import nnx
import jax.numpy as jnp


class LayerNorm(nnx.LayerNorm):
  """nn.LayerNorm over the last axis: computed in float32 whatever the activations' dtype
  (as big_vision does, so that bfloat16 runs keep the statistics exact enough), with the
  exact two-pass variance (PyTorch's, for parity with its weights), returned in the input's
  dtype. Parameters float32."""

  def __init__(self, features: int, *, epsilon: float, rngs: nnx.Rngs):
    super().__init__(features, epsilon=epsilon, dtype=jnp.float32, param_dtype=jnp.float32,
                     use_fast_variance=False, rngs=rngs)

  def __call__(self, x, *, mask=None):
    return super().__call__(x.astype(jnp.float32), mask=mask).astype(x.dtype)
