"""Attention-influence profiling (MoA): how much the loss changes if an entry is dropped.

For softmax row i with probabilities A_i. and G = dL/dA, masking A_ij and
renormalising the rest changes the loss by, to first order,

    E_ij = -A_ij (G_ij - sum_n G_in A_in) / (1 - A_ij)

(exact for a single entry of a linear loss; row 0, whose only entry is A_00 = 1,
uses -G_00 A_00 like the reference). With o_i = sum_j A_ij v_j we have
G_ij = dO_i . v_j and sum_n G_in A_in = dO_i . o_i, so E comes from q, k, v, o
and dO alone, one [block, L] query strip of one head at a time (lax.map over
heads and query blocks): no head's L x L matrix is ever held whole.

Two aggregates per (layer, KV head), summed over the KV head's query heads,
over samples, then divided by the sample count:
  blocks    [nq, nk]  sum of |E| over block x block tiles (the paper's statistic; heatmaps);
  distance  [L]       sum of |E_ij| over pairs with i - j = d and j >= sink. A
                      window-w rule with `sink` sinks drops exactly the pairs
                      with d >= w and j >= sink, so its cost is sum_{d >= w}
                      distance[d]: token-exact, like prefill and decode.

Legend: b batch, t length, n query heads, k kv heads, g group, h head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsity_jax.layers import moa as moa_layer
from sparsity_jax.models.transformer import TransformerLM


@dataclasses.dataclass
class Influence:
  """Profile at one length: [L, K, nq, nk] block sums and [L, K, N] distance sums."""

  length: int
  block_size: int
  sink: int
  blocks: np.ndarray
  distance: np.ndarray
  num_samples: int

  def save(self, path: str) -> None:
    """Writes ``path`` whole or not at all (a Ctrl-C mid-save leaves no file there)."""
    tmp = path + ".partial"  # Not *.npz: globs for influence_*.npz never see it.
    with open(tmp, "wb") as f:
      np.savez(f, length=self.length, block_size=self.block_size, sink=self.sink,
               blocks=self.blocks, distance=self.distance, num_samples=self.num_samples)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "Influence":
    with np.load(path) as z:
      return cls(int(z["length"]), int(z["block_size"]), int(z["sink"]), z["blocks"],
                 z["distance"], int(z["num_samples"]))


def head_influence(q_th, k_th, v_th, o_th, do_th, *, block_size: int, sink: int,
                   take_abs: bool = True):
  """One head of one sequence: (blocks [nq, nk], distance [t]).

  t must be a multiple of block_size. Computed one query strip at a time.
  """
  t, h = q_th.shape
  nq = t // block_size
  scale = h ** -0.5
  q_th, k_th, v_th, o_th, do_th = (x.astype(jnp.float32) for x in (q_th, k_th, v_th, o_th,
                                                                   do_th))
  col = jnp.arange(t)

  def strip(i):
    rows = i * block_size + jnp.arange(block_size)
    q = jax.lax.dynamic_slice_in_dim(q_th, i * block_size, block_size)
    do = jax.lax.dynamic_slice_in_dim(do_th, i * block_size, block_size)
    o = jax.lax.dynamic_slice_in_dim(o_th, i * block_size, block_size)
    causal = col[None, :] <= rows[:, None]
    logits = jnp.where(causal, q @ k_th.T * scale, -jnp.inf)
    a = jax.nn.softmax(logits, axis=-1)
    g = do @ v_th.T  # G_ij = dO_i . v_j
    delta = jnp.sum(do * o, axis=-1, keepdims=True)  # sum_n G_in A_in = dO_i . o_i
    e = -a * (g - delta) / jnp.maximum(1.0 - a, 1e-6)
    e = jnp.where(rows[:, None] == 0, -g * a, e)
    e = jnp.where(causal, e, 0.0)
    if take_abs:
      e = jnp.abs(e)
    blocks = e.reshape(block_size, nq, block_size).sum(axis=(0, 2))
    dist = rows[:, None] - col[None, :]
    keep = causal & (col[None, :] >= sink)
    by_distance = jax.ops.segment_sum(jnp.where(keep, e, 0.0).ravel(),
                                      jnp.clip(dist, 0, t - 1).ravel(), num_segments=t)
    return blocks, by_distance

  blocks, by_distance = jax.lax.map(strip, jnp.arange(nq))
  return blocks, by_distance.sum(axis=0)


@functools.partial(jax.jit, static_argnames=("block_size", "sink", "take_abs"))
def layer_influence(q_btnh, k_btkh, v_btkh, o_btnh, do_btnh, *, block_size: int, sink: int,
                    take_abs: bool = True):
  """Summed over the batch and each KV head's query heads: ([k, nq, nk], [k, t])."""
  b, t, n, h = q_btnh.shape
  kh = k_btkh.shape[2]
  g = n // kh
  # One (sequence, query head) at a time; its KV head is n // g (consecutive grouping).
  heads = jnp.arange(b * n)

  def one(idx):
    bi, ni = idx // n, idx % n
    return head_influence(q_btnh[bi, :, ni], k_btkh[bi, :, ni // g], v_btkh[bi, :, ni // g],
                          o_btnh[bi, :, ni], do_btnh[bi, :, ni], block_size=block_size,
                          sink=sink, take_abs=take_abs)

  blocks, dist = jax.lax.map(one, heads)
  blocks = blocks.reshape(b, kh, g, *blocks.shape[1:]).sum(axis=(0, 2))
  dist = dist.reshape(b, kh, g, t).sum(axis=(0, 2))
  return blocks, dist


def profiling_model(model: TransformerLM, remat: bool = False) -> TransformerLM:
  """The same parameters with the 'moa_profile' core (dense, exposes q, k, v, o, dO);
  ``remat`` recomputes each block in the backward pass (memory for one layer's attention
  matrix instead of all of them: SmolLM2 at 4k tokens needs ~0.6 GB instead of ~18 GB)."""
  cfg = dataclasses.replace(model.cfg, attention={"kind": "moa_profile"}, scan_layers=False,
                            remat=remat)
  if model.cfg.scan_layers:
    raise ValueError("profiling needs a model built with scan_layers=False")
  prof = TransformerLM(cfg, rngs=nnx.Rngs(0))
  nnx.update(prof, nnx.state(model, nnx.Param))
  return prof


def _cores(model):
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, moa_layer.MoAProfileAttention)]


