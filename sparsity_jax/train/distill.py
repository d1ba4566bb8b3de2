"""Distillation from a dense teacher: SquareHead (Kurtic et al. 2023, "Sparse Fine-tuning
for Inference Acceleration of Large Language Models").

  L = h_ce * CE + h_kl * T^2 * KL(p_teacher^T || p_student^T) + h_sq * sum_l NMSE_l,
  NMSE_l = mean((f_l^s - f_l^t)^2) / (mean((f_l^t)^2) + eps)

over the hidden states of every block (HF's ``hidden_states[1:]``: block outputs, the last
one after the final norm; :meth:`TransformerLM.forward_with_hidden`), means over the
tokens that count (``weights``) and features, eps = bfloat16's machine epsilon, as
IST-DASLab/SparseFinetuning ``KnowledgeDistillation`` (scripts/train/train_sparse.py).
The paper's recipe is h_ce = h_sq = 1, h_kl = 0, T = 1 (``config.distill``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparsity_jax.errors import UserError

EPS = float(jnp.finfo(jnp.bfloat16).eps)


@dataclasses.dataclass(frozen=True)
class Distill:
  """``config.distill``: loss weights and temperature; inactive when h_sq = h_kl = 0."""

  h_ce: float = 1.0
  h_sq: float = 0.0
  h_kl: float = 0.0
  temperature: float = 1.0

  def __post_init__(self):
    for name in ("h_ce", "h_sq", "h_kl"):
      if float(getattr(self, name)) < 0:
        raise UserError(f"config.distill.{name}={getattr(self, name)} must be >= 0")
    if float(self.temperature) <= 0:
      raise UserError(f"config.distill.temperature={self.temperature} must be > 0")

  @property
  def active(self) -> bool:
    return self.h_sq > 0 or self.h_kl > 0

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any] | None) -> "Distill":
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise UserError(f"config.distill has unknown fields {unknown}; known: {sorted(known)}")
    return cls(**{k: float(v) for k, v in values.items()})


def normalized_mse(student: jax.Array, teacher: jax.Array, weights_bt: jax.Array) -> jax.Array:
  """Per layer: mean((s - t)^2) / (mean(t^2) + eps) over counted tokens and features.

  student, teacher [L, b, t, e]; weights_bt [b, t] (0 / 1). Returns [L].
  """
  s = student.astype(jnp.float32)
  t = teacher.astype(jnp.float32)
  w = weights_bt.astype(jnp.float32)[None, :, :, None]
  count = jnp.maximum(jnp.sum(w) * s.shape[-1], 1.0)
  mse = jnp.sum(jnp.square(s - t) * w, axis=(1, 2, 3)) / count
  power = jnp.sum(jnp.square(t) * w, axis=(1, 2, 3)) / count
  return mse / (power + EPS)


def kl_divergence(student_logits: jax.Array, teacher_logits: jax.Array, weights_bt: jax.Array,
                  temperature: float) -> jax.Array:
  """Token-averaged KL(teacher || student) of the temperature-T softmaxes, times T^2."""
  t = float(temperature)
  log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  kl_bt = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  w = weights_bt.astype(jnp.float32)
  return jnp.sum(kl_bt * w) / jnp.maximum(jnp.sum(w), 1.0) * t * t


def squarehead_loss(model, batch: dict[str, jax.Array], teacher_logits, teacher_hidden,
                    cfg: Distill):
  """(loss_sum, weight, parts) in the objectives' convention: loss_sum / weight is L;
  ``parts`` holds the token-mean CE, KL and the summed NMSE (metrics)."""
  logits, hidden = model.forward_with_hidden(batch["inputs"])
  ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  w_bt = batch.get("weights")
  w_bt = jnp.ones_like(ce_bt) if w_bt is None else w_bt.astype(jnp.float32)
  weight = jnp.sum(w_bt)
  ce = jnp.sum(ce_bt * w_bt) / jnp.maximum(weight, 1.0)
  nmse = jnp.sum(normalized_mse(hidden, jax.lax.stop_gradient(teacher_hidden), w_bt))
  total = cfg.h_ce * ce + cfg.h_sq * nmse
  parts = {"ce": ce, "nmse": nmse}
  if cfg.h_kl > 0:
    kl = kl_divergence(logits, jax.lax.stop_gradient(teacher_logits), w_bt, cfg.temperature)
    total = total + cfg.h_kl * kl
    parts["kl"] = kl
  return total * jnp.maximum(weight, 1.0), weight, parts
