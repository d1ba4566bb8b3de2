"""attention(): checks, list normalization, row layout, sharding, dispatch, custom_vjp.

Einsum legend: b batch, t query position, s key position, n query heads,
k kv heads, g query heads per kv head (n = k * g), d head dim; kernel
layout: h list head, i query tile, r row of a tile (the query heads sharing
a list x the tile's queries).

Backend contract (module pallas_kernels.stripe.<name>, name in xla, triton,
mosaic_tpu):

    forward(q, k, v, idx, tcount, qpos, cfg, interpret) -> (out, lse)

  * q [b, h, i, r, d]: rows of every (batch, list head, query tile); row r
    is query head h * hp + r // tile_q, position i * tile_q + r % tile_q
    (hp query heads per list head); trailing pad rows are allowed.
  * k, v [b, k, s, d] head-major; list head h reads kv head h // cfg.kv_group.
  * idx int32 [b, h, nQ, W]: normalized lists (lists.py: sorted, distinct,
    padding repeats a valid id), W a multiple of cfg.block_k; tile i reads
    list i * tile_q // cfg.block_q.
  * tcount int32 [b, h, i]: entries tile i walks (a prefix of its list;
    causal already trimmed it to keys <= the tile's last query).
  * qpos int32 [i, r]: end-aligned position of each row (t + s - t_len);
    NO_POS for pad rows. With cfg.causal, key j is allowed iff j <= qpos.
  * Returns out [b, h, i, r, d] in q.dtype and lse [b, h, i, r] float32
    (natural log; rows with no allowed key: out 0, lse -inf).

    backward(q, k, v, idx, tcount, qpos, out, lse, dout, dlse, cfg, interpret)
        -> (dq [b, h, i, r, d], dk [b, k, s, d], dv [b, k, s, d])

  xla and triton implement it; mosaic_tpu uses the xla one (BACKWARD). lse
  comes with -inf replaced by 0; dlse (the cotangent of lse, or None) enters
  as delta - dlse; dk / dv sum every list head reading a kv head.

The 'reference' implementation is the dense oracle on the public layout,
differentiated by autodiff.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pallas_kernels.dispatch import (IMPLEMENTATIONS, check_qkv, resolve_implementation,
                                     resolve_mesh)
from pallas_kernels.stripe import lists, reference
from pallas_kernels.stripe.tiles import Tiles

DEFAULT_BATCH_AXES = ('data', 'fsdp')
DEFAULT_HEAD_AXIS = 'tensor'
NO_POS = -(2 ** 30)  # position of pad rows: before every key

_ROW_MULTIPLE = {'xla': 1, 'triton': None, 'mosaic_tpu': 8}  # None: power of two >= 16
# The backward pass of each implementation. TPUs have no atomics for the scatter of dk / dv
# into gathered rows, so mosaic_tpu uses the xla pass (gather + scatter-add) for now.
BACKWARD = {'xla': 'xla', 'triton': 'triton', 'mosaic_tpu': 'xla'}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static description of one call, handed to the backends (hashable)."""

  implementation: str
  scale: float
  causal: bool
  block_q: int  # the lists' query block
  tile_q: int  # queries per kernel tile
  block_k: int  # gathered keys per step
  kv_group: int  # list heads per kv head (1: lists per kv head; g: per query head)
  num_warps: int
  num_stages: int
  interpret: Any


def _backend(name: str):
  try:
    return importlib.import_module(f'pallas_kernels.stripe.{name}')
  except ImportError as e:
    raise NotImplementedError(
        f"implementation='{name}' is not available: pallas_kernels.stripe.{name} "
        f'could not be imported ({e}).') from e


def _fwd(q, k, v, idx, tcount, qpos, cfg: KernelConfig):
  out, lse = _backend(cfg.implementation).forward(q, k, v, idx, tcount, qpos, cfg,
                                                  cfg.interpret)
  res = (q, k, v, idx, tcount, qpos, out, jnp.where(jnp.isneginf(lse), 0.0, lse))
  return (out, lse), res


