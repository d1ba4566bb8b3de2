"""Byte-level tokenizer: ids 0..255 are bytes, then a few special tokens."""

from __future__ import annotations

import numpy as np

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
MASK_ID = 259  # The mask token of the masked-diffusion LM.
VOCAB_SIZE = 260


class ByteTokenizer:
  """UTF-8 bytes as tokens. Lossless for any text; one token per byte."""

  pad_id, bos_id, eos_id, mask_id = PAD_ID, BOS_ID, EOS_ID, MASK_ID
  vocab_size = VOCAB_SIZE

  def encode(self, text: str | bytes, *, bos: bool = False, eos: bool = False) -> np.ndarray:
    """Token ids of ``text``: bytes as they are, a str as UTF-8 (surrogate escapes, e.g.
    from a command line that was not UTF-8, become their original bytes)."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", errors="surrogateescape")
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
    parts = ([np.array([BOS_ID], np.int32)] if bos else []) + [ids] + (
        [np.array([EOS_ID], np.int32)] if eos else [])
    return np.concatenate(parts)

  def decode(self, ids) -> str:
    """Bytes back to text; special tokens are dropped, invalid UTF-8 is replaced."""
    ids = np.asarray(ids).reshape(-1)
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")
