"""Model changes: residual multipliers (exact), per-(type, layer, segment) init std,
TP/PP-invariant init, the completep logit multiplier, sp + ones bit-identical to unpatched
Megatron, refusal of use_mup and of a target that does not match the model."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402

from ._dist import run_distributed  # noqa: E402
from ._tiny import TINY_SHAPE, tiny_target  # noqa: E402

pytestmark = pytest.mark.megatron


def _tokens(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, TINY_SHAPE["seq_length"] + 1), generator=torch.Generator().manual_seed(seed))


def _reseed(seed: int = 1234) -> None:
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


# --- refusals ---------------------------------------------------------------------------------
def test_refuses_use_mup():
    from cdp_megatron.integration import check_config

    with pytest.raises(ValueError, match="use_mup"):
        check_config(SimpleNamespace(use_mup=True))
    check_config(SimpleNamespace(use_mup=False))


def test_refuses_use_mup_in_build(megatron_1proc):
    from cdp_megatron.integration import build_gpt_model, gpt_config

    target = tiny_target()
    config = gpt_config(target.shape)
    config.use_mup = True  # the field exists in megatron-core >= 0.17
    with pytest.raises(ValueError, match="use_mup"):
        build_gpt_model(target=target, config=config)


def test_refuses_mismatched_target(megatron_1proc):
    from cdp_megatron.integration import build_gpt_model

    target = tiny_target()
    wrong = SimpleNamespace(**{**TINY_SHAPE, "hidden_size": 128, "vocab_size": 512})
    with pytest.raises(ValueError, match=r"hidden_size: model 128, target 64.*vocab_size: model 512"):
        build_gpt_model(wrong, target=target)


# --- (a)-(c) off: sp with every multiplier 1 ----------------------------------------------------
def test_sp_ones_bit_identical_to_unpatched(megatron_1proc):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from cdp_megatron.integration import build_gpt_model, gpt_config, lm_loss

    target = tiny_target("sp")
    shape = target.shape
    config = gpt_config(shape, init_method_std=target.global_hyperparameters["init_method_std"])
    _reseed()
    plain = GPTModel(
        config,
        get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"),
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.seq_length,
        position_embedding_type="rope",
    )
    _reseed()
    (patched,) = build_gpt_model(target=target)
    plain_state, patched_state = plain.state_dict(), patched.state_dict()
    assert plain_state.keys() == patched_state.keys()
    for key, value in plain_state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, patched_state[key]), key
    tokens = _tokens()
    plain_loss, patched_loss = lm_loss(plain, tokens), lm_loss(patched, tokens)
    assert torch.equal(plain_loss, patched_loss)
    plain_loss.backward()
    patched_loss.backward()
    for (name, p), q in zip(plain.named_parameters(), patched.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_sp_with_init_multiplier_redraws(megatron_1proc):
    from cdp_megatron.integration import build_gpt_model, classify_model

    target = tiny_target("sp", multipliers={"type": {"q": {"init_std": 3.0}}})
    (model,) = build_gpt_model(target=target)
    for param, info in classify_model([model]).items():
        if info.type == "mlp_down":
            # Megatron's std/sqrt(2L) for mlp_down is replaced by the target's 0.02.
            assert param.std().item() == pytest.approx(0.02, rel=0.1)


# --- (a) residual multipliers ---------------------------------------------------------------
def test_residual_multiplier_scales_branch_and_bias(megatron_1proc):
    from cdp_megatron.integration import ResidualScaledTransformerLayer, build_gpt_model, lm_loss

    target = tiny_target(
        add_bias_linear=True,
        multipliers={
            "type": {"attention": {"residual": 0.5}, "mlp": {"residual": 3.0}},
            "depth": {"residual": [1.0, 2.0]},
        },
    )
    assert target.residual_mult == {"attention": [0.5, 1.0], "mlp": [3.0, 6.0]}
    (model,) = build_gpt_model(target=target)
    with torch.no_grad():  # non-zero biases, so that their scaling is visible
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
    captured: dict = {}
    for layer in model.decoder.layers:
        assert isinstance(layer, ResidualScaledTransformerLayer)
        n = layer.layer_number
        layer.register_forward_pre_hook(lambda m, a, kw, n=n: captured.update({(n, "in"): kw["hidden_states"]}), with_kwargs=True)
        layer.register_forward_hook(lambda m, a, out, n=n: captured.update({(n, "out"): out[0]}))
        layer.self_attention.register_forward_hook(lambda m, a, out, n=n: captured.update({(n, "attn"): out}))
        layer.mlp.register_forward_hook(lambda m, a, out, n=n: captured.update({(n, "mlp"): out}))
    with torch.no_grad():
        lm_loss(model, _tokens())
    for n in (1, 2):
        m_attn, m_mlp = target.residual_mult["attention"][n - 1], target.residual_mult["mlp"][n - 1]
        (attn, attn_bias), (mlp, mlp_bias) = captured[(n, "attn")], captured[(n, "mlp")]
        expected = captured[(n, "in")] + m_attn * (attn + attn_bias) + m_mlp * (mlp + mlp_bias)
        torch.testing.assert_close(captured[(n, "out")], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recompute", [dict(recompute_granularity="full", recompute_method="uniform",
                                            recompute_num_layers=1),
                                       dict(recompute_granularity="full", recompute_method="block",
                                            recompute_num_layers=2),
                                       dict(recompute_granularity="selective"),
                                       dict(recompute_granularity="selective", recompute_modules=["mlp"]),
                                       dict(recompute_granularity="selective", recompute_modules=["layernorm"]),
                                       dict(recompute_granularity="selective",
                                            recompute_modules=["core_attn", "mlp", "layernorm"])],
                         ids=["full-uniform", "full-block", "selective", "mlp", "layernorm", "all-modules"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_recomputation_reruns_the_forward_and_gives_the_same_gradients(megatron_1proc, recompute, bias):
    """--recompute-* (cdp-pretrain passes these TransformerConfig fields): megatron re-runs the
    layers (or the core attention, MLP or norms of --recompute-modules) in the backward, and
    the residual-scaled layers, dropout included, give bit-identical gradients (with the norms
    recomputed, equal within float rounding: the recomputed norm's backward runs from a hook,
    so the residual stream's gradient terms are added in another order). With biases, megatron's own
    MLP recomputation recursed in its backward until memory ran out (BiasCopyMLP)."""
    from cdp_megatron.integration import build_gpt_model, gpt_config, lm_loss

    target = tiny_target(multipliers={"type": {"attention": {"residual": 0.5}}, "depth": {"residual": [1.0, 2.0]}},
                         add_bias_linear=bias)
    grads, calls = [], []
    for fields in ({}, recompute):
        config = gpt_config(target.shape, init_method_std=0.02, hidden_dropout=0.1, attention_dropout=0.1, **fields)
        (model,) = build_gpt_model(target=target, config=config)
        copies = bias and "mlp" in fields.get("recompute_modules", []) and fields["recompute_granularity"] == "selective"
        assert {type(layer.mlp).__name__ for layer in model.decoder.layers} == {"BiasCopyMLP" if copies else "MLP"}
        count = dict.fromkeys(("layer", "core_attention", "mlp", "input_layernorm", "pre_mlp_layernorm"), 0)
        for layer in model.decoder.layers:
            for name in count:
                module = layer if name == "layer" else layer.self_attention.core_attention if name == "core_attention" \
                    else getattr(layer, name)
                module.register_forward_hook(lambda *a, name=name: count.__setitem__(name, count[name] + 1))
        _reseed()
        lm_loss(model, _tokens()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        calls.append(count)
    assert set(calls[0].values()) == {2}  # 2 layers, each module once
    if recompute["recompute_granularity"] == "full":
        assert set(calls[1].values()) == {4}  # every layer's forward ran again in the backward
    else:
        modules = recompute.get("recompute_modules", ["core_attn"])  # megatron-core's default
        again = {"core_attention": "core_attn" in modules, "mlp": "mlp" in modules,
                 "input_layernorm": "layernorm" in modules, "pre_mlp_layernorm": "layernorm" in modules}
        assert calls[1] == {"layer": 2, **{name: 4 if twice else 2 for name, twice in again.items()}}
    if "layernorm" in recompute.get("recompute_modules", []):
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    else:
        assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_residual_multiplier_follows_global_layer(megatron_1proc):
    from cdp_megatron.integration import build_gpt_model

    # completedp, depth 2 -> 4: m_L^-alpha times the interpolated depth multipliers.
    target = tiny_target(multipliers={"depth": {"residual": [1.0, 4.0]}}, target_shape={"num_layers": 4})
    (model,) = build_gpt_model(target=target)
    got = [(layer.attn_residual_mult, layer.mlp_residual_mult) for layer in model.decoder.layers]
    assert got == list(zip(target.residual_mult["attention"], target.residual_mult["mlp"]))
    assert len(set(got)) > 1 and got[0][0] < 1  # per-layer values, with the m_L^-alpha factor


# --- (b) init std -------------------------------------------------------------------------------
INIT_MULTIPLIERS = {
    "type": {
        "q": {"init_std": 3.0},
        "k": {"init_std": 0.5},
        "v": {"init_std": 1.5},
        "attn_out": {"init_std": 2.0},
        "mlp_gate": {"init_std": 0.25},
        "mlp_up": {"init_std": 4.0},
        "output": {"init_std": 0.5},
    }
}


def test_init_std_per_type_and_segment(megatron_1proc):
    """Measured std of every (type, layer) segment equals the target's init_std."""
    from cdp_megatron.integration import build_gpt_model, classify_model

    # Width x2 (hidden 128) so that Table 1's m_N factors are in play; LayerNorm + biases.
    target = tiny_target(
        multipliers=INIT_MULTIPLIERS,
        normalization="LayerNorm",
        add_bias_linear=True,
        target_shape={"hidden_size": 128},
    )
    (model,) = build_gpt_model(target=target)
    samples: dict[tuple, list[torch.Tensor]] = {}
    for param, info in classify_model([model]).items():
        flat = param.detach().view(-1)
        for s in info.segments:
            if info.param == "bias":
                assert torch.all(flat[s.start:s.end] == 0), info.name
            elif s.type.endswith("norm"):
                assert torch.all(flat[s.start:s.end] == 1), info.name
            else:
                samples.setdefault((s.type, info.layer), []).append(flat[s.start:s.end])
    assert {t for t, _ in samples} == {"embedding", "q", "k", "v", "attn_out", "mlp_gate", "mlp_up", "mlp_down", "output"}
    for (ptype, layer), parts in samples.items():
        values = torch.cat(parts)
        expected = target.group(ptype, layer, "weight").init_std
        # >= 4096 samples: the std estimate is within ~1.1% (1 sigma); allow 5 sigma.
        assert values.numel() >= 4096
        assert values.std().item() == pytest.approx(expected, rel=5.5 / math.sqrt(2 * values.numel()) + 1e-3), (ptype, layer)
        assert abs(values.mean().item()) < 5 * expected / math.sqrt(values.numel())
    # Independent draws: one type in two layers, and the untied embedding and output, are
    # uncorrelated (5 sigma of a correlation estimate from n pairs: 5 / sqrt(n)).
    keys = sorted(samples, key=str)
    pairs = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:]
             if a[0] == b[0] or {a[0], b[0]} == {"embedding", "output"}]
    assert len(pairs) >= 8
    for a, b in pairs:
        x, y = torch.cat(samples[a]), torch.cat(samples[b])
        n = min(x.numel(), y.numel())
        r = (x[:n] / x[:n].std() * (y[:n] / y[:n].std())).mean().item()
        assert abs(r) < 5 / math.sqrt(n), (a, b, r)


