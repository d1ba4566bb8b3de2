"""Sparse training: how the masks of ``config.model.weight_sparsity`` evolve while training.

``config.train.weight_sparsity.method`` picks the rule (phases in optimizer steps: ``dense_steps``
of dense warm-up, the sparse phase, the last ``fine_tune_steps`` of fine-tuning):

  fixed   the masks stay as they are (pruned or loaded, or set once at a fresh start by
          ``mask_init``); pruned weights get no gradient. Sparse fine-tuning (SquareHead)
          and static sparse training (Sparse-IFT's static baseline) use it.
  ste     N:M masks recomputed from |w| every step; the forward uses w * m, the gradient
          reaches every weight unchanged (straight-through; PGF's ``step`` decay).
  sr_ste  ste plus ``sr_ste_lambda * (1 - m) * w`` added to the gradient of the pruned
          weights (SR-STE, Zhou et al. 2021; aojunzz/NM-sparsity ``Sparse``, lambda 2e-4).
  mdgf    mask-decay gradient flow (PGF, Bambhaniya et al. 2024; ``LinearDecay`` /
          ``ExponentialDecay`` of abhibambhaniya/progressive_gradient_flow_nm_sparsity):
          forward w * (m + (1 - m) * beta(t)), beta = max(0, 1 - decay_coef * t) ('linear')
          or exp(-decay_coef * t) ('exp'), t counted from the start of the sparse phase;
          straight-through gradient; beta = 0 (plain ste) in the fine-tune phase.
  rigl    unstructured masks updated every ``rigl_every`` steps by RigL's drop (smallest
          |w|) and grow (largest dense gradient) with a cosine-annealed drop fraction, as
          Sparse-IFT's dynamic sparse training (``sparsity.rigl``); fixed in between.

``structure_decay`` (SDGF, PGF's structure decay) makes the N:M pattern of ste / mdgf change
over equal frames of the sparse phase: 'sparsify' (M-1):M -> M/2:M -> ... -> N:M (after the
dense phase, if ``dense_steps`` > 0),
'fine' 8N:8M -> 4N:4M -> 2N:2M -> N:M; as in the official schedule the final N:M starts with
the fine-tune phase, so it needs ``fine_tune_steps`` > 0.

The recomputed masks are written to the model state every step (checkpoints, evaluation and
export see the current hard mask; evaluation always runs the hard-masked model, also while
mdgf's beta > 0). Gradients come from a ``custom_vjp`` on each masked weight:
:func:`weight_flow` (forward ``w * scale``, backward ``g + decay * w``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparsity_jax.sparsity import masks as masks_lib
from sparsity_jax.sparsity.spec import SparsitySpec, SparsitySpecError

METHODS = ("fixed", "ste", "sr_ste", "mdgf", "rigl")
RECOMPUTED = ("ste", "sr_ste", "mdgf")
DECAYS = ("linear", "exp")
STRUCTURE_DECAYS = ("", "sparsify", "fine")
MASK_INITS = ("keep", "magnitude", "random")


@dataclasses.dataclass(frozen=True)
class SparseTraining:
  """``config.train.weight_sparsity`` (see the module docstring); validated on creation."""

  method: str = "fixed"
  dense_steps: int = 0
  fine_tune_steps: int = 0
  sr_ste_lambda: float = 2e-4
  decay: str = "exp"
  decay_coef: float = 1e-4
  structure_decay: str = ""
  # How a fixed or RigL mask is set at a fresh start: 'magnitude' (|w| of the initial
  # weights, per output / N:M groups), 'random' (uniform), 'keep' (as loaded by init_from;
  # refused on a fresh model, whose masks keep everything).
  mask_init: str = "magnitude"
  rigl_every: int = 100  # RigL: steps between mask updates (cbsparse frequency).
  rigl_drop_fraction: float = 0.3  # RigL: initial drop fraction, cosine-annealed to 0.
  rigl_end: float = 0.75  # RigL: no updates after this fraction of train.steps.

  def __post_init__(self):
    def fail(msg):
      raise SparsitySpecError(f"config.train.weight_sparsity.{msg}")
    if self.method not in METHODS:
      fail(f"method={self.method!r}; use one of {', '.join(METHODS)}")
    if self.decay not in DECAYS:
      fail(f"decay={self.decay!r}; use 'linear' or 'exp'")
    if self.structure_decay not in STRUCTURE_DECAYS:
      fail(f"structure_decay={self.structure_decay!r}; use '', 'sparsify' or 'fine'")
    if self.mask_init not in MASK_INITS:
      fail(f"mask_init={self.mask_init!r}; use one of {', '.join(MASK_INITS)}")
    for name in ("dense_steps", "fine_tune_steps"):
      if int(getattr(self, name)) < 0:
        fail(f"{name}={getattr(self, name)} must be >= 0")
    if self.sr_ste_lambda < 0 or self.decay_coef < 0:
      fail("sr_ste_lambda and decay_coef must be >= 0")
    if self.method == "fixed" and (self.dense_steps or self.structure_decay):
      fail("dense_steps and structure_decay need a recomputed mask (method ste, sr_ste or "
           "mdgf); method='fixed' keeps the mask it starts with")
    if self.rigl_every < 1 or not 0 <= self.rigl_drop_fraction < 1 or not 0 < self.rigl_end <= 1:
      fail("rigl_every must be >= 1, rigl_drop_fraction in [0, 1), rigl_end in (0, 1]")
    if self.method == "rigl" and (self.dense_steps or self.structure_decay or
                                  self.fine_tune_steps):
      fail("method='rigl' has no dense, structure-decay or fine-tune phases (its updates stop "
           "at rigl_end)")
    if self.structure_decay and self.method == "sr_ste":
      fail("structure_decay is PGF's SDGF, used with method 'ste' or 'mdgf', not 'sr_ste'")

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any] | None) -> "SparseTraining":
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise SparsitySpecError(f"config.train.weight_sparsity has unknown fields {unknown}; "
                              f"known: {sorted(known)}")
    return cls(**values)

  @property
  def recomputed(self) -> bool:
    return self.method in RECOMPUTED


# ---------------------------------------------------------------------------- gradient flow


@jax.custom_vjp
def weight_flow(w: jax.Array, scale: jax.Array, decay: jax.Array) -> jax.Array:
  """Forward ``w * scale``; backward ``dL/dw = g + decay * w`` (g: the gradient reaching the
  output), no gradient to ``scale`` or ``decay``.

  ste: scale = m, decay = 0; SR-STE: scale = m, decay = lambda (1 - m); MDGF: scale =
  m + (1 - m) beta, decay = 0 (m: the 0/1 mask). All three arrays have w's shape (or
  broadcast to it).
  """
  return w * scale.astype(w.dtype)


def _flow_fwd(w, scale, decay):
  return weight_flow(w, scale, decay), (w, scale, decay)


def _flow_bwd(res, g):
  w, scale, decay = res
  dw = g + (decay * w).astype(g.dtype)
  return dw, jnp.zeros_like(scale), jnp.zeros_like(decay)


weight_flow.defvjp(_flow_fwd, _flow_bwd)


# ---------------------------------------------------------------------------- schedules


def structure_frames(spec: SparsitySpec, training: SparseTraining,
                     total_steps: int) -> list[tuple[int, int, int]]:
  """[(first step, n, m), ...] of the sparse phase's N:M patterns, in order.

  Without structure decay: one frame, the spec's N:M from ``dense_steps``. With it, PGF's
  schedule (``SparseLinear.__init__``): K frames of (total - dense - fine_tune) / K steps,
  frame i starting at dense + int(i * size) with 'sparsify' patterns (M-1):M, M/2:M,
  M/4:M, ..., N:M (K = log2(M/N)) or 'fine' 8N:8M, 4N:4M, 2N:2M, N:M (K = 3); the last
  pattern starts at the fine-tune phase.
  """
  n, m = spec.nm
  dense = int(training.dense_steps)
  if not training.structure_decay:
    return [(dense, n, m)]
  if training.structure_decay == "sparsify":
    k = math.log2(m / n)
    if k != int(k) or k < 1:
      raise SparsitySpecError(f"structure_decay='sparsify' needs M/N a power of two >= 2 "
                              f"(got {n}:{m}); use e.g. 1:8, 2:8 or 2:4")
    k = int(k)
    patterns = [(m - 1, m)] + [(m // 2 ** i, m) for i in range(1, k + 1)]
  else:
    k = 3
    patterns = [(8 * n, 8 * m), (4 * n, 4 * m), (2 * n, 2 * m), (n, m)]
  if not training.fine_tune_steps:
    raise SparsitySpecError("structure_decay reaches the final N:M at the fine-tune phase "
                            "(as the official schedule): set config.train.weight_sparsity."
                            "fine_tune_steps > 0")
  span = total_steps - dense - int(training.fine_tune_steps)
  if span < k:
    raise SparsitySpecError(f"structure_decay needs at least {k} steps between dense_steps and "
                            f"fine_tune_steps (have {span} of train.steps={total_steps})")
  size = span / k
  return [(dense + int(i * size), pn, pm) for i, (pn, pm) in enumerate(patterns)]


def mask_decay(training: SparseTraining, step: jax.Array, total_steps: int) -> jax.Array:
  """beta(step) of mdgf (0 for the other methods and in the fine-tune phase)."""
  if training.method != "mdgf":
    return jnp.zeros((), jnp.float32)
  t = (step - int(training.dense_steps)).astype(jnp.float32)
  coef = float(training.decay_coef)
  beta = (jnp.maximum(0.0, 1.0 - coef * t) if training.decay == "linear"
          else jnp.exp(-coef * t))
  fine_tune = step >= total_steps - int(training.fine_tune_steps)
  return jnp.where(fine_tune, 0.0, beta)


# ---------------------------------------------------------------------------- masks (jnp)


def nm_keep_jnp(scores: jax.Array, n: int, m: int) -> jax.Array:
  """jnp twin of masks.nm_keep: the n highest of every m consecutive entries along axis -2
  (ties: the lower index is pruned first)."""
  *lead, d_in, d_out = scores.shape
  grouped = scores.reshape(*lead, d_in // m, m, d_out)
  order = jnp.argsort(grouped, axis=-2, stable=True)
  ranks = jnp.argsort(order, axis=-2, stable=True)
  return (ranks >= m - n).reshape(scores.shape)


def per_output_keep_jnp(scores: jax.Array, sparsity: float) -> jax.Array:
  """jnp twin of masks.per_output_keep."""
  d_in = scores.shape[-2]
  ranks = jnp.argsort(jnp.argsort(scores, axis=-2, stable=True), axis=-2, stable=True)
  return ranks >= int(d_in * sparsity)


@dataclasses.dataclass(frozen=True, order=True)  # Ordered: a dict key in jitted pytrees.
class _Slot:
  param_path: tuple
  mask_path: tuple
  lead: int
  d_in: int
  d_out: int
  shape: tuple


class MaskSchedule:
  """The per-step masks and weight flows of a model's masked weights (built once, outside
  jit, from the model's abstract structure)."""

  def __init__(self, model: nnx.Module, spec: SparsitySpec, training: SparseTraining,
               total_steps: int):
    self.spec, self.training, self.total_steps = spec, training, int(total_steps)
    if training.method == "rigl" and spec.nm is not None:
      raise SparsitySpecError("config.train.weight_sparsity.method='rigl' updates unstructured "
                              "masks; set config.model.weight_sparsity.pattern='unstructured'")
    if training.recomputed and spec.nm is None:
      raise SparsitySpecError(
          f"config.train.weight_sparsity.method={training.method!r} recomputes N:M masks; "
          "set config.model.weight_sparsity.pattern to N:M (e.g. '2:4'), or use method='fixed' "
          "for unstructured masks")
    if training.dense_steps + training.fine_tune_steps > self.total_steps:
      raise SparsitySpecError(
          f"config.train.weight_sparsity: dense_steps + fine_tune_steps = "
          f"{training.dense_steps + training.fine_tune_steps} exceed train.steps={total_steps}")
    self.frames = structure_frames(spec, training, total_steps) if training.recomputed else []
    for t in masks_lib.masked(model):
      for _, n, m in self.frames:
        if t.d_in % m:
          raise SparsitySpecError(f"the N:M schedule uses {n}:{m}, but M={m} does not divide "
                                  f"the input dimension {t.d_in} of {t.key}")
    self.slots = [
        _Slot(t.path, t.path[:-1] + (t.name + masks_lib.MASK_SUFFIX,), t.lead, t.d_in, t.d_out,
              t.shape) for t in masks_lib.masked(model)]
    if not self.slots:
      raise SparsitySpecError("config.train.weight_sparsity applies to masked weights, and the "
                              "model has none: set config.model.weight_sparsity")

  def _matrix(self, slot: _Slot, x):
    return x.reshape(slot.shape[:slot.lead] + (slot.d_in, slot.d_out))

  def keep(self, slot: _Slot, w: jax.Array, step: jax.Array) -> jax.Array:
    """Hard mask of one weight at ``step`` (all True in the dense phase)."""
    scores = self._matrix(slot, jnp.abs(w.astype(jnp.float32)))
    branches = [lambda s: jnp.ones(s.shape, jnp.bool_)]
    branches += [lambda s, n=n, m=m: nm_keep_jnp(s, n, m) for _, n, m in self.frames]
    starts = jnp.asarray([f[0] for f in self.frames], jnp.int32)
    index = jnp.sum(step >= starts).astype(jnp.int32)  # 0: dense phase.
    return jax.lax.switch(index, branches, scores).reshape(slot.shape)

  def hard_masks(self, params: nnx.State, step: jax.Array) -> list[jax.Array]:
    """The hard mask of every slot (self.slots' order) for ``params`` at ``step``."""
    flat = dict(nnx.to_flat_state(params))
    return [jax.lax.stop_gradient(self.keep(slot, flat[slot.param_path].get_value(), step))
            for slot in self.slots]

  def current_masks(self, model_state: nnx.State) -> list[jax.Array]:
    flat = dict(nnx.to_flat_state(model_state))
    return [flat[slot.mask_path].get_value() for slot in self.slots]

  def prepare(self, params: nnx.State, step: jax.Array, model_state: nnx.State | None = None):
    """Per masked weight: (hard mask, forward scale, gradient decay) at ``step``; RigL
    reads its masks from ``model_state`` (straight-through: the dense gradient)."""
    beta = mask_decay(self.training, step, self.total_steps)
    lam = float(self.training.sr_ste_lambda) if self.training.method == "sr_ste" else 0.0
    keeps = (self.current_masks(model_state) if self.training.method == "rigl"
             else self.hard_masks(params, step))
    out = {}
    for slot, keep in zip(self.slots, keeps):
      pruned = (~keep).astype(jnp.float32)
      out[slot] = (keep, 1.0 - pruned * (1.0 - beta), lam * pruned)
    return out

  def forward_state(self, params: nnx.State, model_state: nnx.State, prepared):
    """Params with the flow applied and model state whose masks are all True (the flow has
    masked already; a second, hard mask would stop the straight-through gradient)."""
    flat_p = dict(nnx.to_flat_state(params))
    flat_s = dict(nnx.to_flat_state(model_state))
    for slot, (keep, scale, decay) in prepared.items():
      var = flat_p[slot.param_path]
      flat_p[slot.param_path] = var.replace(weight_flow(var.get_value(), scale, decay))
      mask = flat_s[slot.mask_path]
      flat_s[slot.mask_path] = mask.replace(jnp.ones(keep.shape, jnp.bool_))
    return (nnx.from_flat_state(list(flat_p.items())),
            nnx.from_flat_state(list(flat_s.items())))

  def update_grads(self, grads: nnx.State, prepared) -> nnx.State:
    """The gradients the optimizer sees: RigL's pruned weights get none (cbsparse's
    backward mask); the other methods pass every gradient."""
    if self.training.method != "rigl":
      return grads
    flat = dict(nnx.to_flat_state(grads))
    for slot, (keep, _, _) in prepared.items():
      var = flat[slot.param_path]
      flat[slot.param_path] = var.replace(jnp.where(keep, var.get_value(), 0))
    return nnx.from_flat_state(list(flat.items()))

  def after_update(self, params: nnx.State, opt_state, grads: nnx.State, prepared,
                   step: jax.Array):
    """(params, opt_state, masks) after the optimizer update of ``step``: recomputed N:M
    masks of the new weights, or RigL's drop / grow when an update is due (grown weights
    and their optimizer moments zeroed)."""
    if self.training.method != "rigl":
      return params, opt_state, self.hard_masks(params, step + 1)
    from sparsity_jax.sparsity import rigl

    t = self.training
    end = int(t.rigl_end * self.total_steps)
    done = step + 1
    fraction = rigl.drop_fraction(done, float(t.rigl_drop_fraction), max(end, 1))
    flat_p, flat_g = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(grads))
    keeps, grown = [], {}
    for slot in self.slots:
      keep = prepared[slot][0]
      new_keep, new = rigl.drop_grow_stacked(
          flat_p[slot.param_path].get_value(), keep, flat_g[slot.param_path].get_value(),
          fraction, 1.0 - self.spec.level, slot.lead)
      keeps.append(new_keep)
      grown[slot.param_path] = new
    zeros = nnx.from_flat_state([
        (path, var.replace(grown.get(path, jnp.zeros(var.get_value().shape, jnp.bool_))))
        for path, var in flat_p.items()])
    new_params = jax.tree.map(lambda x, z: jnp.where(z, jnp.zeros((), x.dtype), x), params, zeros)
    new_opt = rigl.zero_matching(opt_state, jax.tree.structure(params), zeros)
    due = rigl.update_due(done, int(t.rigl_every), end)
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(due, a, b), new, old)
    return (pick(new_params, params), pick(new_opt, opt_state),
            pick(keeps, [prepared[slot][0] for slot in self.slots]))

  def store_masks(self, model_state: nnx.State, keeps: list[jax.Array]) -> nnx.State:
    """model_state with each slot's mask set to ``keeps`` (self.slots' order)."""
    flat = dict(nnx.to_flat_state(model_state))
    for slot, keep in zip(self.slots, keeps):
      flat[slot.mask_path] = flat[slot.mask_path].replace(keep)
    return nnx.from_flat_state(list(flat.items()))

  def pattern_at(self, step: int) -> str:
    """The N:M pattern in force at ``step`` ('dense' before the sparse phase)."""
    current = "dense"
    for start, n, m in self.frames:
      if step >= start:
        current = f"{n}:{m}"
    return current


