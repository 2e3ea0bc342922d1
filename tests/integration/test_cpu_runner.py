"""The CUDA-on-CPU shim: activate/deactivate round trip, each redirected symbol, the RNG
tracker, the multi-process harness, and Megatron training (DDP, plain and distributed
optimizer, bf16, pipeline schedules with PP=2 and VPP=2) giving the same losses on every
layout."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402
from ._dist import run_distributed  # noqa: E402

from cdp_megatron.integration import cpu_runner  # noqa: E402

pytestmark = pytest.mark.megatron


def _state():
    from megatron.core.tensor_parallel import random as mcore_random

    return (
        torch.cuda.current_device,
        torch.cuda.manual_seed,
        torch.cuda.get_rng_state,
        torch.cuda.random.set_rng_state,
        torch.cuda.synchronize,
        torch.cuda.current_stream,
        torch.cuda.Stream,
        torch.cuda.Event,
        torch.Tensor.cuda,
        torch.nn.Module.cuda,
        torch.Tensor.type,
        mcore_random._get_cuda_rng_state,
        mcore_random._set_cuda_rng_state,
    )


def test_activate_deactivate_round_trip():
    before = _state()
    assert cpu_runner.activate() and cpu_runner.is_active()
    assert cpu_runner.activate()  # idempotent
    assert _state() != before
    cpu_runner.deactivate()
    assert _state() == before and not cpu_runner.is_active()
    assert torch.zeros(1).type() == "torch.FloatTensor"
    cpu_runner.deactivate()  # safe when inactive


def test_context_manager_restores_outer_state():
    before = _state()
    with cpu_runner.active(device_kwargs=False):
        with cpu_runner.active(device_kwargs=True):
            assert torch.zeros(1, device="cuda").device.type == "cpu"
        assert cpu_runner.is_active()
        with pytest.raises((RuntimeError, AssertionError)):  # device-keyword mode is off again
            torch.zeros(1, device="cuda")
    assert _state() == before


def test_redirections():
    with cpu_runner.active():
        assert torch.cuda.current_device() == torch.device("cpu")
        x = torch.ones(2, device="cuda")
        assert x.device.type == "cpu" and x.cuda() is x
        assert x.to("cuda").device.type == "cpu"
        assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
        assert x.type() == "torch.cuda.FloatTensor"
        assert x.bfloat16().type() == "torch.cuda.BFloat16Tensor"
        assert x.type(torch.int64).dtype == torch.int64  # conversions still work
        torch.cuda.synchronize()
        stream = torch.cuda.Stream(device=torch.cuda.current_device())
        with torch.cuda.stream(stream):
            stream.wait_stream(torch.cuda.current_stream())
        torch.cuda.default_stream().wait_event(stream.record_event())
        assert torch.cuda.Event().query()
        torch.cuda.manual_seed(7)
        a = torch.rand(3)
        torch.manual_seed(7)
        assert torch.equal(a, torch.rand(3))
        state = torch.cuda.get_rng_state()
        b = torch.rand(3)
        torch.cuda.set_rng_state(state)
        assert torch.equal(b, torch.rand(3))


def test_inactive_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = _state()
    assert cpu_runner.activate() is False
    assert _state() == before and not cpu_runner.is_active()


def test_rng_tracker_fork(megatron_1proc):
    """Megatron's RNG tracker forks swap the CPU generator's state like the CUDA one."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(11)
    default_state = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        forked = torch.rand(4)
    after_fork = torch.rand(4)
    torch.set_rng_state(default_state)
    assert torch.equal(after_fork, torch.rand(4))  # the default stream did not advance
    assert not torch.equal(forked, after_fork)
    model_parallel_cuda_manual_seed(11)
    with get_cuda_rng_tracker().fork():
        assert torch.equal(forked, torch.rand(4))  # reseeding reproduces the forked stream


