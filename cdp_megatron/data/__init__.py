"""Data for cdp-megatron: tokenizers, ``cdp-preprocess`` and ``cdp-prepare-corpus``.

Pure Python (no torch, no megatron import at package import): the indexed-dataset writer and
the GPTDataset builder live in :mod:`cdp_megatron.integration.datasets`, which
:func:`cdp_megatron.data.preprocess.preprocess` imports only when it writes (the function is
not re-exported here: the name ``cdp_megatron.data.preprocess`` is its module).

Quick start::

    cdp-prepare-corpus --output-dir data/ --tokenizer-type ByteTokenizer
    # -> data/shakespeare.jsonl, data/shakespeare_text_document.bin/.idx
"""

from cdp_megatron.data.tokenizers import (
    SUPPORTED_TOKENIZER_TYPES,
    ByteTokenizer,
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    TokenizerError,
    build_tokenizer,
    padded_vocab_size,
)

# The CLI modules are imported on first use, so that ``python -m cdp_megatron.data.preprocess``
# does not find its own module already imported by the package.
_LAZY = {
    "PreprocessError": "cdp_megatron.data.preprocess",
    "PreprocessResult": "cdp_megatron.data.preprocess",
    "load_shakespeare": "cdp_megatron.data.corpus",
    "prepare_corpus": "cdp_megatron.data.corpus",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SUPPORTED_TOKENIZER_TYPES",
    "ByteTokenizer",
    "GPT2BPETokenizer",
    "HuggingFaceTokenizer",
    "PreprocessError",
    "PreprocessResult",
    "TokenizerError",
    "build_tokenizer",
    "load_shakespeare",
    "padded_vocab_size",
    "prepare_corpus",
]
