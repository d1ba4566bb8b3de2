r"""Routing Transformer LM (Roy et al. 2020) at tiny scale (seq_len 2048).

Half the heads are local (block 256, look back 1), half are routing heads with 8
clusters of 256 tokens (C = L / w, the paper's balanced setting), shared Q/K,
EMA decay 0.999, commitment beta 1e-4, routing in every layer; evaluated left to right.

  python launch/train.py --config=configs/routing_lm_tiny.py --workdir=runs/routing_lm_tiny

Arguments: ``steps=N`` (default 150), ``runlocal``. Expected: docs/results/routing.md.
"""

from sparsity_jax import config_lib


def get_config(arg: str | None = None):
  # eval_routing: 'left_to_right' (a left-to-right likelihood, the default) or
  # 'teacher_forced' (the paper's evaluation; docs/results/routing.md says what it means).
  return config_lib.long_lm_tiny({"kind": "routing", "num_routing_heads": 2, "window": 256,
                                  "num_clusters": 8, "local_block": 256, "local_look_back": 1,
                                  "decay": 0.999, "beta": 1e-4,
                                  "eval_routing": "left_to_right"}, arg)
