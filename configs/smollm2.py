r"""SmolLM2-135M-Instruct (the embedded real model) on the embedded corpus, tokenised with
its own tokenizer: evaluation as it is, or fine-tuning.

Commands (CPU, 2 cores):
  python launch/eval.py --model=smollm2 --config=configs/smollm2.py      # ~1 min
  python launch/train.py --config=configs/smollm2.py --workdir=runs/ft_smollm2

Expected (the model as shipped, Q4_1 weights dequantized to float32; 16 batches of 2 x 1024
tokens of the stdlib validation split): loss 1.893 nats/token, 0.772 bits/byte, perplexity
6.64; 3 min on the shared 2-core CPU.
Arguments (``--config=configs/smollm2.py:runlocal,seq_len=512``): ``runlocal`` shrinks
the evaluation to 2 x 2 sequences of at most 128 tokens; ``seq_len`` sets the length.
Point ``--config.pretrained`` at a .gguf file or a Hugging Face directory for another model.
"""

from sparsity_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.pretrained_config("smollm2", arg)
