r"""Tokenizers from GGUF metadata (``tokenizer.ggml.*``), as ``tokenizers`` objects.

A GGUF file carries its tokenizer as metadata in llama.cpp's keys; this module builds
the same tokenizer with the ``tokenizers`` package and wraps it in
:class:`~sparsity_jax.checkpoints.hf_tokenizer.HFTokenizer` (encode, decode, chat
template, special ids), and writes one back (:func:`write_tokenizer`).

Supported: ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE: GPT-2, SmolLM, Llama 3,
Qwen2 files) with the pre-tokenizers (``tokenizer.ggml.pre``) below, which follow
llama.cpp's ``llama-vocab.cpp`` (its regexes per pre-tokenizer type):

  default, gpt-2         GPT-2's regex
  smollm                 digits one by one, then GPT-2's regex (as SmolLM's own
                         tokenizer.json: Digits(individual_digits) + ByteLevel)
  llama3, llama-bpe,     Llama 3's regex (numbers in groups of up to 3), and whole-word
  llama-v3               vocabulary hits skip the merges (``ignore_merges``)
  qwen2                  Qwen2's regex (digits one by one)

Other models (``llama`` SentencePiece, ``t5`` unigram, ...) and pre-tokenizers raise
:class:`CheckpointError`; the model weights load regardless.

Token types (``tokenizer.ggml.token_type``): CONTROL (3) tokens become special added
tokens, USER_DEFINED (4) plain added tokens, so neither is split by the BPE.
``add_bos_token`` / ``add_eos_token`` become a post-processor, ``tokenizer.chat_template``
the chat template. Note: transformers' own GGUF import ignores ``tokenizer.ggml.pre ==
"smollm"`` and splits digit runs with GPT-2's regex instead (see docs/fidelity.md).
"""

from __future__ import annotations

import json
from typing import Any

from sparsity_jax.checkpoints.arch import CheckpointError
from sparsity_jax.checkpoints.hf_tokenizer import HFTokenizer

CONTROL, USER_DEFINED = 3, 4
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (split regexes applied in order, ignore_merges)
PRE_TOKENIZERS = {
    "default": ([_GPT2_REGEX], False),
    "gpt-2": ([_GPT2_REGEX], False),
    "smollm": ([r"\p{N}", _GPT2_REGEX], False),
    "llama3": ([_LLAMA3_REGEX], True),
    "llama-bpe": ([_LLAMA3_REGEX], True),
    "llama-v3": ([_LLAMA3_REGEX], True),
    "qwen2": ([_QWEN2_REGEX], False),
}


def _value(metadata, key: str, default: Any = None) -> Any:
  value = metadata.get(key)
  return default if value is None else value


def build_tokenizer(tokens: list[str], merges: list[str], token_types: list[int] | None, *,
                    pre: str = "default", bos_id: int | None = None,
                    eos_id: int | None = None, pad_id: int | None = None,
                    unk_id: int | None = None, add_bos: bool = False, add_eos: bool = False,
                    chat_template: str | None = None) -> HFTokenizer:
  """A byte-level BPE :class:`HFTokenizer` from llama.cpp's vocabulary description.

  Args:
    tokens: the vocabulary, id order, in the byte-level alphabet (``Ġ`` for a space).
    merges: ``"left right"`` strings in priority order.
    token_types: llama.cpp token types per id (None: all normal).
    pre: llama.cpp's pre-tokenizer type, a key of :data:`PRE_TOKENIZERS`.
    bos_id, eos_id, pad_id, unk_id: special token ids.
    add_bos, add_eos: whether encoding adds BOS / EOS (``add_special_tokens=True``).
    chat_template: the Jinja chat template.

  Raises:
    CheckpointError: an unknown pre-tokenizer type or an inconsistent vocabulary.
  """
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
  from tokenizers import processors

  if pre not in PRE_TOKENIZERS:
    raise CheckpointError(f"GGUF tokenizer pre-tokenizer {pre!r} is not supported; supported: "
                          f"{', '.join(sorted(PRE_TOKENIZERS))}")
  regexes, ignore_merges = PRE_TOKENIZERS[pre]
  vocab = {token: i for i, token in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise CheckpointError("the GGUF token list holds duplicate tokens")
  pairs = []
  for merge in merges:
    left, sep, right = merge.partition(" ")
    if not sep:
      raise CheckpointError(f"malformed GGUF merge {merge!r} (want 'left right')")
    pairs.append((left, right))
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges,
                                   fuse_unk=False, byte_fallback=False))
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
      + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tokenizer.decoder = decoders.ByteLevel()
  types = list(token_types) if token_types is not None else [1] * len(tokens)
  specials = [AddedToken(t, special=True, normalized=False)
              for t, kind in zip(tokens, types) if kind == CONTROL]
  added = [AddedToken(t, special=False, normalized=False)
           for t, kind in zip(tokens, types) if kind == USER_DEFINED]
  tokenizer.add_special_tokens(specials)
  tokenizer.add_tokens(added)
  if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
    raise CheckpointError("GGUF special tokens are missing from the token list")
  name = lambda i: None if i is None or not 0 <= i < len(tokens) else tokens[i]
  if add_bos or add_eos:
    single = ([f"{name(bos_id)}:0"] if add_bos else []) + ["$A:0"] + (
        [f"{name(eos_id)}:0"] if add_eos else [])
    pair = single + ["$B:0"]
    special = [(name(i), i) for i, used in ((bos_id, add_bos), (eos_id, add_eos))
               if used and name(i) is not None]
    if len(special) != add_bos + add_eos:
      raise CheckpointError("GGUF tokenizer adds BOS/EOS but has no valid bos/eos token id")
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                             special_tokens=special)
  config = {"bos_token": name(bos_id), "eos_token": name(eos_id), "pad_token": name(pad_id),
            "unk_token": name(unk_id), "add_bos_token": add_bos, "add_eos_token": add_eos,
            "tokenizer_class": "PreTrainedTokenizerFast"}
  if chat_template:
    config["chat_template"] = chat_template
  return HFTokenizer(tokenizer, config, chat_template)


