"""Experiments that start from (or evaluate) a pretrained checkpoint.

``config.pretrained`` names the checkpoint: ``smollm2`` (the embedded real model), a
``.gguf`` file or a Hugging Face directory (see :func:`sparsity_jax.checkpoints.open_pretrained`).
Its architecture fixes ``config.model``'s architecture fields; everything else (data,
train, eval, mesh, dtypes, attention core) stays as the experiment's config has it.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from sparsity_jax import parallel
from sparsity_jax.checkpoints import CheckpointError, open_pretrained
from sparsity_jax.checkpoints.arch import ARCH_FIELDS
from sparsity_jax.checkpoints.loading import Checkpoint, build_loaded
from sparsity_jax.models import TransformerLM
from sparsity_jax.train import state as state_lib


def config_with_pretrained(config: ml_collections.ConfigDict,
                           source: str | Checkpoint) -> ml_collections.ConfigDict:
  """A copy of an experiment config whose ``config.model`` describes the checkpoint.

  The architecture fields (:data:`~sparsity_jax.checkpoints.arch.ARCH_FIELDS`,
  ``max_len`` included) come from the checkpoint; the others of ``config.model`` (dtype,
  param_dtype, scan_layers, remat, attention) and every other section (objective, data,
  train, eval, mesh) stay as ``config`` has them, and ``config.pretrained`` records the
  source. The copy is what a run writes to its workdir, so the run can be resumed and
  evaluated without the checkpoint.

  Raises:
    CheckpointError: the byte-level data does not fit the model's vocabulary, or a
      bidirectional model with a causal objective.
  """
  ckpt = open_pretrained(source) if isinstance(source, str) else source
  cfg = ckpt.model_config()
  objective = config.get("objective", "causal_lm")
  tokenizer = config.data.get("tokenizer", "bytes")
  if tokenizer == "bytes":
    from sparsity_jax.data import tokenizer as byte_tokenizer
    if cfg.vocab_size < byte_tokenizer.VOCAB_SIZE:
      raise CheckpointError(f"{ckpt.description}: vocab_size={cfg.vocab_size} is smaller than "
                            f"the {byte_tokenizer.VOCAB_SIZE} token ids of the byte-level "
                            "training data; use --config.data.tokenizer=pretrained")
  if not cfg.causal and objective != "masked_diffusion":
    raise CheckpointError(f"{ckpt.description} is a bidirectional masked-diffusion model "
                          f"(LLaDA); config.objective={objective!r} would let it see the "
                          "targets. Use --config.objective=masked_diffusion "
                          "(configs/diffusion_lm_tiny.py)")
  out = ml_collections.ConfigDict(config.to_dict())
  for field in ARCH_FIELDS:
    value = getattr(cfg, field)
    out.model[field] = dict(value) if isinstance(value, Mapping) else value
  # The caller's name for it (e.g. 'smollm2', portable), else where it was found; never the
  # config's own `pretrained` (it may name another model, whose tokenizer the data would use).
  out.pretrained = source if isinstance(source, str) else (ckpt.source or ckpt.description)
  return out


def create_train_state(ckpt: Checkpoint, make_model: Callable[[], TransformerLM], tx,
                       mesh: Mesh, rules) -> tuple[Any, Any, Any]:
  """Like ``train.state.create_train_state`` but with the parameters of ``ckpt``.

  Parameters are read straight into their shardings; the optimizer state and any
  non-parameter model state are jit-initialised into theirs. Returns
  (graphdef, TrainState, state shardings).
  """
  from flax import nnx

  model = nnx.eval_shape(make_model)
  ckpt.load_params_into(model, mesh=mesh, rules=rules)
  graphdef, params, _ = state_lib.split_model(model)

  def init():
    _, fresh, rest = state_lib.split_model(make_model())
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=fresh, model_state=rest,
                                opt_state=tx.init(fresh))

  shardings = parallel.state_shardings(jax.eval_shape(init), mesh, rules)
  # Random parameters are dead code in these jits: XLA drops them.
  rest = jax.jit(lambda: state_lib.split_model(make_model())[2],
                 out_shardings=shardings.model_state)()
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return graphdef, state_lib.TrainState(step=step, params=params, model_state=rest,
                                        opt_state=opt_state), shardings


def evaluate_pretrained(source: str | Checkpoint,
                        config: ml_collections.ConfigDict) -> dict[str, float]:
  """Validation metrics of a pretrained checkpoint as it is, on ``config``'s data and mesh.

  The model comes from :func:`config_with_pretrained` (``config.model``'s dtypes and
  attention core, the checkpoint's architecture); nothing is written.
  """
  from sparsity_jax.train import loop

  ckpt = open_pretrained(source) if isinstance(source, str) else source
  config = config_with_pretrained(config, ckpt)
  exp = loop.Experiment(config, splits=("validation",))
  with parallel.use_mesh(exp.mesh, exp.rules):
    model = build_loaded(exp.make_model,
                         lambda m: ckpt.load_params_into(m, mesh=exp.mesh, rules=exp.rules),
                         exp.mesh, exp.rules)
    graphdef, params, rest = state_lib.split_model(model)
    shardings = types.SimpleNamespace(
        params=parallel.state_shardings(params, exp.mesh, exp.rules),
        model_state=parallel.state_shardings(rest, exp.mesh, exp.rules))
    return loop.evaluate(exp, loop.jit_eval_step(exp, graphdef, shardings), params, rest)
