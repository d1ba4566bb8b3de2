"""Tokenizer and chat template of a local Hugging Face checkpoint (no transformers).

``tokenizer.json`` is loaded with the ``tokenizers`` package; special tokens and the chat
template come from ``tokenizer_config.json`` (or ``chat_template.jinja`` /
``chat_template.json`` beside it, where newer checkpoints keep the template). Templates
are rendered with jinja2 the way transformers renders them (sandboxed, trim_blocks,
lstrip_blocks, ``raise_exception``, ``tojson``, ``strftime_now``), so MoA calibration can
build chat-formatted prompts exactly as the model saw them in training.

  tok = HFTokenizer.from_dir("/ckpt/Llama-3.2-1B-Instruct")
  ids = tok.encode("Hello")                       # int32 [t], with BOS where the model adds it
  prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sparsity_jax.checkpoints.arch import CheckpointNotFoundError


def _token_text(token: Any) -> str | None:
  # tokenizer_config.json stores a special token as a string or as an AddedToken dict.
  if isinstance(token, Mapping):
    return token.get("content")
  return token


class HFTokenizer:
  """A ``tokenizers.Tokenizer`` plus the special tokens and chat template of its config."""

  def __init__(self, tokenizer, config: Mapping[str, Any] | None = None,
               chat_template: str | None = None):
    self.tokenizer = tokenizer
    self.config = dict(config or {})
    self.chat_template = chat_template
    self.special_tokens = {
        key: _token_text(self.config.get(key))
        for key in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")}

  @classmethod
  def from_dir(cls, directory: str) -> "HFTokenizer":
    """Loads ``tokenizer.json`` (required) and ``tokenizer_config.json`` (optional)."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
      raise CheckpointNotFoundError(f"{path} is missing: only fast tokenizers (tokenizer.json) are "
                              "supported, not sentencepiece .model files alone")
    from tokenizers import Tokenizer  # Lazily: optional for the rest of the package.
    tokenizer = Tokenizer.from_file(path)
    config = {}
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(config_path):
      with open(config_path) as f:
        config = json.load(f)
    return cls(tokenizer, config, _find_chat_template(directory, config))

  def save_pretrained(self, directory: str) -> list[str]:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, chat
    template) so that :meth:`from_dir` and transformers' ``AutoTokenizer`` load them."""
    os.makedirs(directory, exist_ok=True)
    self.tokenizer.save(os.path.join(directory, "tokenizer.json"))
    config = {k: v for k, v in self.config.items() if v is not None}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for key, token in self.special_tokens.items():
      if token is not None:
        config[key] = token
    if self.chat_template:
      config["chat_template"] = self.chat_template
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)
    return ["tokenizer.json", "tokenizer_config.json"]

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def token_id(self, token: str | None) -> int | None:
    return None if token is None else self.tokenizer.token_to_id(token)

  @property
  def bos_id(self) -> int | None:
    return self.token_id(self.special_tokens["bos_token"])

  @property
  def eos_id(self) -> int | None:
    return self.token_id(self.special_tokens["eos_token"])

  def encode(self, text: str, *, add_special_tokens: bool = True) -> np.ndarray:
    """Token ids [t] (int32); ``add_special_tokens`` applies the tokenizer's post-processor
    (e.g. a leading BOS), as transformers does by default."""
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids,
                      np.int32)

  def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
    return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                 skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                          add_generation_prompt: bool = True, tokenize: bool = False,
                          **kwargs) -> str | np.ndarray:
    """Renders ``messages`` ([{"role", "content"}, ...]) with the model's chat template.

    Args:
      messages: the conversation.
      add_generation_prompt: end with the header that starts the assistant's turn.
      tokenize: return token ids (encoded without extra special tokens, since the
        template writes them) instead of text.
      **kwargs: extra template variables (e.g. ``tools``, ``date_string``).
    """
    if not self.chat_template:
      raise ValueError("this tokenizer has no chat template (tokenizer_config.json has no "
                       "'chat_template' and there is no chat_template.jinja)")
    variables = {k: v for k, v in self.special_tokens.items() if v is not None}
    variables.update(kwargs)
    text = _compile(self.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)
    return self.encode(text, add_special_tokens=False) if tokenize else text


def _find_chat_template(directory: str, config: Mapping[str, Any]) -> str | None:
  template = config.get("chat_template")
  if template is None and os.path.exists(os.path.join(directory, "chat_template.jinja")):
    with open(os.path.join(directory, "chat_template.jinja")) as f:
      template = f.read()
  if template is None and os.path.exists(os.path.join(directory, "chat_template.json")):
    with open(os.path.join(directory, "chat_template.json")) as f:
      template = json.load(f).get("chat_template")
  if isinstance(template, list):  # Named templates: [{"name": ..., "template": ...}].
    named = {t["name"]: t["template"] for t in template}
    template = named.get("default", next(iter(named.values()), None))
  return template


def _compile(template: str):
  import jinja2
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson keeps non-ASCII text as is (jinja's own escapes it for HTML).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(template)