def _full_weights_worker(tp: int, pp: int, tied: bool = False) -> dict:
    """This rank's weights, TP shards gathered, keyed by (type, layer, param, suffix)."""
    from megatron.core import parallel_state

    from cdp_megatron.integration import build_gpt_model, classify_model, initialize_model_parallel

    if (tp, pp) != (1, 1):
        initialize_model_parallel(tp, pp)
    target = tiny_target(multipliers=INIT_MULTIPLIERS, num_layers=4, untie_embeddings_and_output_weights=not tied)
    chunks = build_gpt_model(target=target)
    out = {}
    for param, info in classify_model(chunks).items():
        tensor = param.detach()
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            shards = [torch.empty_like(tensor) for _ in range(tp)]
            torch.distributed.all_gather(shards, tensor.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            if info.type == "mlp_gate_up":  # each shard is [gate_r; up_r]
                half = tensor.shape[0] // 2
                tensor = torch.cat([s[:half] for s in shards] + [s[half:] for s in shards])
            else:
                tensor = torch.cat(shards, dim=param.partition_dim)
        suffix = info.name.split(".", 3)[-1] if info.layer is not None else info.name
        out[(info.type, info.layer, info.param, suffix)] = tensor.clone()
    return out


def test_init_is_tp_and_pp_invariant(megatron_1proc):
    reference = _full_weights_worker(1, 1)
    for tp, pp in ((2, 1), (1, 2)):
        per_rank = run_distributed(_full_weights_worker, tp * pp, tp, pp)
        merged = {}
        for weights in per_rank:
            merged.update(weights)
        assert merged.keys() == reference.keys(), (tp, pp)
        for key, value in reference.items():
            assert torch.equal(merged[key], value), (tp, pp, key)


def test_tied_output_copy_equals_embedding_on_pp2():
    """PP=2, tied: the last stage's output_layer.weight is redrawn as the same embedding."""
    first, last = run_distributed(_full_weights_worker, 2, 1, 2, True)
    embedding = first[("embedding", None, "weight", "embedding.word_embeddings.weight")]
    assert torch.equal(last[("embedding", None, "weight", "output_layer.weight")], embedding)
    assert embedding.std().item() == pytest.approx(0.02, rel=0.05)


def _params_norm_worker(tp: int, pp: int, tied: bool) -> float:
    from cdp_megatron.integration import build_gpt_model, initialize_model_parallel
    from cdp_megatron.integration.training import params_norm

    if (tp, pp) != (1, 1):
        initialize_model_parallel(tp, pp)
    target = tiny_target(multipliers=INIT_MULTIPLIERS, num_layers=4, untie_embeddings_and_output_weights=not tied)
    return params_norm(build_gpt_model(target=target))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_params_norm_counts_every_weight_once_on_any_layout(megatron_1proc, tied):
    """--log-params-norm: the norm of all weights, by hand on 1 process, and the same on TP=2
    (norm weights are on both ranks) and PP=2 (with tied embeddings the last stage holds a
    copy of the embedding); the init is TP/PP-invariant, so the weights are the same."""
    from cdp_megatron.integration import build_gpt_model
    from cdp_megatron.integration.training import params_norm

    target = tiny_target(multipliers=INIT_MULTIPLIERS, num_layers=4, untie_embeddings_and_output_weights=not tied)
    chunks = build_gpt_model(target=target)
    by_hand = math.sqrt(sum(float(p.detach().double().square().sum()) for c in chunks for p in c.parameters()))
    assert params_norm(chunks) == pytest.approx(by_hand, rel=1e-6)
    for tp, pp in ((2, 1), (1, 2)):
        norms = run_distributed(_params_norm_worker, tp * pp, tp, pp, tied)
        assert norms == pytest.approx([by_hand] * len(norms), rel=1e-6), (tp, pp)


def _replicas_worker(tp: int, pp: int, corrupt: str | None) -> list[str]:
    import torch

    from cdp_megatron.integration import build_gpt_model, initialize_model_parallel
    from cdp_megatron.integration.training import data_parallel_rank, replicas_that_differ

    initialize_model_parallel(tp, pp)
    chunks = build_gpt_model(target=tiny_target(num_layers=4))
    if corrupt and data_parallel_rank() == 1:
        with torch.no_grad():
            dict(chunks[0].named_parameters())[corrupt].view(-1)[-1] += 1e-6  # one element, one ulp or so
    return replicas_that_differ(chunks)


def test_replicas_that_differ_names_each_tensor_and_rank_everywhere():
    """--check-weight-hash-across-dp-replicas-interval: data-parallel replicas built alike match;
    one element changed on DP rank 1 is named, with the stage and TP rank where there are several,
    on every rank of the world; with one replica there is nothing to differ."""
    assert run_distributed(_replicas_worker, 2, 1, 1, None) == [[], []]
    name = "decoder.layers.1.mlp.linear_fc2.weight"
    assert run_distributed(_replicas_worker, 2, 1, 1, name) == [[f"{name} on DP rank 1"]] * 2
    assert run_distributed(_replicas_worker, 2, 2, 1, name) == [[], []]  # TP 2, DP 1
    # PP 2 x DP 2: the tensor of that name on each stage (layer numbers are a stage's own)
    assert run_distributed(_replicas_worker, 4, 1, 2, name) == [
        [f"{name} (pipeline stage 0) on DP rank 1", f"{name} (pipeline stage 1) on DP rank 1"]] * 4
    # TP 2 x DP 2: each TP rank's shard
    assert run_distributed(_replicas_worker, 4, 2, 1, name) == [
        [f"{name} (TP rank 0) on DP rank 1", f"{name} (TP rank 1) on DP rank 1"]] * 4


# --- (c) logit multiplier -------------------------------------------------------------------
def test_completep_output_multiplier(megatron_1proc):
    from cdp_megatron.integration import apply_output_mult, build_gpt_model, causal_attention_mask

    target = tiny_target("completep", target_shape={"hidden_size": 128})
    assert target.output_mult == 0.5
    (model,) = build_gpt_model(target=target)
    tokens = _tokens()[:, :-1]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    mask = causal_attention_mask(tokens.shape[1])
    with torch.no_grad():
        scaled = model(tokens, positions, mask)
        model.output_layer._forward_hooks.clear()
        plain = model(tokens, positions, mask)
    assert torch.equal(scaled, 0.5 * plain)
    with pytest.raises(RuntimeError, match="already applied"):
        apply_output_mult([model], 0.5)


def test_completedp_has_no_output_multiplier(megatron_1proc):
    from cdp_megatron.integration import build_gpt_model

    target = tiny_target("completedp", target_shape={"hidden_size": 128})
    assert target.output_mult == 1.0
    (model,) = build_gpt_model(target=target)
    assert not model.output_layer._forward_hooks


# --- loss helper, summary, TE spec ----------------------------------------------------------
def test_lm_loss_at_init_and_summary(megatron_1proc, capsys):
    from cdp_megatron.integration import build_gpt_model, classify_model, lm_loss, print_summary

    target = tiny_target()
    (model,) = build_gpt_model(target=target)
    assert lm_loss(model, _tokens()).item() == pytest.approx(math.log(256), abs=0.3)
    print_summary(classify_model([model]), target)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["type", "param", "layers", "tensors", "elements", "lr", "wd", "eps", "beta1", "beta2", "init_std"]
    assert len(lines) == 1 + len({(g.type, g.param) for g in target.groups})


def test_summary_ranges_read_as_cdp_convert_reads_them(megatron_1proc, capsys):
    # The start-up table showed lowest..highest where cdp-convert shows first..last: an lr that
    # falls with depth read as one that grows. Now both read first..last, and lowest..highest*
    # where the values are not monotone, with the legend under the table.
    from cdp_megatron.integration import build_gpt_model, classify_model, print_summary

    target = tiny_target(num_layers=4, multipliers={"depth": {"lr": [4, 2, 1, 0.5], "weight_decay": [1, 4, 1, 1]}},
                         global_={"weight_decay": 0.1})
    (model,) = build_gpt_model(target=target)
    print_summary(classify_model([model]), target)
    lines = capsys.readouterr().out.splitlines()
    q = next(line.split() for line in lines if line.startswith("q "))
    lr = [target.group("q", layer, "weight").lr for layer in (1, 4)]
    wd = sorted(target.group("q", layer, "weight").weight_decay for layer in (1, 2))
    assert lr[0] > lr[1] and q[5] == f"{lr[0]:.3g}..{lr[1]:.3g}"
    assert q[6] == f"{wd[0]:.3g}..{wd[1]:.3g}*"
    assert lines[-1] == "(a..b: first layer .. last layer; a..b*: lowest .. highest, not monotone over the layers)"


def test_what_accepted_no_op_flags_rely_on(megatron_1proc):
    # cdp-pretrain accepts --attention-softmax-in-fp32 and --use-cpu-initialization as no-ops
    # because the model config already does what they ask.
    from types import SimpleNamespace

    from cdp_megatron.integration import gpt_config

    config = gpt_config(SimpleNamespace(**TINY_SHAPE))
    assert config.attention_softmax_in_fp32 is True and config.use_cpu_initialization is True


FUSIONS = ("masked_softmax_fusion", "bias_activation_fusion", "bias_dropout_fusion", "persist_layer_norm",
           "apply_rope_fusion", "gradient_accumulation_fusion")


def test_no_fusion_is_turned_on_on_a_gpu_either(megatron_1proc, monkeypatch):
    # cdp-pretrain accepts Megatron-LM's --no-*-fusion switches and --no-overlap-p2p-communication
    # as no-ops because gpt_config leaves these off on a GPU too (megatron-core's defaults)
    from megatron.core.transformer.transformer_config import TransformerConfig

    from cdp_megatron.integration import gpt_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # gpt_config's GPU branch
    config = gpt_config(SimpleNamespace(**TINY_SHAPE))
    assert config.batch_p2p_comm is True  # the GPU branch was taken (the CPU one turns it off)
    defaults = TransformerConfig.__dataclass_fields__
    assert {name: getattr(config, name) for name in FUSIONS} == dict.fromkeys(FUSIONS, False)
    assert {name: defaults[name].default for name in FUSIONS} == dict.fromkeys(FUSIONS, False)
    assert config.overlap_p2p_comm is False  # --no-overlap-p2p-communication


def test_attention_backend_by_name(megatron_1proc, monkeypatch):
    # gpt_config takes --attention-backend's name; megatron-core sets TE's NVTE_* switches from
    # it (for the whole process: cleared before each build); local and auto are the same
    # DotProductAttention on the local spec
    from megatron.core.transformer.enums import AttnBackend

    from cdp_megatron.integration import build_gpt_model, gpt_config, lm_loss

    names = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")
    target = tiny_target()
    losses = {}
    for backend in ("local", "auto"):
        for name in names:
            monkeypatch.delenv(name, raising=False)
        config = gpt_config(target.shape, attention_backend=backend)
        assert config.attention_backend is AttnBackend[backend]
        (model,) = build_gpt_model(target=target, config=config)
        assert [os.environ[name] for name in names] == ["0" if backend == "local" else "1"] * 3
        losses[backend] = lm_loss(model, _tokens())
    assert torch.equal(losses["local"], losses["auto"])


def test_rotary_positions_reach_the_model_from_the_spec(megatron_1proc):
    """The spec's rotary fields (its shape's) reach the model built from a target alone: the
    base and percent its frequencies, rope scaling and the interpolation factor GPTModel's
    rotary embedding, interleaving the config."""
    from cdp_megatron.integration import build_gpt_model, gpt_config, lm_loss

    target = tiny_target()  # head dim 16
    rotated = tiny_target(rotary_base=500, rotary_percent=0.5, rotary_interleaved=True, use_rope_scaling=True,
                          rope_scaling_factor=16.0, rotary_seq_len_interpolation_factor=2.0)
    (default,) = build_gpt_model(target=target)
    (model,) = build_gpt_model(target=rotated)
    for chunk, base, dim in ((default, 10000, 16), (model, 500, 8)):
        expected = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        if chunk is model:  # Llama 3.1's scaling of the frequencies (megatron-core's own function)
            expected = chunk.rotary_pos_emb._apply_scaling(expected, factor=16.0)
        torch.testing.assert_close(chunk.rotary_pos_emb.inv_freq.cpu(), expected)
    assert (default.rotary_pos_emb.seq_len_interpolation_factor, model.rotary_pos_emb.seq_len_interpolation_factor) \
        == (None, 2.0)
    assert (default.rotary_pos_emb.rotary_interleaved, model.rotary_pos_emb.rotary_interleaved) == (False, True)
    assert gpt_config(rotated.shape).rotary_interleaved and not gpt_config(target.shape).rotary_interleaved
    # the same weights (the init does not depend on the positions), another function
    assert all(torch.equal(a, b) for a, b in zip(default.parameters(), model.parameters()))
    tokens = _tokens()
    assert not torch.allclose(lm_loss(default, tokens), lm_loss(model, tokens))


def test_squared_relu_reaches_the_mlp(megatron_1proc):
    # --squared-relu (Nemotron's MLP): megatron-core's own squared_relu, on the same weights as GeLU's
    from megatron.core.activations import squared_relu

    from cdp_megatron.integration import build_gpt_model, gpt_config, lm_loss

    target = tiny_target(swiglu=False)
    std = target.global_hyperparameters["init_method_std"]
    (gelu,) = build_gpt_model(target=target)
    (relu2,) = build_gpt_model(target=target, config=gpt_config(target.shape, init_method_std=std,
                                                                activation_func="squared_relu"))
    assert {layer.mlp.activation_func for layer in relu2.decoder.layers} == {squared_relu}
    assert {layer.mlp.activation_func for layer in gelu.decoder.layers} == {torch.nn.functional.gelu}
    assert all(torch.equal(a, b) for a, b in zip(gelu.parameters(), relu2.parameters()))
    tokens = _tokens()
    assert not torch.allclose(lm_loss(gelu, tokens), lm_loss(relu2, tokens))


def test_spec_architecture_reaches_the_model(megatron_1proc):
    # a spec's squared_relu and apply_layernorm_1p (what cdp-coordcheck and an in-process
    # build read): gpt_config takes them from the shape, as the flags' overrides give them
    from megatron.core.activations import squared_relu

    from cdp_megatron.integration import ZeroCentredNorm, build_gpt_model

    target = tiny_target(swiglu=False, squared_relu=True, apply_layernorm_1p=True)
    (model,) = build_gpt_model(target=target)
    assert {layer.mlp.activation_func for layer in model.decoder.layers} == {squared_relu}
    assert sum(isinstance(m, ZeroCentredNorm) for m in model.modules()) == 4 * target.shape.num_layers + 1
    (plain,) = build_gpt_model(target=tiny_target(swiglu=False))
    assert {layer.mlp.activation_func for layer in plain.decoder.layers} == {torch.nn.functional.gelu}
    assert not any(isinstance(m, ZeroCentredNorm) for m in plain.modules())


def test_transformer_engine_spec(megatron_1proc):
    pytest.importorskip("transformer_engine")
    from cdp_megatron.integration import ResidualScaledTransformerLayer, build_gpt_model, classify_model

    target = tiny_target(multipliers={"type": {"attention": {"residual": 0.5}}})
    chunks = build_gpt_model(target=target, use_te=True)
    infos = classify_model(chunks)
    assert {(s.type, i.layer, i.param) for i in infos.values() for s in i.segments} == {g.key for g in target.groups}
    assert all(isinstance(layer, ResidualScaledTransformerLayer) for layer in chunks[0].decoder.layers)


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_zero_centred_norm_gains(megatron_1proc, normalization):
    # --apply-layernorm-1p: megatron's torch norms refuse zero-centred gains, so every norm of
    # the local spec (input, pre-MLP, q, k and the final one) becomes ZeroCentredNorm: the
    # weight starts at 0 and the gain is 1 + weight, the same function as the plain model's
    from cdp_megatron.integration import ZeroCentredNorm, build_gpt_model, classify_model, gpt_config, lm_loss

    target = tiny_target(normalization=normalization)
    shape, std = target.shape, target.global_hyperparameters["init_method_std"]
    (plain,) = build_gpt_model(target=target)
    config = gpt_config(shape, init_method_std=std, layernorm_zero_centered_gamma=True)
    (centred,) = build_gpt_model(target=target, config=config)
    norm_class = torch.nn.RMSNorm if normalization == "RMSNorm" else torch.nn.LayerNorm
    plain_norms = {name: m for name, m in plain.named_modules() if isinstance(m, norm_class)}
    norms = {name: m for name, m in centred.named_modules() if isinstance(m, ZeroCentredNorm)}
    assert len(norms) == 4 * shape.num_layers + 1 and sorted(norms) == sorted(plain_norms)
    assert not any(isinstance(m, norm_class) for m in centred.modules())
    plain_params = dict(plain.named_parameters())
    centred_params = dict(centred.named_parameters())
    assert sorted(centred_params) == sorted(plain_params)
    for name, param in centred_params.items():
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.zeros_like(param)) and torch.equal(plain_params[name], 1 + param)
        else:
            assert torch.equal(param, plain_params[name]), name
    assert [(i.name, i.type, i.layer, i.param) for i in classify_model([centred]).values()] == [
        (i.name, i.type, i.layer, i.param) for i in classify_model([plain]).values()]
    tokens = _tokens()
    at_init = lm_loss(plain, tokens)
    assert torch.equal(lm_loss(centred, tokens), at_init)
    with torch.no_grad():  # the gain is 1 + weight
        for name, norm in norms.items():
            delta = 0.3 * torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(len(name)))
            norm.weight.copy_(delta)
            plain_norms[name].weight.copy_(1 + delta)
            if norm.bias is not None:
                norm.bias.fill_(0.1)
                plain_norms[name].bias.fill_(0.1)
    moved = lm_loss(centred, tokens)
    assert not torch.equal(moved, at_init)
    torch.testing.assert_close(moved, lm_loss(plain, tokens), rtol=1e-6, atol=0)


