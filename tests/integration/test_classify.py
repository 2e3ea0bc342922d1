"""Parameter classification: golden name tables (local and TE spec), fused segments (TP=1,
TP=2, GQA, SwiGLU) checked against Megatron's own split, PP/VPP global layer numbers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("megatron.core")

from ._dist import run_distributed  # noqa: E402

from cdp_megatron.integration.classify import (  # noqa: E402
    ParamInfo,
    Segment,
    UnclassifiedParameterError,
    classify_name,
    format_summary,
)

pytestmark = pytest.mark.megatron

# hidden 64, 4 heads of 16, 2 query groups (GQA), SwiGLU ffn 128.
CONFIG = SimpleNamespace(
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=16,
    hidden_size=64,
    ffn_hidden_size=128,
    gated_linear_unit=True,
    tensor_model_parallel_size=1,
)

# (name, local shape) -> (type, layer, param); layer offset 2 (local index 0 = layer 3).
LOCAL_GOLDEN = [
    ("embedding.word_embeddings.weight", (256, 64), ("embedding", None, "weight")),
    ("embedding.position_embeddings.weight", (32, 64), ("position_embedding", None, "weight")),
    ("decoder.layers.0.input_layernorm.weight", (64,), ("attn_norm", 3, "weight")),
    ("decoder.layers.0.input_layernorm.bias", (64,), ("attn_norm", 3, "bias")),
    ("decoder.layers.0.self_attention.linear_qkv.weight", (128, 64), ("qkv", 3, "weight")),
    ("decoder.layers.0.self_attention.linear_qkv.bias", (128,), ("qkv", 3, "bias")),
    ("decoder.layers.0.self_attention.q_layernorm.weight", (16,), ("q_norm", 3, "weight")),
    ("decoder.layers.0.self_attention.q_layernorm.bias", (16,), ("q_norm", 3, "bias")),
    ("decoder.layers.0.self_attention.k_layernorm.weight", (16,), ("k_norm", 3, "weight")),
    ("decoder.layers.0.self_attention.k_layernorm.bias", (16,), ("k_norm", 3, "bias")),
    ("decoder.layers.0.self_attention.linear_proj.weight", (64, 64), ("attn_out", 3, "weight")),
    ("decoder.layers.0.self_attention.linear_proj.bias", (64,), ("attn_out", 3, "bias")),
    ("decoder.layers.0.pre_mlp_layernorm.weight", (64,), ("mlp_norm", 3, "weight")),
    ("decoder.layers.0.pre_mlp_layernorm.bias", (64,), ("mlp_norm", 3, "bias")),
    ("decoder.layers.0.mlp.linear_fc1.weight", (256, 64), ("mlp_gate_up", 3, "weight")),
    ("decoder.layers.0.mlp.linear_fc1.bias", (256,), ("mlp_gate_up", 3, "bias")),
    ("decoder.layers.0.mlp.linear_fc2.weight", (64, 128), ("mlp_down", 3, "weight")),
    ("decoder.layers.0.mlp.linear_fc2.bias", (64,), ("mlp_down", 3, "bias")),
    ("decoder.layers.1.mlp.linear_fc2.weight", (64, 128), ("mlp_down", 4, "weight")),
    ("decoder.final_layernorm.weight", (64,), ("final_norm", None, "weight")),
    ("decoder.final_layernorm.bias", (64,), ("final_norm", None, "bias")),
    ("output_layer.weight", (256, 64), ("output", None, "weight")),
]

# Transformer Engine spec: norms fused into the linears, TENorm q/k norms (names only).
TE_GOLDEN = [
    ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", (64,), ("attn_norm", 3, "weight")),
    ("decoder.layers.0.self_attention.linear_qkv.layer_norm_bias", (64,), ("attn_norm", 3, "bias")),
    ("decoder.layers.0.self_attention.linear_qkv.weight", (128, 64), ("qkv", 3, "weight")),
    ("decoder.layers.0.self_attention.q_layernorm.weight", (16,), ("q_norm", 3, "weight")),
    ("decoder.layers.0.self_attention.k_layernorm.weight", (16,), ("k_norm", 3, "weight")),
    ("decoder.layers.0.self_attention.linear_proj.weight", (64, 64), ("attn_out", 3, "weight")),
    ("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", (64,), ("mlp_norm", 3, "weight")),
    ("decoder.layers.0.mlp.linear_fc1.layer_norm_bias", (64,), ("mlp_norm", 3, "bias")),
    ("decoder.layers.0.mlp.linear_fc1.weight", (256, 64), ("mlp_gate_up", 3, "weight")),
    ("decoder.layers.0.mlp.linear_fc2.weight", (64, 128), ("mlp_down", 3, "weight")),
    ("decoder.final_layernorm.weight", (64,), ("final_norm", None, "weight")),
]


def _key(info: ParamInfo) -> tuple:
    return (info.type, info.layer, info.param)


@pytest.mark.parametrize("table", [LOCAL_GOLDEN, TE_GOLDEN], ids=["local", "te"])
@pytest.mark.parametrize("prefix", ["", "module.", "module.module."], ids=["bare", "ddp", "fp16+ddp"])
def test_golden_names(table, prefix):
    for name, shape, expected in table:
        info = classify_name(prefix + name, shape, CONFIG, layer_offset=2)
        assert _key(info) == expected, name
        assert info.name == name  # wrapper prefixes stripped
        assert info.segments[0].start == 0 and info.segments[-1].end == _numel(shape)


def test_layer_mapping_and_tied_output():
    info = classify_name("decoder.layers.1.mlp.linear_fc2.weight", (64, 128), CONFIG, {0: 5, 1: 6})
    assert info.layer == 6
    tied = classify_name("output_layer.weight", (256, 64), CONFIG, tied_output=True)
    assert _key(tied) == ("embedding", None, "weight")


@pytest.mark.parametrize(
    "name",
    [
        "decoder.layers.0.mlp.router.weight",
        "decoder.layers.0.mlp.experts.linear_fc1.weight",
        "mtp.layers.0.enorm.weight",
        "output_layer.bias",
        "decoder.layers.x.input_layernorm.weight",
    ],
)
def test_unclassified_raises_with_name(name):
    with pytest.raises(UnclassifiedParameterError, match=name.replace(".", r"\.")):
        classify_name(name, (8, 8), CONFIG)


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def _rows(info: ParamInfo, row_numel: int) -> list[tuple[str, int, int]]:
    return [(s.type, s.start // row_numel, s.end // row_numel) for s in info.segments]


QKV = "decoder.layers.0.self_attention.linear_qkv.weight"
FC1 = "decoder.layers.0.mlp.linear_fc1.weight"


def test_qkv_segments_tp1_gqa():
    # Per group: q 2 heads * 16 = 32 rows, k 16, v 16.
    info = classify_name(QKV, (128, 64), CONFIG)
    assert _rows(info, 64) == [
        ("q", 0, 32), ("k", 32, 48), ("v", 48, 64),
        ("q", 64, 96), ("k", 96, 112), ("v", 112, 128),
    ]
    assert info.types == ("q", "k", "v") and info.is_fused
    bias = classify_name(QKV[:-6] + "bias", (128,), CONFIG)
    assert _rows(bias, 1) == _rows(info, 64)


def test_qkv_segments_tp2():
    for rank in (0, 1):
        info = classify_name(QKV, (64, 64), CONFIG, tp_rank=rank, tp_size=2)
        assert _rows(info, 64) == [("q", 0, 32), ("k", 32, 48), ("v", 48, 64)]


def test_qkv_segments_fewer_groups_than_tp():
    # 1 query group, TP=2: the 96 full rows [q 64 | k 16 | v 16] are cut in the middle of q.
    config = SimpleNamespace(**{**vars(CONFIG), "num_query_groups": 1})
    rank0 = classify_name(QKV, (48, 64), config, tp_rank=0, tp_size=2)
    rank1 = classify_name(QKV, (48, 64), config, tp_rank=1, tp_size=2)
    assert _rows(rank0, 64) == [("q", 0, 48)]
    assert _rows(rank1, 64) == [("q", 0, 16), ("k", 16, 32), ("v", 32, 48)]


def test_qkv_shape_mismatch_raises():
    with pytest.raises(UnclassifiedParameterError, match="linear_qkv"):
        classify_name(QKV, (100, 64), CONFIG)


def test_fc1_segments():
    swiglu = classify_name(FC1, (256, 64), CONFIG)
    assert swiglu.segments == (Segment("mlp_gate", 0, 128 * 64), Segment("mlp_up", 128 * 64, 256 * 64))
    tp2 = classify_name(FC1, (128, 64), CONFIG, tp_rank=1, tp_size=2)
    assert _rows(tp2, 64) == [("mlp_gate", 0, 64), ("mlp_up", 64, 128)]
    plain = classify_name(FC1, (128, 64), SimpleNamespace(**{**vars(CONFIG), "gated_linear_unit": False}))
    assert _key(plain) == ("mlp_up", 1, "weight") and not plain.is_fused


def test_summary_table():
    infos = [classify_name(n, s, CONFIG, layer_offset=2) for n, s, _ in LOCAL_GOLDEN]
    text = format_summary(infos)
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in text.splitlines()[1:]}
    assert rows[("q", "weight")] == ["3", "1", str(64 * 64)]
    assert rows[("mlp_down", "weight")] == ["3-4", "2", str(2 * 64 * 128)]
    assert rows[("embedding", "weight")] == ["-", "1", str(256 * 64)]
    assert ("qkv", "weight") not in rows  # fused tensors are shown by their segments' types


# --- model level ------------------------------------------------------------------------------
ARCHS = {
    "rmsnorm-swiglu-qknorm-rope-untied": {},
    "layernorm-bias-learned-tied": dict(
        normalization="LayerNorm",
        add_bias_linear=True,
        position_embedding_type="learned_absolute",
        untie_embeddings_and_output_weights=False,
        swiglu=False,
        qk_layernorm=False,
    ),
    "qkv-bias-only": dict(add_qkv_bias=True),  # Qwen2: linear_qkv.bias, no other linear bias
}


def _groups_of(infos) -> set[tuple]:
    return {(s.type, i.layer, i.param) for i in infos for s in i.segments}


@pytest.mark.parametrize("arch", ARCHS)
def test_model_groups_match_target(megatron_1proc, make_target, arch):
    """Classification of a built model yields exactly the target's group set."""
    from cdp_megatron.integration import build_gpt_model, classify_model, wrap_ddp

    target = make_target(**ARCHS[arch])
    chunks = build_gpt_model(target=target)
    infos = classify_model(chunks)
    assert _groups_of(infos.values()) == {g.key for g in target.groups}
    assert all(p.cdp_info is i for p, i in infos.items())
    wrapped = classify_model(wrap_ddp(chunks, chunks[0].config))
    assert [i.name for i in wrapped.values()] == [i.name for i in infos.values()]


