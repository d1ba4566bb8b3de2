"""The pure train and eval steps: ``train_step(state, batch) -> (state, metrics)``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparsity_jax.layers.attention import AuxLoss
from sparsity_jax.sparsity import masks as masks_lib
from sparsity_jax.train import distill as distill_lib
from sparsity_jax.train import objectives
from sparsity_jax.train.state import TrainState


def global_norm(tree) -> jax.Array:
  """L2 norm over all leaves, accumulated in float32."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def step_rng(seed: int, step: jax.Array) -> jax.Array:
  """Randomness of a step (e.g. diffusion masking): a function of (seed, step) only, so a
  resumed run draws exactly what an uninterrupted one would."""
  return jax.random.fold_in(jax.random.key(seed), step)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, *,
                    objective: str = "causal_lm", seed: int = 0, mask_schedule=None,
                    distill=None):
  """Builds the pure step; the caller jits it once with shardings and donation.

  ``mask_schedule`` (a sparsity.training.MaskSchedule) recomputes the weight masks every
  step and routes the gradients through its weight flow (ste / SR-STE / MDGF).
  ``distill`` (an active train.distill.Distill) makes the step
  ``train_step(state, batch, teacher_params)``: the loss is SquareHead's against the dense
  model of ``teacher_params`` (the same architecture, every weight mask off).
  """
  loss_terms = objectives.get(objective)
  if distill is not None and objective != "causal_lm":
    raise ValueError(f"config.distill needs config.objective='causal_lm' (got {objective!r})")

  def loss_fn(params, model_state, batch, rng, teacher=None):
    # Fresh Variable objects at this trace level, so layers may update their state here.
    model_state = jax.tree.map(lambda x: x, model_state)
    model = nnx.merge(graphdef, params, model_state)
    parts = {}
    if teacher is None:
      loss_sum, weight = loss_terms(model, batch, rng)
    else:
      loss_sum, weight, parts = distill_lib.squarehead_loss(model, batch, *teacher, distill)
    loss = loss_sum / jnp.maximum(weight, 1.0)
    aux = sum((jnp.sum(x) for x in jax.tree.leaves(nnx.pop(model, AuxLoss))),
              jnp.zeros((), jnp.float32))
    new_model_state = nnx.state(model, nnx.Not(nnx.Param))
    return loss + aux, (loss, aux, new_model_state, weight, parts)

  def train_step(state: TrainState, batch: dict[str, jax.Array], teacher_params=None):
    rng = step_rng(seed, state.step)
    teacher = None
    if distill is not None:
      model = nnx.merge(graphdef, teacher_params, masks_lib.all_kept(state.model_state))
      model.eval()
      teacher = jax.lax.stop_gradient(model.forward_with_hidden(batch["inputs"]))
    if mask_schedule is None:
      grads, (loss, aux, model_state, tokens, parts) = jax.grad(loss_fn, has_aux=True)(
          state.params, state.model_state, batch, rng, teacher)
    else:
      prepared = mask_schedule.prepare(state.params, state.step, state.model_state)

      def flowed_loss(params, model_state, batch, rng):
        return loss_fn(*mask_schedule.forward_state(params, model_state, prepared), batch, rng,
                       teacher)

      grads, (loss, aux, model_state, tokens, parts) = jax.grad(flowed_loss, has_aux=True)(
          state.params, state.model_state, batch, rng)
    dense_grads = grads
    if mask_schedule is not None:
      grads = mask_schedule.update_grads(grads, prepared)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if mask_schedule is not None:  # The state's masks are those of its weights (as the
      # official forward recomputes them at inference), or RigL's updated ones.
      params, opt_state, keeps = mask_schedule.after_update(params, opt_state, dense_grads,
                                                            prepared, state.step)
      model_state = mask_schedule.store_masks(model_state, keeps)
    metrics = {
        "loss": loss,
        # Bits per token (CE only when distilling): the loop divides by bytes per token.
        "bits_per_byte": parts.get("ce", loss) / math.log(2.0),
        "aux_loss": aux,
        "grad_norm": global_norm(grads),
        "param_norm": global_norm(params),
        "learning_rate": schedule(state.step),
        "tokens": tokens,
        **{f"distill_{k}": v for k, v in parts.items()},
    }
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                              opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, *, objective: str = "causal_lm", seed: int = 0):
  """eval_step(params, model_state, batch, index) -> {'loss_sum', 'tokens'} (sums).

  ``index`` (the batch's position in the validation stream) seeds stochastic objectives,
  so every evaluation of a checkpoint sees the same noise.
  """
  loss_terms = objectives.get(objective)

  def eval_step(params, model_state, batch, index):
    model = nnx.merge(graphdef, params, model_state)
    model.eval()  # Frozen stateful layers (e.g. no k-means updates at eval).
    loss_sum, weight = loss_terms(model, batch, step_rng(seed + 1, index))
    return {"loss_sum": loss_sum, "tokens": weight}

  return eval_step
