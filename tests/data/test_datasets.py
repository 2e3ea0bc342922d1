"""integration/datasets.py: GPTDataset train/valid/test splits from a preprocessed tiny corpus."""

import json
from pathlib import Path

import pytest
import torch

from cdp_megatron.data.preprocess import preprocess
from cdp_megatron.data.tokenizers import ByteTokenizer
from cdp_megatron.integration.datasets import (
    build_gpt_datasets,
    load_indexed_dataset,
    parse_data_path,
    train_valid_test_num_samples,
)

pytestmark = pytest.mark.megatron

SEQ = 32
EOD = 256
DOCS = [
    f"Scene {i}. " + " ".join(f"word{(i * 7 + j) % 23}" for j in range(20 + i % 9))
    for i in range(40)
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two ByteTokenizer datasets of 40 documents each (EOD appended)."""
    root = tmp_path_factory.mktemp("corpus")
    prefixes = []
    for name, docs in (("a", DOCS), ("b", [d.upper() for d in DOCS])):
        source = root / f"{name}.jsonl"
        source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        prefixes.append(
            preprocess(source, root / name, "ByteTokenizer", append_eod=True).output_prefixes[
                "text"
            ]
        )
    return root, prefixes


def _build(prefix_or_blend, cache, seed=1234, num_samples=(64, 8, None), **kwargs):
    return build_gpt_datasets(
        ByteTokenizer(),
        seq_length=SEQ,
        seed=seed,
        num_samples=num_samples,
        data_path=prefix_or_blend,
        data_cache_path=cache,
        **kwargs,
    )


def _stream(sample):
    """The seq_length + 1 ids a sample was cut from."""
    return torch.cat([sample["tokens"], sample["labels"][-1:]]).tolist()


def _pieces_come_from(ids, docs):
    """Every run of ids between end-of-document ids is part of one of the documents."""
    pieces, current = [], []
    for i in ids:
        if i == EOD:
            pieces.append(current)
            current = []
        else:
            current.append(i)
    pieces.append(current)
    encoded = [d.encode() for d in docs]
    return all(any(bytes(p) in d for d in encoded) for p in pieces if p)


def test_read_back_matches_tokenizer(corpus):
    _, (prefix, _) = corpus
    dataset = load_indexed_dataset(prefix)
    assert len(dataset) == len(DOCS)
    assert dataset[3].tolist() == ByteTokenizer().tokenize(DOCS[3]) + [EOD]


def test_train_valid_splits_and_sample_shape(corpus, tmp_path):
    _, (prefix, _) = corpus
    train, valid, test = _build(prefix, tmp_path / "cache", split="949,50,1")
    assert len(test) == 0  # 40 documents: 0.1% rounds to none, and no test samples were asked
    assert len(train) >= 64 and len(valid) >= 8
    train_docs, valid_docs = DOCS[:38], DOCS[38:]  # contiguous document ranges, as Megatron splits
    for dataset, docs in ((train, train_docs), (valid, valid_docs)):
        for index in range(8):
            sample = dataset[index]
            assert sample["tokens"].shape == sample["labels"].shape == (SEQ,)
            assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
            assert sample["attention_mask"].shape == (1, SEQ, SEQ)
            stream = _stream(sample)
            assert len(stream) == SEQ + 1
            assert _pieces_come_from(stream, docs)


def test_deterministic_with_seed(corpus, tmp_path):
    _, (prefix, _) = corpus
    first = _build(prefix, tmp_path / "c1").train
    again = _build(prefix, tmp_path / "c2").train
    other = _build(prefix, tmp_path / "c3", seed=7).train
    ids = [_stream(first[i]) for i in range(16)]
    assert ids == [_stream(again[i]) for i in range(16)]
    assert ids != [_stream(other[i]) for i in range(16)]


def test_weighted_blend(corpus):
    _, (a, b) = corpus
    train, valid, test = _build(
        f"0.25 {a} 0.75 {b}", None, num_samples=(200, 20, 0), split="90,10,0"
    )
    assert len(train) == 200 and len(valid) == 20 and test is None
    upper = sum(not any(ord("a") <= i <= ord("z") for i in _stream(train[i])) for i in range(200))
    assert 120 <= upper <= 180  # about 75% of the samples come from the upper-case dataset


def test_blend_built_by_threads_is_the_same(corpus, tmp_path):
    # --num-dataset-builder-threads: megatron builds a blend's prefixes in threads; the samples do not change
    # (each build from its own copy of the files: megatron caches next to them, and a blend with a
    # cache folder of ours needs a process group)
    import shutil

    _, prefixes = corpus
    samples = []
    for threads in (1, 2):
        copies = []
        for prefix in prefixes:
            copy = tmp_path / f"threads{threads}" / Path(prefix).name
            copy.parent.mkdir(exist_ok=True)
            for ext in (".bin", ".idx"):
                shutil.copy(prefix + ext, str(copy) + ext)
            copies.append(str(copy))
        train = _build(f"0.25 {copies[0]} 0.75 {copies[1]}", None, num_samples=(64, 8, 0), split="90,10,0",
                       num_dataset_builder_threads=threads).train
        samples.append([_stream(train[i]) for i in range(64)])
    assert samples[0] == samples[1]


def test_per_split_paths(corpus, tmp_path):
    _, (a, b) = corpus
    train, valid, test = build_gpt_datasets(
        ByteTokenizer(),
        seq_length=SEQ,
        seed=1,
        num_samples=(16, 4, None),
        train_data_path=a,
        valid_data_path=b,
        data_cache_path=tmp_path,
    )
    assert test is None
    assert _pieces_come_from(_stream(valid[0]), [d.upper() for d in DOCS])


def test_parse_data_path(corpus):
    _, (a, b) = corpus
    assert parse_data_path(a) == ([a], None)
    assert parse_data_path([a, b]) == ([a, b], None)
    assert parse_data_path(f"0.3 {a} 0.7 {b}") == ([a, b], [0.3, 0.7])
    assert parse_data_path(["1", a, "3", b]) == ([a, b], [1.0, 3.0])
    with pytest.raises(ValueError, match="malformed --data-path"):
        parse_data_path(f"0.3 {a} {b}")
    with pytest.raises(FileNotFoundError, match=r"without the extension"):
        parse_data_path(a + ".bin")
    with pytest.raises(ValueError, match="weights must be >= 0"):
        parse_data_path(f"-1 {a} 2 {b}")


def test_argument_errors(corpus, tmp_path):
    _, (a, b) = corpus
    with pytest.raises(ValueError, match="give --data-path, or"):
        build_gpt_datasets(ByteTokenizer(), seq_length=SEQ, seed=1, num_samples=(1, 1, 1))
    with pytest.raises(ValueError, match="needs a sample count for every split"):
        _build(f"1 {a} 1 {b}", None, num_samples=(10, None, None))
    for blend in (a, f"{a} {b}", f"1 {a} 1 {b}"):  # megatron would hang or fail an assertion
        with pytest.raises(ValueError, match="leaves the test split of .* no documents"):
            _build(blend, None, num_samples=(10, 2, 2), split="949,50,1")
    assert len(_build(a, tmp_path, num_samples=(10, 2, 0), split="949,50,1").test) == 0
    if not torch.distributed.is_initialized():
        with pytest.raises(ValueError, match="needs torch.distributed initialised"):
            _build(f"1 {a} 1 {b}", tmp_path, num_samples=(10, 2, 2))


def test_train_valid_test_num_samples():
    # Megatron-LM: train_iters * gbs; (train_iters // eval_interval + 1) * eval_iters * gbs;
    # eval_iters * gbs
    assert train_valid_test_num_samples(
        global_batch_size=8, train_iters=100, eval_interval=20, eval_iters=5
    ) == (
        800,
        240,
        40,
    )
    assert train_valid_test_num_samples(
        global_batch_size=8, train_samples=804, eval_interval=50, eval_iters=2
    ) == (
        804,
        48,
        16,
    )
