"""cdp-preprocess end to end: JSONL and text in, megatron IndexedDataset out, and bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cdp_megatron.data.preprocess import main, preprocess
from cdp_megatron.data.tokenizers import ByteTokenizer, GPT2BPETokenizer

pytestmark = pytest.mark.megatron

REPO = Path(__file__).resolve().parents[2]
DOCS = [
    f"Document {i}: to be, or not to be; café {'x' * (i % 7)}.\nSecond line {i}." for i in range(70)
]


def _read(prefix):
    from cdp_megatron.integration.datasets import load_indexed_dataset

    dataset = load_indexed_dataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def _jsonl(path, docs, key="text"):
    path.write_text(
        "".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8"
    )
    return path


def _files(directory):
    return sorted(p.name for p in directory.rglob("*") if p.is_file())


def test_jsonl_gpt2_matches_tokenizer_with_eod(tmp_path, capsys):
    source = _jsonl(tmp_path / "in.jsonl", DOCS[:5])
    code = main(
        [
            "--input",
            str(source),
            "--output-prefix",
            str(tmp_path / "out" / "c"),
            "--tokenizer-type",
            "GPT2BPETokenizer",
            "--append-eod",
        ]
    )
    assert code == 0
    tok = GPT2BPETokenizer()
    assert _read(tmp_path / "out" / "c_text_document") == [
        tok.tokenize(d) + [tok.eod] for d in DOCS[:5]
    ]
    out = capsys.readouterr().out
    assert "5 documents" in out and "c_text_document.bin/.idx" in out
    tokens = sum(len(tok.tokenize(d)) + 1 for d in DOCS[:5])
    assert f"{tokens:,} tokens" in out


def test_text_blocks_are_documents(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("first para\nstill first\n\n\n   \nsecond para\n\nthird\n", encoding="utf-8")
    result = preprocess(source, tmp_path / "t", "ByteTokenizer")
    docs = ["first para\nstill first", "second para", "third"]
    assert _read(result.output_prefixes["text"]) == [list(d.encode()) for d in docs]
    assert result.documents == 3 and result.tokens == {"text": sum(map(len, docs))}


def test_several_json_keys_and_empty_documents(tmp_path):
    source = tmp_path / "in.jsonl"
    rows = [
        {"text": "abc", "title": "T1"},
        {"text": "", "title": "T2"},
        {"text": "de", "title": "T3"},
    ]
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    result = preprocess(
        source, tmp_path / "k", "ByteTokenizer", json_keys=["text", "title"], append_eod=True
    )
    assert _read(tmp_path / "k_text_document") == [[97, 98, 99, 256], [100, 101, 256]]
    assert _read(tmp_path / "k_title_document") == [[84, 49, 256], [84, 50, 256], [84, 51, 256]]
    assert result.skipped_empty == {"text": 1}


def test_two_workers_write_identical_files(tmp_path):
    source = _jsonl(tmp_path / "in.jsonl", DOCS)  # 70 documents: several chunks of 32
    one = preprocess(source, tmp_path / "w1", "ByteTokenizer", append_eod=True, workers=1)
    two = preprocess(source, tmp_path / "w2", "ByteTokenizer", append_eod=True, workers=2)
    for suffix in (".bin", ".idx"):
        first = Path(one.output_prefixes["text"] + suffix).read_bytes()
        assert first == Path(two.output_prefixes["text"] + suffix).read_bytes()
    tok = ByteTokenizer()
    assert _read(two.output_prefixes["text"]) == [tok.tokenize(d) + [tok.eod] for d in DOCS]


BAD_INPUTS = [
    ('{"text": "ok"}\n{"text": bad}\n', r"in.jsonl:2: malformed JSON \(Expecting value"),
    ('{"text": "ok"}\n\n{"body": "x"}\n', r"in.jsonl:3: no 'text' field"),
    ('{"text": 3}\n', r"in.jsonl:1: field 'text' is int, not a string"),
    ("[1, 2]\n", r"in.jsonl:1: expected a JSON object"),
    ('{"text": ""}\n', r"no non-empty 'text' documents"),
    ('{"text": "ok"}\n{"text": "\\ud800"}\n', r"in.jsonl:2: not valid Unicode text"),
    (b'{"text": "ok"}\n{"text": "\xff"}\n', r"in.jsonl:2: not valid UTF-8"),
]


def _fails_cleanly(tmp_path, capsys, argv, message):
    """Exit code 2, one line on stderr matching ``message``, no file but the input."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cdp-preprocess: error: "), err
    assert re.search(message, err[0]), err[0]
    assert _files(tmp_path) == ["in.jsonl"]


@pytest.mark.parametrize("content,message", BAD_INPUTS)
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, content, message, workers):
    if isinstance(content, bytes):
        (tmp_path / "in.jsonl").write_bytes(content)
    else:
        (tmp_path / "in.jsonl").write_text(content, encoding="utf-8")
    argv = [
        "--input",
        str(tmp_path / "in.jsonl"),
        "--output-prefix",
        str(tmp_path / "new" / "out"),
        "--tokenizer-type",
        "ByteTokenizer",
        "--workers",
        str(workers),
    ]
    _fails_cleanly(tmp_path, capsys, argv, message)


