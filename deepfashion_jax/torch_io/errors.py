"""The one error the PyTorch readers and loaders raise, in a module of its own so that the
torch.save reader needs nothing else from the project."""


class CheckpointError(ValueError):
  """A file is not a usable PyTorch checkpoint for the configured model."""
