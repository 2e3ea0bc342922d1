"""Tokenizers: GPT-2 ids, byte round trips, local Hugging Face files, factory errors."""

import json

import pytest

from cdp_megatron.data.tokenizers import (
    SUPPORTED_TOKENIZER_TYPES,
    ByteTokenizer,
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    NullTokenizer,
    TokenizerError,
    build_tokenizer,
    default_gpt2_files,
    padded_vocab_size,
)

# Ids from GPT-2's published encoder (openai/gpt-2, tiktoken "gpt2").
GPT2_KNOWN = {
    "Hello world": [15496, 995],
    " Hello world": [18435, 995],
    "Hello  world\n\n  x": [15496, 220, 995, 628, 220, 2124],
    "<|endoftext|>": [27, 91, 437, 1659, 5239, 91, 29],  # plain text, not the special id
    "I'm 123456 tokens's": [40, 1101, 17031, 29228, 16326, 338],
}
ROUND_TRIP = [
    "",
    "Hello world",
    "naïve café 日本語 🤗\n\n\ttabs  ",
    "To be, or not to be:\nthat is",
]


@pytest.fixture(scope="module")
def gpt2():
    return GPT2BPETokenizer()


@pytest.mark.parametrize("text,ids", GPT2_KNOWN.items())
def test_gpt2_known_ids(gpt2, text, ids):
    assert gpt2.tokenize(text) == ids


def test_gpt2_sizes_and_eod(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eod == 50256
    assert gpt2.unique_identifiers["class"] == "GPT2BPETokenizer"


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_gpt2_round_trip(gpt2, text):
    assert gpt2.detokenize(gpt2.tokenize(text)) == text


def test_gpt2_python_backend_matches_tokenizers(gpt2):
    pure = GPT2BPETokenizer(backend="python")
    for text in [*GPT2_KNOWN, *ROUND_TRIP]:
        assert pure.tokenize(text) == gpt2.tokenize(text)
        assert pure.detokenize(pure.tokenize(text)) == text


def test_gpt2_explicit_files(gpt2):
    vocab, merges = default_gpt2_files()
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(merges))
    assert tok.tokenize("Hello world") == [15496, 995]


def test_gpt2_file_errors(tmp_path):
    vocab, _ = default_gpt2_files()
    with pytest.raises(TokenizerError, match="both --vocab-file and --merge-file"):
        GPT2BPETokenizer(vocab_file=vocab)
    with pytest.raises(TokenizerError, match="--merge-file .*does not exist"):
        GPT2BPETokenizer(vocab_file=vocab, merge_file=tmp_path / "missing.txt")


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.tokenize(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.detokenize(ids + [tok.eod]) == text


def test_byte_sizes():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eod) == (257, 256)


def _save_gpt2_as_tokenizer_json(directory, eos=None):
    """A local tokenizer.json (GPT-2's BPE saved by the tokenizers library)."""
    from cdp_megatron.data.tokenizers import _rust_gpt2

    directory.mkdir()
    _rust_gpt2(*default_gpt2_files()).save(str(directory / "tokenizer.json"))
    if eos is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return directory


def test_huggingface_local_directory_and_file(tmp_path, gpt2):
    directory = _save_gpt2_as_tokenizer_json(tmp_path / "tok", eos={"content": "<|endoftext|>"})
    for path in (directory, directory / "tokenizer.json"):
        tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(path))
        assert isinstance(tok, HuggingFaceTokenizer)
        assert tok.tokenize("Hello world") == [15496, 995]
        assert tok.detokenize(tok.tokenize(ROUND_TRIP[2])) == ROUND_TRIP[2]
        assert (tok.vocab_size, tok.eod) == (50257, 50256)


