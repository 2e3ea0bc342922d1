"""Memory and time of the loss, autograd's (the default) vs the fused function
(``--cross-entropy-loss-fusion``), on logits of one micro batch.

The loss is cross-entropy plus z-loss on the vocabulary-parallel logits
(``integration.training.cross_entropy_with_z_loss``). Through autograd it keeps the
exponentials for the backward and, for bf16 logits, makes an fp32 copy and a difference beside
them; the fused function keeps one fp32 buffer (the softmax) and writes the gradient into it.

Peak memory of one forward + backward over what the logits already hold: on a GPU
``torch.cuda.max_memory_allocated``; on a CPU the process's peak resident memory (Linux's
VmHWM, reset through ``/proc/self/clear_refs`` before the step), each variant in a fresh
process. Times: the variants alternated in one process, the median of the per-round ratios.

    python benchmarks/loss_memory.py [--batch 4] [--seq 512] [--vocab 32768] [--bf16] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore")

VARIANTS = ("autograd", "fused")


def _init() -> None:
    """One process's megatron state (the loss asks it for the TP group): the CPU shim where
    there is no GPU, gloo or nccl."""
    from cdp_megatron.integration import cpu_runner, initialize_model_parallel

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cpu_runner.activate(device_kwargs=False)  # no device keywords in the loss
    cpu_runner.init_distributed(0, 1)
    initialize_model_parallel(1, 1)


def _inputs(args, device: str):
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    logits = torch.randn(args.batch, args.seq, args.vocab, generator=gen, device=device, dtype=dtype)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen, device=device)
    mask = torch.ones(args.batch, args.seq, device=device)
    return logits.requires_grad_(), labels, mask


def _step(variant: str, logits, labels, mask) -> None:
    from cdp_megatron.integration.training import cross_entropy_with_z_loss

    loss, _, _ = cross_entropy_with_z_loss(labels, mask, 1e-4, logits, fused=variant == "fused")
    loss.backward()
    logits.grad = None


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _peak_child(args, variant: str, device: str) -> None:
    """One forward + backward in this (fresh) process; prints the peak over the inputs, MiB."""
    import torch

    _init()
    logits, labels, mask = _inputs(args, device)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(variant, logits, labels, mask)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_kib("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset VmHWM to the current resident size
        _step(variant, logits, labels, mask)
        peak = _rss_kib("VmHWM") * 1024 - base
    print(json.dumps({"peak_mib": peak / 2**20}))


def _timed(args, device: str) -> dict:
    import torch

    _init()
    inputs = _inputs(args, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for variant in VARIANTS:  # warm-up
        _step(variant, *inputs)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_ in range(args.rounds):
        for variant in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
            sync()
            start = time.perf_counter()
            _step(variant, *inputs)
            sync()
            times[variant].append(time.perf_counter() - start)
    return times


def _mib(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--bf16", action="store_true", help="bf16 logits (a bf16 model's); default fp32")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.batch, args.seq, args.vocab, args.rounds) < 1:
        parser.error("--batch, --seq, --vocab and --rounds must be >= 1")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        _peak_child(args, args.child, device)
        return
    if device == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        sys.exit("loss_memory.py: the CPU peak needs Linux's /proc/self/clear_refs")
    elements = args.batch * args.seq * args.vocab
    size = elements * (2 if args.bf16 else 4) / 2**20
    print(f"loss of [{args.batch} x {args.seq} x {args.vocab}] {'bf16' if args.bf16 else 'fp32'} logits "
          f"({_mib(size)} MiB; an fp32 copy is {_mib(elements * 4 / 2**20)} MiB) on {device}, z-loss 1e-4", flush=True)
    peaks = {}
    for variant in VARIANTS:
        child = [a for a in (argv if argv is not None else sys.argv[1:])] + ["--child", variant]
        proc = subprocess.run([sys.executable, __file__, *child], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"loss_memory.py: the {variant} peak failed:\n{proc.stderr[-3000:]}")
        peaks[variant] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
    times = _timed(args, device)
    for variant in VARIANTS:
        print(f"  {variant:8s}: peak +{peaks[variant]:.0f} MiB over the logits, forward + backward "
              f"{1000 * statistics.median(times[variant]):.1f} ms (median of {args.rounds})")
    ratios = sorted(f / a for f, a in zip(times["fused"], times["autograd"]))
    print(f"peak memory ratio (fused / autograd): {peaks['fused'] / peaks['autograd']:.2f}")
    print(f"time ratio (fused / autograd): {statistics.median(ratios):.2f} "
          f"(per-round quartiles {ratios[len(ratios) // 4]:.2f}-{ratios[(3 * len(ratios)) // 4]:.2f})")


if __name__ == "__main__":
    main()
