"""Plain-jnp decode attention over per-head ragged KV caches: the test oracle.

Einsum legend: b batch, t query tokens (1 for one-token decode), n query heads,
k kv heads, g query heads per kv head (n = k * g), c cache slots, d head dim.

Element rule (shared by every backend): query (b, t) of a head in kv group k may
read slot c of that kv head iff

    c < lengths[b, k]                                       (ragged lengths)
and, when positions are given (token-exact window + sinks, e.g. MoA):
    kv_pos <= q_pos and (q_pos - kv_pos < window[k] or kv_pos < sinks[k])

with q_pos = q_positions[b, t] and kv_pos = kv_positions[b, k, c] (absolute
positions; keys are cached after RoPE, so slot order does not matter). A row
with no readable slot (e.g. an empty cache) outputs zeros, never NaN. A slot no
query reads never reaches the output, even holding NaN or inf (every backend
zeroes unread values before p @ v).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Large finite negative, never -inf (so masked rows never produce inf - inf).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def allowed(slot, length, q_pos=None, kv_pos=None, window=None, sink=None):
  """The element rule on broadcastable operands (see the module docstring)."""
  ok = slot < length
  if q_pos is not None:
    ok = ok & (kv_pos <= q_pos) & ((q_pos - kv_pos < window) | (kv_pos < sink))
  return ok


def decode_attention_ref(q, k, v, lengths, *, q_positions=None, kv_positions=None,
                         window=None, sinks=None, scale=None):
  """Dense masked attention over the cache, float32 math.

  Args:
    q: [b, t, n, d] queries (after RoPE).
    k, v: [b, k, c, d] per-kv-head caches.
    lengths: int [b, k] valid slots per (batch, kv head); slots >= length are ignored.
    q_positions: optional int [b, t]; kv_positions: optional int [b, k, c].
    window, sinks: int [k] (used with positions; default unbounded / 0).
    scale: logit scale, default 1/sqrt(d).

  Returns:
    [b, t, n, d] in q.dtype.
  """
  b, t, n, d = q.shape
  kh, c = k.shape[1], k.shape[2]
  g = n // kh
  scale = d ** -0.5 if scale is None else scale
  qg = q.reshape(b, t, kh, g, d).astype(jnp.float32)
  logits = jnp.einsum('btkgd,bkcd->bkgtc', qg, k.astype(jnp.float32)) * scale
  slot = jnp.arange(c)[None, None, None, None, :]
  length = lengths[:, :, None, None, None]
  if q_positions is None:
    ok = allowed(slot, length)
  else:
    ok = allowed(slot, length, q_positions[:, None, None, :, None],
                 kv_positions[:, :, None, None, :], window[None, :, None, None, None],
                 sinks[None, :, None, None, None])
  logits = jnp.where(ok, logits, MASK_VALUE)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.where(ok, jnp.exp(logits - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  # Slots no query reads are zeroed, so a NaN / inf there never reaches p @ v as 0 * NaN.
  read = jnp.any(jnp.broadcast_to(ok, logits.shape), axis=(2, 3))[..., None]  # [b, k, c, 1]
  v = jnp.where(read, v.astype(jnp.float32), 0.0)
  out = jnp.einsum('bkgtc,bkcd->btkgd', p / jnp.where(l == 0.0, 1.0, l), v)
  return out.reshape(b, t, n, d).astype(q.dtype)
