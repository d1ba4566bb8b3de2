"""Side-by-side A/B of two versions of the xla block-sparse backend (CPU).

Loads block_mask.py and xla.py of a git revision (A) next to the working tree's
(B) in one process, builds each side's masks with its own constructors, and
times forward and forward+backward alternately (A, B, A, B, ...), so machine
noise hits both sides alike. Outputs are checked equal first. Only those two
files come from the revision: side A's xla.py still imports the working tree's
reference, rules and tiles modules, so the revision must share their interfaces.

Usage:
  python benchmarks/xla_ab.py --rev d804197 --length 8192
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse import block_mask as mask_b, xla as xla_b
from pallas_kernels.block_sparse.tiles import Tiles


def load_revision(rev: str):
  """(block_mask, xla) modules of a git revision, importable beside the current ones."""
  mods = []
  tmp = tempfile.mkdtemp()
  for name in ('block_mask', 'xla'):
    src = subprocess.run(['git', 'show', f'{rev}:pallas_kernels/block_sparse/{name}.py'],
                         check=True, capture_output=True, text=True).stdout
    path = f'{tmp}/{name}_{rev}.py'
    with open(path, 'w') as f:
      f.write(src)
    spec = importlib.util.spec_from_file_location(f'{name}_{rev}', path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    mods.append(mod)
  return mods


def masks(lib, length, heads, block=128):
  """Causal top-k near 5% and 12.5% (k ~ density x blocks per row), and a causal
  top-p mask per head whose static bound is far above the tiles it keeps."""
  n = length // block
  scores = jax.random.uniform(jax.random.key(0), (1, 1, n, n))
  peaked = jax.random.uniform(jax.random.key(1), (1, heads, n, n)) ** 8
  kw = dict(q_len=length, kv_len=length, block_q=block, block_k=block, causal=True)
  return {'causal top-k ~5%': lib.from_block_scores(scores, top_k=max(1, round(0.05 * n)), **kw),
          'causal top-k ~12.5%': lib.from_block_scores(scores, top_k=max(1, round(0.125 * n)),
                                                      **kw),
          'causal top-p 0.3, per head': lib.from_block_scores(peaked, top_p=0.3, **kw)}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--rev', required=True, help='git revision of side A')
  parser.add_argument('--length', type=int, default=8192)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--head-dim', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=7)
  args = parser.parse_args()
  mask_a, xla_a = load_revision(args.rev)
  keys = jax.random.split(jax.random.key(0), 4)
  shape = (1, args.length, args.heads, args.head_dim)
  q, k, v, do = (jax.random.normal(kk, shape, jnp.float32) for kk in keys)
  scale = args.head_dim ** -0.5
  tiles = Tiles().resolve(128, 128, args.head_dim)

  def fns(backend):
    fwd = jax.jit(lambda q, k, v, m: backend.forward(q, k, v, m, scale, tiles)[0])

    @jax.jit
    def fwd_bwd(q, k, v, do, m):
      out, lse = backend.forward(q, k, v, m, scale, tiles)
      return backend.backward(q, k, v, out, lse, do, m, scale, tiles)
    return fwd, fwd_bwd

  side = {'A': (masks(mask_a, args.length, args.heads), fns(xla_a)),
          'B': (masks(mask_b, args.length, args.heads), fns(xla_b))}
  print(f'A = {args.rev}, B = working tree; L={args.length}, {args.heads} heads, '
        f'head dim {args.head_dim}; min / median of {args.repeats} alternating runs (s)\n')
  print('| mask | density | capacity A | capacity B | fwd A | fwd B | fwd A/B '
        '| fwd+bwd A | fwd+bwd B | fwd+bwd A/B |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for name in side['A'][0]:
    ma, mb = side['A'][0][name], side['B'][0][name]
    results = {}
    for i, call in enumerate(('fwd', 'fwd_bwd')):
      run = {s: (lambda s=s, m=m: side[s][1][i](*((q, k, v) if i == 0 else (q, k, v, do)), m))
             for s, m in (('A', ma), ('B', mb))}
      outs = {s: jax.block_until_ready(f()) for s, f in run.items()}  # compile + check
      for xa, xb in zip(jax.tree.leaves(outs['A']), jax.tree.leaves(outs['B'])):
        np.testing.assert_allclose(np.asarray(xa), np.asarray(xb), atol=1e-4, rtol=0)
      times = {'A': [], 'B': []}
      for _ in range(args.repeats):
        for s, f in run.items():
          t0 = time.perf_counter()
          jax.block_until_ready(f())
          times[s].append(time.perf_counter() - t0)
      results[call] = {s: (min(t), float(np.median(t))) for s, t in times.items()}
    cell = lambda c, s: f'{results[c][s][0]:.3f} / {results[c][s][1]:.3f}'
    ratio = lambda c: results[c]['A'][1] / results[c]['B'][1]
    print(f'| {name} | {float(mb.density()):.3f} '
          f'| {ma.kv_capacity} + {ma.full_kv_capacity} | {mb.kv_capacity} + {mb.full_kv_capacity} '
          f'| {cell("fwd", "A")} | {cell("fwd", "B")} | {ratio("fwd"):.2f}x '
          f'| {cell("fwd_bwd", "A")} | {cell("fwd_bwd", "B")} | {ratio("fwd_bwd"):.2f}x |',
          flush=True)


if __name__ == '__main__':
  sys.exit(main())