def _bwd(cfg: KernelConfig, res, cotangents):
  q, k, v, idx, tcount, qpos, out, lse = res
  dout, dlse = cotangents
  dq, dk, dv = _backend(BACKWARD[cfg.implementation]).backward(
      q, k, v, idx, tcount, qpos, out, lse, dout, dlse, cfg, cfg.interpret)
  return dq, dk, dv, None, None, None


def _primal(q, k, v, idx, tcount, qpos, cfg):
  return _fwd(q, k, v, idx, tcount, qpos, cfg)[0]


# One custom_vjp for every kernel backend: primal (out, lse); residuals as in _fwd.
_core = jax.custom_vjp(_primal, nondiff_argnums=(6,))
_core.defvjp(_fwd, _bwd)


def _check(q, k, v, indices, counts, block_q):
  check_qkv(q, k, v)
  b, t, n, d = q.shape
  kh = k.shape[2]
  if not isinstance(block_q, (int, np.integer)) or isinstance(block_q, bool) or block_q <= 0:
    raise ValueError(f'block_q must be a positive int, got {block_q!r}.')
  if getattr(indices, 'ndim', None) != 4:
    raise ValueError(f'indices must be int [batch|1, heads, query_blocks, capacity], got shape '
                     f'{getattr(indices, "shape", None)}.')
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f'indices must be an integer array, got {indices.dtype}.')
  if getattr(counts, 'shape', None) != indices.shape[:3]:
    raise ValueError(f'counts must have shape indices.shape[:3]={indices.shape[:3]}, got '
                     f'{getattr(counts, "shape", None)}.')
  if not jnp.issubdtype(counts.dtype, jnp.integer):
    raise ValueError(f'counts must be an integer array, got {counts.dtype}.')
  bl, hl, nq, cap = indices.shape
  if cap < 1:
    raise ValueError('indices must have a capacity (last dim) >= 1; use counts 0 for empty lists.')
  if bl not in (1, b):
    raise ValueError(f'indices has batch {bl}; expected 1 or {b}.')
  if hl not in (1, kh, n):
    raise ValueError(f'indices has {hl} heads; expected 1, the kv heads ({kh}) or the query '
                     f'heads ({n}).')
  if nq != lists.num_query_blocks(t, block_q):
    raise ValueError(f'indices has {nq} query blocks but ceil(q_len / block_q) = '
                     f'{lists.num_query_blocks(t, block_q)} (q_len {t}, block_q {block_q}).')


def _rows_size(impl: str, rows: int) -> int:
  mult = _ROW_MULTIPLE.get(impl, 1)
  if mult is None:
    return max(16, 1 << (rows - 1).bit_length())
  return -(-rows // mult) * mult


def _kernel_call(q, k, v, indices, counts, *, block_q, causal, scale, impl, interpret,
                 tiles: Tiles):
  """Kernel layout in, public layout out: (out [b, t, n, d], lse [b, n, t])."""
  b, t, n, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  if indices.shape[1] == n:  # one list per query head
    hl, hp = n, 1
  else:  # per kv head (a shared list is broadcast to the kv heads)
    hl, hp = kh, n // kh
  tl = tiles.resolve(list_block_q=block_q, heads_per_list=hp, capacity=indices.shape[-1],
                     head_dim=d, backend=impl)
  tq, tk = tl.block_q, tl.block_k
  nt = -(-t // tq)
  width = -(-indices.shape[-1] // tk) * tk
  idx, count = lists.normalize(indices, counts, kv_len=s, width=width)
  nq = idx.shape[2]
  idx = jnp.broadcast_to(idx, (b, hl, nq, width))
  count = jnp.broadcast_to(count, (b, hl, nq))
  tcount = lists.tile_counts(idx, count, q_len=t, kv_len=s, block_q=block_q, tile=tq,
                             num_tiles=nt, causal=causal)
  r = hp * tq
  rp = _rows_size(impl, r)
  row = np.arange(rp)
  qpos = np.where(row < r, np.arange(nt)[:, None] * tq + row % tq + (s - t), NO_POS)
  cfg = KernelConfig(impl, scale, causal, block_q, tq, tk, hl // kh, tl.num_warps,
                     tl.num_stages, interpret)

  def to_rows(x):  # [b, t, n, d] -> [b, h, i, r, d]
    x = jnp.pad(x, ((0, 0), (0, nt * tq - t), (0, 0), (0, 0)))
    x = x.reshape(b, nt, tq, hl, hp, d).transpose(0, 3, 1, 4, 2, 5).reshape(b, hl, nt, r, d)
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, rp - r), (0, 0)))

  heads = lambda x: jnp.swapaxes(x, 1, 2)
  out, lse = _core(to_rows(q), heads(k), heads(v), idx, tcount, jnp.asarray(qpos, jnp.int32),
                   cfg)
  out = out[:, :, :, :r].reshape(b, hl, nt, hp, tq, d).transpose(0, 2, 4, 1, 3, 5)
  out = out.reshape(b, nt * tq, n, d)[:, :t]
  lse = lse[:, :, :, :r].reshape(b, hl, nt, hp, tq).transpose(0, 1, 3, 2, 4)
  return out, lse.reshape(b, n, nt * tq)[:, :, :t]


