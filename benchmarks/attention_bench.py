"""Block-sparse attention vs dense jax.nn.dot_product_attention (CPU, xla backend).

For each length L and target density the mask is causal top-k: every query
block keeps its diagonal block plus the top-scoring earlier blocks (random
scores), k chosen so that mask.density() (computed area / L^2) is closest to
the target; the 50% row is plain causal. The dense baseline is
jax.nn.dot_product_attention(implementation='xla', is_causal=True), which
computes all L^2 scores; where its score buffers would not fit in half of
this machine's memory (fwd+bwd at L=16384 asks for 34 GB), it runs as a
lax.map over groups of heads: the same work, with one group's scores alive
at a time (the row's "dense" column is then marked "(k head groups)").
Prints a markdown table with time ratios beside the
density (the issue's target at L=8192: fwd ratio <= 1.3 x density, fwd+bwd
ratio <= 1.5 x density).

Usage:
  python benchmarks/attention_bench.py --lengths 4096 8192 [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import block_sparse


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def dense_head_groups(batch, heads, length, bytes_per_score):
  """Fewest head groups (dividing heads) whose score buffers fit in half the RAM."""
  budget = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2
  for groups in range(1, heads + 1):
    if heads % groups == 0 and bytes_per_score * batch * heads / groups * length**2 <= budget:
      return groups
  return heads


def over_head_groups(fn, groups):
  """fn(*arrays [B, L, H, ...]) -> same, run as lax.map over `groups` head groups."""
  if groups == 1:
    return fn

  def split(x):  # [B, L, H, D] -> [groups, B, L, H/groups, D]
    b, l, h, d = x.shape
    return jnp.moveaxis(x.reshape(b, l, groups, h // groups, d), 2, 0)

  def merge(y):
    return jnp.moveaxis(y, 0, 2).reshape(y.shape[1:3] + (-1, y.shape[-1]))

  return lambda *xs: jax.tree.map(merge, jax.lax.map(lambda a: fn(*a), tuple(map(split, xs))))


def causal_topk_mask(length: int, density: float, block: int, seed: int = 0):
  """Causal top-k mask whose computed density is closest to `density`."""
  n = length // block
  if density >= 0.5:
    return block_sparse.causal(length, block_q=block, block_k=block)
  scores = jax.random.uniform(jax.random.key(seed), (1, 1, n, n))
  best = None
  for k in range(1, n + 1):
    m = block_sparse.from_block_scores(scores, q_len=length, kv_len=length, block_q=block,
                                       block_k=block, top_k=k, causal=True)
    gap = abs(float(m.density()) - density)
    if best is None or gap < best[0]:
      best = (gap, m)
    elif gap > best[0]:
      break
  return best[1]


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--lengths', type=int, nargs='+', default=[4096, 8192, 16384])
  parser.add_argument('--densities', type=float, nargs='+', default=[0.05, 0.125, 0.25, 0.5])
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--head-dim', type=int, default=64)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--block', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--implementation', default='xla')
  parser.add_argument('--no-backward', action='store_true')
  parser.add_argument('--quick', action='store_true', help='small sizes for a smoke run')
  args = parser.parse_args()
  if args.quick:
    args.lengths, args.heads, args.repeats = [1024], 2, 1

  print(f'jax {jax.__version__}, backend {jax.default_backend()}, '
        f'devices {jax.device_count()}, heads {args.heads}, head_dim {args.head_dim}, '
        f'batch {args.batch}, block {args.block}, implementation {args.implementation}\n')
  print('| L | target | density | dense fwd (s) | sparse fwd (s) | fwd ratio | ratio / density '
        '| dense fwd+bwd (s) | sparse fwd+bwd (s) | fwd+bwd ratio | ratio / density |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for length in args.lengths:
    keys = jax.random.split(jax.random.key(0), 4)
    shape = (args.batch, length, args.heads, args.head_dim)
    q, k, v, do = (jax.random.normal(kk, shape, jnp.float32) for kk in keys)

    dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                         implementation='xla')

    def dense_fb_one(q, k, v, do):
      out, vjp = jax.vjp(dense, q, k, v)
      return (out,) + vjp(do)

    # Bytes per score element alive at once: fwd ~2 f32 buffers, fwd+bwd ~4.
    groups_fwd = dense_head_groups(args.batch, args.heads, length, 8)
    groups_fb = dense_head_groups(args.batch, args.heads, length, 16)
    dense_fwd = jax.jit(over_head_groups(dense, groups_fwd))
    dense_fb = jax.jit(over_head_groups(dense_fb_one, groups_fb))
    note = lambda g: f' ({g} head groups)' if g > 1 else ''

    sparse_fwd = jax.jit(lambda q, k, v, m: block_sparse.attention(
        q, k, v, m, implementation=args.implementation))

    @jax.jit
    def sparse_fb(q, k, v, do, m):
      out, vjp = jax.vjp(lambda *a: block_sparse.attention(
          *a, m, implementation=args.implementation), q, k, v)
      return out, vjp(do)

    t_dense = _time(dense_fwd, q, k, v, repeats=args.repeats)
    t_dense_fb = (None if args.no_backward
                  else _time(dense_fb, q, k, v, do, repeats=args.repeats))
    for target in args.densities:
      mask = causal_topk_mask(length, target, args.block)
      dens = float(mask.density())
      t_sp = _time(sparse_fwd, q, k, v, mask, repeats=args.repeats)
      r = t_sp / t_dense
      row = (f'| {length} | {target:.3f} | {dens:.3f} | {t_dense:.3f}{note(groups_fwd)} '
             f'| {t_sp:.3f} | {r:.3f} | {r / dens:.2f} |')
      if t_dense_fb is None:
        row += ' - | - | - | - |'
      else:
        t_sp_fb = _time(sparse_fb, q, k, v, do, mask, repeats=args.repeats)
        rb = t_sp_fb / t_dense_fb
        row += (f' {t_dense_fb:.3f}{note(groups_fb)} | {t_sp_fb:.3f} | {rb:.3f} '
                f'| {rb / dens:.2f} |')
      print(row, flush=True)


if __name__ == '__main__':
  main()
