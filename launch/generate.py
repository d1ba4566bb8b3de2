r"""Generates text with a trained masked-diffusion LM, densely or with SparseD.

  python launch/generate.py --workdir=runs/diffusion_tiny --prompt="def main(" \
      --gen_length=64 --steps=64 --block_length=32 [--sparsed] \
      [--sparsed.skip=0.2 --sparsed.select=0.3 --sparsed.block_size=32]

--config overrides the run's own config.json (rarely needed). Prints the generated text
and the timings (total, per step, dense vs sparse steps).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Optional config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (checkpoint).")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "File holding the prompt text.")
_GEN_LENGTH = flags.DEFINE_integer("gen_length", 64, "Tokens (bytes) to generate.")
_STEPS = flags.DEFINE_integer("steps", 64, "Denoising steps in total.")
_BLOCK_LENGTH = flags.DEFINE_integer("block_length", 32, "Semi-autoregressive block length.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling threshold (temperature > 0).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_SPARSED = flags.DEFINE_bool("sparsed", False, "Use SparseD attention.")
_SKIP = flags.DEFINE_float("sparsed.skip", 0.2, "Fraction of steps run dense.")
_SELECT = flags.DEFINE_float("sparsed.select", 0.3, "Fraction of key blocks kept.")
_BLOCK = flags.DEFINE_integer("sparsed.block_size", 128, "SparseD block size (32 for short).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if (_PROMPT.value is None) == (_PROMPT_FILE.value is None):
    raise app.UsageError("give exactly one of --prompt and --prompt_file")
  import jax
  import numpy as np
  from sparsity_jax.models import diffusion
  from sparsity_jax.train import loop

  prompt = _PROMPT.value
  if _PROMPT_FILE.value is not None:
    with open(_PROMPT_FILE.value, encoding="utf-8") as f:
      prompt = f.read()
  attention = None
  if _SPARSED.value:
    attention = {"kind": "sparsed", "block_size": _BLOCK.value, "select": _SELECT.value}
  model = loop.load_model(_WORKDIR.value, attention=attention, config=_CONFIG.value)
  cfg = diffusion.SamplerConfig(gen_length=_GEN_LENGTH.value, steps=_STEPS.value,
                                block_length=_BLOCK_LENGTH.value, temperature=_TEMPERATURE.value,
                                top_p=_TOP_P.value)
  text, result = diffusion.generate_text(
      model, prompt, cfg, sparsed_skip=_SKIP.value if _SPARSED.value else None,
      rng=jax.random.key(_SEED.value), progress=True)
  seconds = np.array(result.step_seconds)
  print(text)
  print(f"\n[{len(prompt.encode())} prompt + {cfg.gen_length} generated tokens, {cfg.steps} steps: "
        f"{seconds.sum():.2f} s total, {1e3 * np.median(seconds):.1f} ms median step "
        f"(first step, with compilation: {seconds[0]:.2f} s)]")


if __name__ == "__main__":
  app.run(main)
