r"""Dense-attention baseline of the Routing Transformer comparison (seq_len 2048).

  python launch/train.py --config=configs/dense_lm_tiny.py --workdir=runs/dense_lm_tiny
  python benchmarks/routing_experiment.py    # trains dense, local and routing side by side

Arguments: ``steps=N`` (default 150), ``runlocal`` (seconds-long smoke run).
Expected: docs/results/routing.md.
"""

from sparsity_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.long_lm_tiny({"kind": "dense"}, arg)
