"""Packed documents: --reset-attention-mask, --reset-position-ids and --eod-mask-loss (Megatron-LM's).

- the batches cdp-pretrain reads mark the documents as the flags say (checked against masks
  and positions written here from the token ids, not through megatron's function);
- with them, every document of a packed sample gets the logits it gets alone at the start of
  a sample (rope: the mask alone; learned positions: the mask and reset positions), and
  without them it does not;
- the forward step gives the model each sample's own mask.
"""

from __future__ import annotations

import json
import shlex
from types import SimpleNamespace

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402

pytestmark = pytest.mark.megatron

EOD = 256  # ByteTokenizer: ids 0..255, end-of-document 256
SEQ = 32
DATA = ("--tokenizer-type ByteTokenizer --num-layers 2 --hidden-size 64 --num-attention-heads 4 "
        f"--seq-length {SEQ} --micro-batch-size 2 --global-batch-size 2 --train-iters 4 --lr 1e-3 --eval-iters 0 "
        "--data-path {prefix}")


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory) -> str:
    """A ByteTokenizer dataset of 3-16 byte documents, so that each 32-token sample packs several."""
    from cdp_megatron.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("short_documents")
    texts = [f"d{i} " + "xy"[i % 2] * (i % 13) for i in range(120)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return preprocess(root / "docs.jsonl", root / "docs", "ByteTokenizer", append_eod=True).output_prefixes["text"]


def _samples(prefix: str, flags: str, count: int = 6) -> list[dict]:
    from cdp_megatron.pretrain import _build_datasets
    from cdp_megatron.pretrain_args import parse_args

    args = parse_args(shlex.split(DATA.format(prefix=prefix) + " " + flags), world_size=1)
    train, _ = _build_datasets(args)
    return [train[i] for i in range(count)]


def _documents(tokens: list[int]) -> list[range]:
    """The index ranges of the documents in a sample: each ends with (and holds) its EOD."""
    spans, start = [], 0
    for i, token in enumerate(tokens):
        if token == EOD:
            spans.append(range(start, i + 1))
            start = i + 1
    if start < len(tokens):
        spans.append(range(start, len(tokens)))
    return spans


def test_batches_mark_the_documents(short_documents):
    plain = _samples(short_documents, "")
    marked = _samples(short_documents, "--reset-attention-mask --reset-position-ids --eod-mask-loss")
    assert "attention_mask" not in plain[0]  # the model's one causal mask serves plain runs
    packed = 0
    for p, m in zip(plain, marked):
        tokens = m["tokens"].tolist()
        assert tokens == p["tokens"].tolist() and m["labels"].tolist() == p["labels"].tolist()
        assert p["position_ids"].tolist() == list(range(SEQ)) and p["loss_mask"].tolist() == [1.0] * SEQ
        spans = _documents(tokens)
        packed += len(spans) > 2
        document = [next(d for d, span in enumerate(spans) if i in span) for i in range(SEQ)]
        # positions restart at 0 after each EOD
        assert m["position_ids"].tolist() == [i - spans[document[i]].start for i in range(SEQ)]
        # no loss where the input is an EOD (the guess of the next document's first token)
        assert m["loss_mask"].tolist() == [0.0 if t == EOD else 1.0 for t in tokens]
        # token i sees token j (False = not masked) iff j <= i in the same document
        want = torch.tensor([[not (j <= i and document[i] == document[j]) for j in range(SEQ)] for i in range(SEQ)])
        assert m["attention_mask"].dtype == torch.bool and m["attention_mask"].shape == (1, SEQ, SEQ)
        assert torch.equal(m["attention_mask"][0], want)
    assert packed >= 4, "the samples should pack several documents each"


@pytest.mark.parametrize("positions", ["rope", "learned_absolute"])
def test_packed_documents_compute_as_alone(short_documents, positions, megatron_1proc):
    """The logits of each document of a packed sample equal those of the document alone at the
    start of a sample, with the flags (rope: --reset-attention-mask; learned positions: both
    flags); without them the later documents' logits differ."""
    from cdp_megatron.integration.model import build_gpt_model, causal_attention_mask

    flags = "--reset-attention-mask" + (" --reset-position-ids" if positions == "learned_absolute" else "")
    arch = "" if positions == "learned_absolute" else "--position-embedding-type rope "
    shape = SimpleNamespace(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=4,
                            ffn_hidden_size=256, seq_length=SEQ, vocab_size=EOD + 1 + 7, normalization="LayerNorm",
                            swiglu=False, qk_layernorm=False, add_bias_linear=True, position_embedding_type=positions,
                            untie_embeddings_and_output_weights=False)
    (model,) = build_gpt_model(shape)
    model.eval()
    samples = {"packed": _samples(short_documents, arch + flags, 4), "plain": _samples(short_documents, arch, 4)}

    def logits(tokens, positions_, mask):
        with torch.no_grad():
            return model(tokens[None], positions_[None], mask).float()[0]

    checked = differ = 0
    for packed, plain in zip(samples["packed"], samples["plain"]):
        together = logits(packed["tokens"], packed["position_ids"], packed["attention_mask"][None])
        leaky = logits(plain["tokens"], plain["position_ids"], causal_attention_mask(SEQ))
        for span in _documents(packed["tokens"].tolist())[1:]:  # the first starts the sample anyway
            alone_tokens = packed["tokens"][span.start:span.stop]
            n = len(alone_tokens)
            alone = logits(alone_tokens, torch.arange(n), causal_attention_mask(n))
            torch.testing.assert_close(together[span.start:span.stop], alone, rtol=1e-5, atol=1e-5)
            checked += 1
            differ += not torch.allclose(leaky[span.start:span.stop], alone, rtol=1e-3, atol=1e-3)
    assert checked >= 8 and differ == checked


def test_forward_step_gives_each_sample_its_mask():
    from cdp_megatron.pretrain import _forward_step

    batch = {"tokens": torch.zeros(2, 4, dtype=torch.long), "position_ids": torch.zeros(2, 4, dtype=torch.long),
             "labels": torch.zeros(2, 4, dtype=torch.long), "loss_mask": torch.ones(2, 4),
             "attention_mask": torch.rand(2, 1, 4, 4) > 0.5}
    causal = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    seen = []

    def model(tokens, positions, mask):
        seen.append(mask)
        return torch.zeros(2, 4)

    def loss(*args):
        return args

    import contextlib

    for reset in (True, False):
        args = SimpleNamespace(reset_attention_mask=reset, cdp_z_loss=0.0)
        _forward_step(args, causal, contextlib.nullcontext, loss, iter([batch]), model)
    assert seen[0] is batch["attention_mask"] and seen[1] is causal


# --- cdp-pretrain end to end ---------------------------------------------------------------------
def _pretrain(flags: str, tmp_path, prefix: str, nproc: int = 1) -> dict[int, float]:
    from .test_pretrain import TINY, ok, run, train_losses

    data = TINY.replace("--mock-data --vocab-size 255", f"--tokenizer-type ByteTokenizer --data-path {prefix}")
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = ok(run(f"{data} --hidden-dropout 0 --attention-dropout 0 --metrics-file m.jsonl {flags}", tmp_path,
                 nproc=nproc))
    return out, train_losses(tmp_path / "m.jsonl")


def test_pretrain_with_packed_documents(short_documents, tmp_path):
    """The flags reach the run (named on the data line); the first loss, on the same initial
    weights, moves with them."""
    learned = "--train-iters 3 --lr 1e-3 --eval-iters 0 --position-embedding-type learned_absolute"
    out, marked = _pretrain(f"{learned} --reset-attention-mask --reset-position-ids --eod-mask-loss",
                            tmp_path / "marked", short_documents)
    assert (", documents attend only to themselves, positions restart at each document, no loss on "
            "end-of-document inputs; z-loss") in out
    _, plain = _pretrain(learned, tmp_path / "plain", short_documents)
    assert len(marked) == len(plain) == 3 and abs(marked[1] - plain[1]) > 1e-3, (marked, plain)


@pytest.mark.slow
def test_packed_documents_on_other_layouts(short_documents, tmp_path):
    """--reset-attention-mask --eod-mask-loss on TP 2, PP 2 and DP 2 (a worker process reading
    the samples) trains as one process (Complete(d)P: layout-invariant weights)."""
    from .test_pretrain import BASE

    raw = json.loads(BASE.read_text())
    raw.pop("$schema", None)
    raw["base"].update(global_batch_size=8, seq_length=32, train_iters=10)
    (tmp_path / "base.json").write_text(json.dumps(raw))
    flags = f"--train-iters 10 --eval-iters 0 --cdp-base {tmp_path / 'base.json'} --reset-attention-mask --eod-mask-loss"
    _, reference = _pretrain(flags, tmp_path / "one", short_documents)
    # TP 2 pads the 257 ids to 384 as one process does with --make-vocab-size-divisible-by 64
    for name, layout in (("tp2", "--tensor-model-parallel-size 2 --make-vocab-size-divisible-by 64"),
                         ("pp2", "--pipeline-model-parallel-size 2"),
                         ("dp2", "--use-distributed-optimizer --num-workers 1")):
        _, losses = _pretrain(f"{flags} {layout}", tmp_path / name, short_documents, nproc=2)
        for i in range(1, 11):
            assert losses[i] == pytest.approx(reference[i], rel=1e-5), (name, i, losses[i], reference[i])
