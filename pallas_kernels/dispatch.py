"""Backend choice shared by every kernel family: one rule, no silent fallback.

``implementation=None`` picks the platform's kernel (xla on CPU, triton on GPUs,
mosaic_tpu on TPUs); an explicit choice that cannot run here raises. Also the
argument checks the families' public entry points share.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

IMPLEMENTATIONS = ('reference', 'xla', 'triton', 'mosaic_tpu')
PLATFORM_DEFAULT = {'cpu': 'xla', 'gpu': 'triton', 'cuda': 'triton', 'rocm': 'triton',
                    'tpu': 'mosaic_tpu'}
NEEDS_PLATFORM = {'triton': ('gpu', 'cuda', 'rocm'), 'mosaic_tpu': ('tpu',)}


def resolve_implementation(implementation: str | None, interpret: Any = False) -> str:
  """The backend to run; raises if an explicit choice cannot run here."""
  platform = jax.default_backend()
  if implementation is None:
    return PLATFORM_DEFAULT.get(platform, 'xla')
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation must be None or one of {IMPLEMENTATIONS}, '
                     f'got {implementation!r}.')
  needs = NEEDS_PLATFORM.get(implementation)
  if needs and platform not in needs and not interpret:
    raise ValueError(
        f"implementation='{implementation}' needs a {needs[0].upper()} but the default "
        f"backend is '{platform}'; pass interpret=True to run the kernel in Pallas "
        'interpret mode, or implementation=None for the platform default.')
  return implementation


def check_at_least(x, minimum: int, name: str, hint: str = '') -> None:
  """Raises ValueError if a concrete int (scalar or array) holds a value below ``minimum``.

  Values traced inside jit cannot be checked here and pass; every public entry point
  checks what it can see, so nonsense never turns into a silently empty mask.
  """
  if x is None or isinstance(x, jax.core.Tracer):
    return
  values = np.asarray(x)
  if values.size and values.min() < minimum:
    raise ValueError(f'{name} must be >= {minimum}, got {x if values.size < 16 else values.min()}'
                     f'{"; " + hint if hint else ""}.')