def initial_masks(params: nnx.State, model_state: nnx.State, spec: SparsitySpec,
                  schedule_slots, how: str, seed: int) -> nnx.State:
  """model_state with fresh-start fixed masks: per spec from |w| ('magnitude') or uniform
  random scores ('random'); 'keep' returns model_state unchanged."""
  if how == "keep":
    return model_state
  flat_p = dict(nnx.to_flat_state(params))
  flat_s = dict(nnx.to_flat_state(model_state))
  key = jax.random.key(seed)
  for i, slot in enumerate(schedule_slots):
    w = flat_p[slot.param_path].get_value()
    if how == "magnitude":
      scores = jnp.abs(w.astype(jnp.float32))
    else:
      scores = jax.random.uniform(jax.random.fold_in(key, i), w.shape)
    scores = scores.reshape(slot.shape[:slot.lead] + (slot.d_in, slot.d_out))
    keep = (nm_keep_jnp(scores, *spec.nm) if spec.nm
            else per_output_keep_jnp(scores, spec.level)).reshape(slot.shape)
    flat_s[slot.mask_path] = flat_s[slot.mask_path].replace(keep)
  return nnx.from_flat_state(list(flat_s.items()))



# ---------------------------------------------------------------------------- run set-up


def schedule_from_config(config, model_config, abstract_model) -> MaskSchedule | None:
  """The MaskSchedule of ``config.train.weight_sparsity`` for a model (None when dense).

  Refuses settings that would silently train something else (a RigL run with no update,
  'keep' masks on a fresh start) and warns when MDGF's mask decay has not finished by the
  last step.
  """
  training = SparseTraining.from_mapping(config.train.get("weight_sparsity", None))
  spec = SparsitySpec.from_mapping(model_config.weight_sparsity)
  if spec is None:
    if training != SparseTraining():
      raise SparsitySpecError("config.train.weight_sparsity is set but the model is dense: set "
                              "config.model.weight_sparsity.pattern (e.g. '2:4')")
    return None
  steps = int(config.train.steps)
  if steps < 1:
    raise SparsitySpecError(f"config.train.steps={steps}: sparse training needs at least one step")
  if training.mask_init == "keep" and training.method in ("fixed", "rigl") and not config.get(
      "init_from"):
    raise SparsitySpecError("config.train.weight_sparsity.mask_init='keep' keeps the masks a "
                            "model starts with, and a fresh model's keep everything: use "
                            "'magnitude' or 'random', or start from a pruned run (init_from)")
  if training.method == "rigl":
    end = int(training.rigl_end * steps)
    if not [n for n in range(training.rigl_every, end, training.rigl_every)]:
      raise SparsitySpecError(
          f"RigL with rigl_every={training.rigl_every} and rigl_end={training.rigl_end} makes no "
          f"mask update in {steps} steps (updates at multiples of rigl_every below "
          f"{end}): lower config.train.weight_sparsity.rigl_every")
  if training.method == "mdgf" and not training.fine_tune_steps:
    last = steps - 1 - int(training.dense_steps)
    beta = float(mask_decay(training, jnp.asarray(steps - 1), steps + 1))
    if beta > 0.1:
      logging.getLogger(__name__).warning(
          "MDGF: beta is still %.2f at the last step (decay_coef %g x %d sparse steps), so "
          "training runs nearly dense while evaluation uses the hard mask; raise "
          "config.train.weight_sparsity.decay_coef or set fine_tune_steps", beta,
          training.decay_coef, last)
  return MaskSchedule(abstract_model, spec, training, steps)


def with_initial_masks(schedule: MaskSchedule, state, shardings, seed: int, *, log: bool):
  """A fresh start's train state with masks set by ``mask_init`` (fixed and RigL masks;
  the recomputed methods set theirs every step)."""
  how = schedule.training.mask_init
  if schedule.training.recomputed or how == "keep":
    return state
  set_masks = jax.jit(
      lambda p, s: initial_masks(p, s, schedule.spec, schedule.slots, how, seed),
      out_shardings=shardings.model_state)
  if log:
    print(f"Weight masks: {schedule.spec.pattern} {schedule.spec.level:.0%} sparsity from "
          f"{how} scores ({schedule.training.method}).", flush=True)
  return state.replace(model_state=set_masks(state.params, state.model_state))
