"""Training objectives: ``loss(model, batch, rng) -> (loss_sum, weight_sum)``.

Both return sums so that the train step and evaluation average them the same way
(``loss = loss_sum / weight_sum``), whatever the batch sharding.

Legend: b batch, t length, v vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from sparsity_jax.data import tokenizer

Objective = Callable[..., tuple[jax.Array, jax.Array]]


def causal_lm(model, batch: dict[str, jax.Array], rng: jax.Array):
  """Next-token cross-entropy over ``targets`` (weighted by ``weights`` if present)."""
  del rng
  logits_btv = model(batch["inputs"])
  ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, batch["targets"])
  weights_bt = batch.get("weights")
  weights_bt = jnp.ones_like(ce_bt) if weights_bt is None else weights_bt.astype(jnp.float32)
  return jnp.sum(ce_bt * weights_bt), jnp.sum(weights_bt)


def mask_tokens(tokens_bt: jax.Array, rng: jax.Array, *, eps: float = 1e-3,
                mask_id: int = tokenizer.MASK_ID):
  """The forward process of a masked diffusion LM (LLaDA).

  Samples t ~ U(eps, 1] per sequence (t = 1 - (1 - eps) u) and replaces each token by the
  mask token independently with probability t. Returns (noisy tokens, masked, t [b]).
  """
  t_rng, mask_rng = jax.random.split(rng)
  b, length = tokens_bt.shape
  t_b = 1.0 - (1.0 - eps) * jax.random.uniform(t_rng, (b,))
  masked_bt = jax.random.uniform(mask_rng, (b, length)) < t_b[:, None]
  return jnp.where(masked_bt, mask_id, tokens_bt), masked_bt, t_b


def masked_diffusion(model, batch: dict[str, jax.Array], rng: jax.Array):
  """LLaDA's objective: cross-entropy on masked tokens weighted by 1/t.

  ``loss_sum / weight_sum`` with weight = number of tokens is the negative ELBO per
  token, an upper bound on the model's NLL in nats per token (so bits/byte is a bound).
  The clean sequence is ``inputs``; ``targets`` are unused (no shift: the model predicts
  the token at its own position).
  """
  tokens_bt = batch["inputs"]
  noisy_bt, masked_bt, t_b = mask_tokens(tokens_bt, rng)
  logits_btv = model(noisy_bt)
  ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, tokens_bt)
  loss_bt = jnp.where(masked_bt, ce_bt / t_b[:, None], 0.0)
  return jnp.sum(loss_bt), jnp.asarray(tokens_bt.size, jnp.float32)


OBJECTIVES: dict[str, Objective] = {"causal_lm": causal_lm, "masked_diffusion": masked_diffusion}


def get(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"config.objective={name!r}; use one of {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]
