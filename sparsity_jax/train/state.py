"""Train state: created abstractly, then jit-initialised straight into its shardings."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from sparsity_jax import parallel


@flax.struct.dataclass
class TrainState:
  """Everything a training run needs to continue, as one pytree.

  ``params`` are the trainable nnx Params; ``model_state`` holds the model's other
  variables (e.g. k-means centroids of routing attention, updated by the step but not by
  gradients). The model's structure (``graphdef``) is static and kept outside.
  """

  step: jax.Array
  params: nnx.State
  model_state: nnx.State
  opt_state: optax.OptState


def split_model(model: nnx.Module):
  """graphdef, Params, every other variable (intermediates excluded)."""
  return nnx.split(model, nnx.Param, nnx.Not(nnx.Intermediate))


def create_train_state(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                       mesh: Mesh, rules) -> tuple[Any, TrainState, Any]:
  """Returns (graphdef, state, state_shardings) without materialising on one device.

  ``make_model`` must build the model from its own seeded ``nnx.Rngs`` so that the
  initial parameters depend only on the config, never on the mesh.
  """

  def init() -> TrainState:
    graphdef, params, rest = split_model(make_model())
    del graphdef
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=rest,
                      opt_state=tx.init(params))

  graphdef = split_model(nnx.eval_shape(make_model))[0]
  abstract = jax.eval_shape(init)
  shardings = parallel.state_shardings(abstract, mesh, rules)
  state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state, shardings


def abstract_with_shardings(state_like: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings (restore targets for orbax)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_like, shardings)
