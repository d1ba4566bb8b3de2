"""Rotary position embeddings (the "rotate half" convention of Llama/Hugging Face).

Optional frequency scaling (``scaling``, the ``rope_scaling`` dict of a Hugging Face
config) stretches the context of a pretrained model:

  {"rope_type": "linear", "factor": f}: every frequency / f.
  {"rope_type": "llama3", "factor": f, "low_freq_factor": l, "high_freq_factor": hf,
   "original_max_position_embeddings": L}: wavelengths above L / l are divided by f,
   those below L / hf are kept, and the band in between is interpolated smoothly
   (Llama 3.1+).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

ROPE_TYPES = ("default", "linear", "llama3")
_REQUIRED = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings")}


def scaling_type(scaling: Mapping[str, Any] | None) -> str:
  """The rope_type of a scaling dict ("default" for None); raises on unknown or incomplete.

  ``scaling`` (here and below) is a mapping or a tuple of (key, value) pairs.
  """
  if not scaling:
    return "default"
  scaling = dict(scaling)  # A mapping or (key, value) pairs.
  # Older Hugging Face configs name the key "type" instead of "rope_type".
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: {ROPE_TYPES}")
  missing = [k for k in _REQUIRED[kind] if scaling.get(k) is None]
  if missing:
    raise ValueError(f"rope_scaling of type {kind!r} lacks {missing}: {dict(scaling)}")
  if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
    raise ValueError(f"rope_scaling llama3 needs high_freq_factor > low_freq_factor: "
                     f"{dict(scaling)}")
  return kind


def rope_frequencies(head_dim: int, theta: float,
                     scaling: Mapping[str, Any] | None = None) -> jax.Array:
  """Inverse frequencies [h/2] for rotary embeddings, optionally scaled."""
  if head_dim % 2:
    raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  kind = scaling_type(scaling)
  scaling = dict(scaling or {})
  if kind == "linear":
    inv_freq = inv_freq / float(scaling["factor"])
  elif kind == "llama3":
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    # 0 for wavelengths above old_len / low (fully scaled), 1 below old_len / high (kept).
    smooth = jnp.clip((old_len / wavelen - low) / (high - low), 0.0, 1.0)
    inv_freq = (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
  return inv_freq


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float,
               scaling: Mapping[str, Any] | None = None) -> jax.Array:
  """Rotates pairs (i, i + h/2) of each head by angle position * freq_i.

  Args:
    x_btnh: queries or keys [b, t, n, h].
    positions_bt: absolute integer positions [b, t] (any integers: permuted or cached
      tokens keep their original positions).
    theta: RoPE base.
    scaling: optional frequency scaling (see the module docstring).
  """
  head_dim = x_btnh.shape[-1]
  inv_freq = rope_frequencies(head_dim, theta, scaling)
  angles_bth = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [b, t, h/2]
  sin = jnp.sin(angles_bth)[:, :, None, :]
  cos = jnp.cos(angles_bth)[:, :, None, :]
  x32 = x_btnh.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_btnh.dtype)
