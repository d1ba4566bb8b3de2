"""Kernel tile sizes (separate from the mask's block sizes).

A mask block (block_q x block_k) is the unit of sparsity; a kernel tile is the
unit of work. Kernel tiles must divide the mask blocks: a query tile lies in
one mask row, and a mask block's keys are walked in key sub-tiles.
"""

from __future__ import annotations

import dataclasses


# Largest default tiles (block_q, block_k, block_q_bwd, block_k_bwd) per backend.
_DEFAULT_CAPS = {
    'xla': (128, 64, 64, 64),
    'reference': (128, 64, 64, 64),
    'triton': (128, 64, 64, 64),
    'mosaic_tpu': (512, 512, 512, 512),
}


def _is_pow2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes and launch parameters. None means "derive from the mask".

  Attributes:
    block_q: forward query tile (Pallas kernels); divides mask.block_q.
    block_k: forward key sub-tile; divides mask.block_k.
    block_q_bwd: backward query tile (dq kernel and dk/dv inner loop).
    block_k_bwd: backward key tile (dk/dv kernel and dq inner loop).
    num_warps: Triton warps (default 4 for head dim <= 64, else 8).
    num_stages: Triton pipelining stages.
    xla_tiles_per_step: xla backend: tiles processed per scan step across all
      (batch, head) programs; bounds its working memory (each tile holds
      block_q x block_k float32 scores).
  """

  block_q: int | None = None
  block_k: int | None = None
  block_q_bwd: int | None = None
  block_k_bwd: int | None = None
  num_warps: int | None = None
  num_stages: int = 2
  xla_tiles_per_step: int = 64

  def __post_init__(self):
    for f in ('block_q', 'block_k', 'block_q_bwd', 'block_k_bwd', 'num_warps'):
      v = getattr(self, f)
      if v is not None and (not isinstance(v, int) or v <= 0):
        raise ValueError(f'Tiles.{f} must be a positive int or None, got {v!r}.')
    if self.num_stages < 1 or self.xla_tiles_per_step < 1:
      raise ValueError('Tiles.num_stages and Tiles.xla_tiles_per_step must be >= 1.')

  def resolve(self, block_q: int, block_k: int, head_dim: int,
              backend: str = 'xla') -> 'Tiles':
    """Fills defaults for a mask with these block sizes and checks divisibility.

    Args:
      block_q, block_k: the mask's block sizes.
      head_dim: head dimension (picks num_warps).
      backend: the implementation the tiles are for. Triton needs power-of-two tiles
        and keeps register tiles small; Mosaic TPU wants whole 128-lane score tiles,
        so its default tiles are the mask blocks themselves (capped at 512).
    """
    power_of_two = backend == 'triton'
    caps = _DEFAULT_CAPS.get(backend, _DEFAULT_CAPS['xla'])
    def pick(value, mask_block, cap, name):
      v = value
      if v is None:  # largest power of two <= cap that divides the mask block
        v = cap
        while v > 1 and mask_block % v:
          v //= 2
      if mask_block % v:
        raise ValueError(f'Tiles.{name}={v} must divide the mask block size {mask_block}.')
      if power_of_two and not _is_pow2(v):
        raise ValueError(f'Tiles.{name}={v} must be a power of two for this backend '
                         f'(mask block {mask_block}); pick a power-of-two mask block size.')
      return v
    return dataclasses.replace(
        self,
        block_q=pick(self.block_q, block_q, caps[0], 'block_q'),
        block_k=pick(self.block_k, block_k, caps[1], 'block_k'),
        block_q_bwd=pick(self.block_q_bwd, block_q, caps[2], 'block_q_bwd'),
        block_k_bwd=pick(self.block_k_bwd, block_k, caps[3], 'block_k_bwd'),
        num_warps=self.num_warps or (4 if head_dim <= 64 else 8))
