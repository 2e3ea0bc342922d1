"""The cdp optimizer: every parameter and every fused segment is stepped with its target
group's lr / min lr / weight decay / eps / betas, on every layout, plain and distributed
optimizer, fp32 and bf16; segments are exact (only the gate rows see the gate's lr); forced
splitting is bit-identical to no splitting; the grouped multi-tensor step (torch Adam) and the
segment-hook path (apex / TE FusedAdam) agree bit for bit; sp with no multipliers equals
plain Megatron."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402

from . import _optim_common as oc  # noqa: E402
from ._dist import run_distributed  # noqa: E402
from ._tiny import tiny_target  # noqa: E402

pytestmark = [pytest.mark.megatron, pytest.mark.timeout(600)]


# --- hyperparameters reach the optimizer -------------------------------------------------------
def _hparams_worker(tp: int, pp: int, vpp: int | None, num_layers: int, variants: list) -> list:
    target = tiny_target(num_layers=num_layers, multipliers=oc.multipliers_for(num_layers))
    out = []
    for index, (dist_opt, bf16) in enumerate(variants):
        setup = oc.setup_model(
            target, tp, pp, vpp, dist_opt=dist_opt, bf16=bf16, init_model_parallel=index == 0
        )
        coverage = oc.check_assignments(setup)
        losses = oc.train_steps(setup, 2)
        assert oc.check_assignments(setup) == coverage  # unchanged by steps and the scheduler
        from cdp_megatron.integration.optimizer import optimizer_hyperparameters

        for a in optimizer_hyperparameters(setup.optimizer):  # one schedule for all groups
            assert a.current_lr == setup.scheduler.get_lr({"max_lr": a.lr, "min_lr": a.min_lr})
        out.append((oc.coords(), coverage, losses))
    return out


LAYOUTS = [  # (tp, pp, dp, vpp, num_layers, variants (dist_opt, bf16))
    pytest.param(1, 1, 1, None, 2, [(False, False), (True, False), (False, True), (True, True)], id="tp1pp1dp1"),
    pytest.param(2, 1, 1, None, 2, [(False, False), (True, False)], id="tp2"),
    pytest.param(1, 2, 1, None, 2, [(False, False), (True, False)], id="pp2"),
    pytest.param(1, 1, 2, None, 2, [(False, False), (True, False), (True, True)], id="dp2"),
    pytest.param(2, 2, 1, 2, 4, [(False, False), (True, False)], id="tp2pp2vpp2"),
]


@pytest.mark.parametrize("tp,pp,dp,vpp,num_layers,variants", LAYOUTS)
def test_hyperparameters_reach_every_param_and_segment(tp, pp, dp, vpp, num_layers, variants):
    results = run_distributed(_hparams_worker, tp * pp * dp, tp, pp, vpp, num_layers, variants)
    for v, (dist_opt, bf16) in enumerate(variants):
        by_model_rank: dict[tuple, list] = {}
        for rank_result in results:
            (tp_rank, pp_rank, _), coverage, losses = rank_result[v]
            by_model_rank.setdefault((tp_rank, pp_rank), []).append(coverage)
            assert all(loss == loss for loss in losses) or pp > 1
        # Every element of every parameter is stepped exactly once: on each rank with the
        # plain optimizer, over the DP ranks (its shards) with the distributed one.
        for coverages in by_model_rank.values():
            if dist_opt:
                oc.assert_full_coverage(coverages)
            else:
                for coverage in coverages:
                    oc.assert_full_coverage([coverage])


# --- exactness of segments -----------------------------------------------------------------------
def _one_segment_lr_worker(tp: int, dist_opt: bool, key: str, fused: str, arch: dict) -> dict:
    """Train one step with the lr of ``key`` (a type, or TYPE.bias) x3 and one without: only
    that segment of the fused tensor ``fused`` may move differently, by exactly 3x."""
    type_, _, bias = key.partition(".")
    param = "bias" if bias else "weight"
    base = tiny_target(**arch)
    scaled = tiny_target(multipliers={"type": {key: {"lr": 3.0}}}, **arch)
    results = {}
    for index, target in enumerate((base, scaled)):
        setup = oc.setup_model(target, tp, 1, dist_opt=dist_opt, lr_warmup_iters=0, init_model_parallel=index == 0)
        before = oc.snapshot(setup.chunks)
        oc.train_steps(setup, 1)
        results[index] = (before, oc.snapshot(setup.chunks))
        infos = {n: p.cdp_info for c in setup.chunks for n, p in c.named_parameters()}
    (b0, a0), (b1, a1) = results[0], results[1]
    checked = 0
    for name in b0:
        assert torch.equal(b0[name], b1[name]), f"{name}: different init"
        info = infos[name]
        if (info.type, info.param) != (fused, param):
            assert torch.equal(a0[name], a1[name]), f"{name}: update changed by the {key} lr"
            continue
        d0, d1 = (a0[name] - b0[name]).view(-1), (a1[name] - b1[name]).view(-1)
        for seg in info.segments:
            u0, u1 = d0[seg.start:seg.end], d1[seg.start:seg.end]
            if seg.type != type_:
                assert torch.equal(u0, u1), f"{name}: {seg.type} rows changed"
            else:
                assert (u0 != 0).any() and not torch.equal(u0, u1)
                torch.testing.assert_close(u1, 3.0 * u0, rtol=1e-4, atol=1e-9)
            checked += 1
    return {"checked": checked}


@pytest.mark.parametrize("tp,dp,dist_opt", [(1, 1, False), (2, 1, False), (1, 2, True)], ids=["tp1", "tp2", "dp2-distopt"])
def test_gate_lr_changes_only_gate_rows(tp, dp, dist_opt):
    results = run_distributed(_one_segment_lr_worker, tp * dp, tp, dist_opt, "mlp_gate", "mlp_gate_up", {})
    assert all(r["checked"] >= 4 for r in results)  # 2 layers x (gate, up)


@pytest.mark.parametrize("tp,dp,dist_opt", [(1, 1, False), (2, 1, False), (1, 2, True)], ids=["tp1", "tp2", "dp2-distopt"])
def test_k_bias_lr_changes_only_the_k_part_of_a_qkv_bias(tp, dp, dist_opt):
    """--add-qkv-bias (Qwen2): linear_qkv has a bias, no other linear layer has one."""
    results = run_distributed(_one_segment_lr_worker, tp * dp, tp, dist_opt, "k.bias", "qkv", {"add_qkv_bias": True})
    # 2 layers x (q, k, v) x the 2 query groups on this TP rank (the bias is interleaved per group)
    assert all(r["checked"] == 2 * 3 * 2 // tp for r in results)


def _forced_split_worker(dist_opt: bool, bf16: bool) -> dict:
    from cdp_megatron.integration import optimizer as cdp_opt

    target = tiny_target(parameterisation="sp")
    snapshots, losses = [], []
    for index, merge in enumerate((True, False)):
        cdp_opt._MERGE_EQUAL_SEGMENTS = merge
        try:
            setup = oc.setup_model(target, 1, 1, dist_opt=dist_opt, bf16=bf16, lr_warmup_iters=1, init_model_parallel=index == 0)
        finally:
            cdp_opt._MERGE_EQUAL_SEGMENTS = True
        views = [m.optimizer.cdp_grouped_step.n_views for m in setup.optimizer.chained_optimizers]
        assert (sum(views) == 0) if merge else sum(views) > 0
        losses.append(oc.train_steps(setup, 4))
        snapshots.append(oc.snapshot(setup.chunks))
    for name in snapshots[0]:
        assert torch.equal(snapshots[0][name], snapshots[1][name]), name
    assert losses[0] == losses[1]
    return {}


@pytest.mark.parametrize("dp,dist_opt,bf16", [(1, False, False), (2, True, True)], ids=["plain-fp32", "distopt-bf16-dp2"])
def test_split_step_is_bit_identical_to_unsplit(dp, dist_opt, bf16):
    """Stepping q/k/v and gate/up as separate views (same values) changes nothing."""
    run_distributed(_forced_split_worker, dp, dist_opt, bf16)


def _hook_path_worker(tp: int, dist_opt: bool) -> dict:
    """The segment-hook path (apex / TE FusedAdam's) and the grouped multi-tensor step (torch
    Adam's) give bit-identical training."""
    from cdp_megatron.integration import optimizer as cdp_opt

    target = tiny_target(multipliers=oc.multipliers_for(2))
    snapshots, losses, kinds = [], [], []
    for index, grouped in enumerate((True, False)):
        cdp_opt._GROUPED_STEP = grouped
        try:
            setup = oc.setup_model(target, tp, 1, dist_opt=dist_opt, lr_warmup_iters=1, init_model_parallel=index == 0)
        finally:
            cdp_opt._GROUPED_STEP = True
        mopt = setup.optimizer.chained_optimizers[0]
        kinds.append((hasattr(mopt.optimizer, "cdp_grouped_step"), hasattr(mopt, "cdp_segment_step")))
        losses.append(oc.train_steps(setup, 3))
        snapshots.append(oc.snapshot(setup.chunks))
    assert kinds == [(True, False), (False, True)], kinds
    assert losses[0] == losses[1]
    for name in snapshots[0]:
        assert torch.equal(snapshots[0][name], snapshots[1][name]), name
    return {}


@pytest.mark.parametrize("tp,dp,dist_opt", [(1, 1, False), (2, 1, False), (1, 2, True)], ids=["tp1", "tp2", "dp2-distopt"])
def test_segment_hook_path_equals_grouped_step(tp, dp, dist_opt):
    run_distributed(_hook_path_worker, tp * dp, tp, dist_opt)


# --- identity with plain Megatron --------------------------------------------------------------
def _identity_worker() -> dict:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    target = tiny_target(parameterisation="sp")
    cdp = oc.setup_model(target, 1, 1, lr_warmup_iters=2)
    plain = oc.setup_model(target, 1, 1, lr_warmup_iters=2, init_model_parallel=False)
    g = target.global_hyperparameters
    config = OptimizerConfig(
        optimizer="adam", lr=g["lr"], min_lr=g["min_lr"], weight_decay=g["weight_decay"],
        adam_beta1=g["adam_beta1"], adam_beta2=g["adam_beta2"], adam_eps=g["adam_eps"], clip_grad=0.0,
    )
    plain.optimizer = get_megatron_optimizer(config, plain.chunks)  # standard overrides
    plain.scheduler = OptimizerParamScheduler(
        plain.optimizer, init_lr=0.0, max_lr=g["lr"], min_lr=g["min_lr"], lr_warmup_steps=2,
        lr_decay_steps=target.train_iters, lr_decay_style="cosine", start_wd=g["weight_decay"],
        end_wd=g["weight_decay"], wd_incr_steps=target.train_iters, wd_incr_style="constant",
    )
    assert all(m.optimizer.cdp_grouped_step.n_views == 0 for m in cdp.optimizer.chained_optimizers)
    a, b = oc.train_steps(cdp, 3), oc.train_steps(plain, 3)
    assert a == b, (a, b)
    sa, sb = oc.snapshot(cdp.chunks), oc.snapshot(plain.chunks)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    return {}


def test_sp_without_multipliers_equals_plain_megatron():
    run_distributed(_identity_worker, 1)


# --- overlapped communication ------------------------------------------------------------------
def _overlap_worker(dist_opt: bool) -> dict:
    """Per-type and per-depth hyperparameters with Megatron's overlapped grad reduce (and, with
    the distributed optimizer, param gather) in several buckets: the same losses and weights as
    without overlap, every segment still with its group's values, the grouped step's rows kept."""
    from cdp_megatron.integration.training import synced_params

    target = tiny_target(multipliers=oc.multipliers_for(2))
    out = {}
    for overlap in (False, True):
        setup = oc.setup_model(target, dist_opt=dist_opt, overlap=overlap, init_model_parallel=not overlap)
        buckets = sum(len(c.bucket_groups) for c in setup.chunks)
        losses = oc.train_steps(setup, 4, micro_batch_size=1)  # 2 micro batches a rank: no_sync
        kept = [m.optimizer.cdp_grouped_step._kept is not None for m in setup.optimizer.chained_optimizers]
        coverage = oc.check_assignments(setup)
        with synced_params(setup.chunks):  # with overlap_param_gather: the last step's weights
            weights = oc.snapshot(setup.chunks)
        out[overlap] = (buckets, losses, kept, coverage, weights)
    (b0, l0, _, c0, w0), (b1, l1, k1, c1, w1) = out[False], out[True]
    assert b0 == 1 and b1 > 2, (b0, b1)
    assert l1 == l0, (l0, l1)
    assert all(k1)
    if not dist_opt:  # the distributed optimizer's shards follow the buckets (coverage: caller)
        assert c1 == c0
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
    return c1


@pytest.mark.parametrize("dist_opt", [False, True], ids=["dp2", "dp2-distopt"])
def test_overlapped_grad_reduce_and_param_gather_train_identically(dist_opt):
    results = run_distributed(_overlap_worker, 2, dist_opt)
    if dist_opt:
        oc.assert_full_coverage(results)


# --- refusals ----------------------------------------------------------------------------------
def _refusal_worker() -> list[str]:
    from megatron.core.optimizer import OptimizerConfig

    from cdp_megatron.integration.model import build_gpt_model, gpt_config, initialize_model_parallel, wrap_ddp
    from cdp_megatron.integration.optimizer import build_optimizer

    initialize_model_parallel(1, 1)
    target = tiny_target()
    config = gpt_config(target.shape)
    chunks = wrap_ddp(build_gpt_model(target=target, config=config), config)
    messages = []
    for bad in (OptimizerConfig(optimizer="sgd"), OptimizerConfig(optimizer="adam", decoupled_lr=1e-3)):
        try:
            build_optimizer(chunks, target, bad)
        except ValueError as exc:
            messages.append(str(exc))
    try:  # a target for fewer layers than the model has
        build_optimizer(chunks, tiny_target(num_layers=1), OptimizerConfig(optimizer="adam"))
    except KeyError as exc:
        messages.append(str(exc))
    return messages


def test_refuses_unsupported_configs_and_mismatched_target():
    messages = run_distributed(_refusal_worker, 1)[0]
    assert len(messages) == 3, messages
    assert "optimizer='sgd'" in messages[0]
    assert "decoupled_lr" in messages[1]
    assert "layer=2" in messages[2]


def test_scheduler_refuses_a_warmup_not_shorter_than_the_decay():
    # Megatron's scheduler asserts warmup < decay; the warmup is not quietly shortened
    from cdp_megatron.integration.optimizer import build_scheduler

    for warmup, decay in ((5, 5), (6, 5), (-1, 5)):
        with pytest.raises(ValueError, match=rf"^lr warmup of {warmup} iterations must be shorter than the decay \({decay} "):
            build_scheduler(None, tiny_target(), None, lr_decay_iters=decay, lr_warmup_iters=warmup)
