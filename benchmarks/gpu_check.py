"""GPU check for the block-sparse Triton kernels (run by gpu_check.sh, < 8 min on an H200).

1. Correctness: implementation='triton' vs the dense reference on the GPU,
   float32 and bfloat16, forward and backward (dq, dk, dv), several masks.
2. Timing (bf16, batch 1, 16 heads, head dim 128, L = 8k and 32k):
   jax.nn.dot_product_attention(implementation='cudnn', is_causal=True) vs
   block_sparse triton on dense causal and on random block masks of 10% and
   50% density; forward and forward+backward.
3. torch flex_attention on the same block tables (if torch is importable).

Writes gpu_check.md / gpu_check.json to $OUT (or --out) when set.

`--smoke` runs the same code paths on CPU at toy sizes (Triton kernels in
interpret mode, the xla dense attention as the baseline, no torch), so CI
catches a broken script before a GPU session spends its minutes on it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import block_sparse

TOL = {'float32': (2e-3, 5e-3), 'bfloat16': (3e-2, 8e-2)}  # (out, grads) max abs error


def _time_jax(fn, *args, repeats=5):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts) * 1e3


def _qkv(key, b, l, h, d, dtype):
  ks = jax.random.split(key, 4)
  return [jax.random.normal(k, (b, l, h, d), jnp.float32).astype(dtype) for k in ks]


def random_block_mask(l, density, block=128, seed=0):
  """Every query block keeps round(density * nk) random key blocks (all full tiles)."""
  n = l // block
  scores = jax.random.uniform(jax.random.key(seed), (1, 1, n, n))
  return block_sparse.from_block_scores(scores, q_len=l, kv_len=l, block_q=block,
                                        block_k=block, top_k=max(1, round(density * n)))


def flex_block_mask(mask, length, device):
  """Our tables as a torch flex_attention BlockMask (same tiles, same order).

  flex sizes its dense scratch from the index tables' last dim, so the tables
  are padded to all key blocks first (ours are only as wide as the busiest row).
  The timed block masks hold full tiles only. The mask_mod states the same
  pattern element-wise: the compiled kernel never calls it on full tiles, but
  flex's eager path masks by mask_mod alone, so without it the two would differ.
  """
  import torch
  from torch.nn.attention.flex_attention import BlockMask
  if np.shape(mask.full_kv_indices)[:2] != (1, 1):
    raise ValueError('flex_block_mask: pass a mask shared over batch and heads.')
  if int(np.asarray(mask.kv_num_blocks).sum()):
    raise ValueError('flex_block_mask: partial tiles need a mask_mod; pass full-tile masks.')
  nk = length // mask.block_k

  def table(num, idx):
    num, idx = np.asarray(num, np.int32), np.asarray(idx, np.int32)
    padded = np.zeros(idx.shape[:-1] + (nk,), np.int32)
    width = min(idx.shape[-1], nk)
    padded[..., :width] = idx[..., :width]
    return torch.from_numpy(num).to(device), torch.from_numpy(padded).to(device)

  nq = length // mask.block_q
  num, idx = (np.broadcast_to(np.asarray(x), (1, 1) + np.shape(x)[2:])
              for x in (mask.full_kv_num_blocks, mask.full_kv_indices))
  bits = np.zeros((nq, nk), bool)  # the (shared) pattern of batch 0, head 0
  for i in range(nq):
    bits[i, idx[0, 0, i, :num[0, 0, i]]] = True
  bits_t = torch.from_numpy(bits).to(device)
  bq, bk = mask.block_q, mask.block_k

  def mask_mod(b, h, q_idx, kv_idx):
    return bits_t[q_idx // bq, kv_idx // bk]

  return BlockMask.from_kv_blocks(*table(mask.kv_num_blocks, mask.kv_indices),
                                  *table(mask.full_kv_num_blocks, mask.full_kv_indices),
                                  BLOCK_SIZE=(bq, bk), mask_mod=mask_mod,
                                  seq_lengths=(length, length))


def check_correctness(rows, smoke=False):
  l, d, heads = (128, 32, 2) if smoke else (1024, 128, 4)
  masks = {
      'causal': block_sparse.causal(l),
      'window+sink per head': block_sparse.sliding_window(
          l, window=np.array([100, 300, 700, 1024][:heads]),
          sinks=np.array([0, 4, 16, 0][:heads])),
      'top-k 25%': random_block_mask(l, 0.25, block=64 if smoke else 128),
  }
  if smoke:
    masks.pop('causal')
  ok = True
  for i, dtype in enumerate(('float32', 'bfloat16')):
    q, k, v, do = _qkv(jax.random.key(0), 2, l, heads, d, getattr(jnp, dtype))
    k, v = k[:, :, :heads // 2], v[:, :, :heads // 2]  # GQA 2:1
    for j, (name, mask) in enumerate(masks.items()):
      if smoke and i != j:  # the smoke run checks each mask in one dtype
        continue
      @jax.jit
      def both(q, k, v, do, mask):
        o, f = jax.vjp(lambda *a: block_sparse.attention(
            *a, mask, implementation='triton', interpret=smoke), q, k, v)
        o_r, f_r = jax.vjp(lambda *a: block_sparse.attention_ref(*a, mask), q, k, v)
        return (o,) + f(do), (o_r,) + f_r(do)
      got, ref = both(q, k, v, do, mask)
      errs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
              for a, b in zip(got, ref)]
      tol_o, tol_g = TOL[dtype]
      passed = errs[0] <= tol_o and max(errs[1:]) <= tol_g
      ok &= passed
      rows.append(dict(check='correctness', dtype=dtype, mask=name, out_err=errs[0],
                       dq_err=errs[1], dk_err=errs[2], dv_err=errs[3], passed=passed))
      print(f'[check] {dtype:8s} {name:22s} out {errs[0]:.2e} dq {errs[1]:.2e} '
            f'dk {errs[2]:.2e} dv {errs[3]:.2e} {"PASS" if passed else "FAIL"}', flush=True)
  return ok


def _flex_time(kind, mask, q, k, v, do, repeats=5):
  import torch
  from torch.nn.attention.flex_attention import create_block_mask, flex_attention
  # Each mask (new mask_mod closure) and length recompiles; past dynamo's default
  # limit flex would fall back to eager, which does not fit at L=32k.
  for name in ('recompile_limit', 'cache_size_limit'):
    if hasattr(torch._dynamo.config, name):
      setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
  flex = torch.compile(flex_attention)
  b, l, h, d = q.shape
  tq = [torch.from_dlpack(x).to(torch.bfloat16).transpose(1, 2).contiguous().requires_grad_()
        for x in (q, k, v)]
  tdo = torch.from_dlpack(do).to(torch.bfloat16).transpose(1, 2).contiguous()
  if kind == 'causal':
    bm = create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, l, l, device='cuda')
  else:
    bm = flex_block_mask(mask, l, 'cuda')

  def run(bwd):
    out = flex(*tq, block_mask=bm)
    if bwd:
      out.backward(tdo)
    return out

  res = {}
  for bwd in (False, True):
    run(bwd)
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      run(bwd)
      end.record()
      torch.cuda.synchronize()
      ts.append(start.elapsed_time(end))
    res['fwd_bwd' if bwd else 'fwd'] = statistics.median(ts)
  return res


def run_timings(rows, lengths, heads=16, d=128, smoke=False, on_row=lambda: None):
  """jax timings for every length first, flex_attention after (its torch.compile
  runs are the slow, optional part); `on_row` after each row, to save progress."""
  have_torch = False
  if not smoke:
    try:
      import torch  # noqa: F401
      have_torch = torch.cuda.is_available()
      if not have_torch:
        print('[flex] skipped: torch sees no CUDA device', flush=True)
    except Exception as e:  # pylint: disable=broad-except  (any import failure: no flex row)
      print(f'[flex] skipped: torch does not import ({type(e).__name__}: {e})', flush=True)
  base_impl = 'xla' if smoke else 'cudnn'
  repeats = 1 if smoke else 5
  block = 64 if smoke else 128
  flex_todo = []
  for l in lengths:
    q, k, v, do = _qkv(jax.random.key(1), 1, l, heads, d, jnp.bfloat16)

    def fb(f):
      @jax.jit
      def g(q, k, v, do, *extra):
        out, vjp = jax.vjp(lambda *a: f(*a, *extra), q, k, v)
        return out, vjp(do)
      return g

    dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                         implementation=base_impl)
    base = dict(fwd=_time_jax(jax.jit(dense), q, k, v, repeats=repeats),
                fwd_bwd=_time_jax(fb(dense), q, k, v, do, repeats=repeats))
    rows.append(dict(check='timing', L=l, impl=f'{base_impl} dense causal', density=0.5, **base))
    on_row()
    print(f'[time] L={l} {base_impl} causal fwd {base["fwd"]:.2f} ms '
          f'fwd+bwd {base["fwd_bwd"]:.2f} ms', flush=True)
    sparse = lambda q, k, v, m: block_sparse.attention(q, k, v, m, implementation='triton',
                                                       interpret=smoke)
    masks = (('causal', block_sparse.causal(l, block_q=block, block_k=block)),
             ('random 10%', random_block_mask(l, 0.10, block)),
             ('random 50%', random_block_mask(l, 0.50, block)))
    for kind, mask in masks[:2] if smoke else masks:
      dens = float(mask.density())
      t = dict(fwd=_time_jax(jax.jit(sparse), q, k, v, mask, repeats=repeats),
               fwd_bwd=_time_jax(fb(sparse), q, k, v, do, mask, repeats=repeats))
      row = dict(check='timing', L=l, impl=f'triton {kind}', density=dens, **t,
                 speedup_fwd_vs_cudnn=base['fwd'] / t['fwd'],
                 speedup_fwd_bwd_vs_cudnn=base['fwd_bwd'] / t['fwd_bwd'])
      rows.append(row)
      on_row()
      flex_todo.append((row, kind, mask, (q, k, v, do)))
      print(f'[time] L={l} triton {kind:10s} density {dens:.3f} fwd {t["fwd"]:.2f} ms '
            f'fwd+bwd {t["fwd_bwd"]:.2f} ms', flush=True)
  for row, kind, mask, arrays in flex_todo if have_torch else ():
    try:
      fl = _flex_time('causal' if kind == 'causal' else 'blocks', mask, *arrays)
      row.update(flex_fwd=fl['fwd'], flex_fwd_bwd=fl['fwd_bwd'])
      print(f'[flex] L={row["L"]} {kind:10s} fwd {fl["fwd"]:.2f} ms '
            f'fwd+bwd {fl["fwd_bwd"]:.2f} ms', flush=True)
    except Exception:  # pylint: disable=broad-except
      row['flex_error'] = traceback.format_exc(limit=2)
      print(f'[flex] {kind}: {row["flex_error"]}', flush=True)
    on_row()


def bar_verdicts(rows):
  """The issue's GPU bars, as (statement, measured, passed) triples."""
  timing = {(r['L'], r['impl']): r for r in rows if r['check'] == 'timing'}
  out = []
  for l in sorted({key[0] for key in timing}):
    base = next(r for (ll, impl), r in timing.items() if ll == l and 'dense' in impl)
    causal, sparse10 = timing.get((l, 'triton causal')), timing.get((l, 'triton random 10%'))
    if causal:
      ratio = causal['fwd_bwd'] / base['fwd_bwd']
      out.append((f'L={l}: dense causal fwd+bwd within 1.5x of {base["impl"]}',
                  f'{ratio:.2f}x (fwd {causal["fwd"] / base["fwd"]:.2f}x)', ratio <= 1.5))
    if sparse10:
      speedup = base['fwd_bwd'] / sparse10['fwd_bwd']
      out.append((f'L={l}: 10% density >= 4x faster than dense causal fwd+bwd',
                  f'{speedup:.2f}x (fwd {base["fwd"] / sparse10["fwd"]:.2f}x)', speedup >= 4))
    for (ll, impl), r in sorted(timing.items()):
      if ll == l and 'flex_fwd_bwd' in r:
        ratio = r['fwd_bwd'] / r['flex_fwd_bwd']
        out.append((f'L={l}: {impl} no slower than flex_attention (fwd+bwd)',
                    f'{ratio:.2f}x flex time (fwd {r["fwd"] / r["flex_fwd"]:.2f}x)', ratio <= 1.0))
  return out


