"""decode_attention(): checks, layout, padding, dispatch.

Einsum legend: b batch, t query tokens, n query heads, k kv heads, g query
heads per kv head (n = k * g), c cache slots, d head dim, r grouped rows
(r = g * t, padded).

Backend contract (module pallas_kernels.decode.<name>):
  * 'reference' / 'xla': forward(q, k, v, lengths, q_positions, kv_positions,
    window, sinks, scale, block_k, interpret) in the public layout.
  * 'triton' / 'mosaic_tpu': grouped rows [b, k, R, d] in and out (this module
    builds them); see the modules' docstrings.
The element rule is reference.allowed for every backend.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.dispatch import IMPLEMENTATIONS, check_at_least, resolve_implementation

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
UNBOUNDED = 2 ** 30


def _check(q, k, v, lengths, q_positions, kv_positions, window, sinks):
  for name, x in (('q', q), ('k', k), ('v', v)):
    if getattr(x, 'ndim', None) != 4:
      raise ValueError(f'{name} must be rank 4, got shape {getattr(x, "shape", None)}.')
    if x.dtype not in _FLOAT_DTYPES:
      raise ValueError(f'{name} must be float32, bfloat16 or float16, got {x.dtype}.')
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f'q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}.')
  if k.shape != v.shape:
    raise ValueError(f'k and v caches must have the same shape, got {k.shape}, {v.shape}.')
  b, t, n, d = q.shape
  kb, kh, c, kd = k.shape
  if kb != b or kd != d:
    raise ValueError(f'cache [b, k, c, d]={k.shape} does not match q [b, t, n, d]={q.shape}.')
  if n % kh:
    raise ValueError(f'q heads ({n}) must be a multiple of cache kv heads ({kh}) (GQA).')
  if tuple(lengths.shape) != (b, kh):
    raise ValueError(f'lengths must be [batch, kv_heads]=({b}, {kh}), got {lengths.shape}.')
  if (q_positions is None) != (kv_positions is None):
    raise ValueError('give q_positions and kv_positions together (or neither).')
  if q_positions is not None:
    if tuple(q_positions.shape) != (b, t):
      raise ValueError(f'q_positions must be [b, t]=({b}, {t}), got {q_positions.shape}.')
    if tuple(kv_positions.shape) != (b, kh, c):
      raise ValueError(f'kv_positions must be [b, k, c]=({b}, {kh}, {c}), '
                       f'got {kv_positions.shape}.')
  elif window is not None or sinks is not None:
    raise ValueError('window / sinks need q_positions and kv_positions.')


def _per_head(x, default, kh, name):
  x = jnp.full((kh,), default, jnp.int32) if x is None else jnp.asarray(x, jnp.int32)
  x = jnp.broadcast_to(x, (kh,)) if x.ndim == 0 else x
  if x.shape != (kh,):
    raise ValueError(f'{name} must be a scalar or [kv_heads]=({kh},), got {x.shape}.')
  return x


def decode_attention(q, k, v, lengths, *, q_positions=None, kv_positions=None, window=None,
                     sinks=None, scale: float | None = None,
                     implementation: str | None = None, interpret: Any = False,
                     block_k: int = 128):
  """Attention of a few new tokens over per-kv-head ragged KV caches (MoA decode).

  Args:
    q: [b, t, n, d] queries (after RoPE); t is 1 for one-token decode.
    k, v: [b, k, c, d] caches: per kv head c slots, e.g. a sink region then a
      ring buffer, padded to the largest head's capacity.
    lengths: int [b, k] valid slots per (batch, kv head): slots >= length are
      never read (ragged heads; 0 is an empty cache and gives zeros).
    q_positions: optional int [b, t] absolute positions of the queries;
    kv_positions: optional int [b, k, c] absolute positions of the cached keys.
      With them the token-exact rule kv <= q and (q - kv < window or kv < sinks)
      also applies (e.g. several new tokens against a ring buffer).
    window, sinks: optional int scalar or [k] (need positions; default
      unbounded / no sinks). window >= 1 (None, not -1, is unbounded), sinks >= 0.
    scale: logit scale, default 1/sqrt(d).
    implementation: None (platform default: xla on CPU, triton on GPU,
      mosaic_tpu on TPU), 'reference', 'xla', 'triton' or 'mosaic_tpu'. An
      explicit choice that cannot run raises; there is no silent fallback.
    interpret: run the Pallas kernels in interpret mode (True, or
      pltpu.InterpretParams() for mosaic_tpu).
    block_k: cache slots per kernel step (a power of two).

  Returns:
    [b, t, n, d] in q.dtype.
  """
  _check(q, k, v, lengths, q_positions, kv_positions, window, sinks)
  check_at_least(window, 1, 'window', 'window=None is unbounded (there is no -1 convention)')
  check_at_least(sinks, 0, 'sinks')
  check_at_least(lengths, 0, 'lengths')
  impl = resolve_implementation(implementation, interpret)
  if block_k <= 0 or block_k & (block_k - 1):
    raise ValueError(f'block_k must be a positive power of two, got {block_k}.')
  b, t, n, d = q.shape
  kh, c = k.shape[1], k.shape[2]
  g = n // kh
  scale = float(1.0 / math.sqrt(d) if scale is None else scale)
  lengths = jnp.minimum(jnp.asarray(lengths, jnp.int32), c)
  use_positions = q_positions is not None
  if use_positions:
    q_positions = jnp.asarray(q_positions, jnp.int32)
    kv_positions = jnp.asarray(kv_positions, jnp.int32)
  window = _per_head(window, UNBOUNDED, kh, 'window')
  sinks = _per_head(sinks, 0, kh, 'sinks')
  if impl == 'reference':
    from pallas_kernels.decode.reference import decode_attention_ref
    if not use_positions:
      window = sinks = None
    return decode_attention_ref(q, k, v, lengths, q_positions=q_positions,
                                kv_positions=kv_positions, window=window, sinks=sinks,
                                scale=scale)
  bk = min(block_k, max(8, pl.next_power_of_2(c)))
  cp = -(-c // bk) * bk
  if cp != c:  # Padded slots sit past every length: never read.
    k = jnp.pad(k, ((0, 0), (0, 0), (0, cp - c), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, cp - c), (0, 0)))
    if use_positions:
      kv_positions = jnp.pad(kv_positions, ((0, 0), (0, 0), (0, cp - c)))
  backend = importlib.import_module(f'pallas_kernels.decode.{impl}')
  if impl == 'xla':
    return backend.forward(q, k, v, lengths, q_positions if use_positions else None,
                           kv_positions, window, sinks, scale, bk)
  # Pallas kernels: one program per kv head; rows = the group's heads x tokens.
  r = g * t
  rows = backend.block_rows(r)[1] if impl == 'triton' else -(-r // 8) * 8
  q_bkrd = jnp.einsum('btkgd->bkgtd', q.reshape(b, t, kh, g, d)).reshape(b, kh, r, d)
  q_bkrd = jnp.pad(q_bkrd, ((0, 0), (0, 0), (0, rows - r), (0, 0)))
  qpos = jnp.zeros((b, t), jnp.int32) if q_positions is None else q_positions
  # Padding rows sit at position -1: they read no slot, so they never make a slot "read".
  qpos_br = jnp.pad(jnp.tile(qpos, (1, g)), ((0, 0), (0, rows - r)), constant_values=-1)
  kpos = jnp.zeros((b, kh, cp), jnp.int32) if kv_positions is None else kv_positions
  if impl == 'triton':
    meta = jnp.stack([lengths, jnp.broadcast_to(window, (b, kh)),
                      jnp.broadcast_to(sinks, (b, kh)), jnp.zeros((b, kh), jnp.int32)], -1)
    o = backend.forward(q_bkrd, k, v, meta, qpos_br, kpos, scale, bk, use_positions,
                        interpret=interpret)
  else:
    o = backend.forward(q_bkrd, k, v, lengths, window, sinks, qpos_br, kpos, scale, bk,
                        use_positions, interpret=interpret)
  o = o[:, :, :r].reshape(b, kh, g, t, d)
  return jnp.einsum('bkgtd->btkgd', o).reshape(b, t, n, d)


def cache_bytes(capacities, *, batch: int, head_dim: int, dtype) -> int:
  """Bytes of K and V for per-head capacities (any nesting of ints), unpadded."""
  return int(2 * batch * head_dim * np.dtype(dtype).itemsize * int(np.sum(capacities)))
