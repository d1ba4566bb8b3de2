"""Sharded loading of pretrained weights, shared by every checkpoint format.

A format provides a :class:`TensorReader` that names its tensors with the Hugging Face
names of :mod:`~sparsity_jax.checkpoints.tensor_map` and reads any block of them in the
Hugging Face layout; :func:`load_params` then creates each parameter of a TransformerLM
directly in its target sharding with ``jax.make_array_from_callback``, so each process
reads (and dequantizes) only the blocks its devices hold.

:class:`Checkpoint` is what the rest of the project sees of a pretrained model, whatever
its format: its architecture (a ModelConfig), its weights and its tokenizer.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from sparsity_jax import parallel
from sparsity_jax.checkpoints import tensor_map
from sparsity_jax.checkpoints.arch import CheckpointError, check_compatible
from sparsity_jax.models import ModelConfig, TransformerLM

log = logging.getLogger(__name__)


class TensorReader(abc.ABC):
  """Read access to a checkpoint's tensors under Hugging Face names and layouts."""

  @abc.abstractmethod
  def names(self) -> list[str]:
    """Every tensor name the checkpoint holds."""

  @abc.abstractmethod
  def shape(self, name: str) -> tuple[int, ...]:
    """Shape of tensor ``name`` in the Hugging Face layout."""

  @abc.abstractmethod
  def read(self, name: str, index: Sequence[slice] | None = None) -> np.ndarray:
    """Tensor ``name`` (or its block ``index``, one slice per dim) as a float array."""

  def where(self, name: str) -> str:
    """Where ``name`` is stored, for error messages."""
    del name
    return "the checkpoint"


def check_shapes(reader: TensorReader, maps: Sequence[tensor_map.TensorMap], what: str) -> None:
  """Raises if a mapped tensor is missing or misshapen; warns about unused tensors.

  ``what`` says what implied the expected shapes (e.g. "config.json (llama)").
  """
  held = set(reader.names())
  for tmap in maps:
    for name in tmap.names:
      if name not in held:
        raise CheckpointError(f"tensor {name!r} is missing from {reader.where(name)} "
                              f"({len(held)} tensors, e.g. {sorted(held)[:3]})")
      got = reader.shape(name)
      if got != tmap.hf_shape:
        raise CheckpointError(
            f"tensor {name!r} in {reader.where(name)} has shape {list(got)}, but {what} "
            f"implies {list(tmap.hf_shape)} for {'.'.join(map(str, tmap.path))}")
  used = {name for tmap in maps for name in tmap.names}
  tied_head = {names["lm_head"] for names in tensor_map.HF_NAMES.values()}
  extra = [n for n in held - used if not tensor_map.ignorable(n) and n not in tied_head]
  if extra:  # (A tied head may still be stored.)
    log.warning("%d checkpoint tensors are not used, e.g. %s", len(extra), sorted(extra)[:5])


