r"""Generates text: causal LMs with a KV cache (chat too), masked-diffusion LMs with SparseD.

Causal LMs, pretrained or trained here; tokens stream as they are generated, and a last
line gives prompt tokens, new tokens, prefill and decode tokens/s:

  python launch/generate.py --model=smollm2 --chat --prompt="What is sparse attention?"
  python launch/generate.py --model=/ckpt/model.gguf --prompt="def fib(n):" --max_new_tokens=64
  python launch/generate.py --model=/ckpt/hf_dir --chat --temperature=0.7 --top_p=0.9 --prompt=...
  python launch/generate.py --workdir=runs/lm_tiny --prompt="def main("

--model is ``smollm2`` (the embedded SmolLM2-135M-Instruct), a .gguf file or a Hugging
Face directory; --chat wraps the prompt in the model's chat template (--system adds a
system message); generation stops at the tokenizer's EOS token.

Masked-diffusion LMs (a --workdir trained with the masked_diffusion objective):

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
_MODEL = flags.DEFINE_string("model", None, "Pretrained causal LM: smollm2, a .gguf file or a "
                             "Hugging Face directory (instead of --workdir).")
_CHAT = flags.DEFINE_bool("chat", False, "Causal LMs: wrap the prompt in the chat template.")
_SYSTEM = flags.DEFINE_string("system", None, "Causal LMs with --chat: a system message.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Causal LMs: tokens to generate at most.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Causal LMs from --model: compute and parameter dtype.")
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if (_PROMPT.value is None) == (_PROMPT_FILE.value is None):
    raise app.UsageError("give exactly one of --prompt and --prompt_file")
  if (_WORKDIR.value is None) == (_MODEL.value is None):
    raise app.UsageError("give exactly one of --workdir (a training run) and --model (smollm2, a "
                         ".gguf file or a Hugging Face directory)")
  prompt = _PROMPT.value
  if _PROMPT_FILE.value is not None:
    with open(_PROMPT_FILE.value, encoding="utf-8") as f:
      prompt = f.read()
  if _MODEL.value is not None:
    import jax.numpy as jnp
    from sparsity_jax.checkpoints import CheckpointError, load_pretrained
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[_DTYPE.value]
    try:
      model, tokenizer = load_pretrained(_MODEL.value, dtype=dtype, param_dtype=dtype)
    except (FileNotFoundError, CheckpointError) as e:
      sys.exit(f"generate: {e}")
    return _generate_causal(model, tokenizer, prompt)
  from sparsity_jax.train import loop
  model = loop.load_model(_WORKDIR.value, config=_CONFIG.value,
                          attention=_sparsed_attention())
  if model.cfg.causal:
    from sparsity_jax.data.tokenizer import ByteTokenizer
    return _generate_causal(model, ByteTokenizer(), prompt)
  return _generate_diffusion(model, prompt)


def _generate_causal(model, tokenizer, prompt):
  from sparsity_jax.models import generation
  if _SPARSED.value:
    raise app.UsageError("--sparsed is for masked-diffusion models")
  write = lambda text: (sys.stdout.write(text), sys.stdout.flush())
  try:
    result = generation.generate_text(
        model, tokenizer, prompt, chat=_CHAT.value, system=_SYSTEM.value,
        max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
        top_p=1.0 if _TOP_P.value is None else _TOP_P.value, seed=_SEED.value, stream=write)
  except ValueError as e:  # Too long a prompt, bad sampling arguments, no chat template.
    sys.exit(f"generate: {e}")
  print(f"\n{result.summary()}")


def _sparsed_attention():
  if not _SPARSED.value:
    return None
  return {"kind": "sparsed", "block_size": _BLOCK.value, "select": _SELECT.value}


def _generate_diffusion(model, prompt):
  import jax
  import numpy as np
  from sparsity_jax.models import diffusion

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