@pytest.mark.parametrize("workers", [1, 2])
def test_null_tokenizer_writes_the_ids_and_refuses_one_outside_the_vocabulary(tmp_path, capsys, workers):
    (tmp_path / "in.jsonl").write_text('{"text": "1 2 3"}\n{"text": "70000 0"}\n', encoding="utf-8")
    argv = ["--input", str(tmp_path / "in.jsonl"), "--tokenizer-type", "NullTokenizer", "--append-eod",
            "--workers", str(workers)]
    assert main([*argv, "--output-prefix", str(tmp_path / "ok" / "ids"), "--vocab-size", "100000"]) == 0
    assert _read(tmp_path / "ok" / "ids_text_document") == [[1, 2, 3, 100000], [70000, 0, 100000]]
    capsys.readouterr()
    for path in (tmp_path / "ok").iterdir():
        path.unlink()
    (tmp_path / "ok").rmdir()
    _fails_cleanly(tmp_path, capsys, [*argv, "--output-prefix", str(tmp_path / "new" / "ids"), "--vocab-size", "1000"],
                   r"in.jsonl:2: NullTokenizer: id 70000 is outside 0..999 \(--vocab-size 1000\)$")


@pytest.mark.parametrize("workers", [1, 2])
def test_llama2_tokenizer_documents_start_with_bos_and_end_with_eod(tmp_path, capsys, workers):
    from ..data.test_tokenizers import train_sentencepiece

    model = train_sentencepiece(tmp_path / "sp")
    source = _jsonl(tmp_path / "in.jsonl", DOCS[:6])
    argv = ["--input", str(source), "--output-prefix", str(tmp_path / "out" / "c"), "--tokenizer-type",
            "Llama2Tokenizer", "--tokenizer-model", model, "--append-eod", "--workers", str(workers)]
    assert main(argv) == 0
    from cdp_megatron.data.tokenizers import build_tokenizer

    tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=model)
    assert _read(tmp_path / "out" / "c_text_document") == [[1, *tok.tokenize(d), tok.eod] for d in DOCS[:6]]
    assert "(Llama2Tokenizer)" in capsys.readouterr().out


def test_unknown_tokenizer_exits_2(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"text": "ok"}\n', encoding="utf-8")
    argv = [
        "--input",
        str(tmp_path / "in.jsonl"),
        "--output-prefix",
        str(tmp_path / "o"),
        "--tokenizer-type",
        "NoSuchTokenizer",
    ]
    _fails_cleanly(
        tmp_path, capsys, argv, r"unknown --tokenizer-type 'NoSuchTokenizer'; supported: GPT2BPE"
    )


def test_output_prefix_that_cannot_be_written_is_refused_before_tokenizing(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"text": "ok"}\n', encoding="utf-8")
    (tmp_path / "f").write_text("x")  # _files lists it; the check below wants only in.jsonl
    cases = [(tmp_path / "f" / "out", rf"--output-prefix {tmp_path}/f/out_text_document.bin: {tmp_path}/f is a file, "
                                      "not a folder; choose another path")]
    if os.path.isdir("/proc/self"):  # nothing can be made in /proc, root included (os.access says yes to root)
        cases.append(("/proc/out", r"--output-prefix /proc/out_text_document.bin: cannot create files in /proc "
                                   r"\(No such file or directory\)"))
    for prefix, message in cases:
        argv = ["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(prefix), "--tokenizer-type", "ByteTokenizer"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.match("cdp-preprocess: error: " + message, err), err
    assert _files(tmp_path) == ["f", "in.jsonl"]


def test_failure_keeps_previous_output(tmp_path):
    good = preprocess(_jsonl(tmp_path / "in.jsonl", DOCS[:3]), tmp_path / "d", "ByteTokenizer")
    before = Path(good.output_prefixes["text"] + ".bin").read_bytes()
    (tmp_path / "in.jsonl").write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    assert (
        main(
            [
                "--input",
                str(tmp_path / "in.jsonl"),
                "--output-prefix",
                str(tmp_path / "d"),
                "--tokenizer-type",
                "ByteTokenizer",
            ]
        )
        == 2
    )
    assert Path(good.output_prefixes["text"] + ".bin").read_bytes() == before
    assert _files(tmp_path) == ["d_text_document.bin", "d_text_document.idx", "in.jsonl"]


def test_cli_process_missing_input_and_unsupported_flag(tmp_path):
    """As a user runs it: a separate process, one line on stderr, exit code 2."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    base = [
        sys.executable,
        "-m",
        "cdp_megatron.data.preprocess",
        "--output-prefix",
        str(tmp_path / "o"),
        "--tokenizer-type",
        "ByteTokenizer",
    ]
    for extra, message in [
        (["--input", str(tmp_path / "missing.jsonl")], "missing.jsonl does not exist"),
        (["--input", "x.jsonl", "--split-sentences"], "--split-sentences is not supported"),
    ]:
        run = subprocess.run(base + extra, capture_output=True, text=True, env=env, timeout=60)
        assert run.returncode == 2, run.stderr
        assert run.stderr.count("\n") == 1 and message in run.stderr
    assert _files(tmp_path) == []
