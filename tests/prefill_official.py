"""Straightforward numpy ports of the official selection code of the training-free prefill
methods: the oracles of tests/test_prefill.py.

Each port follows the released code line by line (loops where the CUDA / Triton code
loops), batch 1, per query head (the official code repeats the KV heads first), and
returns what the official kernel computes as a bool [heads, t, t] mask of computed causal
pairs, or None where the official code falls back to dense attention. Written from the
sources named in each docstring; no code is copied.

Shapes: q [t, n, d], k [t, n, d] (already repeated to the query heads).
"""

from __future__ import annotations

import math

import numpy as np


def softmax(x, axis=-1):
  x = x - np.max(x, axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def causal(t):
  return np.tril(np.ones((t, t), bool))


def last_probs(q, k, last):
  """softmax((q[-last:] k^T) / sqrt(d)) with the last `last` keys masked causally, [n, r, t]."""
  t, n, d = q.shape
  qk = np.einsum("ind,jnd->nij", q[-last:].astype(np.float32), k.astype(np.float32)) / math.sqrt(d)
  tri = np.tril(np.ones((last, last), bool))
  qk[:, :, t - last:] = np.where(tri, qk[:, :, t - last:], -np.inf)
  return softmax(qk)


def diagonal_sums(p):
  """sum_all_diagonal_matrix / sum_over_diagonals: entry j = diagonal through (last row, key j)."""
  n, r, t = p.shape
  out = np.zeros((n, t), p.dtype)
  for j in range(t):
    for i in range(r):
      key = j - (r - 1 - i)
      if key >= 0:
        out[:, j] += p[:, i, key]
  return out


def expand_blocks(bits, t, block):
  """[n, nb, nb] kept blocks -> [n, t, t] computed causal pairs."""
  up = np.repeat(np.repeat(bits, block, axis=1), block, axis=2)[:, :t, :t]
  return up & causal(t)


# ---- Vertical-Slash: sparse_frontier/modelling/attention/minference/{vertical_and_slash.py,
# csrc/vertical_slash_index.cu} @31d86c17 -------------------------------------------------


def vertical_slash(q, k, vertical_size, slash_size, last_q, block=64):
  t, n, _ = q.shape
  vertical_size, slash_size, last_q = min(vertical_size, t), min(slash_size, t), min(last_q, t)
  p = last_probs(q, k, last_q)
  vertical = p.sum(1)
  vertical[:, :4] = np.inf
  slash = diagonal_sums(p)
  slash[:, -64:] = np.inf
  out = np.zeros((n, t, t), bool)
  for h in range(n):
    v_idx = np.sort(np.argsort(-vertical[h], kind="stable")[:vertical_size])
    s_idx = np.sort((t - 1) - np.argsort(-slash[h], kind="stable")[:slash_size])[::-1]
    for bm in range(-(-t // block)):  # convert_vertical_slash_indexes_kernel, one thread
      start_m, end_m = bm * block, bm * block + block
      blocks, columns = [], []
      s = v = 0
      vi = v_idx[v]; v += 1
      si = s_idx[s]; s += 1
      while si >= end_m:
        si = s_idx[s]; s += 1
      si = max(end_m - si, block)
      range_start, range_end = si - block, si
      while True:
        if vi < range_end:
          if vi < range_start:
            columns.append(vi)
          if v < len(v_idx):
            vi = v_idx[v]; v += 1
          else:
            vi = end_m + block
        else:
          if s < len(s_idx):
            si = max(end_m - s_idx[s], block); s += 1
          else:
            blocks.extend(range(range_start, range_end, block))
            break
          if si > range_end + block:
            blocks.extend(range(range_start, range_end, block))
            range_start, range_end = si - block, si
          elif si > range_end:
            range_end += block
      rows = np.arange(start_m, min(end_m, t))
      keys = np.zeros(t, bool)
      for b0 in blocks:  # _triton_mixed_sparse_attn_fwd_kernel: causal blocks, then columns
        keys[b0:min(b0 + block, t)] = True
      cols = np.zeros(t, bool)
      cols[columns] = True
      out[h, rows] = (keys[None, :] & (np.arange(t)[None, :] <= rows[:, None])) | cols[None, :]
  return out


# ---- block top-k: sparse_frontier/modelling/attention/minference/block.py @31d86c17 ------


def block_topk(q, k, top_k, block):
  t, n, d = q.shape
  pad = block - (t & (block - 1)) if block & (block - 1) == 0 else block - t % block
  qp = np.pad(q, ((0, pad), (0, 0), (0, 0)))
  kp = np.pad(k, ((0, pad), (0, 0), (0, 0)))
  nb = qp.shape[0] // block
  q_pool = qp.reshape(nb, block, n, d).mean(1)
  k_pool = kp.reshape(nb, block, n, d).mean(1)
  p = np.einsum("ind,jnd->nij", q_pool, k_pool)
  i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
  p = np.where((i == j) | (j == i - 1), np.inf, p)
  p = np.where(i >= j, p, -np.inf)
  p[..., 0] = np.inf
  top_k = min(top_k, qp.shape[0] // block)
  idx = np.argsort(-p, axis=-1, kind="stable")[..., :top_k]
  bits = np.zeros((n, nb, nb), bool)
  for h in range(n):
    for r in range(nb):
      bits[h, r, idx[h, r]] = True
  return expand_blocks(bits, t, block)


# ---- FlexPrefill: flex_prefill/ops/flex_prefill_attention.py (get_active_blocks,
# flex_prefill_attention) in bytedance/FlexPrefill @a24b27bf ------------------------------


def flexprefill(q, k, gamma, tau, min_budget, max_budget, block, budget_block=128,
                return_jsd=False):
  """Computed pairs [n, t, t], or None for the official dense fallback. ``budget_block`` is
  the literal 128 of the official budget conversion (a parameter only for small tests)."""
  t, n, d = q.shape
  nb = -(-t // block)
  min_budget = 1 if min_budget is None else min_budget
  max_budget = 2147483647 if max_budget is None else max_budget
  if t <= max(2 * block, math.ceil(min_budget / block) * block):
    return None
  min_budget, max_budget = math.ceil(min_budget / block), math.ceil(max_budget / block)
  max_budget = min(max_budget, nb)
  last_q = q[-block:].astype(np.float32) / math.sqrt(d)
  qk = np.einsum("ind,jnd->nij", last_q, k.astype(np.float32))
  tri = np.tril(np.ones((block, block), bool))
  qk[..., -block:] = np.where(tri, qk[..., -block:], -np.inf)
  qk = softmax(qk)
  slash = diagonal_sums(qk) / qk.shape[-2]
  vertical = qk.mean(-2)

  def cover(x):
    return np.sum(np.cumsum(np.sort(x, -1)[..., ::-1], -1) <= gamma, -1) + 1

  n_v = cover(vertical) // budget_block + 1
  n_s = cover(slash) // budget_block + 1
  n_v[n_v < min_budget] = min_budget
  n_v[n_v > max_budget] = max_budget
  n_s[n_s < min_budget] = min_budget
  n_s[n_s > max_budget] = max_budget

  def sumpool(x):
    return np.pad(x, ((0, 0), (0, nb * block - t))).reshape(n, nb, block).sum(-1)

  vertical, slash = sumpool(vertical), sumpool(slash)
  avg_k = np.stack([k[j * block:(j + 1) * block].mean(0) for j in range(nb)])  # [nb, n, d]
  avg_qk = softmax(np.einsum("nd,jnd->nj", last_q.mean(0), avg_k))
  m = (avg_qk + vertical) / 2
  jsd = np.sqrt(0.5 * (avg_qk * np.log(avg_qk / m)).sum(-1)
                + 0.5 * (vertical * np.log(vertical / m)).sum(-1))
  if return_jsd:
    return jsd
  aware = jsd < tau
  n_v[aware] = min_budget
  n_s[aware] = min_budget
  vertical[:, :1] = np.inf
  slash[:, -1:] = np.inf
  bits = np.zeros((n, nb, nb), bool)
  for h in range(n):
    s_top = (nb - 1) - np.argsort(-slash[h], kind="stable")[:min(n_s.max(), nb)]
    s_top[np.arange(len(s_top)) >= n_s[h]] = 0
    v_top = np.argsort(-vertical[h], kind="stable")[:min(n_v.max(), nb)]
    v_top[np.arange(len(v_top)) >= n_v[h]] = 0
    flat = []  # transform_veritcal_slash_idx
    for i in range(nb):
      for v in v_top:
        flat.append(i * nb + v if i >= v else 0)
      for o in s_top:
        f = i * nb + i + o * nb
        flat.append(f if f < nb * nb else 0)
    if aware[h]:
      pad_q = nb * block - t
      avg_q = np.pad(q[:, h], ((0, pad_q), (0, 0))).reshape(nb, block, d).mean(1)
      avg_q[-1] = avg_q[-1] * block / (block - pad_q)
      attn = avg_q / math.sqrt(d) @ avg_k[:, h].T
      attn = np.where(np.tril(np.ones((nb, nb), bool)), attn, -np.inf)
      attn = softmax(attn).reshape(-1)
      idx = np.argsort(-attn, kind="stable")
      idx[np.cumsum(attn[idx]) > gamma * nb] = 0  # score_cover_idx
      flat.extend(idx.tolist())
    for f in np.unique(flat):
      bits[h, f // nb, f % nb] = True
  return expand_blocks(bits, t, block)


# ---- PBS-Attn: pbs_attn/src/{permute_states.py, pbs.py, utils.py} and the kernel's stages
# (src/kernels/permuted_block_sparse_attention.py) in xinghaow99/pbs-attn @8ce8e024 -------


def pbs(q, k, block, segment, threshold, force_first=True, permute=True):
  """Computed pairs [n, t, t] in original order, or None for the dense fallback."""
  t, n, d = q.shape
  if t <= segment:
    return None
  # last_block_attn_sorting
  complete, rem = t // segment, t % segment
  idx = np.broadcast_to(np.arange(t), (n, t)).copy()
  if permute and not (complete == 0 or (complete == 1 and rem == 0)):
    full = complete * segment
    scores = np.einsum("ind,jnd->nij", q[-block:].astype(np.float32),
                       k[:full].astype(np.float32)) / math.sqrt(d)
    avg = softmax(scores).mean(1).reshape(n, complete, segment)
    order = np.argsort(-avg, axis=-1, kind="stable")
    idx[:, :full] = (order + np.arange(0, full, segment)[:, None]).reshape(n, full)
  k_perm = np.stack([k[idx[h], h] for h in range(n)], axis=1)
  # permuted_block_selection (queries not permuted)
  pad = -(-t // block) * block - t
  qp = np.pad(q, ((0, pad), (0, 0), (0, 0)))
  kp = np.pad(k_perm, ((0, pad), (0, 0), (0, 0)))
  key_idx = np.concatenate([idx, np.broadcast_to(np.arange(t, t + pad), (n, pad))], axis=1)
  nb = qp.shape[0] // block
  per_seg = segment // block
  qb, kb = np.arange(nb)[:, None], np.arange(nb)[None, :]
  segment_mask = (qb // per_seg) == (kb // per_seg)
  mask = ~segment_mask & (kb <= qb)
  q_pool = qp.reshape(nb, block, n, d).mean(1)
  k_pool = kp.reshape(nb, block, n, d).mean(1)
  s = np.einsum("ind,jnd->nij", q_pool, k_pool) / math.sqrt(d)
  with np.errstate(invalid="ignore"):
    s = softmax(np.where(mask, s, -np.inf))
  if threshold == 1:
    block_mask = np.broadcast_to(mask, (n, nb, nb)).copy()
  else:
    s = np.nan_to_num(s, nan=0.0)
    order = np.argsort(-s, axis=-1, kind="stable")
    cum = np.cumsum(np.take_along_axis(s, order, -1), -1)
    exceed = cum >= threshold
    first = np.argmax(exceed, -1)[..., None]
    sel_sorted = (np.arange(nb) <= first) & exceed.any(-1, keepdims=True)
    block_mask = np.zeros_like(sel_sorted)
    np.put_along_axis(block_mask, order, sel_sorted, -1)
  if force_first:
    block_mask |= (key_idx.reshape(n, nb, block) == 0).any(-1)[:, None, :]
  block_mask |= segment_mask
  # Kernel: stage 1, earlier segments, selected blocks whole; stage 2, own segment, selected
  # blocks with perm_K <= perm_Q (queries unpermuted: perm_Q = position).
  out = np.zeros((n, t, t), bool)
  for h in range(n):
    for i in range(t):
      seg_start = (i // segment) * segment
      for s_ in range(min(seg_start + segment, t)):
        if not block_mask[h, i // block, s_ // block]:
          continue
        if s_ < seg_start or idx[h, s_] <= i:
          out[h, i, idx[h, s_]] = True
  return out


# ---- AnchorAttention: anchor_attn/src/ops/{anchor_step_1_2_v2.py (step 1),
# get_mask_test.py (step 2), anchor_attn_v4.py (step 3)} and modules/llama/anchor_attention.py
# (the tail) in yuzhouzhang9/Anchor-Attention @fdc74208 ------------------------------------


def anchor(q, k, block, step, theta, tile_m=128, return_coords=False):
  """Computed pairs [n, t, t] of the official (a pair is computed once even where the
  official counts it twice), or the per big block coordinate lists."""
  t, n, d = q.shape
  size = block * step
  pad = t % size
  body = t - pad  # anchor_attn runs on q[:, :-pad] (the tail is dense flash attention)
  scale = 1 / math.sqrt(d)
  log2e = 1.44269504
  out = np.zeros((n, t, t), bool)
  out[:, body:] = causal(t)[body:]
  coords_all = []
  # Step 1 (get_mask_fused_anchor_triton, init_cnt = local_cnt = 1): running max in log2 units.
  m = np.full((n, body), -np.inf)
  for start_m in range(-(-body // tile_m)):
    rows = np.arange(start_m * tile_m, min((start_m + 1) * tile_m, body))
    big = (start_m * tile_m) // size
    init_offset = min(size, (start_m + 1) * tile_m)
    local_offset = max(big * size, 0)
    keys = np.concatenate([np.arange(0, init_offset),
                           np.arange(max(local_offset, init_offset), (big + 1) * size)])
    qk = np.einsum("rnd,snd->nrs", q[rows], k[keys]) * scale * log2e
    qk = np.where(keys[None, None, :] <= rows[None, :, None], qk, -1e6)
    m[:, rows] = qk.max(-1)
    for r in rows:
      out[:, r, keys[keys <= r]] = True
  # Step 2 (get_q_mask_triton): per big block, pooled queries vs candidate keys.
  for g in range(body // size):
    rows = np.arange(g * size, (g + 1) * size)
    q_bar = q[rows].reshape(step, block, n, d).mean(1)  # [step, n, d]
    a_bar = m[:, rows].reshape(n, step, block).mean(-1)  # [n, step]
    coords = []
    for h in range(n):
      sel = []
      for i in range(block, g * size - block, block):
        qk = q_bar[:, h] @ k[i:i + block, h].T * scale * log2e  # [step, block]
        hit = ((qk + theta * log2e) >= a_bar[h][:, None]).any(0)
        sel.extend((i + np.nonzero(hit)[0]).tolist())
      coords.append(sel)
      out[h, g * size:(g + 1) * size][:, sel] = True  # Step 3: no mask (keys < g * size).
    coords_all.append(coords)
  return coords_all if return_coords else out
