"""Optimizer-step overhead of per-type and per-depth hyperparameters (every group distinct).

Builds three copies of the same GPT in one process (CPU with gloo, or one GPU): one whose
target gives every (type, layer) group its own lr / weight decay / eps / betas (q, k, v and
gate, up included: the fused linear_qkv and linear_fc1 are stepped per segment), one with
global hyperparameters only (parameterisation sp, no multipliers: Megatron's usual two groups),
and a third with Megatron's own ``get_megatron_optimizer`` (no cdp code at all: torch's
AdamW step, the reference the issue's 1.02x target is measured against).
Times the inner Adam step (the torch/apex/TE optimizer's ``step()``, where the per-segment
stepping happens; Megatron's grad copy and norm are the same for both models) and a whole
training step (forward, backward, Megatron's ``optimizer.step()``), alternating the three
models, and prints the medians and the ratios. The whole step is also split into forward +
backward and the optimizer part (Megatron's ``optimizer.step()`` and the LR schedule), and
``train step from its parts`` gives the whole-step ratio with forward+backward taken as equal:
the paired optimizer difference over the base step, which a loaded machine's forward noise
(larger than the effect on a 2-core CPU) does not reach.

    python benchmarks/optimizer_overhead.py [--layers 16] [--hidden 128] [--steps 40]
        [--dist-opt] [--bf16] [--host-only] [--lr-only]

``--host-only`` times only the host's Python bookkeeping of the inner Adam step: every
``torch._foreach_*`` op is replaced by a no-op (and torch's own AdamW is made to take its
multi-tensor path, and cdp's grouped step its choice of sqrt buffer, as on a GPU); it also
counts the tensors the ops are handed per step. A small GPU step is launch-bound, so this is the
part of the overhead that a CPU can measure for it; the ops' own per-tensor cost is not in it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402


def _spec(args, distinct: bool) -> dict:
    layers = args.layers
    depth = [1.0 + 0.05 * ((7 * i) % 11 - 5) for i in range(layers)]  # distinct per layer
    multipliers = {
        "type": {
            "q": {"lr": 1.5, "eps": 0.5}, "k": {"lr": 0.75, "beta2": 0.5},
            "v": {"lr": 1.25, "weight_decay": 2.0}, "attn_out": {"lr": 0.6},
            "mlp_gate": {"lr": 2.0}, "mlp_up": {"lr": 0.5, "beta2": 1.5},
            "mlp_down": {"lr": 0.9}, "q_norm": {"lr": 1.3}, "k_norm": {"lr": 0.8},
            "output": {"lr": 0.7}, "embedding": {"lr": 1.1},
        },
        "depth": {"lr": depth, "eps": depth[::-1]},
    }
    if args.lr_only:  # as a searched target often is (examples/base.json): only LRs move
        multipliers = {"type": {t: {"lr": m["lr"]} for t, m in multipliers["type"].items()}, "depth": {"lr": depth}}
    return {
        "schema_version": 1,
        "base": {
            "hidden_size": args.hidden, "num_layers": layers,
            "num_attention_heads": args.hidden // 32, "num_query_groups": max(1, args.hidden // 64),
            "ffn_hidden_size": 4 * args.hidden, "seq_length": args.seq, "global_batch_size": args.batch,
            "train_iters": 1000, "vocab_size": 256,
            "parameterisation": "completedp" if distinct else "sp",
        },
        "global": {"lr": 1e-3},
        "multipliers": multipliers if distinct else {},
    }


def _build(args, mode: str, first: bool):
    """mode: 'plain' (Megatron's own get_megatron_optimizer, no cdp code), 'global' (cdp,
    parameterisation sp, no multipliers) or 'distinct' (every group distinct)."""
    distinct = mode == "distinct"
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from cdp_megatron.integration.model import build_gpt_model, gpt_config, initialize_model_parallel, wrap_ddp
    from cdp_megatron.integration.optimizer import build_optimizer
    from cdp_megatron.spec import Spec
    from cdp_megatron.target import resolve

    target = resolve(Spec.from_dict(_spec(args, distinct)))
    if first:
        initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = gpt_config(target.shape, bf16=args.bf16, params_dtype=dtype, pipeline_dtype=dtype)
    chunks = wrap_ddp(build_gpt_model(target=target, config=config), config,
                      use_distributed_optimizer=args.dist_opt, grad_reduce_in_fp32=True)
    opt_config = OptimizerConfig(optimizer="adam", bf16=args.bf16, params_dtype=dtype,
                                 use_distributed_optimizer=args.dist_opt, clip_grad=1.0)
    if mode == "plain":
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        optimizer = get_megatron_optimizer(dataclasses.replace(opt_config, lr=1e-3, min_lr=1e-4), chunks)
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=0, lr_decay_steps=1000,
            lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=1000, wd_incr_style="constant")
    else:
        optimizer, scheduler = build_optimizer(chunks, target, opt_config, lr_warmup_iters=0)
    groups = sum(len(m.optimizer.param_groups) for m in optimizer.chained_optimizers)
    return target, chunks, optimizer, scheduler, groups


def _train_step(target, chunks, optimizer, scheduler, tokens, sync=lambda: None) -> float:
    """One training step; returns the perf_counter time at which forward and backward (and
    the grad sync) ended and Megatron's ``optimizer.step()`` and the LR schedule began."""
    from cdp_megatron.integration.model import lm_loss

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    lm_loss(chunks[0], tokens).backward()
    for chunk in chunks:
        chunk.finish_grad_sync()
    sync()
    split = time.perf_counter()
    optimizer.step()
    scheduler.step(1)
    return split