def _zero_centred_worker(tp: int, pp: int, vpp: int | None) -> dict:
    from megatron.core import parallel_state

    from cdp_megatron.integration import ZeroCentredNorm

    from . import _optim_common as oc

    target = tiny_target(num_layers=4, multipliers=oc.multipliers_for(4))
    setup = oc.setup_model(target, tp, pp, vpp, config_fields={"layernorm_zero_centered_gamma": True})
    norms = [type(m) for chunk in setup.chunks for name, m in chunk.named_modules()
             if name.endswith("norm") and list(m.parameters())]  # not the IdentityOp of cross-attention
    assert norms and set(norms) == {ZeroCentredNorm}, norms
    finals = [chunk.module.decoder.final_layernorm is not None for chunk in setup.chunks]
    last = parallel_state.is_pipeline_last_stage()
    assert finals == [last and index == len(finals) - 1 for index in range(len(finals))], finals
    return {"losses": oc.train_steps(setup, 4), "last": last}


def test_zero_centred_norm_gains_train_alike_on_every_layout():
    """The final norm of the last (virtual) stage is built apart from the layers' spec: on TP 2 and
    on PP 2 with 2 virtual stages the losses are one process's."""
    (reference,) = [r["losses"] for r in run_distributed(_zero_centred_worker, 1, 1, 1, None)]
    for tp, pp, vpp in ((2, 1, None), (1, 2, 2)):
        results = run_distributed(_zero_centred_worker, tp * pp, tp, pp, vpp)
        for result in results:
            if result["last"]:
                assert result["losses"] == pytest.approx(reference, rel=1e-5), (tp, pp, vpp)


