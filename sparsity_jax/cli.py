"""What every launcher shares: a user's mistake is one line, a bug keeps its traceback.

    from sparsity_jax import cli
    ...
    if __name__ == "__main__":
      cli.run(main)

``cli.run`` is ``absl.app.run`` that reports a UserError (sparsity_jax.errors) raised by
``main``, a flag the command line gets wrong, a config override naming a field the
config lacks, and a ``--config`` file that does not exist as ``error: <message>`` on one
line (exit status 2). Ctrl-C (a KeyboardInterrupt that reaches it) prints
``interrupted; rerun the same command to resume`` instead of a traceback (exit status
130, as a shell reports SIGINT). Set SPARSITY_JAX_TRACEBACK=1 to see their tracebacks too.

Code that handles SIGINT itself (the training loop checkpoints, then raises
``loop.Preempted``) installs its own handler, so no KeyboardInterrupt reaches ``run``
from there.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from sparsity_jax.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C.


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def _without_traceback(text: str) -> str:
  """ml_collections puts a config file's whole traceback in the flag error: keep the text
  before it and the exception line it ends with (e.g. a get_config that rejects its arg)."""
  head, sep, trace = text.partition("Traceback (most recent call last):")
  if not sep:
    return text
  last = [line for line in trace.strip().splitlines() if line.strip()][-1:]
  return f"{head.strip()} {' '.join(last)}"


def _innermost_text(error: BaseException) -> str:
  """The message of a wrapped exception, unescaped (ml_collections wraps a KeyError whose
  message holds the "Did you mean" hint in an AttributeError, whose str() escapes it)."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return error.args[0] if error.args and isinstance(error.args[0], str) else str(error)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise UserError(f"{_one_line(_without_traceback(str(e)))} (see --helpshort)") from e
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections applies --config.a.b=... overrides while parsing the flags.
    raise UserError(f"bad config override: {_one_line(_innermost_text(e))}") from e


def config(holder):
  """The value of a config_flags flag; a --config file that does not exist is a UserError
  (a file that fails to load keeps its traceback: the bug is in that file)."""
  try:
    value = holder.value
    if value is not None:
      value.keys  # config_flags returns a placeholder that raises its load error on use.
    return value
  except OSError as e:
    path = str(getattr(flags.FLAGS[holder.name], "config_filename", "")).split(":")[0]
    if path and not os.path.exists(path):
      raise UserError(f"--{holder.name}={path}: no such file") from e
    raise


def run(main) -> None:
  """absl.app.run(main) with user errors and Ctrl-C reported in one line (see the module
  docstring)."""
  try:
    app.run(main, flags_parser=_parse_flags)
  except UserError as e:
    if os.environ.get("SPARSITY_JAX_TRACEBACK"):
      raise
    print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
  except KeyboardInterrupt:
    if os.environ.get("SPARSITY_JAX_TRACEBACK"):
      raise
    # Finished work is on disk (checkpoints, stage markers): the traceback tells nothing.
    print("interrupted; rerun the same command to resume", file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)
