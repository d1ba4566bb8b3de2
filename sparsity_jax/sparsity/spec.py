"""Weight-sparsity specs: which weights carry a mask, in which pattern, at which level.

A spec is three fields, given as ``config.model.weight_sparsity`` (a dict; absent or
None: a dense model) or built directly:

  targets   regex searched in each maskable weight's path, e.g. ``layers/3/attn/q_proj``
            or ``layers/mlp/down`` (scanned stacks have no layer index). Default: every
            linear weight inside the blocks (q/k/v/o projections and the SwiGLU
            gate/up/down); the embedding and the output head stay dense, as in Wanda,
            DSnoT and essential sparsity.
  pattern   ``unstructured`` or ``N:M`` (N nonzeros in every group of M consecutive
            weights along the input dimension, the NVIDIA sparse-tensor-core layout).
  sparsity  fraction of zeros for ``unstructured``, in [0, 1); for ``N:M`` it is
            1 - N/M and may be omitted.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from sparsity_jax.errors import UserError

#: Every linear weight inside the transformer blocks.
DEFAULT_TARGETS = r"attn/[qkvo]_proj$|mlp/(gate|up|down)$"
UNSTRUCTURED = "unstructured"


class SparsitySpecError(UserError):
  """A weight-sparsity spec that cannot be built (the message names the fix)."""


@dataclasses.dataclass(frozen=True)
class SparsitySpec:
  targets: str = DEFAULT_TARGETS
  pattern: str = UNSTRUCTURED
  sparsity: float | None = None

  def __post_init__(self):
    try:
      re.compile(self.targets)
    except re.error as e:
      raise SparsitySpecError(f"weight_sparsity.targets={self.targets!r} is not a regular "
                              f"expression ({e})") from None
    if self.sparsity is not None and (isinstance(self.sparsity, bool) or
                                      not isinstance(self.sparsity, (int, float))):
      raise SparsitySpecError(f"weight_sparsity.sparsity={self.sparsity!r} must be a number "
                              "(the fraction of zeros, e.g. 0.5)")
    if self.pattern == UNSTRUCTURED:
      if self.sparsity is None:
        raise SparsitySpecError("weight_sparsity.pattern='unstructured' needs a sparsity level "
                                "(weight_sparsity.sparsity, e.g. 0.5)")
      if not 0.0 <= float(self.sparsity) < 1.0:
        raise SparsitySpecError(f"weight_sparsity.sparsity={self.sparsity} must be in [0, 1) "
                                "(the fraction of zeros; 0.5 halves the weights)")
      return
    n, m = parse_nm(self.pattern)
    if self.sparsity is not None and abs(float(self.sparsity) - (1 - n / m)) > 1e-9:
      raise SparsitySpecError(f"weight_sparsity.sparsity={self.sparsity} contradicts pattern "
                              f"{self.pattern!r} (sparsity 1 - {n}/{m} = {1 - n / m:g}); "
                              "omit sparsity for N:M patterns")

  @property
  def nm(self) -> tuple[int, int] | None:
    """(N, M) of an N:M pattern; None when unstructured."""
    return None if self.pattern == UNSTRUCTURED else parse_nm(self.pattern)

  @property
  def level(self) -> float:
    """The fraction of zeros the pattern gives."""
    nm = self.nm
    return float(self.sparsity) if nm is None else 1.0 - nm[0] / nm[1]

  def to_dict(self) -> dict[str, Any]:
    out = {"targets": self.targets, "pattern": self.pattern}
    if self.nm is None:
      out["sparsity"] = float(self.sparsity)
    return out

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any] | None) -> "SparsitySpec | None":
    """The spec of ``config.model.weight_sparsity``; None (or {}) for a dense model."""
    if not values:
      return None
    values = dict(values)
    if not values.get("pattern", UNSTRUCTURED):  # config_lib's default: pattern '' = dense.
      return None
    if values.get("sparsity") in (None, 0, 0.0) and values.get("pattern") not in (None,
                                                                               UNSTRUCTURED):
      values.pop("sparsity", None)  # N:M: the level follows from the pattern.
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise SparsitySpecError(f"config.model.weight_sparsity has unknown fields {unknown}; "
                              f"known: {sorted(known)}")
    spec = cls(**values)
    if spec.level == 0.0:  # A config asking for masks that remove nothing is a mistake.
      raise SparsitySpecError(
          f"config.model.weight_sparsity.pattern={spec.pattern!r} with sparsity 0 keeps every "
          "weight: set weight_sparsity.sparsity (e.g. 0.5) or an N:M pattern with N < M, or "
          "pattern='' for a dense model")
    return spec


def parse_nm(pattern: str) -> tuple[int, int]:
  """'2:4' -> (2, 4); raises SparsitySpecError naming the accepted forms."""
  match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
  if not match:
    raise SparsitySpecError(f"weight sparsity pattern {pattern!r}: use 'unstructured' or 'N:M' "
                            "(e.g. '2:4')")
  n, m = int(match.group(1)), int(match.group(2))
  if m < 1 or n < 1:
    raise SparsitySpecError(f"weight sparsity pattern {pattern!r}: N and M must be at least 1")
  if n > m:
    raise SparsitySpecError(f"weight sparsity pattern {pattern!r}: N={n} is larger than M={m}; "
                            "N:M keeps N weights of every M (e.g. '2:4')")
  return n, m


def from_flags(**fields) -> SparsitySpec:
  """A spec from a launcher's --targets / --pattern / --sparsity flags; errors name the
  flags (``--sparsity=...``) instead of the config fields.

  Stricter than a config's spec: ``--sparsity`` with an N:M ``--pattern`` is refused (the
  pattern alone sets the level; a matching value would be dropped silently, another one
  contradicts it), and so is a spec that prunes nothing (the config would refuse it later,
  naming config fields).
  """
  pattern, sparsity = fields.get("pattern", UNSTRUCTURED), fields.get("sparsity")
  if pattern != UNSTRUCTURED and sparsity is not None:
    try:
      n, m = parse_nm(pattern)
    except SparsitySpecError:
      n = m = None  # Reported below, as for any bad pattern.
    if n is not None:
      raise SparsitySpecError(
          f"--pattern={pattern} sets the sparsity itself ({n} of every {m} weights kept: "
          f"{1 - n / m:g} zeros); leave --sparsity out")
  if pattern == UNSTRUCTURED and isinstance(sparsity, (int, float)) and not isinstance(
      sparsity, bool) and not 0 < sparsity < 1:
    if sparsity == 0:
      raise SparsitySpecError("--sparsity=0 prunes nothing: give the fraction of weights to "
                              "zero, in (0, 1), e.g. --sparsity=0.5")
    raise SparsitySpecError(f"--sparsity={sparsity:g} must be in (0, 1): the fraction of "
                            "weights to zero, e.g. 0.5")
  try:
    spec = SparsitySpec(**fields)
  except SparsitySpecError as e:
    message = str(e).replace("weight sparsity pattern ", "--pattern=")
    for field in ("targets", "pattern", "sparsity"):
      message = message.replace(f"weight_sparsity.{field}", f"--{field}")
    raise SparsitySpecError(message) from None
  if spec.level == 0.0:  # N:M with N == M.
    raise SparsitySpecError(f"--pattern={pattern} keeps every weight: use N < M, e.g. "
                            "--pattern=2:4")
  return spec
