"""Gathered-key (stripe) attention vs dense jax.nn.dot_product_attention on this machine.

For each length L and density rho, every (kv head, query block of --block_q queries) gets a
sorted list of round(rho * n_i) random keys drawn from the n_i keys its block may see (causal:
keys up to the block's last query, as AnchorAttention / vertical-slash selections are), so rho
is the fraction of the causal pairs kept. The lists' capacity is the longest list (rho * L).
The baseline is jax.nn.dot_product_attention(implementation='xla', is_causal=True), which
computes all L^2 scores. Times are medians of --repeats calls after a compile + warm-up call,
in seconds; a ratio is stripe time / dense time.

Writes results.md (a markdown table with the command) and results.jsonl into --out;
--update_docs also writes docs/results/stripe.md.

Usage:
  PYTHONPATH=. python benchmarks/stripe_bench.py --out runs/stripe_bench [--lengths 4096 8192]
      [--densities 0.02 0.05 0.1 0.25] [--implementation xla] [--no_backward] [--update_docs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import stripe


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def causal_lists(rng, *, heads: int, length: int, block_q: int, density: float):
  """Sorted random lists over each block's causal keys: (indices, counts, kept pair fraction)."""
  nq = length // block_q
  visible = (np.arange(nq) + 1) * block_q  # keys up to the block's last query
  sizes = np.maximum(1, np.round(density * visible)).astype(int)
  cap = int(sizes.max())
  idx = np.zeros((1, heads, nq, cap), np.int32)
  for h in range(heads):
    for i in range(nq):
      keys = np.sort(rng.choice(visible[i], sizes[i], replace=False))
      idx[0, h, i, :sizes[i]] = keys
  counts = np.broadcast_to(sizes.astype(np.int32), (1, heads, nq)).copy()
  kept = float(np.asarray(stripe.dense_mask(idx[:, :1], counts[:, :1], q_len=length,
                                            kv_len=length, block_q=block_q, causal=True)).sum())
  return idx, counts, kept / (length * (length + 1) / 2)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True, help='run directory for results.md / .jsonl')
  parser.add_argument('--lengths', type=int, nargs='+', default=[4096, 8192])
  parser.add_argument('--densities', type=float, nargs='+', default=[0.02, 0.05, 0.1, 0.25])
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--kv_heads', type=int, default=2)
  parser.add_argument('--list_heads', choices=['kv', 'q'], default='kv',
                      help='one list per kv head (shared by its GQA group) or per query head')
  parser.add_argument('--head_dim', type=int, default=64)
  parser.add_argument('--block_q', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--implementation', default='xla')
  parser.add_argument('--no_backward', action='store_true')
  parser.add_argument('--update_docs', action='store_true',
                      help='also write docs/results/stripe.md')
  args = parser.parse_args(argv)

  setup = (f'jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs, '
           f'batch 1, {args.heads} query heads / {args.kv_heads} kv heads, head dim '
           f'{args.head_dim}, float32, lists per {args.list_heads} head over query blocks of '
           f'{args.block_q}, causal, implementation {args.implementation}')
  print(setup, flush=True)
  header = ('| L | density | kept pairs | keys / list | dense fwd (s) | stripe fwd (s) | fwd ratio '
            '| dense fwd+bwd (s) | stripe fwd+bwd (s) | fwd+bwd ratio |')
  lines = [header, '|---|---|---|---|---|---|---|---|---|---|']
  print('\n'.join(lines), flush=True)
  rows = []
  rng = np.random.default_rng(0)
  for length in args.lengths:
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (1, length, args.heads, args.head_dim))
    k = jax.random.normal(ks[1], (1, length, args.kv_heads, args.head_dim))
    v = jax.random.normal(ks[2], (1, length, args.kv_heads, args.head_dim))
    do = jax.random.normal(ks[3], q.shape)
    dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                         implementation='xla')
    sparse = lambda q, k, v, i, c: stripe.attention(q, k, v, i, c, block_q=args.block_q,
                                                    causal=True,
                                                    implementation=args.implementation)

    def fwd_bwd(fn):
      def run(q, k, v, do, *lists):
        out, vjp = jax.vjp(lambda *a: fn(*a, *lists), q, k, v)
        return (out,) + vjp(do)
      return jax.jit(run)

    t_dense = _time(jax.jit(dense), q, k, v, repeats=args.repeats)
    t_dense_fb = None if args.no_backward else _time(fwd_bwd(dense), q, k, v, do,
                                                     repeats=args.repeats)
    sparse_fwd, sparse_fb = jax.jit(sparse), fwd_bwd(sparse)
    heads = args.kv_heads if args.list_heads == 'kv' else args.heads
    for density in args.densities:
      idx, counts, kept = causal_lists(rng, heads=heads, length=length, block_q=args.block_q,
                                       density=density)
      t_sp = _time(sparse_fwd, q, k, v, idx, counts, repeats=args.repeats)
      t_sp_fb = None if args.no_backward else _time(sparse_fb, q, k, v, do, idx, counts,
                                                    repeats=args.repeats)
      row = dict(length=length, density=density, kept_pairs=kept, capacity=idx.shape[-1],
                 dense_fwd_s=t_dense, stripe_fwd_s=t_sp, dense_fwd_bwd_s=t_dense_fb,
                 stripe_fwd_bwd_s=t_sp_fb)
      rows.append(row)
      fb = ('- | - | - |' if t_sp_fb is None else
            f'{t_dense_fb:.3f} | {t_sp_fb:.3f} | {t_sp_fb / t_dense_fb:.3f} |')
      line = (f'| {length} | {density:.3f} | {kept:.3f} | {idx.shape[-1]} | {t_dense:.3f} | '
              f'{t_sp:.3f} | {t_sp / t_dense:.3f} | ' + fb)
      lines.append(line)
      print(line, flush=True)

  command = 'python benchmarks/stripe_bench.py ' + ' '.join(
      a for a in (argv if argv is not None else sys.argv[1:]))
  text = '\n'.join(['# Stripe (gathered-key) attention vs dense, CPU', '',
                    f'Command: `{command}`', '', f'Setup: {setup}.', '',
                    'density: fraction of each block\'s causal keys listed; kept pairs: '
                    'fraction of all causal (query, key) pairs computed; ratio: stripe time / '
                    'dense time (dense computes all L^2 scores).', ''] + lines) + '\n'
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'results.md'), 'w') as f:
    f.write(text)
  with open(os.path.join(args.out, 'results.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  if args.update_docs:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs',
                        'results', 'stripe.md')
    with open(path, 'w') as f:
      f.write(text)
  print(f'wrote {args.out}/results.md' + (' and docs/results/stripe.md' if args.update_docs
                                          else ''))


if __name__ == '__main__':
  main()
