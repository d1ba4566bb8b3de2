"""Validation of Pareto plans at an unseen longer length, and plan heatmaps."""

from __future__ import annotations

import dataclasses
import os
import tempfile

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsity_jax.models.transformer import TransformerLM
from sparsity_jax.moa import plan as plan_lib
from sparsity_jax.moa.profile import response_loss


def with_plan(model: TransformerLM, plan_path: str, **attention) -> TransformerLM:
  """The same parameters with the MoA core reading ``plan_path``."""
  cfg = dataclasses.replace(model.cfg, scan_layers=False,
                            attention={"kind": "moa", "plan": plan_path, **attention})
  moa_model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  nnx.update(moa_model, nnx.state(model, nnx.Param))
  return moa_model


def loss_on(model: TransformerLM, samples, batch_size: int = 4) -> float:
  """Response-masked mean cross-entropy over (tokens [t+1], mask [t+1]) samples."""
  total, count = 0.0, 0.0
  forward = nnx.jit(lambda m, x: m(x))
  for start in range(0, len(samples), batch_size):
    tokens = jnp.asarray(np.stack([s[0] for s in samples[start:start + batch_size]]))
    mask = jnp.asarray(np.stack([s[1] for s in samples[start:start + batch_size]]))[:, 1:]
    weight = float(mask.sum())
    total += float(response_loss(forward(model, tokens[:, :-1]), tokens[:, 1:], mask)) * weight
    count += weight
  return total / max(count, 1.0)


def validate(model: TransformerLM, plans, samples, *, length: int,
             **attention) -> tuple[int, list[float]]:
  """(index of the best plan, response losses at ``length``) over ``plans``."""
  if not plans:
    raise ValueError("no plans to validate: run `launch/moa.py search` first")
  if not samples:
    raise ValueError(f"empty validation set at length {length}")
  losses = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, plan in enumerate(plans):
      plan.check_length(length)
      path = os.path.join(tmp, f"plan_{i}.json")
      plan_lib.save_plan(plan, path)
      losses.append(loss_on(with_plan(model, path, **attention), samples))
  return int(np.argmin(losses)), losses


def heatmap(plan: plan_lib.Plan, length: int, path: str) -> None:
  """PNG of the KV-cache fraction (sink + window) / N per layer and KV head at N."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  frac = plan.capacities(length) / length
  fig, ax = plt.subplots(figsize=(1.2 + 0.5 * plan.num_kv_heads, 1.0 + 0.35 * plan.num_layers))
  im = ax.imshow(frac, vmin=0, vmax=1, cmap="viridis", aspect="auto")
  for (l, k), v in np.ndenumerate(frac):
    ax.text(k, l, f"{v:.2f}", ha="center", va="center", fontsize=7,
            color="white" if v < 0.6 else "black")
  ax.set_xlabel("KV head")
  ax.set_ylabel("layer")
  ax.set_title(f"MoA span / N at N={length} (density {plan.density(length):.2f})", fontsize=8)
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
