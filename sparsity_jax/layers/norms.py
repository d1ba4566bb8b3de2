"""Normalisation layers."""

import jax
import jax.numpy as jnp
from flax import nnx

from sparsity_jax import axes


class RMSNorm(nnx.Module):
  """Root-mean-square norm with a learned scale, computed in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axes.ACT_EMBED,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale.get_value().astype(jnp.float32)).astype(x.dtype)
