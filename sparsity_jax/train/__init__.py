"""Train state, steps, loop, optimizer and checkpointing."""

from sparsity_jax.train.loop import Experiment, evaluate_workdir, train_and_evaluate
from sparsity_jax.train.state import TrainState, create_train_state
from sparsity_jax.train.step import make_eval_step, make_train_step

__all__ = ["Experiment", "TrainState", "create_train_state", "evaluate_workdir",
           "make_eval_step", "make_train_step", "train_and_evaluate"]
