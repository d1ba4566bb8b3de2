"""Tokenizer, corpora and the deterministic, resumable iterator."""

import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparsity_jax.data import corpus, pipeline
from sparsity_jax.data.tokenizer import EOS_ID, ByteTokenizer


@given(st.text(max_size=200))
@settings(max_examples=50, deadline=None)
def test_tokenizer_round_trip(text):
  tok = ByteTokenizer()
  ids = tok.encode(text, bos=True, eos=True)
  assert ids.max(initial=0) < tok.vocab_size
  assert tok.decode(ids) == text


def test_stdlib_corpus_split_is_deterministic_and_disjoint():
  root, files = corpus.stdlib_files()
  assert files == sorted(files) and len(files) > 100
  assert not any("site-packages" in f for f in files)
  train, val = corpus.split_files(files, 0.05)
  assert set(train).isdisjoint(val) and len(train) + len(val) == len(files)
  assert corpus.split_files(files, 0.05) == (train, val)
  assert 0.02 < len(val) / len(files) < 0.1


def test_text_files_source(tmp_path):
  for i in range(4):
    (tmp_path / f"doc{i}.txt").write_text(f"hello {i} " * 50)
  root, files = corpus.text_files(str(tmp_path / "*.txt"))
  assert files == [f"doc{i}.txt" for i in range(4)]
  tokens = corpus.load_tokens(root, files)
  assert (tokens == EOS_ID).sum() == 4


def test_empty_glob_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="matches no files"):
    corpus.text_files(str(tmp_path / "nothing" / "*.txt"))


def _data(n_tokens=10_000, seq_len=16):
  rng = np.random.default_rng(0)
  return pipeline.PackedSequences(rng.integers(0, 256, n_tokens).astype(np.uint16), seq_len)


def test_batches_depend_only_on_seed_and_step():
  data = _data()
  a = pipeline.TrainIterator(data, 8, seed=3)
  first = [next(a) for _ in range(5)]
  b = pipeline.TrainIterator(data, 8, seed=3)
  b.set_state(a.get_state() | {"step": 2})
  np.testing.assert_array_equal(next(b)["inputs"], first[2]["inputs"])
  c = pipeline.TrainIterator(data, 8, seed=4)
  assert not np.array_equal(next(c)["inputs"], first[0]["inputs"])
  # Targets are inputs shifted by one.
  np.testing.assert_array_equal(first[0]["inputs"][:, 1:], first[0]["targets"][:, :-1])


def test_process_shards_cover_the_global_batch():
  data = _data()
  full = pipeline.TrainIterator(data, 8, seed=0).batch(7)["inputs"]
  halves = [pipeline.TrainIterator(data, 8, seed=0, rows=range(i * 4, i * 4 + 4)).batch(7)
            for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]), full)


def test_every_example_once_per_epoch():
  data = _data(n_tokens=16 * 40 + 1)  # 40 examples, batch 8 -> 5 steps per epoch.
  it = pipeline.TrainIterator(data, 8, seed=1)
  rows = {tuple(r) for s in range(5) for r in it.batch(s)["inputs"]}
  assert len(rows) == 40


def test_resume_with_other_seed_is_refused():
  it = pipeline.TrainIterator(_data(), 8, seed=1)
  with pytest.raises(ValueError, match="seed"):
    it.set_state({"step": 3, "seed": 2})


def test_too_short_split_is_a_clear_error():
  with pytest.raises(ValueError, match="fewer than one sequence"):
    pipeline.PackedSequences(np.zeros(10, np.uint16), 16)
