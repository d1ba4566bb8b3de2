"""Rotary position embeddings (the "rotate half" convention of Llama/Hugging Face)."""

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
  """Inverse frequencies [h/2] for rotary embeddings."""
  if head_dim % 2:
    raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
  """Rotates pairs (i, i + h/2) of each head by angle position * freq_i.

  Args:
    x_btnh: queries or keys [b, t, n, h].
    positions_bt: absolute integer positions [b, t] (any integers: permuted or cached
      tokens keep their original positions).
    theta: RoPE base.
  """
  head_dim = x_btnh.shape[-1]
  inv_freq = rope_frequencies(head_dim, theta)
  angles_bth = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [b, t, h/2]
  sin = jnp.sin(angles_bth)[:, :, None, :]
  cos = jnp.cos(angles_bth)[:, :, None, :]
  x32 = x_btnh.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_btnh.dtype)
