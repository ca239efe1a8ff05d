"""Training data building: split/blend sample counts (docs/data.md, "Sample accounting"), caches,
resume by consumed samples, DP=2 with rank 0 building first."""

import os

import numpy
import pytest
import torch

from data_fixtures import train_hf_bpe
from megatron_latent.data import indexed
from megatron_latent.data.gpt_data import (
    DataArgs,
    DataConfigError,
    MegatronPretrainingSampler,
    build_pretraining_data_loader,
    build_train_valid_test_datasets,
)
from megatron_latent.data.tokenizer import build_tokenizer
from multirank import run_on_ranks

SEQ = 16
DOC_LEN = 10  # tokens per document, EOD included


def _make_dataset(prefix, ndocs, base):
    builder = indexed.CompactIndexedDatasetBuilder(prefix + ".bin", numpy.uint16)
    builder.add_documents([[base + i % 50] * (DOC_LEN - 1) for i in range(ndocs)], eod=0)
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("build")
    tok = build_tokenizer("HuggingFaceTokenizer", train_hf_bpe(str(d)))
    return {"tok": tok, "A": _make_dataset(str(d / "A"), 1000, 100),
            "B": _make_dataset(str(d / "B"), 600, 200), "dir": d}


def _samples_for(docs, epochs):
    """Documented count: epochs * tokens of the split's documents, minus the one extra label
    token, cut into sequences of SEQ."""
    return (epochs * docs * DOC_LEN - 1) // SEQ


def test_split_sample_counts(env):
    args = DataArgs(seq_length=SEQ, data_path=[env["A"]], split="969,30,1")
    train, valid, test = build_train_valid_test_datasets(args, env["tok"], [None, None, None])
    # 1000 documents -> 969 / 30 / 1 documents; one epoch each
    assert (len(train), len(valid), len(test)) == (_samples_for(969, 1), _samples_for(30, 1), 0)
    train, valid, test = build_train_valid_test_datasets(args, env["tok"], [1000, 50, 5])
    # enough whole epochs to cover the request: 2, 3 and 9 epochs
    assert (len(train), len(valid), len(test)) == (
        _samples_for(969, 2), _samples_for(30, 3), _samples_for(1, 9))
    assert (len(train), len(valid), len(test)) == (1211, 56, 5)
    sample = train[0]
    assert sample["tokens"].shape == (SEQ,) and sample["labels"].shape == (SEQ,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])


def test_blend_sample_counts(env, tmp_path, single_rank):
    # the cached blend needs torch.distributed (a world of one, shared with the other in-process tests)
    args = DataArgs(seq_length=SEQ, data_path=["0.3", env["A"], "0.7", env["B"]],
                    split="969,30,0", data_cache_path=str(tmp_path / "cache"))
    train, valid, test = build_train_valid_test_datasets(args, env["tok"], [1000, 100, 0])
    assert test is None
    assert (len(train), len(valid)) == (1000, 100)
    assert numpy.bincount(train.dataset_index).tolist() == [300, 700]
    assert numpy.bincount(valid.dataset_index).tolist() == [30, 70]
    # every blended sample comes from the dataset its index names
    for i in range(0, 1000, 97):
        expected = 100 if train.dataset_index[i] == 0 else 200
        assert set(train[i]["tokens"].tolist()) - {0} <= set(range(expected, expected + 50))


def test_per_split_paths_and_errors(env):
    args = DataArgs(seq_length=SEQ, train_data_path=[env["A"]], valid_data_path=[env["B"]])
    train, valid, test = build_train_valid_test_datasets(args, env["tok"], [None, None, None])
    assert (len(train), len(valid), test) == (_samples_for(1000, 1), _samples_for(600, 1), None)
    assert set(valid[0]["tokens"].tolist()) - {0} <= set(range(200, 250))
    with pytest.raises(DataConfigError, match="data_path: no dataset .*/missing.bin/.idx"):
        build_train_valid_test_datasets(
            DataArgs(seq_length=SEQ, data_path=[str(env["dir"] / "missing")]), env["tok"], [1, 1, 1])
    # B has 600 documents: 969,30,1 leaves its test split empty (round(599.4) = 599 .. 600 is
    # one document); with 400 documents it rounds to nothing, and megatron-core would hang
    small = _make_dataset(str(env["dir"] / "small"), 400, 300)
    with pytest.raises(DataConfigError, match=r"the test split \(documents 400..400 of 400\)"):
        build_train_valid_test_datasets(
            DataArgs(seq_length=SEQ, data_path=[small]), env["tok"], [10, 10, 10])


