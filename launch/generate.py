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

A flag of the other kind of model (--max_new_tokens or --chat for a diffusion run;
--gen_length, --steps, --block_length or --sparsed for a causal LM) is refused, and so are
SparseD options out of range, before the model loads. --config overrides a run's own
config.json (rarely needed; its model must be the run's). Prints the prompt, the generated
text (or what it holds when nothing is printable), the timings, and a note when the run's
validation says the model is undertrained. The model reads bytes: a prompt that is not
UTF-8 (a --prompt_file of any bytes) is passed through as it is.
"""

import os
import sys

import numpy as np
from absl import flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparsity_jax import cli  # noqa: E402  (after the path)
from sparsity_jax.errors import UserError  # noqa: E402

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


# Flags of one kind of model; given for the other kind they would be ignored silently.
_CAUSAL_ONLY = ("max_new_tokens", "chat", "system")
_DIFFUSION_ONLY = ("gen_length", "steps", "block_length", "sparsed", "sparsed.skip",
                   "sparsed.select", "sparsed.block_size")


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if (_PROMPT.value is None) == (_PROMPT_FILE.value is None):
    raise UserError("give exactly one of --prompt and --prompt_file")
  if (_WORKDIR.value is None) == (_MODEL.value is None):
    raise UserError("give exactly one of --workdir (a training run) and --model (smollm2, a "
                    ".gguf file or a Hugging Face directory)")
  _check_sparsed_flags()
  prompt = prompt_bytes(_PROMPT.value, _PROMPT_FILE.value)
  if _MODEL.value is not None:
    _refuse_given(("config",), "for --workdir runs; a --model's settings are its own")
    _refuse_given(_DIFFUSION_ONLY, "for masked-diffusion runs (--workdir); --model is a causal "
                  "LM: set the length with --max_new_tokens")
    import jax.numpy as jnp
    from sparsity_jax.checkpoints import load_pretrained
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[_DTYPE.value]
    model, tokenizer = load_pretrained(_MODEL.value, dtype=dtype, param_dtype=dtype)
    return _generate_causal(model, tokenizer, prompt.decode("utf-8", errors="replace"))
  _refuse_given(("dtype",), "for --model; a --workdir run keeps its config's dtypes")
  from sparsity_jax.train import loop
  config = cli.config(_CONFIG)
  # Checked before the model loads: which flags apply depends on the kind of model.
  causal = bool((config if config is not None
                 else loop.load_workdir_config(_WORKDIR.value)).model.causal)
  if causal:
    _refuse_given(_DIFFUSION_ONLY, f"for masked-diffusion models, and {_WORKDIR.value} is a "
                  "causal LM: set the length with --max_new_tokens")
  else:
    _refuse_given(_CAUSAL_ONLY, f"for causal LMs, and {_WORKDIR.value} is a masked-diffusion "
                  "model: it generates --gen_length tokens (with --steps and --block_length)")
    sampler = _sampler_config()
  model = loop.load_model(_WORKDIR.value, config=config, attention=_sparsed_attention())
  if model.cfg.causal:
    from sparsity_jax.data.tokenizer import ByteTokenizer
    return _generate_causal(model, ByteTokenizer(), prompt)
  return _generate_diffusion(model, prompt, sampler)


def _refuse_given(names, why: str) -> None:
  """UserError naming those of the flags ``names`` that the command line sets (a bool
  flag only when true: --nosparsed asks for nothing)."""
  given = [f"--{name}" for name in names if flags.FLAGS[name].present and
           (flags.FLAGS[name].value is not False)]
  if given:
    raise UserError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} {why}")


def _check_sparsed_flags() -> None:
  """SparseD's options, checked before anything loads (out of range they failed mid-way
  through denoising, or deep inside JAX)."""
  options = [f"--{name}" for name in ("sparsed.skip", "sparsed.select", "sparsed.block_size")
             if flags.FLAGS[name].present]
  if options and not _SPARSED.value:
    raise UserError(f"{', '.join(options)} set{'s' if len(options) == 1 else ''} up SparseD "
                    "attention: add --sparsed")
  if not _SPARSED.value:
    return
  if not 0.0 <= _SKIP.value < 1.0:
    raise UserError(f"--sparsed.skip={_SKIP.value} must be in [0, 1) (the fraction of "
                    "denoising steps run dense)")
  if not 0.0 < _SELECT.value <= 1.0:
    raise UserError(f"--sparsed.select={_SELECT.value} must be in (0, 1] (the fraction of key "
                    "blocks kept)")
  if _BLOCK.value < 1:
    raise UserError(f"--sparsed.block_size={_BLOCK.value} must be >= 1 (tokens per block; 32 "
                    "for short sequences, 128 for long ones)")


def _generate_causal(model, tokenizer, prompt):
  """Streams a causal LM's continuation and ends with the speed line."""
  from sparsity_jax.models import generation
  sys.stdout.reconfigure(errors="replace")
  write = lambda text: (sys.stdout.write(text), sys.stdout.flush())
  try:
    result = generation.generate_text(
        model, tokenizer, prompt, chat=_CHAT.value, system=_SYSTEM.value,
        max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
        top_p=1.0 if _TOP_P.value is None else _TOP_P.value, seed=_SEED.value, stream=write)
  except ValueError as e:  # Too long a prompt, bad sampling arguments, no chat template.
    raise UserError(str(e)) from e
  print(f"\n{result.summary()}")