def test_huggingface_missing_path_is_clear(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist.*hub names are not downloaded"):
        HuggingFaceTokenizer(tmp_path / "gpt2")
    with pytest.raises(TokenizerError, match="needs --tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        HuggingFaceTokenizer(tmp_path / "empty")


def test_factory_unknown_type_lists_supported():
    with pytest.raises(TokenizerError) as info:
        build_tokenizer("GPT3Tokenizer")
    for name in SUPPORTED_TOKENIZER_TYPES:
        assert name in str(info.value)
    with pytest.raises(
        TokenizerError, match="Megatron-LM tokenizer that cdp-megatron does not support"
    ):
        build_tokenizer("SentencePieceTokenizer")


def test_null_tokenizer_reads_ids_as_megatron_lm_does():
    tok = build_tokenizer("NullTokenizer", vocab_size=1000)
    assert isinstance(tok, NullTokenizer)
    assert (tok.vocab_size, tok.eod) == (1001, 1000)  # ids 0..999, end-of-document 1000
    assert tok.tokenize("5 17  3\n999") == [5, 17, 3, 999] and tok.detokenize([5, 17]) == "5 17"
    with pytest.raises(TokenizerError, match=r"^NullTokenizer: id 1000 is outside 0..999 \(--vocab-size 1000\)$"):
        tok.tokenize("1 1000")
    with pytest.raises(TokenizerError, match="NullTokenizer reads space-separated ids; 'x1' is not one"):
        tok.tokenize("1 x1")
    with pytest.raises(TokenizerError, match=r"outside 0..999"):
        tok.tokenize("-1")
    with pytest.raises(TokenizerError, match="NullTokenizer needs --vocab-size N"):
        build_tokenizer("NullTokenizer")
    with pytest.raises(TokenizerError, match="--vocab-size is only used with --tokenizer-type NullTokenizer, not "
                                             "ByteTokenizer"):
        build_tokenizer("ByteTokenizer", vocab_size=5)
    with pytest.raises(TokenizerError, match="NullTokenizer does not use --vocab-file"):
        build_tokenizer("NullTokenizer", vocab_file="v.json", vocab_size=5)


def test_factory_refuses_unused_files():
    with pytest.raises(TokenizerError, match="ByteTokenizer does not use --vocab-file"):
        build_tokenizer("ByteTokenizer", vocab_file="vocab.json")


@pytest.mark.parametrize(
    "vocab,divisible_by,tp,padded",
    [
        (50257, 128, 1, 50304),
        (50257, 128, 8, 51200),
        (257, 128, 1, 384),
        (257, 128, 2, 512),
        (256, 128, 2, 256),
    ],
)
def test_padded_vocab_size(vocab, divisible_by, tp, padded):
    assert padded_vocab_size(vocab, divisible_by, tp) == padded


# --- SentencePiece (GPTSentencePieceTokenizer, Llama2Tokenizer) ------------------------------
SP_TEXT = [f"To be, or not to be, that is the question {i}: whether 'tis nobler in the mind to suffer." for i in range(300)]


def train_sentencepiece(path, **options) -> str:
    """A 200-piece SentencePiece model of SP_TEXT at ``path`` (unk 0, bos 1, eos 2 unless given)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(SP_TEXT), model_prefix=str(path), vocab_size=200,
                                             model_type="bpe", minloglevel=2, **options)
    return f"{path}.model"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "tok")


def test_gpt_sentencepiece_is_the_model_with_eos_as_end_of_document(sp_model):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_model)
    assert (tok.vocab_size, tok.eod, tok.bos) == (200, 2, 1) == (sp.get_piece_size(), sp.eos_id(), sp.bos_id())
    text = "whether 'tis nobler to be"
    assert tok.tokenize(text) == sp.encode(text) and 1 not in tok.tokenize(text)  # no bos added
    assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.unique_identifiers == {"class": "GPTSentencePieceTokenizer", "tokenizer_path": [sp_model]}


def test_llama2_tokenizer_puts_bos_first(sp_model):
    gpt = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_model)
    llama = build_tokenizer("Llama2Tokenizer", tokenizer_model=sp_model)
    text = "To be, or not to be"
    assert llama.tokenize(text) == [1, *gpt.tokenize(text)]  # as Megatron-LM's tokenize(s, bos=True)
    assert (llama.vocab_size, llama.eod) == (gpt.vocab_size, gpt.eod)
    assert llama.detokenize(llama.tokenize(text)) == text


def test_sentencepiece_errors_name_the_fix(sp_model, tmp_path):
    with pytest.raises(TokenizerError, match="^GPTSentencePieceTokenizer needs --tokenizer-model"):
        build_tokenizer("GPTSentencePieceTokenizer")
    with pytest.raises(TokenizerError, match="^--tokenizer-type Llama2Tokenizer does not use --vocab-file"):
        build_tokenizer("Llama2Tokenizer", vocab_file="v.json", tokenizer_model=sp_model)
    with pytest.raises(TokenizerError, match="is not a file"):
        build_tokenizer("Llama2Tokenizer", tokenizer_model=str(tmp_path))
    (tmp_path / "x.model").write_text("not a model")
    with pytest.raises(TokenizerError, match="cannot load .*x.model as a SentencePiece model"):
        build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=str(tmp_path / "x.model"))
    no_eos = train_sentencepiece(tmp_path / "no_eos", eos_id=-1)
    with pytest.raises(TokenizerError, match=r"has no eos piece \(eos_id -1\), which is the end of document"):
        build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=no_eos)
    no_bos = train_sentencepiece(tmp_path / "no_bos", bos_id=-1)
    assert build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=no_bos).eod == 2
    with pytest.raises(TokenizerError, match=r"has no bos piece \(bos_id -1\), which is the start of every document"):
        build_tokenizer("Llama2Tokenizer", tokenizer_model=no_bos)
