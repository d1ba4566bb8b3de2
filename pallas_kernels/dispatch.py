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


FLOAT_DTYPES = ('float32', 'bfloat16', 'float16')


def check_qkv(q, k, v) -> None:
  """The layout of jax.nn.dot_product_attention: q [b, t, n, d], k / v [b, s, k, d] of one
  float dtype, n a multiple of k (GQA); one-line ValueErrors otherwise."""
  for name, x in (('q', q), ('k', k), ('v', v)):
    if getattr(x, 'ndim', None) != 4:
      raise ValueError(f'{name} must be rank 4 [batch, length, heads, head_dim], got shape '
                       f'{getattr(x, "shape", None)}.')
    if x.dtype.name not in FLOAT_DTYPES:
      raise ValueError(f'{name} must be float32, bfloat16 or float16, got {x.dtype}.')
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f'q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}.')
  if k.shape != v.shape:
    raise ValueError(f'k and v must have the same shape, got {k.shape} and {v.shape}.')
  b, _, n, d = q.shape
  if k.shape[0] != b:
    raise ValueError(f'k has batch {k.shape[0]} but q has batch {b}.')
  if k.shape[3] != d:
    raise ValueError(f'k has head_dim {k.shape[3]} but q has head_dim {d}.')
  if n % k.shape[2]:
    raise ValueError(f'q heads ({n}) must be a multiple of k/v heads ({k.shape[2]}) (GQA).')


def resolve_mesh(mesh, batch_axes, head_axis):
  """(mesh, batch axes, head axis) a kernel call shards over with shard_map, or None: the
  given mesh, else the context mesh (``jax.set_mesh``), keeping the axes it has."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
      return None
  names = set(mesh.axis_names)
  batch = tuple(a for a in (batch_axes or ()) if a in names)
  head = head_axis if head_axis in names else None
  if not batch and head is None:
    return None
  return mesh, batch, head