def _sparsed_attention():
  if not _SPARSED.value:
    return None
  return {"kind": "sparsed", "block_size": _BLOCK.value, "select": _SELECT.value}


def _sampler_config():
  from sparsity_jax.models import diffusion
  try:
    return diffusion.SamplerConfig(gen_length=_GEN_LENGTH.value, steps=_STEPS.value,
                                   block_length=_BLOCK_LENGTH.value,
                                   temperature=_TEMPERATURE.value, top_p=_TOP_P.value)
  except ValueError as e:
    raise UserError(str(e)) from e


def _generate_diffusion(model, prompt: bytes, cfg):
  import jax
  from sparsity_jax.layers import sparsed
  from sparsity_jax.models import diffusion

  prompt_ids = np.frombuffer(prompt, np.uint8).astype(np.int32)[None]
  hook = (sparsed.sparsed_step_hook(model, prompt_ids.shape[1], _SKIP.value)
          if _SPARSED.value else None)
  result = diffusion.generate(model, prompt_ids, cfg, rng=jax.random.key(_SEED.value),
                              step_hook=hook, progress=True)
  show_diffusion_result(prompt, result, _WORKDIR.value)


def prompt_bytes(prompt: str | None, prompt_file: str | None) -> bytes:
  """The prompt as the bytes the byte-level model reads: a file's raw bytes, or the
  command line's (os.fsencode keeps bytes that are not UTF-8, which Python decoded
  with surrogate escapes)."""
  if prompt_file is None:
    return os.fsencode(prompt)
  try:
    with open(prompt_file, "rb") as f:
      return f.read()
  except OSError as e:
    raise UserError(f"--prompt_file={prompt_file}: {e.strerror}") from e


UNDERTRAINED_BITS_PER_BYTE = 3.0  # Byte LMs that produce readable text are well below.


def show_diffusion_result(prompt: bytes, result, workdir: str) -> None:
  """Echoes the prompt, prints the continuation (saying so when it holds nothing
  printable) and the timings, and warns when the run's last validation says the model
  is undertrained (its output is then noise, not a bug)."""
  from sparsity_jax.data import tokenizer
  from sparsity_jax.train import metrics as metrics_lib

  sys.stdout.reconfigure(errors="replace")
  generated = result.generated[0]
  text = tokenizer.ByteTokenizer().decode(generated)
  print(f"--- prompt ({len(prompt)} bytes) ---")
  print(prompt.decode("utf-8", errors="replace"))
  print(f"--- generated ({len(generated)} tokens) ---")
  if text.strip():
    print(text)
  else:
    special = int(np.sum(generated >= 256))
    print(f"(nothing printable: {len(text)} whitespace bytes and {special} special tokens "
          "(end of text, padding, mask))")
  seconds = np.array(result.step_seconds)
  print(f"--- [{len(prompt)} prompt + {len(generated)} generated tokens, {len(seconds)} steps: "
        f"{seconds.sum():.2f} s total, {1e3 * np.median(seconds):.1f} ms median step "
        f"(first step, with compilation: {seconds[0]:.2f} s)]")
  path = os.path.join(workdir, "metrics.jsonl")
  evals = [r for r in metrics_lib.read_jsonl(path) if "eval/bits_per_byte" in r] if (
      os.path.exists(path)) else []
  if evals and evals[-1]["eval/bits_per_byte"] > UNDERTRAINED_BITS_PER_BYTE:
    print(f"note: this model is undertrained (validation {evals[-1]['eval/bits_per_byte']:.2f} "
          f"bits/byte after {evals[-1]['step']} steps; readable text needs well under "
          f"{UNDERTRAINED_BITS_PER_BYTE:.0f}): expect noise, train longer for text")


if __name__ == "__main__":
  cli.run(main)
