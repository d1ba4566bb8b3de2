"""Feed-forward block."""

import jax
import jax.numpy as jnp
from flax import nnx

from sparsity_jax import axes, parallel
from sparsity_jax.sparsity import masks


class SwiGLU(nnx.Module):
  """down(silu(x @ gate) * (x @ up)). Legend: b batch, t length, e embed, f mlp."""

  def __init__(self, d_model: int, mlp_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.dtype = dtype
    self.gate = nnx.Param(init(rngs.params(), (d_model, mlp_dim), param_dtype),
                          logical_axes=(axes.EMBED, axes.MLP))
    self.up = nnx.Param(init(rngs.params(), (d_model, mlp_dim), param_dtype),
                        logical_axes=(axes.EMBED, axes.MLP))
    self.down = nnx.Param(init(rngs.params(), (mlp_dim, d_model), param_dtype),
                          logical_axes=(axes.MLP, axes.EMBED))

  def __call__(self, x_bte: jax.Array) -> jax.Array:
    return self.project_down(self.hidden(x_bte))

  def hidden(self, x_bte: jax.Array) -> jax.Array:
    """silu(x @ gate) * (x @ up) [b, t, f]: the input of ``down``."""
    cast = lambda name: masks.weight(self, name).astype(self.dtype)  # Masked when sparse.
    gate_btf = jnp.einsum("bte,ef->btf", x_bte, cast("gate"))
    up_btf = jnp.einsum("bte,ef->btf", x_bte, cast("up"))
    return parallel.constrain(jax.nn.silu(gate_btf) * up_btf,
                              (axes.BATCH, axes.LENGTH, axes.ACT_MLP))

  def project_down(self, h_btf: jax.Array) -> jax.Array:
    return jnp.einsum("btf,fe->bte", h_btf, masks.weight(self, "down").astype(self.dtype))
