r"""Tiny masked-diffusion LM (LLaDA-style, bidirectional) on the embedded corpus.

Command (CPU, 2 cores, a few minutes):
  python launch/train.py --config=configs/diffusion_lm_tiny.py --workdir=runs/diffusion_tiny

Objective: mask each token with probability t ~ U(0, 1], cross-entropy on masked tokens
weighted by 1/t; the reported loss (bits/byte) is the negative ELBO, an upper bound.
``runlocal`` shrinks it to a seconds-long smoke run.
"""

from sparsity_jax import config_lib as common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, runlocal=False)
  c = common.base_config()
  c.objective = "masked_diffusion"
  c.model.causal = False
  c.train.steps = 600
  c.train.lr = 3e-3
  c.train.checkpoint_every = 200
  c.eval.every = 200
  if args.runlocal:
    common.shrink_for_runlocal(c)
  return c