def variable(model: nnx.Module, path: Sequence[str | int]) -> nnx.Variable:
  """The nnx Variable at ``path`` (attribute names and list indices) in ``model``."""
  node: Any = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def host_array(value: jax.Array) -> np.ndarray:
  """``value`` on the host, gathered from every process when it spans several."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))
  return np.asarray(jax.device_get(value))


def target_sharding(var: nnx.Variable, shape, mesh: Mesh | None, rules):
  if mesh is None:
    return SingleDeviceSharding(jax.devices()[0])
  names = parallel.variable_logical_axes(var, len(shape))
  return NamedSharding(mesh, parallel.logical_to_spec(names, shape, mesh, rules))


def load_params(model: TransformerLM, reader: TensorReader,
                maps: Sequence[tensor_map.TensorMap], *, mesh: Mesh | None = None,
                rules: parallel.Rules | None = None) -> None:
  """Sets every mapped Param of ``model`` (concrete or from nnx.eval_shape).

  Each parameter is created in its target sharding (its logical axes through ``rules``
  on ``mesh``; one device without a mesh) and each process reads only the blocks its
  devices hold. Values are cast to the model's ``param_dtype``.
  """
  rules = parallel.current_rules() if rules is None else rules
  for tmap in maps:
    var = variable(model, tmap.path)
    value = var.get_value()
    if tuple(value.shape) != tmap.shape:
      raise CheckpointError(f"parameter {'.'.join(map(str, tmap.path))} has shape "
                            f"{value.shape}, expected {tmap.shape}")
    dtype = np.dtype(value.dtype)
    sharding = target_sharding(var, tmap.shape, mesh, rules)
    blocks: dict[tuple, np.ndarray] = {}  # Devices that replicate a block read it once.

    def callback(index, tmap=tmap, dtype=dtype, blocks=blocks):
      index = tuple(index) + (slice(None),) * (len(tmap.shape) - len(index))
      key = tuple(s.indices(size)[:2] for s, size in zip(index, tmap.shape))
      if key not in blocks:
        if tmap.stacked:
          layers = range(*index[0].indices(len(tmap.names)))
          block = np.stack([tensor_map.read_block(reader.read, tmap, tmap.names[i], index[1:])
                            for i in layers])
        else:
          block = tensor_map.read_block(reader.read, tmap, tmap.names[0], index)
        blocks[key] = np.ascontiguousarray(block.astype(dtype))
      return blocks[key]

    var.set_value(jax.make_array_from_callback(tmap.shape, sharding, callback))


def build_loaded(make_model: Callable[[], TransformerLM],
                 load: Callable[[TransformerLM], None], mesh: Mesh | None,
                 rules: parallel.Rules | None) -> TransformerLM:
  """``make_model()`` with its Params set by ``load`` and never materialised at random.

  The model is created abstractly, ``load`` fills its parameters; any other state
  (e.g. k-means centroids) is jit-initialised into its sharding.
  """
  model = nnx.eval_shape(make_model)
  load(model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):  # E.g. k-means centroids: initialised, not loaded.
    rules = parallel.current_rules() if rules is None else rules
    shardings = parallel.state_shardings(rest, mesh, rules) if mesh is not None else None
    # The random parameters are dead code in this jit: XLA drops them.
    rest = jax.jit(lambda: nnx.split(make_model(), nnx.Param, ...)[2], out_shardings=shardings)()
  return nnx.merge(graphdef, params, rest)


def with_attention(model: TransformerLM, attention: dict) -> TransformerLM:
  """``model`` with another attention core (``config.model.attention``), sharing its
  parameters (no copy): e.g. one loaded checkpoint evaluated under several sparse cores."""
  import dataclasses

  cfg = dataclasses.replace(model.cfg, attention=dict(attention))
  params = nnx.state(model, nnx.Param)
  return build_loaded(lambda: TransformerLM(cfg, rngs=nnx.Rngs(0)),
                      lambda m: nnx.update(m, params), None, None)


class Checkpoint(abc.ABC):
  """A pretrained model on disk: architecture, weights and tokenizer, any format."""

  #: Human-readable origin, e.g. the file or directory path.
  description: str
  #: What it was opened as (``open_pretrained``'s argument, e.g. "smollm2"); None when
  #: constructed directly.
  source: str | None = None
  #: Architecture name as in :data:`~sparsity_jax.checkpoints.arch.ARCHITECTURES`.
  arch: str

  @abc.abstractmethod
  def model_config(self, **overrides) -> ModelConfig:
    """The checkpoint's architecture; ``overrides`` set how it runs (dtypes, core, ...)."""

  @abc.abstractmethod
  def reader(self) -> TensorReader:
    """The checkpoint's tensors under Hugging Face names."""

  @abc.abstractmethod
  def tokenizer(self):
    """The model's tokenizer (:class:`~sparsity_jax.checkpoints.hf_tokenizer.HFTokenizer`)."""

  def load_params_into(self, model: TransformerLM, *, mesh: Mesh | None = None,
                       rules: parallel.Rules | None = None) -> None:
    """Sets every Param of ``model`` from the checkpoint, straight into its sharding."""
    check_compatible(model.cfg, self.model_config())
    reader = self.reader()
    maps = tensor_map.tensor_maps(model.cfg, self.arch)
    check_shapes(reader, maps, f"the architecture of {self.description} ({self.arch})")
    load_params(model, reader, maps, mesh=mesh, rules=rules)

  def load_model(self, *, mesh: Mesh | None = None, rules: parallel.Rules | None = None,
                 seed: int = 0, **overrides) -> TransformerLM:
    """A TransformerLM with this checkpoint's architecture and weights.

    Args:
      mesh: target mesh (parameters sharded by their logical axes); None: one device.
      rules: logical axis rules (default: the current ones, see parallel.use_mesh).
      seed: seeds any non-parameter state (none for dense attention).
      **overrides: ModelConfig fields on top of the checkpoint's, e.g.
        ``param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, scan_layers=True``.
    """
    cfg = self.model_config(**overrides)
    return build_loaded(lambda: TransformerLM(cfg, rngs=nnx.Rngs(params=seed)),
                        lambda m: self.load_params_into(m, mesh=mesh, rules=rules), mesh, rules)
