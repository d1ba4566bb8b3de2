r"""Local-attention baseline of the Routing Transformer comparison (seq_len 2048).

All heads run blocked local attention (block 256, look back 1 block): the routing
config with zero routing heads, so it costs what the routing model's local heads cost.

  python launch/train.py --config=configs/local_lm_tiny.py --workdir=runs/local_lm_tiny

Arguments: ``steps=N`` (default 150), ``runlocal``. Expected: docs/results/routing.md.
"""

from sparsity_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.long_lm_tiny({"kind": "routing", "num_routing_heads": 0, "window": 256,
                                  "num_clusters": 8, "local_block": 256, "local_look_back": 1},
                                 arg)
