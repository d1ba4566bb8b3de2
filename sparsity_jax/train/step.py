"""The pure train and eval steps: ``train_step(state, batch) -> (state, metrics)``.

Legend: b batch, t length, v vocab.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparsity_jax.layers.attention import AuxLoss
from sparsity_jax.train.state import TrainState


def token_losses(model: nnx.Module, batch: dict[str, jax.Array]):
  """Per-token cross-entropy [b, t] and weights [b, t] (1 where a target counts)."""
  logits_btv = model(batch["inputs"])
  ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, batch["targets"])
  weights_bt = batch.get("weights")
  if weights_bt is None:
    weights_bt = jnp.ones_like(ce_bt)
  return ce_bt, weights_bt.astype(jnp.float32)


def global_norm(tree) -> jax.Array:
  """L2 norm over all leaves, accumulated in float32."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule):
  """Builds the pure step; the caller jits it once with shardings and donation."""

  def loss_fn(params, model_state, batch):
    model = nnx.merge(graphdef, params, model_state)
    ce_bt, w_bt = token_losses(model, batch)
    loss = jnp.sum(ce_bt * w_bt) / jnp.maximum(jnp.sum(w_bt), 1.0)
    aux = sum((jnp.sum(x) for x in jax.tree.leaves(nnx.pop(model, AuxLoss))),
              jnp.zeros((), jnp.float32))
    new_model_state = nnx.state(model, nnx.Not(nnx.Param))
    return loss + aux, (loss, aux, new_model_state, jnp.sum(w_bt))

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    grads, (loss, aux, model_state, tokens) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.model_state, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "bits_per_byte": loss / math.log(2.0),
        "aux_loss": aux,
        "grad_norm": global_norm(grads),
        "param_norm": global_norm(params),
        "learning_rate": schedule(state.step),
        "tokens": tokens,
    }
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                              opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(graphdef):
  """eval_step(params, model_state, batch) -> {'loss_sum', 'tokens'} (sums, not means)."""

  def eval_step(params, model_state, batch):
    model = nnx.merge(graphdef, params, model_state)
    model.eval()  # Frozen stateful layers (e.g. no k-means updates at eval).
    ce_bt, w_bt = token_losses(model, batch)
    return {"loss_sum": jnp.sum(ce_bt * w_bt), "tokens": jnp.sum(w_bt)}

  return eval_step
