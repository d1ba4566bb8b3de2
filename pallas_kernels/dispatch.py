"""Backend choice shared by every kernel family: one rule, no silent fallback.

``implementation=None`` picks the platform's kernel (xla on CPU, triton on GPUs,
mosaic_tpu on TPUs); an explicit choice that cannot run here raises.
"""

from __future__ import annotations

from typing import Any

import jax

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