def _profile(runs: dict, sync) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for name, (_, _, optimizer, _, _) in runs.items():
        with profile(activities=activities) as prof:
            for _ in range(5):
                for sub in optimizer.chained_optimizers:
                    sub.optimizer.step()
            sync()
        events = prof.key_averages()
        kernels = sum(e.count for e in events if getattr(e, "device_type", None) is not None
                      and str(e.device_type).endswith("CUDA"))
        print(f"--- profile of 5 inner Adam steps: {name} ({kernels} device events)")
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        print(events.table(sort_by=sort, row_limit=12, max_name_column_width=60))


class _ForeachStubbed:
    """Within the block, torch's ``_foreach_*`` ops do nothing (out-of-place ones return their
    first argument): what is left of an optimizer step is its host bookkeeping. ``tensors``
    counts the tensors handed to the ops (their first list): on a GPU each costs the op host
    time and a share of a kernel launch."""

    def __enter__(self):
        self.tensors = 0
        self.saved = {n: getattr(torch, n) for n in dir(torch) if n.startswith("_foreach_")}

        def stub(name):
            def op(*a, **k):
                if isinstance(a[0], (list, tuple)):
                    self.tensors += len(a[0])
                return None if name.endswith("_") else a[0]
            return op

        for n in self.saved:
            setattr(torch, n, stub(n))
        return self

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(torch, n, fn)


def _host_only(args, runs: dict) -> None:
    from cdp_megatron.integration import grouped_adam

    # The grouped step's choice of a single sqrt buffer, made as on a GPU (its cost model).
    grouped_adam._one_buffer = grouped_adam._buffer_pays
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (args.batch, args.seq + 1), generator=gen)
    subs = {}
    for name, (target, chunks, optimizer, scheduler, _) in runs.items():
        _train_step(target, chunks, optimizer, scheduler, tokens)  # grads and Adam state exist
        subs[name] = [sub.optimizer for sub in optimizer.chained_optimizers]
        for opt in subs[name]:
            for group in opt.param_groups:
                group["foreach"] = True  # torch's GPU path (_multi_tensor_adam), also on CPU
    from cdp_megatron.integration import cpu_runner

    cpu_runner.activate(device_kwargs=False)  # time without the shim's device-keyword rewrite
    times = {name: [] for name in runs}
    tensors = {}
    with _ForeachStubbed() as stubbed:
        for name, opts in subs.items():  # one step each, counting the tensors the ops get
            stubbed.tensors = 0
            for opt in opts:
                opt.step()
            tensors[name] = stubbed.tensors
        for i in range(args.warmup + args.steps):
            for name, opts in _rotated(subs, i):
                t0 = time.perf_counter()
                for _ in range(10):
                    for opt in opts:
                        opt.step()
                if i >= args.warmup:
                    times[name].append((time.perf_counter() - t0) / 10)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"host bookkeeping of the inner Adam step (foreach ops stubbed), torch={torch.__version__} "
          f"layers={args.layers} hidden={args.hidden} dist_opt={args.dist_opt} bf16={args.bf16} lr_only={args.lr_only}")
    for name, (*_, groups) in runs.items():
        print(f"  {name:8s}: {groups:4d} param groups | {med[name]:7.3f} ms | "
              f"{tensors[name]:5d} tensors through _foreach_* ops per step")
    for base in ("global", "plain"):
        print(f"host bookkeeping ratio (distinct / {base}): {_paired(times, base)}")
        print(f"foreach tensors ratio  (distinct / {base}): {tensors['distinct'] / tensors[base]:.3f}")


def _rotated(items: dict, i: int) -> list:
    """The variants in round i's order: rotated each round, so none always runs first."""
    pairs = list(items.items())
    k = i % len(pairs)
    return pairs[k:] + pairs[:k]


def _paired(times: dict, base: str) -> str:
    """The median over rounds of distinct / base measured in the same round, and the spread
    (quartiles) of those per-round ratios: drift of a loaded machine cancels within a round."""
    ratios = sorted(d / b for d, b in zip(times["distinct"], times[base]))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return f"{statistics.median(ratios):.3f} (per-round quartiles {q[0]:.3f}-{q[2]:.3f}, {len(ratios)} rounds)"


