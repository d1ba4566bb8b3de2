"""Hugging Face checkpoints: logits parity with transformers, round trips, sharded loads.

The fixtures under tests/fixtures/hf/ are tiny random checkpoints written by
tools/make_hf_fixtures.py with transformers + torch (neither is needed here), together
with transformers' logits on a fixed input.
"""

import json
import math
import re
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from support import ROOT, make_tiny_config, subprocess_env
from sparsity_jax import parallel
from sparsity_jax.checkpoints import hf
from sparsity_jax.checkpoints.hf_tokenizer import HFTokenizer
from sparsity_jax.layers import rope

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
CAUSAL = ("llama", "mistral", "qwen2")
# fp32 on both sides; the differences are summation order only (observed ~1e-5 on
# logits of magnitude ~5).
ATOL, RTOL = 1e-4, 1e-4


def fixture(arch: str) -> str:
  return os.path.join(FIXTURES, arch)


def all_tensors(directory: str) -> dict[str, np.ndarray]:
  out = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith(".safetensors"):
      out.update(load_file(os.path.join(directory, name)))
  return out


def params_of(model) -> dict:
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}


@pytest.mark.parametrize("arch", CAUSAL)
def test_logits_match_transformers(arch):
  model = hf.load_model(fixture(arch))
  input_ids = np.load(os.path.join(fixture(arch), "input_ids.npy"))
  reference = np.load(os.path.join(fixture(arch), "reference_logits.npy"))
  logits = np.asarray(model(jnp.asarray(input_ids)))
  print(f"{arch}: max |logits - transformers| = {np.abs(logits - reference).max():.2e}")
  np.testing.assert_allclose(logits, reference, atol=ATOL, rtol=RTOL)
  assert model.cfg.causal and model.cfg.qkv_bias == (arch == "qwen2")
  assert model.cfg.tie_embeddings == (arch == "qwen2")


def test_llama3_rope_scaling_matches_transformers_and_matters():
  cfg = hf.load_model(fixture("llama")).cfg
  assert cfg.rope_scaling["rope_type"] == "llama3"
  reference = np.load(os.path.join(fixture("llama"), "rope_inv_freq.npy"))
  ours = np.asarray(rope.rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
  np.testing.assert_allclose(ours, reference, rtol=1e-6)
  plain = np.asarray(rope.rope_frequencies(cfg.head_dim, cfg.rope_theta))
  assert not np.allclose(plain, reference, rtol=1e-3)  # The fixture exercises the scaling...
  unscaled = hf.load_model(fixture("llama"))
  for block in unscaled.layers:
    block.attn.rope_scaling = None
  input_ids = np.load(os.path.join(fixture("llama"), "input_ids.npy"))
  reference_logits = np.load(os.path.join(fixture("llama"), "reference_logits.npy"))
  # ...and the parity test would catch a model that ignored it.
  assert np.abs(np.asarray(unscaled(jnp.asarray(input_ids))) - reference_logits).max() > 10 * ATOL


def test_classic_and_v5_rope_config_fields_agree():
  v5 = hf.read_config(fixture("llama"))  # transformers 5 writes rope_parameters.
  classic = {k: v for k, v in v5.items() if k != "rope_parameters"}
  classic["rope_theta"] = v5["rope_parameters"]["rope_theta"]
  classic["rope_scaling"] = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 8.0, "original_max_position_embeddings": 256}
  assert hf.model_config_from_hf(classic) == hf.model_config_from_hf(v5)