def test_index_cache_is_written_once_and_reused(env, tmp_path):
    cache = tmp_path / "cache"
    args = DataArgs(seq_length=SEQ, data_path=[env["A"]], split="99,1,0", data_cache_path=str(cache))
    first, _, _ = build_train_valid_test_datasets(args, env["tok"], [200, 10, None])
    files = sorted(os.listdir(cache))
    assert len(files) == 8  # description + 3 index arrays, for train and valid
    mtimes = {f: os.path.getmtime(cache / f) for f in files}
    second, _, _ = build_train_valid_test_datasets(args, env["tok"], [200, 10, None])
    assert {f: os.path.getmtime(cache / f) for f in os.listdir(cache)} == mtimes
    for i in (0, 7, 199):
        assert torch.equal(first[i]["tokens"], second[i]["tokens"])


def test_sampler_resumes_exactly():
    full = [b for r in range(2) for b in MegatronPretrainingSampler(40, 0, 3, r, 2)]
    # dp rank r gets micro-batch r of every global micro-batch of 6; the tail of 4 is dropped
    assert list(MegatronPretrainingSampler(40, 0, 3, 0, 2))[:2] == [[0, 1, 2], [6, 7, 8]]
    assert list(MegatronPretrainingSampler(40, 0, 3, 1, 2))[:2] == [[3, 4, 5], [9, 10, 11]]
    assert sorted(i for b in full for i in b) == list(range(36))
    # resuming after 4 global micro-batches (24 consumed samples) continues where it stopped
    for rank in range(2):
        whole = list(MegatronPretrainingSampler(40, 0, 3, rank, 2))
        assert list(MegatronPretrainingSampler(40, 24, 3, rank, 2)) == whole[4:]
    assert list(MegatronPretrainingSampler(10, 6, 3, 1, 2, drop_last=False)) == [[9]]
    with pytest.raises(DataConfigError, match="consumed_samples 40 >= total 40"):
        MegatronPretrainingSampler(40, 40, 3, 0, 2)


def _dp_body(env, cache):
    rank = torch.distributed.get_rank()
    args = DataArgs(seq_length=SEQ, data_path=["0.3", env["A"], "0.7", env["B"]],
                    split="969,30,1", data_cache_path=cache)
    train, _, _ = build_train_valid_test_datasets(args, env["tok"], [64, 8, 8])
    loader = build_pretraining_data_loader(train, consumed_samples=16, micro_batch_size=4,
                                           data_parallel_rank=rank, data_parallel_size=2)
    batches = [batch["tokens"] for _, batch in zip(range(3), loader)]
    reference = torch.stack([train[i]["tokens"] for i in range(64)])
    return {"batches": batches, "reference": reference}


def test_builder_at_data_parallel_2(env, tmp_path):
    cache = str(tmp_path / "cache")
    env_paths = {"A": env["A"], "B": env["B"], "tok": env["tok"]}
    r0, r1 = run_on_ranks(_dp_body, 2, env_paths, cache)
    assert torch.equal(r0["reference"], r1["reference"])  # both ranks read the same samples
    ref = r0["reference"]
    # resumed at 16 consumed samples: global micro-batches of 8 = rank 0's 4 then rank 1's 4
    for step in range(3):
        start = 16 + 8 * step
        assert torch.equal(r0["batches"][step], ref[start : start + 4])
        assert torch.equal(r1["batches"][step], ref[start + 4 : start + 8])
    assert len([f for f in os.listdir(cache) if f.endswith("description.txt")]) == 9
