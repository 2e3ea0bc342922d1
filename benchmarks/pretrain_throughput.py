"""Tokens/s of cdp-pretrain with --cdp-base against the same model and flags without it.

Runs ``python -m cdp_megatron.pretrain`` on --mock-data, alternating plain and Complete(d)P
runs (``--rounds`` of each, so that drifting machine load hits both alike), and prints per
run the median iteration time (iterations after ``--skip``), the optimizer step's share,
tokens/s, the start-up time to the first iteration, and the ratio cdp / plain (issue 4's
target: at most 2% slower).

    python benchmarks/pretrain_throughput.py                 # CPU: the quick-start shape
    python benchmarks/pretrain_throughput.py --gpu-shape     # 12 layers x 1024, seq 1024, bf16

Extra arguments after ``--`` go to both runs (e.g. ``-- --tensor-model-parallel-size 2``
with ``--nproc 2``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCH = ("--normalization RMSNorm --swiglu --qk-layernorm --position-embedding-type rope "
        "--untie-embeddings-and-output-weights --disable-bias-linear --hidden-dropout 0 --attention-dropout 0")
CPU_SHAPE = ("--num-layers 4 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 352 --seq-length 128 "
             "--micro-batch-size 8 --global-batch-size 16 --make-vocab-size-divisible-by 192")
GPU_SHAPE = ("--num-layers 12 --hidden-size 1024 --num-attention-heads 16 --ffn-hidden-size 2816 "
             "--seq-length 1024 --micro-batch-size 8 --global-batch-size 32 --vocab-size 50256 --bf16")


def run_once(flags: list[str], nproc: int, workdir: Path, name: str) -> dict:
    metrics = workdir / f"{name}.jsonl"
    module = ["-m", "cdp_megatron.pretrain", *flags, "--metrics-file", str(metrics)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *module]
    else:
        cmd = [sys.executable, *module]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode:
        sys.exit(f"{name} failed (exit {result.returncode}):\n{result.stdout[-4000:]}")
    return {"records": [json.loads(line) for line in metrics.read_text().splitlines()]}


def summarise(records: list[dict], skip: int, tokens_per_iteration: int) -> dict:
    train = [r for r in records if "lm_loss" in r and not r.get("eval")]
    steady = [r for r in train if r["iteration"] > skip]
    step = statistics.median(r["iteration_time_s"] for r in steady)
    first = train[0]
    return {
        "step_ms": 1e3 * step,
        "optimizer_ms": 1e3 * statistics.median(r["optimizer_step_s"] for r in steady),
        "tokens_per_s": tokens_per_iteration / step,
        "startup_s": first["elapsed_s"] - first["iteration_time_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-shape", action="store_true", help="the 12-layer width-1024 bf16 shape")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--skip", type=int, default=10, help="warm-up iterations left out of the median")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--base", default=str(REPO / "examples" / "base.json"))
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    shape = GPU_SHAPE if args.gpu_shape else CPU_SHAPE
    common = shlex.split(f"--mock-data {shape} {ARCH} --train-iters {args.iters} --eval-iters 0 "
                         f"--log-interval 1") + extra
    flag = {k: v for k, v in zip(common, common[1:]) if k.startswith("--")}
    tokens = int(flag["--global-batch-size"]) * int(flag["--seq-length"])
    variants = {"plain": ["--lr", "3e-4"], "cdp": ["--cdp-base", args.base]}
    results: dict[str, list[dict]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory(prefix="cdp_bench_") as tmp:
        for round_ in range(args.rounds):
            for name, flags in variants.items():
                out = run_once(common + flags, args.nproc, Path(tmp), f"{name}{round_}")
                results[name].append(summarise(out["records"], args.skip, tokens))
                r = results[name][-1]
                print(f"{name:>5} round {round_ + 1}: step {r['step_ms']:.1f} ms (optimizer {r['optimizer_ms']:.1f} ms), "
                      f"{r['tokens_per_s']:.0f} tokens/s, start-up {r['startup_s']:.1f} s", flush=True)
    best = {name: min(rs, key=lambda r: r["step_ms"]) for name, rs in results.items()}
    ratio = best["cdp"]["step_ms"] / best["plain"]["step_ms"]
    print(f"cdp / plain step time (best of {args.rounds}): {ratio:.3f} "
          f"({'within' if ratio <= 1.02 else 'above'} the 1.02 target); "
          f"tokens/s {best['cdp']['tokens_per_s']:.0f} vs {best['plain']['tokens_per_s']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
