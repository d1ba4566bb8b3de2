"""attention(): checks, padding, sharding, dispatch, custom_vjp.

Einsum legend: b batch, t query position, s key position, n query heads,
k kv heads, g query heads per kv head, d head dim.

Backend contract (what a backend module must expose; see also __init__.py):

    forward(q, k, v, mask, scale, tiles, interpret) -> (out, lse)
    backward(q, k, v, out, lse, dout, mask, scale, tiles, interpret, dlse=None) -> (dq, dk, dv)

  * q [b, t, n, d], k, v [b, s, k, d] with t, s multiples of mask.block_q /
    mask.block_k (the API pads), n % k == 0. Same dtype for q, k, v.
  * mask: a BlockMask already passed through `mask.for_kernel()`: its
    q_len / kv_len are the padded lengths and its rule masks padded keys.
    Its batch dim is 1 or b and its head dim 1 or n (broadcast, never tiled).
  * out [b, t, n, d] in q.dtype; lse [b, n, t] float32, natural log; rows
    with no allowed key: out = 0 and lse = -inf (what `return_lse` returns:
    merging such a partial with another one gives it zero weight).
  * backward receives the residual lse with -inf replaced by 0 (any finite
    value works as long as masked scores are MASK_VALUE, so exp(MASK_VALUE -
    lse) == 0) and `dlse`, the cotangent of lse ([b, n, t] float32, or None):
    since d lse / d s = p, it enters as delta - dlse. It returns dq, dk, dv in
    the dtypes of q, k, v (dk/dv summed over the query heads of each GQA
    group); empty rows give zero gradients.
  * scale is a Python float; tiles a resolved `Tiles`; interpret is passed
    through unchanged (True, or backend-specific interpret params).
  * The residuals are exactly (q, k, v, out, lse, mask): backends must not
    need anything else from the forward.
The 'reference' backend receives the unpadded inputs and the caller's mask.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.dispatch import (IMPLEMENTATIONS, check_qkv, resolve_implementation,
                                     resolve_mesh)
from pallas_kernels.block_sparse.block_mask import BlockMask
from pallas_kernels.block_sparse.tiles import Tiles

DEFAULT_BATCH_AXES = ('data', 'fsdp')
DEFAULT_HEAD_AXIS = 'tensor'



@dataclasses.dataclass(frozen=True)
class _Config:
  implementation: str
  scale: float
  tiles: Tiles
  interpret: Any


def _backend(name: str):
  try:
    return importlib.import_module(f'pallas_kernels.block_sparse.{name}')
  except ImportError as e:
    raise NotImplementedError(
        f"implementation='{name}' is not available: pallas_kernels.block_sparse.{name} "
        f'could not be imported ({e}).') from e


def _fwd(q, k, v, mask, cfg: _Config):
  out, lse = _backend(cfg.implementation).forward(q, k, v, mask, cfg.scale, cfg.tiles,
                                                  cfg.interpret)
  return (out, lse), (q, k, v, out, jnp.where(jnp.isneginf(lse), 0.0, lse), mask)


def _bwd(cfg: _Config, res, cotangents):
  q, k, v, out, lse, mask = res
  dout, dlse = cotangents
  dq, dk, dv = _backend(cfg.implementation).backward(q, k, v, out, lse, dout, mask, cfg.scale,
                                                     cfg.tiles, cfg.interpret, dlse=dlse)
  return dq, dk, dv, None


def _primal(q, k, v, mask, cfg):
  return _fwd(q, k, v, mask, cfg)[0]


# One custom_vjp for every backend: primal (out, lse); residuals (q, k, v, out, lse, mask).
_core = jax.custom_vjp(_primal, nondiff_argnums=(4,))
_core.defvjp(_fwd, _bwd)


def _check_inputs(q, k, v, mask):
  check_qkv(q, k, v)
  b, t, n, d = q.shape
  if not isinstance(mask, BlockMask):
    raise ValueError(f'mask must be a BlockMask, got {type(mask).__name__}.')
  mask.validate(b, n, t, k.shape[1], name='mask')


def _mask_specs(mask: BlockMask, batch, head):
  def spec(b_size, h_size, rank, head_only=False):
    bs = (batch or None) if b_size > 1 else None
    hs = head if h_size > 1 else None
    if head_only:
      return P(hs)
    return P(bs, hs, *([None] * (rank - 2)))
  tables = {f.name: spec(*getattr(mask, f.name).shape[:2], getattr(mask, f.name).ndim)
            for f in dataclasses.fields(mask) if f.name.endswith(('blocks', 'indices'))}
  leaves, treedef = jax.tree.flatten(mask.rule)
  rule_specs = [spec(1, x.shape[0], 1, head_only=True) if kind == 'head'
                else spec(x.shape[0], x.shape[1], x.ndim)
                for kind, x in zip(mask.rule.leaf_kinds(), leaves)]
  return dataclasses.replace(mask, **tables, rule=jax.tree.unflatten(treedef, rule_specs))


def attention(q, k, v, mask: BlockMask, *, scale: float | None = None,
              implementation: str | None = None, interpret: Any = False,
              tiles: Tiles | None = None, mesh=None,
              batch_axes: Sequence[str] | None = DEFAULT_BATCH_AXES,
              head_axis: str | None = DEFAULT_HEAD_AXIS, return_lse: bool = False):
  """Block-sparse attention, layout of jax.nn.dot_product_attention.

  Args:
    q: [b, t, n, d] queries.
    k: [b, s, k, d] keys; n % k == 0 (GQA: query head h reads kv head h // (n // k)).
    v: [b, s, k, d] values.
    mask: BlockMask built for (t, s), batch 1 or b, heads 1 or n.
    scale: Python float; default 1/sqrt(d).
    implementation: None (platform default: xla on CPU, triton on GPU,
      mosaic_tpu on TPU), 'reference', 'xla', 'triton' or 'mosaic_tpu'. An
      explicit choice that cannot run raises; there is no silent fallback.
    interpret: run Pallas kernels in interpret mode (CPU testing).
    tiles: kernel tile sizes (default derived from the mask's blocks).
    mesh: Mesh / AbstractMesh to shard over; default the context mesh
      (`jax.set_mesh`), if any. With a mesh, the computation runs under
      jax.shard_map: batch over `batch_axes`, heads over `head_axis` (axes
      missing from the mesh are ignored; sequence dims are never sharded).
      Mask tables with batch / head dim 1 are replicated.
    batch_axes: mesh axes of the batch dimension.
    head_axis: mesh axis of the head dimension. An explicitly chosen axis must divide
      both n and k; the default ('tensor') is skipped when it does not.
    return_lse: also return the rows' log-sum-exp, to merge this attention with
      another one over disjoint keys (pallas_kernels.stripe.merge_partials).

  Lengths need not be multiples of the mask's block sizes: inputs are padded
  internally and the output is sliced back.

  Returns:
    out [b, t, n, d] in q.dtype (query rows with no allowed key are zero); with
    return_lse, (out, lse) with lse [b, n, t] float32, the natural-log
    log-sum-exp of each row's scaled scores (-inf for rows with no allowed
    key). Gradients flow through both.
  """
  _check_inputs(q, k, v, mask)
  impl = resolve_implementation(implementation, interpret)
  d = q.shape[-1]
  scale = float(1.0 / math.sqrt(d) if scale is None else scale)
  tiles = (tiles or Tiles()).resolve(mask.block_q, mask.block_k, d, backend=impl)
  cfg = _Config(impl, scale, tiles, interpret)
  t, s = q.shape[1], k.shape[1]

  def run(q, k, v, mask):
    if impl == 'reference':
      out, lse = _core(q, k, v, mask, cfg)
      return (out, lse) if return_lse else out
    kmask = mask.for_kernel()
    tp, sp = kmask.q_len - t, kmask.kv_len - s
    if tp or sp:
      q = jnp.pad(q, ((0, 0), (0, tp), (0, 0), (0, 0)))
      k = jnp.pad(k, ((0, 0), (0, sp), (0, 0), (0, 0)))
      v = jnp.pad(v, ((0, 0), (0, sp), (0, 0), (0, 0)))
    out, lse = _core(q, k, v, kmask, cfg)
    return (out[:, :t], lse[:, :, :t]) if return_lse else out[:, :t]

  sharding = resolve_mesh(mesh, batch_axes, head_axis)
  if sharding is None:
    return run(q, k, v, mask)
  mesh, batch, head = sharding
  batch_spec = batch or None
  n_batch = math.prod(mesh.shape[a] for a in batch)
  n_head = mesh.shape[head] if head else 1
  if head == DEFAULT_HEAD_AXIS and (q.shape[2] % n_head or k.shape[2] % n_head):
    # The default layout only shards heads when the axis divides both head counts (e.g. a
    # core that runs 1 KV head of a layer here); otherwise heads stay whole on each shard.
    head, n_head = None, 1
  if q.shape[0] % n_batch:
    raise ValueError(f'q batch {q.shape[0]} is not divisible by mesh axes {batch} '
                     f'(size {n_batch}); pass batch_axes=() or a matching mesh.')
  if q.shape[2] % n_head or k.shape[2] % n_head:
    raise ValueError(f'q heads ({q.shape[2]}) and k/v heads ({k.shape[2]}) must be '
                     f'divisible by mesh axis {head!r} (size {n_head}); pass head_axis=None.')
  x_spec = P(batch_spec, None, head, None)
  in_specs = (x_spec, x_spec, x_spec, _mask_specs(mask, batch_spec, head))
  args = (q, k, v, mask)
  if any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, 'axis_types', ())):
    # Explicit-sharding meshes type-check shard_map inputs: move them first.
    def to_spec(x, spec):
      dst = jax.sharding.NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec
      return jax.sharding.reshard(x, dst)
    args = jax.tree.map(to_spec, args, in_specs)
  out_specs = (x_spec, P(batch_spec, head, None)) if return_lse else x_spec
  fn = jax.shard_map(run, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  return fn(*args)
