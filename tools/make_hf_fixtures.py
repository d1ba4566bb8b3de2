r"""Generates the tiny Hugging Face checkpoints under tests/fixtures/hf/ (needs torch).

torch and transformers are not test dependencies, so this runs in its own Python 3.11
environment outside the repository, once, and its small outputs are committed:

  python3.11 -m venv /tmp/hfgen
  /tmp/hfgen/bin/pip install torch==2.13.0 transformers safetensors numpy
  /tmp/hfgen/bin/python tools/make_hf_fixtures.py [--out=tests/fixtures/hf]

For each of llama (with Llama 3 rope_scaling), mistral (saved as sharded files with an
index) and qwen2 (q/k/v biases, tied embeddings) it writes a random 2-layer GQA model in
float32 with transformers' own ``save_pretrained`` (config.json, safetensors), a fixed
``input_ids.npy`` [2, 24] and transformers' ``reference_logits.npy`` for it (eager
attention, float32). Every weight is randomised (norm scales and biases too, which
transformers initialises to constants) so that a wrong mapping cannot go unnoticed.
llama also gets ``rope_inv_freq.npy`` (transformers' scaled RoPE frequencies), a
byte-level BPE ``tokenizer.json`` with a chat template, and ``reference_tokens.json``
(transformers' tokenisation and rendered chat template).

llada has no transformers class: its directory is written in the layout of GSAI-ML's
LLaDA-8B-Base (``model.transformer.*`` names, LLaDA config fields) from numpy arrays;
the tests check it against a numpy forward pass written from LLaDA's documented math.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from safetensors.numpy import save_file

VOCAB, D_MODEL, HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS = 288, 32, 4, 2, 8, 64, 2
BATCH, LENGTH = 2, 24
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
# A Llama-3-style template: header tokens around each role, <|eot_id|> after each turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  What is 2 + 2?  "}]
TEXT = "Sparse attention: routing, MoA and SparseD. Ünïcödé too."


def common(**extra):
  return dict(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=MLP,
              num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
              head_dim=HEAD_DIM, max_position_embeddings=512, rms_norm_eps=1e-5,
              rope_theta=10_000.0, **extra)


def randomise(model: torch.nn.Module, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.2 * noise)


def write_causal(out: str, arch: str, seed: int) -> None:
  import transformers

  if arch == "llama":
    # Frequencies on both sides of the band: wavelengths 6.3 and 63 (kept or smoothed),
    # 628 and 6283 (divided by factor) for original_max_position_embeddings=256.
    config = transformers.LlamaConfig(**common(
        tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 8.0, "original_max_position_embeddings": 256}))
    cls = transformers.LlamaForCausalLM
  elif arch == "mistral":
    config = transformers.MistralConfig(**common(tie_word_embeddings=False, sliding_window=4096))
    cls = transformers.MistralForCausalLM
  else:
    config = transformers.Qwen2Config(**common(tie_word_embeddings=True))
    cls = transformers.Qwen2ForCausalLM
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = cls(config).float().eval()
  randomise(model, seed)
  if config.tie_word_embeddings:
    model.tie_weights()
  directory = os.path.join(out, arch)
  # Mistral goes out in several files with an index, to cover sharded checkpoints.
  model.save_pretrained(directory, max_shard_size="60KB" if arch == "mistral" else "50MB")
  rng = np.random.default_rng(seed)
  input_ids = rng.integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32)
  with torch.no_grad():
    logits = model(torch.from_numpy(input_ids).long()).logits.float().numpy()
  np.save(os.path.join(directory, "input_ids.npy"), input_ids)
  np.save(os.path.join(directory, "reference_logits.npy"), logits.astype(np.float32))
  if arch == "llama":
    inv_freq = model.model.rotary_emb.inv_freq.float().numpy()
    np.save(os.path.join(directory, "rope_inv_freq.npy"), inv_freq)
    write_tokenizer(directory)
  print(f"{arch}: {sorted(os.listdir(directory))}")


def write_tokenizer(directory: str) -> None:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import AutoTokenizer

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = [TEXT, "the quick brown fox jumps over the lazy dog " * 4,
            "attention is all you need; sparse attention is faster"] * 8
  tok.train_from_iterator(corpus, trainer)
  bos = tok.token_to_id("<|begin_of_text|>")
  tok.post_processor = processors.TemplateProcessing(
      single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
      special_tokens=[("<|begin_of_text|>", bos)])
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
               "eos_token": "<|eot_id|>", "chat_template": CHAT_TEMPLATE,
               "model_max_length": 512}, f, indent=2)
  hf_tok = AutoTokenizer.from_pretrained(directory)
  rendered = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
  reference = {
      "text": TEXT, "ids": hf_tok(TEXT)["input_ids"],
      "ids_no_special": hf_tok(TEXT, add_special_tokens=False)["input_ids"],
      "chat": CHAT, "chat_rendered": rendered,
      "chat_ids": hf_tok(rendered, add_special_tokens=False)["input_ids"],
      "chat_rendered_no_prompt": hf_tok.apply_chat_template(CHAT, tokenize=False,
                                                            add_generation_prompt=False),
  }
  with open(os.path.join(directory, "reference_tokens.json"), "w") as f:
    json.dump(reference, f, indent=2, ensure_ascii=False)


def write_llada(out: str, seed: int) -> None:
  """LLaDA-8B-Base layout and config fields, tiny: MHA as in LLaDA-8B (n_kv_heads=n_heads
  would not test GQA, so this uses 2 kv heads, which LLaDA's code supports)."""
  directory = os.path.join(out, "llada")
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  w = lambda *shape: (0.2 * rng.standard_normal(shape)).astype(np.float32)
  norm = lambda: (1.0 + 0.2 * rng.standard_normal(D_MODEL)).astype(np.float32)
  head_dim = D_MODEL // HEADS
  tensors = {"model.transformer.wte.weight": w(VOCAB, D_MODEL),
             "model.transformer.ln_f.weight": norm(),
             "model.transformer.ff_out.weight": w(VOCAB, D_MODEL)}
  for i in range(LAYERS):
    p = f"model.transformer.blocks.{i}."
    tensors.update({
        p + "attn_norm.weight": norm(), p + "ff_norm.weight": norm(),
        p + "q_proj.weight": w(D_MODEL, D_MODEL),
        p + "k_proj.weight": w(KV_HEADS * head_dim, D_MODEL),
        p + "v_proj.weight": w(KV_HEADS * head_dim, D_MODEL),
        p + "attn_out.weight": w(D_MODEL, D_MODEL),
        p + "ff_proj.weight": w(MLP, D_MODEL), p + "up_proj.weight": w(MLP, D_MODEL),
        p + "ff_out.weight": w(D_MODEL, MLP)})
  save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  config = {
      "architectures": ["LLaDAModelLM"], "model_type": "llada",
      "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                   "AutoModel": "modeling_llada.LLaDAModelLM",
                   "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
      "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
      "attention_dropout": 0.0, "attention_layer_norm": False,
      "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False,
      "block_group_size": 1, "block_type": "llama", "d_model": D_MODEL,
      "embedding_dropout": 0.0, "embedding_size": VOCAB, "eos_token_id": VOCAB - 2,
      "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
      "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell",
      "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
      "layer_norm_with_affine": True, "mask_token_id": VOCAB - 1,
      "max_sequence_length": 512, "mlp_hidden_size": MLP, "mlp_ratio": 2,
      "multi_query_attention": None, "n_heads": HEADS, "n_kv_heads": KV_HEADS,
      "n_layers": LAYERS, "pad_token_id": VOCAB - 2, "precision": "amp_bf16",
      "residual_dropout": 0.0, "rms_norm_eps": 1e-5, "rope": True,
      "rope_full_precision": True, "rope_theta": 10_000.0, "scale_logits": False,
      "use_cache": False, "vocab_size": VOCAB, "weight_tying": False}
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  input_ids = rng.integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32)
  input_ids[:, ::3] = VOCAB - 1  # Masked positions, as the diffusion LM sees them.
  np.save(os.path.join(directory, "input_ids.npy"), input_ids)
  print(f"llada: {sorted(os.listdir(directory))}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "tests", "fixtures", "hf"))
  args = parser.parse_args()
  torch.set_num_threads(1)
  for seed, arch in enumerate(("llama", "mistral", "qwen2")):
    write_causal(args.out, arch, seed)
  write_llada(args.out, 3)
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
  print(f"total {total / 1e3:.0f} kB in {args.out}")


if __name__ == "__main__":
  main()
