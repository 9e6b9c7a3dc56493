"""The one error the PyTorch readers and loaders raise, in a module of its own so that the
torch.save reader needs nothing else from the project (the common error type aside)."""

from deepfashion_jax import errors


class CheckpointError(errors.DeepFashionError, ValueError):
  """A file is not a usable PyTorch checkpoint for the configured model."""