def llada_reference(directory: str, input_ids: np.ndarray) -> np.ndarray:
  """LLaDA's forward pass in float64 numpy, written from modeling_llada.py's math with
  LLaDA's own tensor names (independent of our name mapping)."""
  c = hf.read_config(directory)
  w = {k: v.astype(np.float64) for k, v in all_tensors(directory).items()}
  d, n, k = c["d_model"], c["n_heads"], c["n_kv_heads"]
  h, eps, b, t = d // n, c["rms_norm_eps"], *input_ids.shape
  rms = lambda x, g: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g
  inv_freq = 1.0 / c["rope_theta"] ** (np.arange(0, h, 2) / h)
  angles = np.arange(t)[:, None] * inv_freq
  cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))
  rotary = lambda x: x * cos + np.concatenate([-x[..., h // 2:], x[..., :h // 2]], -1) * sin
  heads = lambda x, m: x.reshape(b, t, m, h).transpose(0, 2, 1, 3)  # [b, m, t, h]
  x = w["model.transformer.wte.weight"][input_ids]
  for i in range(c["n_layers"]):
    p = f"model.transformer.blocks.{i}."
    xn = rms(x, w[p + "attn_norm.weight"])
    q = rotary(heads(xn @ w[p + "q_proj.weight"].T, n))
    key = rotary(np.repeat(heads(xn @ w[p + "k_proj.weight"].T, k), n // k, axis=1))
    val = np.repeat(heads(xn @ w[p + "v_proj.weight"].T, k), n // k, axis=1)
    scores = q @ key.transpose(0, 1, 3, 2) / np.sqrt(h)  # No mask: bidirectional.
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    att = (probs @ val).transpose(0, 2, 1, 3).reshape(b, t, d)
    x = x + att @ w[p + "attn_out.weight"].T
    hn = rms(x, w[p + "ff_norm.weight"])
    gate, up = hn @ w[p + "ff_proj.weight"].T, hn @ w[p + "up_proj.weight"].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "ff_out.weight"].T
  x = rms(x, w["model.transformer.ln_f.weight"])
  return x @ w["model.transformer.ff_out.weight"].T


def test_llada_matches_numpy_reference():
  directory = fixture("llada")
  model = hf.load_model(directory)
  assert not model.cfg.causal
  assert hf.mask_token_id(hf.read_config(directory)) == 287
  input_ids = np.load(os.path.join(directory, "input_ids.npy"))
  logits = np.asarray(model(jnp.asarray(input_ids)))
  reference = llada_reference(directory, input_ids)
  print(f"llada: max |logits - numpy reference| = {np.abs(logits - reference).max():.2e}")
  np.testing.assert_allclose(logits, reference, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("arch", CAUSAL + ("llada",))
def test_save_load_round_trip_is_exact(arch, tmp_path):
  source = hf.read_config(fixture(arch))
  model = hf.load_model(fixture(arch))
  out = str(tmp_path / "out")
  hf.save_model(model, out, arch=arch, hf_config=source)
  original, saved = all_tensors(fixture(arch)), all_tensors(out)
  assert sorted(saved) == sorted(original)
  for name in original:
    assert saved[name].dtype == original[name].dtype, name
    np.testing.assert_array_equal(saved[name], original[name], err_msg=name)
  assert hf.read_config(out) == source
  reloaded = hf.load_model(out)
  assert reloaded.cfg == model.cfg
  # A config.json built from the ModelConfig describes the same model.
  assert hf.model_config_from_hf(hf.hf_config_from_model_config(model.cfg, arch)) == model.cfg
  a, b = params_of(model), params_of(reloaded)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_export_without_source_config_scanned_and_sharded_files(tmp_path):
  """A scanned (stacked) model exported with a config built from its ModelConfig, split
  into several files with an index, loads back to the same logits."""
  scanned = hf.load_model(fixture("qwen2"), scan_layers=True)
  assert scanned.layers.attn.q_proj.get_value().shape[0] == 2  # Stacked layers.
  out = str(tmp_path / "out")
  files = hf.save_model(scanned, out, arch="qwen2", max_shard_bytes=40_000)
  assert hf.INDEX_FILE in files and len(files) > 3
  for name, array in all_tensors(fixture("qwen2")).items():
    np.testing.assert_array_equal(all_tensors(out)[name], array, err_msg=name)
  reloaded = hf.load_model(out)
  input_ids = jnp.asarray(np.load(os.path.join(fixture("qwen2"), "input_ids.npy")))
  np.testing.assert_allclose(np.asarray(reloaded(input_ids)), np.asarray(scanned(input_ids)),
                             atol=1e-5, rtol=1e-5)


def test_sharded_load_on_2x2x2_mesh_reads_only_shards(monkeypatch):
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  reads = []
  read = hf.SafetensorsReader.read

  def recording_read(self, name, index=None):
    out = read(self, name, index)
    reads.append((name, out.shape))
    return out

  monkeypatch.setattr(hf.SafetensorsReader, "read", recording_read)
  with parallel.use_mesh(mesh):
    model = hf.load_model(fixture("llama"), mesh=mesh)
    input_ids = jnp.asarray(np.load(os.path.join(fixture("llama"), "input_ids.npy")))
    logits = np.asarray(model(input_ids))
  reference = np.load(os.path.join(fixture("llama"), "reference_logits.npy"))
  np.testing.assert_allclose(logits, reference, atol=ATOL, rtol=RTOL)
  q = model.layers[0].attn.q_proj.get_value()  # [e=32, n=4, h=8]
  assert q.sharding.spec == P("fsdp", "tensor", None)
  assert {s.data.shape for s in q.addressable_shards} == {(16, 2, 8)}
  embed = model.embed.get_value()  # [v=288, e=32]
  assert embed.sharding.spec == P("tensor", "fsdp")
  assert {s.data.shape for s in embed.addressable_shards} == {(144, 16)}
  # Each device's block is sliced out of the file: q_proj is [n*h=32, e=32] on disk.
  q_reads = {shape for name, shape in reads if name == "model.layers.0.self_attn.q_proj.weight"}
  assert q_reads == {(16, 16)}
  # Devices holding the same block share one read (4 distinct blocks of q_proj).
  assert sum(name == "model.layers.0.self_attn.q_proj.weight" for name, _ in reads) == 4


def test_bfloat16_load():
  model = hf.load_model(fixture("mistral"), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  assert model.layers[1].mlp.down.get_value().dtype == jnp.bfloat16
  input_ids = jnp.asarray(np.load(os.path.join(fixture("mistral"), "input_ids.npy")))
  reference = np.load(os.path.join(fixture("mistral"), "reference_logits.npy"))
  logits = np.asarray(model(input_ids))
  assert np.abs(logits - reference).max() < 0.1 * np.abs(reference).max()


# ----------------------------------------------------------------------------- bad input


def copy_fixture(arch, tmp_path) -> str:
  out = str(tmp_path / arch)
  shutil.copytree(fixture(arch), out)
  return out


def test_unsupported_architecture_is_named(tmp_path):
  directory = copy_fixture("llama", tmp_path)
  config = hf.read_config(directory)
  config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(hf.CheckpointError, match=r"unsupported architecture.*gpt2.*llama"):
    hf.load_model(directory)
  with pytest.raises(hf.CheckpointError, match="hidden_act='gelu'"):
    hf.model_config_from_hf({**hf.read_config(fixture("llama")), "hidden_act": "gelu"})
  with pytest.raises(hf.CheckpointError, match="yarn"):
    hf.model_config_from_hf({**hf.read_config(fixture("llada")), "yarn": True})


def test_wrong_tensor_shape_names_tensor_and_file(tmp_path):
  directory = copy_fixture("llama", tmp_path)
  path = os.path.join(directory, "model.safetensors")
  tensors = load_file(path)
  name = "model.layers.1.self_attn.k_proj.weight"
  tensors[name] = np.zeros((32, 32), np.float32)  # 4 kv heads where config.json says 2.
  save_file(tensors, path)
  with pytest.raises(hf.CheckpointError,
                     match=rf"{name}.*model\.safetensors.*\[32, 32\].*\[16, 32\]"):
    hf.load_model(directory)


def test_missing_shard_file_and_tensor_are_named(tmp_path):
  directory = copy_fixture("mistral", tmp_path)
  os.remove(os.path.join(directory, "model-00002-of-00003.safetensors"))
  with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
    hf.load_model(directory)
  directory = copy_fixture("qwen2", tmp_path)
  path = os.path.join(directory, "model.safetensors")
  tensors = load_file(path)
  del tensors["model.layers.0.self_attn.v_proj.bias"]
  save_file(tensors, path)
  with pytest.raises(hf.CheckpointError, match=r"model\.layers\.0\.self_attn\.v_proj\.bias"):
    hf.load_model(directory)
  os.remove(os.path.join(directory, "config.json"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_model(directory)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf.load_model(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_and_chat_template_match_transformers():
  tok = HFTokenizer.from_dir(fixture("llama"))
  with open(os.path.join(fixture("llama"), "reference_tokens.json")) as f:
    ref = json.load(f)
  assert tok.encode(ref["text"]).tolist() == ref["ids"]
  assert tok.encode(ref["text"], add_special_tokens=False).tolist() == ref["ids_no_special"]
  assert tok.decode(ref["ids_no_special"]) == ref["text"]
  assert tok.bos_id == ref["ids"][0]
  assert tok.apply_chat_template(ref["chat"]) == ref["chat_rendered"]
  assert tok.apply_chat_template(ref["chat"], add_generation_prompt=False) == \
      ref["chat_rendered_no_prompt"]
  assert tok.apply_chat_template(ref["chat"], tokenize=True).tolist() == ref["chat_ids"]
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    HFTokenizer.from_dir(fixture("qwen2"))


# ----------------------------------------------------------------------------- training


def test_train_loop_starts_from_hf_weights(tmp_path):
  from sparsity_jax.train import from_pretrained, loop

  config = make_tiny_config(**{"train.steps": 1, "train.lr": 0.0, "eval.num_batches": 1,
                              "train.log_every": 1, "data.tokenizer": "pretrained",
                              # A few files: BPE over the whole stdlib takes minutes.
                              "data.source": "text_files",
                              "data.glob": os.path.join(ROOT, "docs", "*.md")})
  out = loop.train_and_evaluate(config, str(tmp_path / "run"), pretrained=fixture("llama"))
  # Subword tokens: the training row's bits per byte divide by the train split's bytes per
  # token, as the evaluation's do.
  row = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")
         if "train/loss" in x][-1]
  per_token = row["train/loss"] / math.log(2) / row["train/bits_per_byte"]
  assert 1.0 < per_token < 1.2 and per_token == pytest.approx(
      out["eval_metrics"]["loss"] / math.log(2) / out["eval_metrics"]["bits_per_byte"], rel=0.1)
  loaded = params_of(hf.load_model(fixture("llama")))
  trained = {jax.tree_util.keystr(p): np.asarray(x) for p, x in
             jax.tree_util.tree_flatten_with_path(out["state"].params)[0]}
  assert trained.keys() == loaded.keys()
  for key in loaded:  # lr=0: the step leaves the imported weights as they were.
    np.testing.assert_array_equal(trained[key], loaded[key], err_msg=key)
  with open(tmp_path / "run" / "config.json") as f:
    saved = json.load(f)["model"]
  assert saved["vocab_size"] == 288 and saved["rope_scaling"]["rope_type"] == "llama3"
  metrics = from_pretrained.evaluate_pretrained(fixture("llama"), config)
  assert metrics["loss"] == pytest.approx(out["eval_metrics"]["loss"], rel=1e-5)
  # The workdir's own config describes the imported model: no checkpoint dir needed.
  metrics = loop.evaluate_workdir(str(tmp_path / "run"))
  assert metrics["loss"] == pytest.approx(out["eval_metrics"]["loss"], rel=1e-5)
  with pytest.raises(hf.CheckpointError, match="masked_diffusion"):
    from_pretrained.config_with_pretrained(config, fixture("llada"))


@pytest.mark.slow
def test_launcher_init_from_hf(tmp_path):
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--workdir={workdir}",
         "--config=" + os.path.join(ROOT, "configs", "diffusion_lm_tiny.py") + ":runlocal",
         "--config.train.steps=2", "--config.eval.every=0", "--config.data.seq_len=32",
         f"--init_from_hf={fixture('llada')}"]
  run = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stdout + run.stderr
  assert "final validation" in run.stdout + run.stderr
  with open(os.path.join(workdir, "config.json")) as f:
    model = json.load(f)["model"]
  assert model["causal"] is False and model["d_model"] == 32 and model["num_kv_heads"] == 2


def test_evaluate_pretrained_with_its_own_tokenizer():
  """config.data.tokenizer='pretrained': the corpus is tokenised with the checkpoint's
  tokenizer, the loss is the model's mean next-token NLL on those windows, and bits per
  byte divide by the split's bytes per token."""
  import math
  from sparsity_jax import config_lib
  from sparsity_jax.data import corpus
  from sparsity_jax.train import from_pretrained

  config = config_lib.pretrained_config(fixture("llama"), "runlocal,seq_len=32")
  config.eval.num_batches = 1
  config.eval.batch_size = config.data.batch_size = 8  # Multiples of the 8 fake devices.
  metrics = from_pretrained.evaluate_pretrained(fixture("llama"), config)
  tok = HFTokenizer.from_dir(fixture("llama"))
  tokens = corpus.load_split(config.data, tok, splits=("validation",))["validation"]
  windows = np.stack([tokens[i * 32:i * 32 + 33] for i in range(config.eval.batch_size)])
  logits = np.asarray(hf.load_model(fixture("llama"))(jnp.asarray(windows[:, :-1], jnp.int32)))
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -np.take_along_axis(np.asarray(logp), windows[:, 1:, None].astype(np.int64), -1).mean()
  assert metrics["loss"] == pytest.approx(float(nll), rel=1e-4)
  per_token = corpus.bytes_per_token(config.data, "validation", tokens)
  assert 1.0 < per_token < 1.2  # Byte-level BPE with only 27 merges: ~1 byte per token.
  assert metrics["bits_per_byte"] == pytest.approx(metrics["loss"] / math.log(2) / per_token)


def test_generate_launcher_streams_a_causal_chat_and_reports_speed():
  cmd = [sys.executable, os.path.join(ROOT, "launch", "generate.py"),
         f"--model={fixture('llama')}", "--chat", "--prompt=Hello", "--max_new_tokens=6"]
  run = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stdout + run.stderr
  last = run.stdout.strip().splitlines()[-1]
  assert re.fullmatch(r"\[\d+ prompt tokens, \d+ new tokens; prefill [\d.]+ tokens/s "
                      r"\([\d.]+ s\), decode [\d.]+ tokens/s; compile [\d.]+ s\]", last), last
  too_long = subprocess.run(cmd[:-1] + ["--max_new_tokens=600"], env=subprocess_env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
  assert too_long.returncode == 2  # A user error: one line, no traceback.
  assert too_long.stderr.strip().splitlines() == [
      "error: prompt (27 tokens) + max_new_tokens (600) = 627 exceed the model's context "
      "of 512 tokens; shorten the prompt or generate fewer tokens"]


def test_a_config_naming_another_model_takes_the_checkpoints_name():
  """config_with_pretrained(config, checkpoint): the data's tokenizer follows
  config.pretrained, so it must name the checkpoint given (opened as a path or as
  'smollm2'), never the config's own model (configs/smollm2.py with --model=X evaluated X
  on SmolLM2's token ids: NaN, or a plausible wrong perplexity for a larger vocabulary)."""
  from sparsity_jax import config_lib
  from sparsity_jax.checkpoints import open_pretrained
  from sparsity_jax.train import from_pretrained
  config = config_lib.pretrained_config("smollm2", "runlocal")
  assert config.pretrained == "smollm2"
  for source in (fixture("llama"), open_pretrained(fixture("llama"))):
    out = from_pretrained.config_with_pretrained(config, source)
    assert out.pretrained == fixture("llama") and out.model.vocab_size == 288
  assert open_pretrained("smollm2").source == "smollm2"  # Portable name kept.
  assert from_pretrained.config_with_pretrained(
      config, open_pretrained("smollm2")).pretrained == "smollm2"