def _from_parts(step_times: dict, tail_times: dict, base: str) -> str:
    """The whole-step ratio with forward+backward taken as equal (the models differ there only
    by the residual multipliers, two elementwise products per layer): 1 + the per-round
    difference of the optimizer part (Megatron's step and the schedule, measured side by side)
    over the base's train step. The forward+backward noise of a loaded machine, which
    dominates the whole-step ratio, cancels; the quartiles are those of the differences."""
    diffs = sorted(d - b for d, b in zip(tail_times["distinct"], tail_times[base]))
    step = statistics.median(step_times[base])
    q = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else [diffs[0]] * 3
    return (f"{1 + statistics.median(diffs) / step:.4f} (optimizer part {statistics.median(diffs) * 1e3:+.2f} ms "
            f"on a {step * 1e3:.1f} ms step; quartiles {1 + q[0] / step:.4f}-{1 + q[2] / step:.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dist-opt", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true",
                        help="also profile 5 inner Adam steps per variant (torch.profiler): top ops and kernel counts")
    parser.add_argument("--host-only", action="store_true",
                        help="time only the inner step's host bookkeeping (torch's _foreach_* ops stubbed)")
    parser.add_argument("--lr-only", action="store_true",
                        help="per-type and per-depth LR multipliers only (the default also moves eps, betas and "
                             "weight decay between q, k, v and gate, up: the worst case for the segments)")
    parser.add_argument("--keep-device-mode", action="store_true",
                        help="keep the CPU shim's device-keyword rewrite on while timing")
    args = parser.parse_args()

    from cdp_megatron.integration import cpu_runner

    torch.set_num_threads(args.threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    cpu_runner.activate()
    cpu_runner.init_distributed(0, 1)
    try:
        runs = {name: _build(args, name, first=name == "plain") for name in ("plain", "global", "distinct")}
        if args.host_only:
            _host_only(args, runs)
            return
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 256, (args.batch, args.seq + 1), generator=gen)
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        tokens = tokens.to(device)
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        opt_times = {name: [] for name in runs}
        step_times = {name: [] for name in runs}
        fb_times = {name: [] for name in runs}  # forward, backward, grad sync
        tail_times = {name: [] for name in runs}  # Megatron's optimizer.step() and the LR schedule
        for i in range(args.warmup + args.steps):
            for name, (target, chunks, optimizer, scheduler, _) in _rotated(runs, i):
                sync()
                t0 = time.perf_counter()
                split = _train_step(target, chunks, optimizer, scheduler, tokens, sync)
                sync()
                t_end = time.perf_counter()
                if not args.keep_device_mode:
                    # The shim's device='cuda' rewrite (a TorchFunctionMode) adds microseconds
                    # to every torch call, far more than a GPU launch: time without it.
                    cpu_runner.activate(device_kwargs=False)
                t1 = time.perf_counter()
                # The inner Adam step (with the segment hooks) on the same gradients: the
                # part that differs; Megatron's grad copy and norm are the same for both.
                for sub in optimizer.chained_optimizers:
                    sub.optimizer.step()
                sync()
                t2 = time.perf_counter()
                cpu_runner.activate(device_kwargs=True)
                if i >= args.warmup:
                    step_times[name].append(t_end - t0)
                    fb_times[name].append(split - t0)
                    tail_times[name].append(t_end - split)
                    opt_times[name].append(t2 - t1)
        med = {k: statistics.median(v) * 1e3 for k, v in opt_times.items()}
        step = {k: statistics.median(v) * 1e3 for k, v in step_times.items()}
        print(f"device={device.type} torch={torch.__version__} layers={args.layers} hidden={args.hidden} "
              f"dist_opt={args.dist_opt} bf16={args.bf16} lr_only={args.lr_only} steps={args.steps} "
              f"shim_device_mode_in_step={args.keep_device_mode}")
        for name, (*_, groups) in runs.items():
            print(f"  {name:8s}: {groups:4d} param groups | inner Adam step {med[name]:8.2f} ms | "
                  f"train step {step[name]:8.2f} ms")
        if args.profile:
            _profile(runs, sync)
        for base in ("global", "plain"):
            print(f"inner Adam step ratio (distinct / {base}): {_paired(opt_times, base)}")
            print(f"train step ratio      (distinct / {base}): {_paired(step_times, base)}")
            print(f"  forward+backward    (distinct / {base}): {_paired(fb_times, base)}")
            print(f"  optimizer+schedule  (distinct / {base}): {_paired(tail_times, base)}")
            print(f"train step from its parts (distinct / {base}): {_from_parts(step_times, tail_times, base)}")
    finally:
        cpu_runner.destroy_distributed()
        cpu_runner.deactivate()


if __name__ == "__main__":
    main()
