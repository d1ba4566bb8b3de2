"""Device mesh, logical-axis rules and multi-host start-up.

The model names dimensions with logical axes (:mod:`sparsity_jax.axes`); this module
turns them into ``PartitionSpec``s over a ``("data", "fsdp", "tensor")`` mesh using
``config.logical_axis_rules``. Nothing here knows about a particular model.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sparsity_jax import axes

Rules = tuple[tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class _Context:
  mesh: Mesh | None
  rules: Rules


_CONTEXT: contextvars.ContextVar[_Context] = contextvars.ContextVar(
    "sparsity_jax_parallel", default=_Context(None, axes.DEFAULT_RULES))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts jax.distributed for a multi-process run (a no-op for one process).

  On TPU pods and SLURM clusters all arguments may be None: JAX discovers them. For
  several processes on one CPU machine pass all three explicitly; CPU collectives then
  go through gloo.
  """
  if num_processes is None and coordinator_address is None:
    try:
      jax.distributed.initialize()  # Cluster auto-detection (TPU pod, SLURM, ...).
    except (ValueError, RuntimeError):
      pass  # A plain single-process run: nothing to join.
    return
  if _platform_is_cpu():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def _platform_is_cpu() -> bool:
  # Must not initialise a backend (jax.distributed has to come first): read the config.
  platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0] == "cpu"
  import importlib.util
  return not any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin",
                                                         "libtpu"))


def mesh_shape(mesh_config: Any, num_devices: int | None = None) -> tuple[int, ...]:
  """Resolves ``{data, fsdp, tensor}`` sizes; at most one may be -1 (= the rest)."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  sizes = [int(mesh_config[name]) for name in axes.MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(axes.MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(zip(axes.MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh: {num_devices} devices are not divisible by the fixed axes "
                       f"{dict(zip(axes.MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"config.mesh {dict(zip(axes.MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
        f"{num_devices} are available; set one axis to -1 to take the rest.")
  return tuple(sizes)


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ("data", "fsdp", "tensor") mesh described by ``config.mesh``."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, axes.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices)


def rules_from_config(rules: Any) -> Rules:
  """Normalises ``config.logical_axis_rules`` (a list of pairs) to a tuple."""
  if rules is None:
    return axes.DEFAULT_RULES
  out = []
  for name, target in rules:
    if isinstance(target, list):
      target = tuple(target)
    out.append((str(name), target))
  return tuple(out)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Rules = axes.DEFAULT_RULES) -> Iterator[None]:
  """Makes ``mesh`` and ``rules`` the ones :func:`constrain` uses (also sets jax's mesh)."""
  token = _CONTEXT.set(_Context(mesh, rules))
  try:
    if mesh is None:
      yield
    else:
      with jax.set_mesh(mesh):
        yield
  finally:
    _CONTEXT.reset(token)


def current_mesh() -> Mesh | None:
  return _CONTEXT.get().mesh


def current_rules() -> Rules:
  return _CONTEXT.get().rules


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: Rules | None = None) -> P:
  """Maps logical axis names to a PartitionSpec.

  A mesh axis is used at most once per spec (first dimension wins), and, when ``shape``
  and ``mesh`` are given, a mesh axis whose size does not divide the dimension is dropped
  (that dimension is replicated over it) so that e.g. 2 KV heads still work on tensor=4.
  """
  rules = current_rules() if rules is None else rules
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(logical_axes):
    target = table.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    targets = (target,) if isinstance(target, str) else tuple(target)
    kept = []
    size = shape[dim] if shape is not None else None
    for mesh_axis in targets:
      if mesh_axis in used:
        continue
      if mesh is not None and mesh_axis not in mesh.shape:
        continue
      if mesh is not None and size is not None:
        axis_size = mesh.shape[mesh_axis]
        if size % (axis_size * math.prod(mesh.shape[a] for a in kept)):
          continue
      kept.append(mesh_axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op outside :func:`use_mesh`."""
  mesh = current_mesh()
  if mesh is None:
    return x
  spec = logical_to_spec(logical_axes, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def variable_logical_axes(variable: nnx.Variable, ndim: int) -> tuple[str | None, ...]:
  """Logical axes of a variable; a scanned layer stack adds a leading LAYERS axis."""
  names = tuple(getattr(variable, "logical_axes", None) or ())
  if not names:
    return (None,) * ndim
  if len(names) == ndim - 1:
    names = (axes.LAYERS,) + names
  if len(names) != ndim:
    raise ValueError(f"variable of rank {ndim} declares logical axes {names}")
  return names


def state_shardings(state: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
  """NamedShardings for every leaf of a pytree that may contain nnx Variables.

  Variables carry ``logical_axes`` metadata; plain arrays (optimizer counts, the step)
  are replicated. optax states mirror the params' structure, so their moments get the
  params' shardings because they hold the same Variable wrappers.
  """

  def one(leaf):
    if isinstance(leaf, nnx.Variable):
      value = leaf.get_value()
      names = variable_logical_axes(leaf, np.ndim(value))
      spec = logical_to_spec(names, np.shape(value), mesh, rules)
      return leaf.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Rules | None = None) -> NamedSharding:
  """Sharding of a [batch, length, ...] input batch."""
  spec = logical_to_spec((axes.BATCH,) + (None,) * (ndim - 1), None, mesh, rules)
  return NamedSharding(mesh, spec)