def tokenizer_from_gguf(metadata: dict[str, Any], path: str = "the GGUF file") -> HFTokenizer:
  """The tokenizer a GGUF file's metadata (key -> value, see ``gguf.GGUFFile``) describes.

  Raises:
    CheckpointError: no tokenizer metadata, or a tokenizer model / pre-tokenizer that is
      not supported (the message names the supported ones).
  """
  model = _value(metadata, "tokenizer.ggml.model")
  if model is None:
    raise CheckpointError(f"{path} carries no tokenizer (no tokenizer.ggml.model)")
  if model != "gpt2":
    raise CheckpointError(f"{path}: GGUF tokenizer model {model!r} is not supported (only "
                          "'gpt2', byte-level BPE); load the model's tokenizer.json instead with "
                          "HFTokenizer.from_dir")
  tokens = _value(metadata, "tokenizer.ggml.tokens")
  merges = _value(metadata, "tokenizer.ggml.merges")
  if tokens is None or merges is None:
    raise CheckpointError(f"{path}: byte-level BPE tokenizer without tokens or merges")
  as_int = lambda key: None if _value(metadata, key) is None else int(_value(metadata, key))
  try:
    return build_tokenizer(
        list(tokens), list(merges), _value(metadata, "tokenizer.ggml.token_type"),
        pre=_value(metadata, "tokenizer.ggml.pre", "default"),
        bos_id=as_int("tokenizer.ggml.bos_token_id"),
        eos_id=as_int("tokenizer.ggml.eos_token_id"),
        pad_id=as_int("tokenizer.ggml.padding_token_id"),
        unk_id=as_int("tokenizer.ggml.unknown_token_id"),
        add_bos=bool(_value(metadata, "tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(_value(metadata, "tokenizer.ggml.add_eos_token", False)),
        chat_template=_value(metadata, "tokenizer.chat_template"))
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None


def write_tokenizer(writer, tokenizer: HFTokenizer, *, pre: str | None = None) -> None:
  """Adds a byte-level BPE tokenizer's ``tokenizer.ggml.*`` metadata to a GGUFWriter.

  ``pre`` is llama.cpp's pre-tokenizer type; by default it is read off the tokenizer:
  ``default`` for GPT-2's byte-level pre-tokenizer, ``smollm`` for Digits + ByteLevel.

  Raises:
    CheckpointError: not a byte-level BPE tokenizer, or a pre-tokenizer with no GGUF name.
  """
  spec = json.loads(tokenizer.tokenizer.to_str())
  model = spec.get("model") or {}
  if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
    raise CheckpointError("only byte-level BPE tokenizers can be written to GGUF")
  if pre is None:
    pre = _pre_type(spec.get("pre_tokenizer"))
  if pre not in PRE_TOKENIZERS:
    raise CheckpointError(f"pre-tokenizer {pre!r} has no GGUF name; pass pre=")
  size = tokenizer.vocab_size
  tokens = [tokenizer.tokenizer.id_to_token(i) for i in range(size)]
  if any(t is None for t in tokens):
    raise CheckpointError("the tokenizer's ids are not contiguous; GGUF needs one token per id")
  types = [1] * size
  for added in spec.get("added_tokens", []):
    types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                   ("pad_token", writer.add_pad_token_id), ("unk_token", writer.add_unk_token_id)):
    token_id = tokenizer.token_id(tokenizer.special_tokens.get(key))
    if token_id is not None:
      add(token_id)
  probe = tokenizer.tokenizer.encode("a", add_special_tokens=True).ids
  plain = tokenizer.tokenizer.encode("a", add_special_tokens=False).ids
  writer.add_add_bos_token(len(probe) > len(plain) and probe[0] == tokenizer.bos_id)
  writer.add_add_eos_token(len(probe) > len(plain) and probe[-1] == tokenizer.eos_id)
  if tokenizer.chat_template:
    writer.add_chat_template(tokenizer.chat_template)


def _pre_type(pre_tokenizer: dict | None) -> str:
  if not pre_tokenizer:
    raise CheckpointError("a tokenizer without a pre-tokenizer has no GGUF pre-tokenizer type")
  kind = pre_tokenizer.get("type")
  if kind == "ByteLevel" and pre_tokenizer.get("use_regex", True):
    return "default"
  if kind == "Sequence":
    parts = [p.get("type") for p in pre_tokenizer.get("pretokenizers", [])]
    first = pre_tokenizer["pretokenizers"][0] if parts else {}
    if parts == ["Digits", "ByteLevel"] and first.get("individual_digits"):
      return "smollm"
  raise CheckpointError(f"pre-tokenizer {kind!r} has no GGUF pre-tokenizer type; pass pre=")