def response_loss(logits_btv, targets_bt, mask_bt):
  """Mean cross-entropy over the positions where mask_bt is set."""
  logp = jax.nn.log_softmax(logits_btv, axis=-1)
  nll = -jnp.take_along_axis(logp, targets_bt[..., None], axis=-1)[..., 0]
  mask = mask_bt.astype(jnp.float32)
  return jnp.sum(nll * mask) / jnp.maximum(mask.sum(), 1.0)


@functools.partial(jax.jit, static_argnums=(0,))
def _captures(graphdef, probes, rest, inputs_bt, targets_bt, mask_bt):
  def loss_fn(probes):
    model = nnx.merge(graphdef, probes, rest)
    loss = response_loss(model(inputs_bt), targets_bt, mask_bt)
    return loss, [c.qkvo.get_value() for c in _cores(model)]

  (loss, qkvo), d_probes = jax.value_and_grad(loss_fn, has_aux=True)(probes)
  return loss, qkvo, d_probes


def capture(prof: TransformerLM, tokens_bt, mask_bt):
  """(loss, [(q, k, v, o, dO) per layer]) for tokens [b, t+1] and a response mask [b, t+1].

  The mask marks which *target* tokens count in the loss (position j scores token j).
  """
  tokens_bt = jnp.asarray(tokens_bt, jnp.int32)
  inputs, targets = tokens_bt[:, :-1], tokens_bt[:, 1:]
  mask = jnp.asarray(mask_bt)[:, 1:]
  b, t = inputs.shape
  cfg = prof.cfg
  for core in _cores(prof):
    core.probe.set_value(jnp.zeros((b, t, cfg.num_heads, cfg.head_dim), jnp.float32))
  # The capture slots travel with the differentiated probes so the cores may write them
  # inside the gradient trace (their own gradient is empty).
  graphdef, probes, rest = nnx.split(
      prof, nnx.Any(moa_layer.ProfileProbe, moa_layer.ProfileCapture), ...)
  loss, qkvo, d_probes = _captures(graphdef, probes, rest, inputs, targets, mask)
  holder = nnx.merge(graphdef, d_probes, rest)
  dos = [c.probe.get_value() for c in _cores(holder)]
  return float(loss), [tuple(x) + (do,) for x, do in zip(qkvo, dos)]


def profile_length(model: TransformerLM, samples, *, length: int, block_size: int = 64,
                   sink: int = 64, batch_size: int = 1, take_abs: bool = True,
                   remat: bool = False) -> Influence:
  """Average influence over calibration samples of one length level.

  Args:
    model: a trained causal TransformerLM (any core; its parameters are used densely).
    samples: list of (tokens [length + 1], response mask [length + 1]) pairs.
    length: input length N (a multiple of block_size).
    block_size: aggregation block (64 in the paper).
    sink: sink tokens every rule keeps (excluded from the distance statistic).
    remat: recompute blocks in the backward pass (long lengths; same result).
  """
  if not samples:
    raise ValueError(f"no calibration samples of length {length}: run `launch/moa.py "
                     "calibrate` (or pass samples) before profiling")
  if length % block_size:
    raise ValueError(f"profile length {length} must be a multiple of block_size={block_size}")
  for tokens, mask in samples:
    if len(tokens) != length + 1 or len(mask) != length + 1:
      raise ValueError(f"calibration samples for length {length} must have {length + 1} "
                       f"tokens, got {len(tokens)}")
  prof = profiling_model(model, remat=remat)
  cfg = model.cfg
  nq = length // block_size
  blocks = np.zeros((cfg.num_layers, cfg.num_kv_heads, nq, nq))
  dist = np.zeros((cfg.num_layers, cfg.num_kv_heads, length))
  for start in range(0, len(samples), batch_size):
    chunk = samples[start:start + batch_size]
    tokens = np.stack([s[0] for s in chunk])
    mask = np.stack([s[1] for s in chunk])
    _, layers = capture(prof, tokens, mask)
    for l, (q, k, v, o, do) in enumerate(layers):
      bl, di = layer_influence(q, k, v, o, do, block_size=block_size, sink=sink,
                               take_abs=take_abs)
      blocks[l] += np.asarray(bl)
      dist[l] += np.asarray(di)
  n = len(samples)
  return Influence(length, block_size, sink, blocks / n, dist / n, n)