def attention(q, k, v, indices, counts, *, block_q: int, causal: bool = False,
              scale: float | None = None, return_lse: bool = False,
              implementation: str | None = None, interpret: Any = False,
              tiles: Tiles | None = None, mesh=None,
              batch_axes: Sequence[str] | None = DEFAULT_BATCH_AXES,
              head_axis: str | None = DEFAULT_HEAD_AXIS):
  """Attention over gathered keys ("stripes"), layout of jax.nn.dot_product_attention.

  Args:
    q: [b, t, n, d] queries.
    k: [b, s, k, d] keys; n % k == 0 (GQA: query head h reads kv head h // (n // k)).
    v: [b, s, k, d] values.
    indices: int [b|1, H, ceil(t / block_q), C] key indices per (batch, list
      head, query block); H is 1 (shared), k (per kv head: one gather serves
      the GQA group) or n (per query head). Any order; duplicates and
      entries outside [0, s) count once / never. See lists.py.
    counts: int [b|1, H, ceil(t / block_q)] entries in use (the rest is padding).
    block_q: queries per list (static).
    causal: also require key j <= t' + s - t for query t' (end-aligned: the
      last query sees the last key, as in chunked prefill).
    scale: logit scale, default 1/sqrt(d).
    return_lse: also return the log-sum-exp (for merge_partials).
    implementation: None (platform default: xla on CPU, triton on GPU,
      mosaic_tpu on TPU), 'reference', 'xla', 'triton' or 'mosaic_tpu'. An
      explicit choice that cannot run raises; there is no silent fallback.
      Backward: xla and triton have their own; mosaic_tpu uses the xla pass.
    interpret: run the Pallas kernels in interpret mode (True, or
      pltpu.InterpretParams() for mosaic_tpu).
    tiles: kernel tile sizes (stripe.Tiles).
    mesh: Mesh / AbstractMesh to shard over; default the context mesh, if any.
      With a mesh the call runs under jax.shard_map: batch over `batch_axes`,
      heads over `head_axis` (axes missing from the mesh are ignored; lists
      with batch or heads 1 are replicated).
    batch_axes: mesh axes of the batch dimension.
    head_axis: mesh axis of the head dimension; the default ('tensor') is
      skipped when it does not divide n and k.

  Returns:
    out [b, t, n, d] in q.dtype (rows with no allowed key are zero); with
    return_lse, (out, lse) with lse [b, n, t] float32, natural log, -inf for
    rows with no allowed key. Gradients flow through both.
  """
  _check(q, k, v, indices, counts, block_q)
  impl = resolve_implementation(implementation, interpret)
  d = q.shape[-1]
  scale = float(1.0 / math.sqrt(d) if scale is None else scale)
  tiles = tiles or Tiles()
  if not isinstance(tiles, Tiles):
    raise ValueError(f'tiles must be a stripe.Tiles, got {type(tiles).__name__}.')

  def run(q, k, v, indices, counts):
    if impl == 'reference':
      out, lse = reference.attention_with_lse_ref(q, k, v, indices, counts, block_q=block_q,
                                                  causal=causal, scale=scale)
    else:
      out, lse = _kernel_call(q, k, v, indices, counts, block_q=block_q, causal=causal,
                              scale=scale, impl=impl, interpret=interpret, tiles=tiles)
    return (out, lse) if return_lse else out

  sharding = resolve_mesh(mesh, batch_axes, head_axis)
  if sharding is None:
    return run(q, k, v, indices, counts)
  mesh, batch, head = sharding
  batch_spec = batch or None
  n_batch = math.prod(mesh.shape[a] for a in batch)
  n_head = mesh.shape[head] if head else 1
  n, kh = q.shape[2], k.shape[2]
  if head == DEFAULT_HEAD_AXIS and (n % n_head or kh % n_head):
    head, n_head = None, 1
  if q.shape[0] % n_batch:
    raise ValueError(f'q batch {q.shape[0]} is not divisible by mesh axes {batch} '
                     f'(size {n_batch}); pass batch_axes=() or a matching mesh.')
  if n % n_head or kh % n_head:
    raise ValueError(f'q heads ({n}) and k/v heads ({kh}) must be divisible by mesh axis '
                     f'{head!r} (size {n_head}); pass head_axis=None.')
  x_spec = P(batch_spec, None, head, None)
  bl, hl = indices.shape[:2]
  list_spec = P(batch_spec if bl > 1 else None, head if hl > 1 else None, None)
  in_specs = (x_spec, x_spec, x_spec, P(*list_spec, None), list_spec)
  out_specs = (x_spec, P(batch_spec, head, None)) if return_lse else x_spec
  args = (q, k, v, indices, counts)
  if any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, 'axis_types', ())):
    def to_spec(x, spec):  # explicit-sharding meshes type-check shard_map inputs
      dst = jax.sharding.NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec
      return jax.sharding.reshard(x, dst)
    args = tuple(map(to_spec, args, in_specs))
  fn = jax.shard_map(run, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  return fn(*args)


def merge_partials(out_a, lse_a, out_b, lse_b):
  """Combines two attentions of the same queries over DISJOINT key sets.

  The result is the attention over the union (softmax renormalised by the
  log-sum-exps), e.g. a block-sparse part (initial + local blocks) and a
  stripe part (keys gathered elsewhere), as AnchorAttention does. A key in
  both parts would be counted twice: keep the sets disjoint.

  Args:
    out_a, out_b: [b, t, n, d] normalised outputs.
    lse_a, lse_b: [b, n, t] float32 log-sum-exps; -inf marks a part with no
      key for that row (its output is ignored).

  Returns:
    (out [b, t, n, d] in out_a.dtype, lse [b, n, t] float32); rows empty in
    both parts give out 0, lse -inf. Differentiable (no NaN for empty rows).
  """
  lse_a, lse_b = lse_a.astype(jnp.float32), lse_b.astype(jnp.float32)
  m = jax.lax.stop_gradient(jnp.maximum(lse_a, lse_b))  # lse is invariant to m
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w_a, w_b = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
  total = w_a + w_b
  safe = jnp.where(total > 0.0, total, 1.0)
  lse = jnp.where(total > 0.0, m + jnp.log(safe), -jnp.inf)
  frac = lambda w: jnp.swapaxes(w / safe, 1, 2)[..., None]  # [b, n, t] -> [b, t, n, 1]
  out = frac(w_a) * out_a.astype(jnp.float32) + frac(w_b) * out_b.astype(jnp.float32)
  return out.astype(out_a.dtype), lse
