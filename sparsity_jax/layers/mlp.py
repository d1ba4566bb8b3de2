"""Feed-forward block."""

import jax
import jax.numpy as jnp
from flax import nnx

from sparsity_jax import axes, parallel


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
    cast = lambda p: p.get_value().astype(self.dtype)
    gate_btf = jnp.einsum("bte,ef->btf", x_bte, cast(self.gate))
    up_btf = jnp.einsum("bte,ef->btf", x_bte, cast(self.up))
    h_btf = parallel.constrain(jax.nn.silu(gate_btf) * up_btf,
                               (axes.BATCH, axes.LENGTH, axes.ACT_MLP))
    return jnp.einsum("btf,fe->bte", h_btf, cast(self.down))
