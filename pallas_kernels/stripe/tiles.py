"""Kernel tile sizes of the stripe kernels (separate from the lists' block size).

A list covers a query block of `block_q` queries (the unit of sparsity); a
kernel tile covers `Tiles.block_q` queries of every query head that shares
the list (the unit of work: its rows are heads x queries), and walks the
list `Tiles.block_k` gathered keys at a time.
"""

from __future__ import annotations

import dataclasses

# Default (query rows per tile, gathered keys per step) by backend. Rows are the
# query heads sharing a list times the tile's queries.
_DEFAULT_ROWS = {'xla': None, 'triton': 64, 'mosaic_tpu': 256}
_DEFAULT_KEYS = {'xla': 128, 'triton': 64, 'mosaic_tpu': 128}


def _is_pow2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes and launch parameters; None means "derive a default".

  Attributes:
    block_q: queries per kernel tile (per query head); must divide the lists'
      block_q. Default: the whole list block (xla), else the largest divisor
      keeping heads x queries near 64 rows (triton) or 256 rows (mosaic_tpu).
    block_k: gathered keys per step (triton: a power of two >= 16).
    num_warps: Triton warps (default 4 for head dim <= 64, else 8).
    num_stages: Triton pipelining stages.
  """

  block_q: int | None = None
  block_k: int | None = None
  num_warps: int | None = None
  num_stages: int = 2

  def __post_init__(self):
    for f in ('block_q', 'block_k', 'num_warps'):
      v = getattr(self, f)
      if v is not None and (not isinstance(v, int) or v <= 0):
        raise ValueError(f'Tiles.{f} must be a positive int or None, got {v!r}.')
    if self.num_stages < 1:
      raise ValueError('Tiles.num_stages must be >= 1.')

  def resolve(self, *, list_block_q: int, heads_per_list: int, capacity: int, head_dim: int,
              backend: str) -> 'Tiles':
    """Fills the defaults for these lists and checks them."""
    tq = self.block_q
    if tq is None:
      target = _DEFAULT_ROWS.get(backend)
      tq = list_block_q
      if target is not None:
        fits = [x for x in range(1, list_block_q + 1)
                if list_block_q % x == 0 and x * heads_per_list <= target]
        tq = max(fits) if fits else 1
    if list_block_q % tq:
      raise ValueError(f'Tiles.block_q={tq} must divide the lists\' block_q={list_block_q}.')
    tk = self.block_k
    if tk is None:
      floor = 16 if backend == 'triton' else 8
      tk = min(_DEFAULT_KEYS.get(backend, 128), max(floor, _next_pow2(capacity)))
    if backend == 'triton' and (not _is_pow2(tk) or tk < 16):
      raise ValueError(f'Tiles.block_k={tk} must be a power of two >= 16 for '
                       "implementation='triton'.")
    if backend == 'mosaic_tpu' and tk % 8:
      raise ValueError(f'Tiles.block_k={tk} must be a multiple of 8 for '
                       "implementation='mosaic_tpu' (128 or more is fastest).")
    return dataclasses.replace(self, block_q=tq, block_k=tk,
                               num_warps=self.num_warps or (4 if head_dim <= 64 else 8))