def test_fused_segments_match_megatron_split(megatron_1proc):
    """Segments equal Megatron's own q/k/v and gate/up split (TP=1 here, TP=2 below)."""
    assert _fused_layout_worker() == []


def test_fused_segments_match_megatron_split_tp2():
    assert run_distributed(_fused_layout_worker, 2, 2) == [[], []]


def _fused_layout_worker(tp: int = 1) -> list[str]:
    """Fill each segment with a constant per type; Megatron's split must see those values."""
    import torch
    from ._tiny import tiny_target

    from cdp_megatron.integration import build_gpt_model, classify_model, initialize_model_parallel

    if tp > 1:
        initialize_model_parallel(tp, 1)
    model = build_gpt_model(target=tiny_target(qk_layernorm=False))[0]  # norms would rescale q, k
    layer = model.decoder.layers[0]
    value = {"q": 1.0, "k": 2.0, "v": 3.0, "mlp_gate": 1.0, "mlp_up": 2.0}
    with torch.no_grad():
        for param, info in classify_model([model]).items():
            if info.is_fused:
                for s in info.segments:
                    param.view(-1)[s.start:s.end] = value[s.type] / 64  # hidden 64: sum = value
    hidden = torch.ones(3, 1, 64)
    errors = []
    query, key, val = layer.self_attention.get_query_key_value_tensors(hidden)
    for tensor, name in ((query, "q"), (key, "k"), (val, "v")):
        if not torch.allclose(tensor, torch.full_like(tensor, value[name])):
            errors.append(f"{name}: {tensor.unique().tolist()}")
    seen = {}
    layer.mlp.linear_fc2.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    layer.mlp(hidden)
    expected = torch.nn.functional.silu(torch.tensor(1.0)) * 2.0  # silu(gate) * up
    if not torch.allclose(seen["x"], expected.expand_as(seen["x"])):
        errors.append(f"fc1: {seen['x'].unique().tolist()}")
    return errors