# --- harness ----------------------------------------------------------------------------------
def _ranks_worker(offset: int) -> tuple[int, int, float]:
    value = torch.tensor([float(torch.distributed.get_rank() + offset)])
    torch.distributed.all_reduce(value)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), value.item()


def _failing_worker() -> None:
    if torch.distributed.get_rank() == 1:
        raise ValueError("boom from rank one")
    torch.distributed.barrier()


def _hanging_worker() -> None:
    import time

    time.sleep(3600)


def test_run_distributed_times_out_on_a_hung_rank():
    with pytest.raises(RuntimeError, match="no result within 2 s"):
        run_distributed(_hanging_worker, 1, reuse=False, timeout_s=2)


def test_run_distributed_returns_per_rank_results():
    assert run_distributed(_ranks_worker, 2, 10) == [(0, 2, 21.0), (1, 2, 21.0)]


def test_run_distributed_fails_loudly():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1.*ValueError: boom from rank one"):
        run_distributed(_failing_worker, 2)


# --- Megatron training on gloo ------------------------------------------------------------------
def _train_worker(tp: int, pp: int, vpp: int | None, distopt: bool, bf16: bool = False, steps: int = 3):
    """3 Adam steps of a 4-layer model on 4 sequences; returns the last stage's losses."""
    from ._tiny import tiny_target
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from cdp_megatron.integration import (
        build_gpt_model,
        gpt_config,
        gpt_forward_step,
        initialize_model_parallel,
        wrap_ddp,
    )

    initialize_model_parallel(tp, pp, vpp)
    # completedp: every weight is redrawn per (type, layer), so all layouts start equal.
    target = tiny_target(num_layers=4)
    dtype = torch.bfloat16 if bf16 else torch.float32
    config = gpt_config(target.shape, bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype)
    chunks = build_gpt_model(target=target, config=config)
    model = wrap_ddp(chunks, config, use_distributed_optimizer=distopt)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, bf16=bf16, use_distributed_optimizer=distopt, clip_grad=1.0),
        model,
    )
    config.finalize_model_grads_func = finalize_model_grads

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    data = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    micro_batches = list(data[dp_rank::dp_size].split(1))
    losses = []
    for _ in range(steps):
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        iterators = [iter(micro_batches) for _ in model] if vpp else iter(micro_batches)
        out = get_forward_backward_func()(
            forward_step_func=gpt_forward_step,
            data_iterator=iterators,
            model=model,
            num_microbatches=len(micro_batches),
            seq_length=32,
            micro_batch_size=1,
            forward_only=False,
        )
        ok, _, _ = optimizer.step()
        assert ok
        if out:  # last pipeline stage
            loss = torch.stack([o["loss"] for o in out]).mean()
            torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            losses.append(loss.item() / dp_size)
    return losses or None


@pytest.fixture(scope="module")
def baseline_losses():
    return run_distributed(_train_worker, 1, 1, 1, None, False)[0]


@pytest.mark.parametrize(
    "tp,pp,vpp,dp,distopt",
    [
        (1, 1, None, 1, True),
        (2, 1, None, 1, False),
        (1, 2, None, 1, False),
        (1, 1, None, 2, True),
        (1, 2, 2, 1, False),
    ],
    ids=["distopt", "tp2", "pp2", "dp2-distopt", "pp2-vpp2"],
)
def test_training_matches_across_layouts(baseline_losses, tp, pp, vpp, dp, distopt):
    results = run_distributed(_train_worker, tp * pp * dp, tp, pp, vpp, distopt)
    losses = results[-1]  # the last rank is on the last pipeline stage
    assert baseline_losses[-1] < baseline_losses[0]  # it trains
    assert losses == pytest.approx(baseline_losses, rel=1e-5)


def test_training_bf16_float16_optimizer():
    """bf16 params with fp32 main params: the Float16 optimizer's type checks pass."""
    (losses,) = run_distributed(_train_worker, 1, 1, 1, None, False, True)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