def to_markdown(rows):
  lines = ['| check | dtype / L | mask / impl | density | out err / fwd ms | dq err / fwd+bwd ms '
           '| dk err / flex fwd ms | dv err / flex fwd+bwd ms | pass / speedup vs cuDNN (fwd, fwd+bwd) |',
           '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    if r['check'] == 'correctness':
      lines.append(f"| correctness | {r['dtype']} | {r['mask']} | - | {r['out_err']:.2e} | "
                   f"{r['dq_err']:.2e} | {r['dk_err']:.2e} | {r['dv_err']:.2e} | "
                   f"{'PASS' if r['passed'] else 'FAIL'} |")
    else:
      sp = (f"{r['speedup_fwd_vs_cudnn']:.2f}x, {r['speedup_fwd_bwd_vs_cudnn']:.2f}x"
            if 'speedup_fwd_vs_cudnn' in r else '1x (baseline)')
      lines.append(f"| timing | {r['L']} | {r['impl']} | {r['density']:.3f} | {r['fwd']:.2f} | "
                   f"{r['fwd_bwd']:.2f} | {r.get('flex_fwd', float('nan')):.2f} | "
                   f"{r.get('flex_fwd_bwd', float('nan')):.2f} | {sp} |")
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--lengths', type=int, nargs='+', default=[8192, 32768])
  parser.add_argument('--out', default=os.environ.get('OUT'))
  parser.add_argument('--skip-timing', action='store_true')
  parser.add_argument('--smoke', action='store_true',
                      help='CPU dry run at toy sizes (interpret mode, xla baseline, no torch)')
  args = parser.parse_args(argv)
  print(f'jax {jax.__version__} devices {jax.devices()}', flush=True)
  if jax.default_backend() != 'gpu' and not args.smoke:
    print('no GPU: nothing to check (use --smoke for a CPU dry run)', file=sys.stderr)
    return 2
  rows = []

  def report():
    table = to_markdown(rows)
    bars = '\n'.join(f'- {"PASS" if ok_ else "MISS"}: {what}: {got}'
                     for what, got, ok_ in bar_verdicts(rows))
    return table + '\n\nBars:\n' + (bars or '- (no timing rows)')

  def save():  # after every row: a run cut short by the timeout keeps what it measured
    if args.out:
      os.makedirs(args.out, exist_ok=True)
      with open(os.path.join(args.out, 'gpu_check.md'), 'w') as f:
        f.write(f'jax {jax.__version__}, {jax.devices()[0].device_kind}'
                f'{" (--smoke)" if args.smoke else ""}\n\n{report()}\n')
      with open(os.path.join(args.out, 'gpu_check.json'), 'w') as f:
        json.dump(rows, f, indent=1, default=str)

  ok = check_correctness(rows, smoke=args.smoke)
  save()
  if not args.skip_timing:
    try:
      if args.smoke:
        run_timings(rows, [256], heads=2, d=32, smoke=True, on_row=save)
      else:
        run_timings(rows, args.lengths, on_row=save)
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
      ok = False
  save()
  print('\n' + report())
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