def _layers_worker(pp: int, vpp: int | None, tied: bool, split: dict) -> list[tuple]:
    from ._tiny import tiny_target

    from cdp_megatron.integration import build_gpt_model, classify_model, gpt_config, initialize_model_parallel

    initialize_model_parallel(1, pp, vpp)
    target = tiny_target(num_layers=4, untie_embeddings_and_output_weights=not tied)
    config = gpt_config(target.shape, init_method_std=target.global_hyperparameters["init_method_std"], **split)
    chunks = build_gpt_model(target=target, config=config)
    infos = classify_model(chunks)
    return [(i.name, i.type, i.layer, i.param, tuple(s.type for s in i.segments)) for i in infos.values()]


COUNTED = dict(account_for_embedding_in_pipeline_split=True, account_for_loss_in_pipeline_split=True)


@pytest.mark.parametrize(
    "pp,vpp,tied,split,stage_layers",
    [
        (2, None, True, {}, [{1, 2}, {3, 4}]),
        (2, 2, False, {}, [{1, 3}, {2, 4}]),  # interleaved: rank 0 holds layers 1 and 3
        (2, None, False, dict(num_layers_in_first_pipeline_stage=3), [{1, 2, 3}, {4}]),  # uneven
        # the embedding and the loss as layers, 3 chunks a rank: rank 0's first holds only the
        # embedding, rank 1's last only the loss (chunks [0, 1, 1] and [1, 1, 0])
        (2, 3, True, COUNTED, [{2, 4}, {1, 3}]),
    ],
    ids=["pp2-tied", "pp2-vpp2", "pp2-uneven", "pp2-vpp3-embedding-and-loss-counted"],
)
def test_pipeline_global_layers(pp, vpp, tied, split, stage_layers):
    per_rank = run_distributed(_layers_worker, pp, pp, vpp, tied, split)
    for rank, rows in enumerate(per_rank):
        assert {layer for _, _, layer, _, _ in rows if layer is not None} == stage_layers[rank]
    union = {(t, layer, p) for rows in per_rank for _, _, layer, p, types in rows for t in types}
    from ._tiny import tiny_target

    target = tiny_target(num_layers=4, untie_embeddings_and_output_weights=not tied)
    assert union == {g.key for g in target.groups}
    if tied:
        # The last stage's copy of the tied embedding is an embedding, not an output.
        last = {name: (t, layer) for name, t, layer, _, _ in per_rank[-1]}
        assert last["output_layer.weight"] == ("embedding", None)
