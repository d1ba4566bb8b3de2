"""Weight masks as model state: attached beside their weights, applied in the forward.

A masked weight ``<name>`` of a module gets a sibling variable ``<name>_mask``, a
:class:`WeightMask` (boolean, True = kept) of the weight's shape and logical axes, so it is
sharded like the weight and saved with the model's non-parameter state (``model_state``
of the train state; no gradient, no optimizer moments). The layers read their weights
through :func:`weight`, which multiplies by the mask when one is attached: a model without
masks computes exactly what it did before.

Every maskable weight is seen as a matrix [d_in, d_out] (after a scanned stack's leading
layer axis): :data:`INPUT_AXES` says how many leading axes are the input (o_proj [n, h, e]
has two). N:M groups run along d_in, as in the Hugging Face [out, in] layout's rows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsity_jax.sparsity.spec import SparsitySpec, SparsitySpecError

MASK_SUFFIX = "_mask"

#: Weights the forward masks (attribute name -> number of leading input axes).
INPUT_AXES = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate": 1, "up": 1,
              "down": 1, "lm_head": 1}


class WeightMask(nnx.Variable):
  """Boolean keep-mask of the weight it sits beside (True: kept). Not a Param."""


def weight(module: nnx.Module, name: str) -> jax.Array:
  """``module.<name>``'s value, zero where its mask (if any) is False."""
  value = getattr(module, name).get_value()
  mask = getattr(module, name + MASK_SUFFIX, None)
  if mask is None:
    return value
  return jnp.where(mask.get_value(), value, jnp.zeros((), value.dtype))


class Target:
  """One maskable weight: its path, owning module and matrix view."""

  def __init__(self, path: tuple, module: nnx.Module, name: str):
    self.path, self.module, self.name = path, module, name
    self.param = getattr(module, name)
    shape = tuple(self.param.get_value().shape)
    logical = getattr(self.param, "logical_axes", None) or ()
    self.lead = len(shape) - len(logical) if logical else 0  # 1 for a scanned stack.
    k = INPUT_AXES[name]
    self.shape = shape
    self.d_in = math.prod(shape[self.lead:self.lead + k])
    self.d_out = math.prod(shape[self.lead + k:])

  @property
  def key(self) -> str:
    return "/".join(str(p) for p in self.path)

  @property
  def mask(self) -> WeightMask | None:
    return getattr(self.module, self.name + MASK_SUFFIX, None)

  def matrix(self, x) -> Any:
    """[*lead, d_in, d_out] view of a weight-shaped array (numpy or jax)."""
    return x.reshape(self.shape[:self.lead] + (self.d_in, self.d_out))

  def unmatrix(self, x) -> Any:
    return x.reshape(self.shape)


def maskable(model: nnx.Module) -> list[Target]:
  """Every weight the forward can mask, in graph order."""
  out = []
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Module):
      continue
    for name in INPUT_AXES:
      if isinstance(getattr(node, name, None), nnx.Param):
        out.append(Target(tuple(path) + (name,), node, name))
  return out


def select(model: nnx.Module, targets: str) -> list[Target]:
  """The maskable weights whose path matches ``targets`` (raises when none does)."""
  candidates = maskable(model)
  chosen = [t for t in candidates if re.search(targets, t.key)]
  if not chosen:
    names = sorted({re.sub(r"/\d+/", "/<i>/", t.key) for t in candidates})
    raise SparsitySpecError(f"weight_sparsity.targets={targets!r} matches no maskable weight; "
                            f"they are: {', '.join(names)}")
  return chosen


def masked(model: nnx.Module) -> list[Target]:
  """The weights of ``model`` that carry a mask."""
  return [t for t in maskable(model) if t.mask is not None]


def check_divisible(target: Target, spec: SparsitySpec) -> None:
  nm = spec.nm
  if nm and target.d_in % nm[1]:
    raise SparsitySpecError(
        f"weight_sparsity.pattern={spec.pattern!r}: M={nm[1]} does not divide the input "
        f"dimension {target.d_in} of {target.key}; choose an M that divides it or leave "
        "the weight out of weight_sparsity.targets")


def attach(model: nnx.Module, spec: SparsitySpec) -> list[Target]:
  """Gives every weight ``spec`` targets an all-True mask (works under nnx.eval_shape).

  Masks that exist already are kept. Returns the targets.
  """
  chosen = select(model, spec.targets)
  for t in chosen:
    check_divisible(t, spec)
    if t.mask is None:
      value = t.param.get_value()
      setattr(t.module, t.name + MASK_SUFFIX,
              WeightMask(jnp.ones(value.shape, jnp.bool_),
                         logical_axes=getattr(t.param, "logical_axes", None)))
  return chosen


def set_mask(target: Target, keep) -> None:
  """Sets a target's mask (any array of the weight's shape or matrix view), placed like
  the weight."""
  value = target.param.get_value()
  keep = np.asarray(keep, bool).reshape(target.shape)
  sharding = getattr(value, "sharding", None)
  keep = jax.device_put(keep, sharding) if sharding is not None else jnp.asarray(keep)
  if target.mask is None:
    setattr(target.module, target.name + MASK_SUFFIX,
            WeightMask(keep, logical_axes=getattr(target.param, "logical_axes", None)))
  else:
    target.mask.set_value(keep)


def all_kept(state: nnx.State) -> nnx.State:
  """``state`` with every WeightMask set to all True (the dense model of the same weights,
  e.g. a distillation teacher)."""
  flat = [(path, var.replace(jnp.ones(var.get_value().shape, jnp.bool_))
           if isinstance(var, WeightMask) else var) for path, var in nnx.to_flat_state(state)]
  return nnx.from_flat_state(flat)