def _distributed_saved_worker(distribute: bool) -> dict:
    # --distribute-saved-activations: megatron's checkpoint keeps 1/TP of each recomputed
    # chunk's input (a flat shard) instead of the whole [s, b, h] tensor
    from . import _optim_common as oc

    target = tiny_target(num_layers=4, multipliers=oc.multipliers_for(4))
    fields = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2,
                  distribute_saved_activations=distribute)
    setup = oc.setup_model(target, 2, 1, None, config_fields=fields)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        losses = oc.train_steps(setup, 3)
    return {"losses": losses, "saved": saved}


def test_distributed_saved_activations():
    """On TP 2 each rank saves half of every recomputed chunk's input (seq x micro batch x hidden
    / 2 as one flat shard, gathered again for the backward), and trains exactly as without."""
    whole, split = (run_distributed(_distributed_saved_worker, 2, distribute) for distribute in (False, True))
    shape = TINY_SHAPE
    flat = (shape["seq_length"] * 1 * shape["hidden_size"] // 2,)  # micro batch 1
    full = (shape["seq_length"], 1, shape["hidden_size"])
    for rank in range(2):
        assert split[rank]["losses"] == whole[rank]["losses"]
        # every input the checkpoint saved whole is saved as a shard instead
        assert split[rank]["saved"].count(flat) > 0 and whole[rank]["saved"].count(flat) == 0
        assert whole[rank]["saved"].count(full) - split[rank]["saved"].count(full) == split[rank]["saved"].count(flat)
    # cdp-pretrain's flag sets the field
    import shlex

    from cdp_megatron.pretrain import config_overrides
    from cdp_megatron.pretrain_args import parse_args

    flags = ("--mock-data --num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --micro-batch-size 1 "
             "--train-iters 4 --lr 1e-3 --tensor-model-parallel-size 2 --recompute-granularity full "
             "--recompute-method uniform --recompute-num-layers 1")
    for extra, want in (("", False), (" --distribute-saved-activations", True)):
        assert config_overrides(parse_args(shlex.split(flags + extra), world_size=2))["distribute_saved_activations"] is want


def test_aligned_param_gather_gives_the_schedule_its_sync_function(megatron_1proc):
    # --align-param-gather: the schedule, not each bucket's forward pre-hook, starts a chunk's
    # all-gathers (megatron's DDP then skips its own dispatch of the next bucket)
    from cdp_megatron.integration import build_gpt_model, gpt_config, wrap_ddp
    from cdp_megatron.integration import cpu_runner

    target = tiny_target()
    for align in (False, True):
        config = gpt_config(target.shape, init_method_std=target.global_hyperparameters["init_method_std"])
        with cpu_runner.active(device_kwargs=True):
            (chunk,) = wrap_ddp(build_gpt_model(target=target, config=config), config, use_distributed_optimizer=True,
                                overlap_grad_reduce=True, overlap_param_gather=True, align_param_gather=align)
        assert chunk.ddp_config.align_param_gather is align
        assert config.grad_sync_func == chunk.start_grad_sync
        assert config.param_sync_func == (chunk.start_param_sync if align else None)


def test_embedding_init_method_std_of_a_plain_run(megatron_1proc):
    # --embedding-init-method-std (plain runs): megatron's own init of the word and position
    # embeddings with that std; every other weight keeps --init-method-std
    import shlex

    from cdp_megatron.integration import build_gpt_model, gpt_config
    from cdp_megatron.pretrain import config_overrides
    from cdp_megatron.pretrain_args import parse_args

    flags = ("--mock-data --num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --micro-batch-size 1 "
             "--train-iters 4 --lr 1e-3 --init-method-std 0.02 --embedding-init-method-std 0.5")
    args = parse_args(shlex.split(flags), world_size=1)
    shape = SimpleNamespace(**{**TINY_SHAPE, "position_embedding_type": "learned_absolute", "vocab_size": 512})
    config = gpt_config(shape, init_method_std=args.init_method_std, **config_overrides(args))
    (model,) = build_gpt_model(shape, config=config)
    stds = {name: float(p.detach().std()) for name, p in model.named_parameters() if p.dim() == 2}
    assert stds["embedding.word_embeddings.weight"] == pytest.approx(0.5, rel=0.05)
    assert stds["embedding.position_embeddings.weight"] == pytest.approx(0.5, rel=0.05)
    assert stds["decoder.layers.0.self_attention.linear_qkv.weight"] == pytest.approx(0.02, rel=0.05)


# --- the split of the layers over pipeline stages ----------------------------------------------
def _megatron_split(layers: int, pp: int, vpp: int | None, first, last, embedding: bool, loss: bool):
    """megatron-core's own split (``get_num_layers_to_build`` through ``pipeline_stage_layers``),
    or None where its TransformerConfig or that function refuses the flags, or where the first
    global layer of a chunk (``get_transformer_layer_offset``, in the schedule's order: virtual
    stage, then pipeline rank) is not the one after the previous chunk's last, or fails."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from cdp_megatron.integration.model import pipeline_stage_layers

    try:
        config = TransformerConfig(
            num_layers=layers, hidden_size=64, num_attention_heads=4, pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp, pipeline_dtype=torch.float32,
            num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
            account_for_embedding_in_pipeline_split=embedding, account_for_loss_in_pipeline_split=loss)
        split = pipeline_stage_layers(config)
        built = 0
        for stage in range(vpp or 1):
            for rank in range(pp):
                if split[rank][stage] and get_transformer_layer_offset(
                        config, vp_stage=stage if vpp else None, pp_rank=rank) != built:
                    return None
                built += split[rank][stage]
        return split
    except (ValueError, AssertionError, ZeroDivisionError):  # the last: 2 uneven interleaved stages
        return None


def test_stage_split_is_megatron_cores():
    """Every split cdp-pretrain accepts (uneven first/last stages, the embedding and the loss
    counted as layers, interleaved or not) is megatron-core's, chunk by chunk, with the global
    layer numbers following on from chunk to chunk, on 2-4 stages of 1-8 layers. Every split it
    refuses is one megatron-core refuses, numbers wrongly or fails on, or would build wrongly
    (chunks that do not add up to the layers, or hold fewer than none)."""
    import itertools
    import shlex

    from cdp_megatron.pretrain_args import ArgsError, parse_args

    base = ("--hidden-size 64 --num-attention-heads 4 --seq-length 32 --micro-batch-size 1 --global-batch-size 12 "
            "--train-iters 2 --mock-data --lr 1e-3 ")
    splits = [(None, None, False, False), (None, None, True, False), (None, None, False, True),
              (None, None, True, True)]
    splits += [(f, g, False, False) for f, g in itertools.product((None, 1, 2, 3, 4), repeat=2) if (f, g) != (None, None)]
    accepted = refused = 0
    for layers, pp, vpp, (first, last, embedding, loss) in itertools.product(range(1, 9), (2, 3, 4), (None, 2, 3),
                                                                             splits):
        flags = (f"--num-layers {layers} --pipeline-model-parallel-size {pp}"
                 + (f" --num-virtual-stages-per-pipeline-rank {vpp}" if vpp else "")
                 + (f" --decoder-first-pipeline-num-layers {first}" if first is not None else "")
                 + (f" --decoder-last-pipeline-num-layers {last}" if last is not None else "")
                 + (" --account-for-embedding-in-pipeline-split" if embedding else "")
                 + (" --account-for-loss-in-pipeline-split" if loss else ""))
        theirs = _megatron_split(layers, pp, vpp, first, last, embedding, loss)
        try:
            ours = parse_args(shlex.split(base + flags), world_size=pp).pipeline_layers
        except ArgsError:
            refused += 1
            assert (theirs is None or sum(map(sum, theirs)) != layers
                    or min(map(min, theirs)) < 0), (flags, theirs)
            continue
        accepted += 1
        assert ours == theirs, (flags, ours, theirs)
    assert accepted > 200 and refused > 1000, (accepted, refused)  # 246 and 1770


def test_pipeline_layout_is_megatron_cores():
    """--pipeline-model-parallel-layout: cdp-pretrain's parse of Megatron-LM's syntax ((..)*n,
    x*n, commas) and of 400 random layouts (2-4 stages, 1-3 chunks a stage, 1-8 layers; a
    quarter broken: E or L moved, a layer missing, a chunk too many) gives megatron-core's
    layers chunk by chunk, and it refuses exactly the layouts megatron-core refuses."""
    import random
    import shlex

    from megatron.core.transformer import TransformerConfig

    from cdp_megatron.integration.model import pipeline_stage_layers
    from cdp_megatron.pretrain_args import ArgsError, parse_args

    rng = random.Random(0)
    accepted = refused = 0
    # (pipeline stages, layers, layout): Megatron-LM's syntax, then random ones
    cases = [(2, 4, "E|(tt|)*2,L"), (2, 7, "E(tt|)*3,tL"), (3, 6, "Ett|(t|)*2tt|L"), (2, 4, "Ett,t|t,L"),
             (2, 4, "E|(tt|)*2L"), (2, 4, "E(t)*2|t*2L"), (2, 4, "Ettt|tL|"), (2, 4, "Et t|ttL")]
    for _ in range(400):
        pp, vpp, layers = rng.randint(2, 4), rng.randint(1, 3), rng.randint(1, 8)
        cuts = sorted(rng.randint(0, layers) for _ in range(pp * vpp - 1))
        counts = [b - a for a, b in zip([0] + cuts, cuts + [layers])]
        chunks = [rng.choice((f"t*{n}", "t" * n)) if n else "" for n in counts]
        chunks[0], chunks[-1] = "E" + chunks[0], chunks[-1] + "L"
        broken = rng.random() < 0.25
        if broken:
            kind = rng.randrange(4)
            if kind == 0:
                chunks[0] = chunks[0][1:] + "E"
            elif kind == 1:
                chunks[-1] = "L" + chunks[-1][:-1]
            elif kind == 2:
                chunks[-1] = chunks[-1].replace("t", "", 1) if "t" in chunks[-1] else chunks[-1]
            else:
                chunks.append("t")
        cases.append((pp, layers, "|".join(chunks)))
    for pp, layers, layout in cases:
        try:
            config = TransformerConfig(num_layers=layers, hidden_size=64, num_attention_heads=4,
                                       pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                                       pipeline_model_parallel_layout=layout)
            theirs = pipeline_stage_layers(config)
        except (ValueError, AssertionError):
            theirs = None
        try:
            ours = parse_args(shlex.split(
                f"--num-layers {layers} --hidden-size 64 --num-attention-heads 4 --seq-length 32 --micro-batch-size 1 "
                f"--global-batch-size 12 --train-iters 2 --mock-data --lr 1e-3 --pipeline-model-parallel-size {pp}")
                + ["--pipeline-model-parallel-layout", layout], world_size=pp).pipeline_layers
        except ArgsError:
            ours = None
        assert ours == theirs, (layout, pp, layers, ours, theirs)
        accepted, refused = accepted + (ours is not None), refused + (ours is None)
    assert accepted > 200 and refused > 50, (accepted, refused)


def test_fp8_options_reach_the_transformer_config(megatron_1proc, monkeypatch):
    """Megatron-LM's FP8 options arrive in megatron-core's TransformerConfig (the fields of the
    same names), which accepts them as given; refused combinations are refused by it too. (The
    FP8 layers themselves need Transformer Engine and a GPU: not built here.)"""
    import importlib.util
    import shlex

    from cdp_megatron.integration import gpt_config
    from cdp_megatron.pretrain import config_overrides
    from cdp_megatron.pretrain_args import parse_args

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "transformer_engine" else find_spec(name, *a))
    flags = ("--mock-data --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --micro-batch-size 1 "
             "--train-iters 4 --lr 1e-3 --bf16 --transformer-impl transformer_engine --fp8-format hybrid ")
    shape = SimpleNamespace(**{**TINY_SHAPE, "num_layers": 4})
    cases = {"": dict(fp8_recipe="delayed", fp8_amax_history_len=1, fp8_amax_compute_algo="most_recent",
                      fp8_margin=0, fp8_wgrad=True, first_last_layers_bf16=False),
             "--fp8-amax-history-len 1024 --fp8-amax-compute-algo max --fp8-margin 2 --no-fp8-wgrad":
                 dict(fp8_amax_history_len=1024, fp8_amax_compute_algo="max", fp8_margin=2, fp8_wgrad=False),
             "--fp8-recipe tensorwise --first-last-layers-bf16 --num-layers-at-start-in-bf16 2":
                 dict(fp8_recipe="tensorwise", first_last_layers_bf16=True, num_layers_at_start_in_bf16=2,
                      num_layers_at_end_in_bf16=1)}
    for extra, want in cases.items():
        config = gpt_config(shape, init_method_std=0.02, **config_overrides(parse_args(shlex.split(flags + extra),
                                                                                       world_size=1)))
        assert config.fp8 == "hybrid"
        assert {name: str(getattr(config, name)).removeprefix("Fp8Recipe.") if name == "fp8_recipe"
                else getattr(config, name) for name in want} == want, extra
    # what parse_args refuses, megatron-core's TransformerConfig refuses
    overrides = config_overrides(parse_args(shlex.split(flags + "--fp8-recipe tensorwise"), world_size=1))
    for bad, said in ((dict(first_last_layers_bf16=True, fp8_recipe="delayed"), "Delayed scaling does not support"),
                      (dict(first_last_layers_bf16=True, num_layers_at_start_in_bf16=5), "num_layers_at_start_in_bf16")):
        with pytest.raises(ValueError, match=said):
            gpt_config(shape, init_method_std=0.02, **{**overrides, **bad})


def test_no_initialization_draws_no_weight(megatron_1proc, monkeypatch):
    """--no-initialization: with ``perform_initialization`` off and ``init="none"`` neither
    Megatron's init (torch.nn.init.normal_ through its init methods) nor Complete(d)P's redraw
    runs; a normal build runs both."""
    from cdp_megatron.integration import build_gpt_model, gpt_config
    from cdp_megatron.integration import model as model_module

    target = tiny_target(multipliers=INIT_MULTIPLIERS)
    drawn = []
    normal = torch.nn.init.normal_
    monkeypatch.setattr(torch.nn.init, "normal_", lambda tensor, *a, **k: drawn.append("megatron") or normal(tensor, *a, **k))
    redraw = model_module.apply_target_init
    monkeypatch.setattr(model_module, "apply_target_init", lambda *a, **k: drawn.append("target") or redraw(*a, **k))
    shape = SimpleNamespace(**TINY_SHAPE)
    build_gpt_model(shape, target=target, config=gpt_config(shape, init_method_std=0.02))
    assert "megatron" in drawn and "target" in drawn
    drawn.clear()
    (model,) = build_gpt_model(shape, target=target, init="none",
                               config=gpt_config(shape, init_method_std=0.02, perform_initialization=False))
    assert drawn == []
    assert sum(p.numel() for p in model.parameters()) > 0


def test_deterministic_mode_reaches_the_model(megatron_1proc):
    import shlex

    from cdp_megatron.integration import build_gpt_model, gpt_config
    from cdp_megatron.pretrain import config_overrides
    from cdp_megatron.pretrain_args import parse_args

    flags = ("--mock-data --num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --micro-batch-size 1 "
             "--train-iters 4 --lr 1e-3 --transformer-impl local")
    shape = SimpleNamespace(**TINY_SHAPE)
    for extra, want in (("", False), (" --deterministic-mode", True)):
        config = gpt_config(shape, **config_overrides(parse_args(shlex.split(flags + extra), world_size=1)))
        (model,) = build_gpt_model(shape, config=config)
        assert model.embedding.word_embeddings.deterministic_mode is want


def _rank_places_worker(order: str) -> tuple[int, int]:
    from megatron.core import parallel_state

    from cdp_megatron.integration import initialize_model_parallel

    initialize_model_parallel(1, 2, order=order)
    return parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_data_parallel_rank()


def test_rank_order_of_the_tp_pp_dp_mapping():
    """--use-tp-pp-dp-mapping: on 4 ranks with PP 2, megatron-core's default numbers DP before PP
    (ranks 0, 1 are stage 0), Megatron-LM's tp-pp-dp mapping PP before DP (ranks 0, 1 are the
    two stages of DP rank 0). (pipeline rank, data-parallel rank) of each global rank:"""
    from cdp_megatron.integration.model import RANK_ORDER, TP_PP_DP_RANK_ORDER

    assert run_distributed(_rank_places_worker, 4, RANK_ORDER) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert run_distributed(_rank_places_worker, 4, TP_PP_DP_RANK_ORDER) == [(0, 0), (1, 0), (0, 1), (1, 1)]
