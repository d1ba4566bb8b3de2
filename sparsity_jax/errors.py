"""Errors that are the user's to fix, not bugs.

A launcher (``sparsity_jax.cli.run``) prints a UserError as one line and exits with
status 2; any other exception keeps its traceback (it is a bug to report).
"""


class UserError(ValueError):
  """A mistake in what was asked for: flags, config values, a workdir, a file."""


class WorkdirError(UserError, FileNotFoundError):
  """A workdir (or checkpoint) that does not hold what the command needs."""
