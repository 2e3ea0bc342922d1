"""Shared pieces of the optimizer / checkpoint tests (importable by spawned workers).

``setup_model(...)`` builds this rank's DDP-wrapped tiny GPT and the cdp optimizer for a
(TP, PP, VPP) layout; ``train_steps(...)`` runs Megatron's forward-backward schedule on fixed
synthetic tokens (each DP rank its slice of the global batch); ``check_assignments(...)``
compares ``optimizer_hyperparameters`` with the target.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

# Multipliers that make (almost) every (type, layer) group distinct in lr, wd, eps and betas.
# q and k, and gate and up, share an lr and differ in eps and beta2: adjacent segments of one
# fused tensor that agree in lr alone must still be stepped apart.
DISTINCT_MULTIPLIERS = {
    "type": {
        "q": {"lr": 1.5, "eps": 0.5},
        "k": {"lr": 1.5, "beta2": 0.5},
        "v": {"lr": 1.25, "weight_decay": 2.0},
        "attn_out": {"lr": 0.6, "beta1": 0.8},
        "mlp_gate": {"lr": 2.0, "eps": 2.0},
        "mlp_up": {"lr": 2.0, "beta2": 1.5},
        "mlp_down": {"lr": 0.9, "weight_decay": 0.5},
        "embedding": {"lr": 1.1},
        "output": {"lr": 0.7, "eps": 3.0},
        "q_norm": {"lr": 1.3},
        "k_norm": {"lr": 0.8},
    },
    "depth": {"lr": [1.0, 1.2, 0.9, 1.1], "eps": [1.0, 2.0, 0.5, 1.5]},
}


def multipliers_for(num_layers: int, base: dict = DISTINCT_MULTIPLIERS) -> dict:
    depth = {hp: (v * num_layers)[:num_layers] for hp, v in base.get("depth", {}).items()}
    return {**base, "depth": depth}


@dataclasses.dataclass
class Setup:
    chunks: list
    optimizer: Any
    scheduler: Any
    config: Any
    target: Any


def setup_model(
    target: Any,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    *,
    dist_opt: bool = False,
    bf16: bool = False,
    lr_warmup_iters: int | None = None,
    init_model_parallel: bool = True,
    clip_grad: float = 0.0,
    overlap: bool = False,
    config_fields: dict | None = None,
) -> Setup:
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig

    from cdp_megatron.integration.model import (
        build_gpt_model,
        gpt_config,
        initialize_model_parallel,
        wrap_ddp,
    )
    from cdp_megatron.integration.optimizer import build_optimizer

    if init_model_parallel:
        initialize_model_parallel(tp, pp, vpp)
    else:  # the same weights as a first build (Megatron's own init draws from these RNGs)
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)
        torch.manual_seed(1234)
    dtype = torch.bfloat16 if bf16 else torch.float32
    config = gpt_config(
        target.shape,
        init_method_std=target.global_hyperparameters["init_method_std"],
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        **(config_fields or {}),
    )
    chunks = build_gpt_model(target=target, config=config)
    # overlap: Megatron's overlapped grad reduce (and param gather with dist_opt) in buckets of
    # 2000 elements, so the tiny models have several
    comm = dict(overlap_grad_reduce=True, overlap_param_gather=dist_opt, bucket_size=2000) if overlap else {}
    chunks = wrap_ddp(chunks, config, use_distributed_optimizer=dist_opt, grad_reduce_in_fp32=True, **comm)
    config.finalize_model_grads_func = finalize_model_grads
    opt_config = OptimizerConfig(
        optimizer="adam",
        bf16=bf16,
        params_dtype=dtype,
        use_distributed_optimizer=dist_opt,
        clip_grad=clip_grad,
    )
    optimizer, scheduler = build_optimizer(
        chunks, target, opt_config, lr_warmup_iters=lr_warmup_iters
    )
    return Setup(chunks, optimizer, scheduler, config, target)


def global_batch(target: Any, step: int, seed: int = 0) -> torch.Tensor:
    """Tokens [global_batch_size, seq + 1] for one step (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    shape = target.shape
    return torch.randint(0, shape.vocab_size, (shape.global_batch_size, shape.seq_length + 1), generator=gen)


def train_steps(setup: Setup, steps: int, first_step: int = 0, micro_batch_size: int = 1) -> list[float]:
    """Run ``steps`` training iterations; returns the per-step mean loss over the global batch
    (averaged over the DP ranks; last PP stage, NaN elsewhere)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from cdp_megatron.integration.model import gpt_forward_step

    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    gbs = setup.target.shape.global_batch_size
    local = gbs // dp
    num_microbatches = local // micro_batch_size
    losses = []
    for step in range(first_step, first_step + steps):
        tokens = global_batch(setup.target, step)[dp_rank * local:(dp_rank + 1) * local]
        micro = [tokens[i * micro_batch_size:(i + 1) * micro_batch_size] for i in range(num_microbatches)]
        for chunk in setup.chunks:
            chunk.zero_grad_buffer()
        setup.optimizer.zero_grad()
        iters = [iter(micro) for _ in setup.chunks]
        out = get_forward_backward_func()(
            forward_step_func=gpt_forward_step,
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=setup.chunks,
            num_microbatches=num_microbatches,
            seq_length=setup.target.shape.seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=False,
        )
        ok, _, _ = setup.optimizer.step()
        assert ok, "optimizer step skipped"
        setup.scheduler.step(1)
        if out:
            loss = torch.stack([o["loss"] for o in out]).mean()
            torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            losses.append(float(loss) / dp)
        else:
            losses.append(float("nan"))
    return losses


def check_assignments(setup: Setup) -> dict:
    """Compare every (param, segment) assignment with the target; returns the coverage
    {(name): (numel, [(start, end), ...])} for the caller to check across DP ranks."""
    from cdp_megatron.integration.optimizer import optimizer_hyperparameters

    assignments = optimizer_hyperparameters(setup.optimizer)
    assert assignments, "no assignments"
    coverage: dict[str, list] = {}
    for a in assignments:
        g = setup.target.group(a.type, a.layer, a.param)
        got = (a.lr, a.min_lr, a.weight_decay, a.eps, a.beta1, a.beta2)
        want = (g.lr, g.min_lr, g.weight_decay, g.eps, g.beta1, g.beta2)
        assert got == want, f"{a.name}[{a.start}:{a.end}] ({a.type}, layer {a.layer}): {got} != {want}"
        # Local names repeat across virtual-pipeline chunks; the global layer tells them apart.
        coverage.setdefault(f"{a.name}@{a.layer}", []).append((a.start, a.end))
    numels = {}
    for chunk in setup.chunks:
        for name, param in chunk.named_parameters():
            info = param.cdp_info
            numels[f"{info.name}@{info.layer}"] = param.numel()
    unknown = set(coverage) - set(numels)
    assert not unknown, f"assignments for parameters not in the model: {unknown}"
    return {name: (numel, coverage.get(name, [])) for name, numel in numels.items()}


def coords() -> tuple[int, int, int]:
    """(tp rank, pp rank, dp rank) of this process."""
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_rank(),
        ps.get_pipeline_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )


def allow_child_processes() -> None:
    """dist_checkpointing's writer starts processes; the test pool's ranks are daemonic."""
    import multiprocessing

    multiprocessing.current_process().daemon = False


def snapshot(chunks) -> dict:
    return {n: p.detach().float().clone() for c in chunks for n, p in c.named_parameters()}


def assert_full_coverage(per_rank: list[dict]) -> None:
    """Every element of every parameter is covered exactly once over the given ranks."""
    merged: dict[str, tuple[int, list]] = {}
    for cov in per_rank:
        for name, (numel, ranges) in cov.items():
            merged.setdefault(name, (numel, []))[1].extend(ranges)
    for name, (numel, ranges) in merged.items():
        ranges = sorted(ranges)
        pos = 0
        for start, end in ranges:
            assert start == pos, f"{name}: gap or overlap at {pos} (next range {start}:{end})"
            pos = end
        assert pos == numel, f"{name}: covered up to {pos} of {numel}"