def bake(model: nnx.Module) -> None:
  """Zeros the masked-out weights in place (for an export that has no masks)."""
  for t in masked(model):
    t.param.set_value(weight(t.module, t.name))


def iter_masks(model: nnx.Module) -> Iterator[tuple[str, np.ndarray]]:
  for t in masked(model):
    yield t.key, np.asarray(jax.device_get(t.mask.get_value()))


# ---- mask builders (numpy; groups along d_in of [..., d_in, d_out] score arrays) ----


def _keep_highest(scores: np.ndarray, prune: int, axis: int) -> np.ndarray:
  """True for all but the ``prune`` lowest scores along ``axis`` (ties: the lower index
  is pruned first, a stable sort)."""
  order = np.argsort(scores, axis=axis, kind="stable")
  ranks = np.empty_like(order)
  np.put_along_axis(ranks, order, np.arange(scores.shape[axis]).reshape(
      [-1 if a == (axis % scores.ndim) else 1 for a in range(scores.ndim)]), axis=axis)
  return ranks >= prune


def nm_keep(scores: np.ndarray, n: int, m: int) -> np.ndarray:
  """Keeps the n highest scores of every m consecutive entries along axis -2 (d_in)."""
  *lead, d_in, d_out = scores.shape
  if d_in % m:
    raise SparsitySpecError(f"N:M with M={m} needs the input dimension ({d_in}) to be a "
                            "multiple of M")
  grouped = scores.reshape(*lead, d_in // m, m, d_out)
  return _keep_highest(grouped, m - n, axis=-2).reshape(scores.shape)


def per_output_keep(scores: np.ndarray, sparsity: float) -> np.ndarray:
  """Prunes the floor(sparsity * d_in) lowest scores of every output (column), Wanda's
  comparison group."""
  d_in = scores.shape[-2]
  return _keep_highest(scores, int(d_in * sparsity), axis=-2)


def lowest_keep(score_list: list[np.ndarray], sparsity: float) -> list[np.ndarray]:
  """One comparison group over all given arrays: prunes exactly floor(sparsity * total)
  entries, the lowest scores (ties: earlier arrays / flat positions first)."""
  flat = np.concatenate([np.ravel(s) for s in score_list])
  prune = int(flat.size * sparsity)
  keep = np.ones(flat.size, bool)
  if prune:
    keep[np.argsort(flat, kind="stable")[:prune]] = False
  out, start = [], 0
  for s in score_list:
    out.append(keep[start:start + s.size].reshape(s.shape))
    start += s.size
  return out


def keep_for_spec(scores: np.ndarray, spec: SparsitySpec) -> np.ndarray:
  """Mask of one weight (scores in its matrix view) with per-output groups (unstructured)
  or N:M groups."""
  nm = spec.nm
  return nm_keep(scores, *nm) if nm else per_output_keep(scores, spec.level)


# ---- reports ----


def nm_valid(keep: np.ndarray, n: int, m: int) -> bool:
  """Every group of m consecutive entries along axis -2 keeps at most n."""
  *lead, d_in, d_out = keep.shape
  if d_in % m:
    return False
  return bool((keep.reshape(*lead, d_in // m, m, d_out).sum(axis=-2) <= n).all())


def report(model: nnx.Module, spec: SparsitySpec | None = None) -> dict[str, Any]:
  """Per-weight and global sparsity of the masks (and of the weights as computed: a mask
  over weights that are already zero counts too), plus N:M validity when ``spec`` is N:M.

  Returns {"layers": {path: {...}}, "global": {...}}; sparsities are fractions of zeros.
  """
  layers, zeros, total, mask_zeros = {}, 0, 0, 0
  nm = spec.nm if spec is not None else None
  for t in masked(model):
    keep = np.asarray(jax.device_get(t.mask.get_value()))
    value = np.asarray(jax.device_get(weight(t.module, t.name)))
    entry = {"shape": list(t.shape), "d_in": t.d_in, "d_out": t.d_out,
             "mask_sparsity": float(1 - keep.mean()),
             "weight_sparsity": float((value == 0).mean())}
    if nm:
      entry["nm_valid"] = nm_valid(t.matrix(keep), *nm)
    layers[t.key] = entry
    zeros += int((value == 0).sum())
    mask_zeros += int((~keep).sum())
    total += keep.size
  out = {"layers": layers,
         "global": {"masked_weights": total,
                    "mask_sparsity": mask_zeros / total if total else 0.0,
                    "weight_sparsity": zeros / total if total else 0.0}}
  if nm:
    out["global"]["nm_valid"] = all(e["nm_valid"] for e in layers.values())
  return out


def report_markdown(rep: dict[str, Any]) -> str:
  """A markdown table of :func:`report`."""
  g = rep["global"]
  lines = [f"global: {g['masked_weights']} masked weights, mask sparsity "
           f"{g['mask_sparsity']:.4f}, weight sparsity {g['weight_sparsity']:.4f}"
           + (f", N:M valid: {g['nm_valid']}" if "nm_valid" in g else ""), "",
           "| weight | shape | mask sparsity | weight sparsity |" +
           (" N:M valid |" if "nm_valid" in g else ""),
           "|---|---|---|---|" + ("---|" if "nm_valid" in g else "")]
  for key, e in rep["layers"].items():
    row = (f"| {key} | {'x'.join(map(str, e['shape']))} | {e['mask_sparsity']:.4f} | "
           f"{e['weight_sparsity']:.4f} |")
    if "nm_valid" in e:
      row += f" {e['nm_valid']} |"
    lines.append(row)
  return "\n".join(lines) + "\n"
