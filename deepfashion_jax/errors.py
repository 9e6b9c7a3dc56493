"""The project's own error type: what a user gave (a configuration, a data folder, a file, a
workdir) is wrong, and the message says which and what was expected.

main.py prints such an error as one message and exits with status 2 (the traceback only with
--verbose); anything else is a bug and keeps its traceback. Each module's error subclasses
this one (and ValueError, as they did before there was a common type)."""


class DeepFashionError(Exception):
  """The input or the configuration is wrong; the message names the file, line or field."""


class ConfigError(DeepFashionError, ValueError):
  """A configuration value that is out of range, of the wrong kind, or unknown."""
