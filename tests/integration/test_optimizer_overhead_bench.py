"""benchmarks/optimizer_overhead.py runs end to end on a tiny model and prints its ratios, in
both modes (whole steps, and --host-only with the foreach ops stubbed); benchmarks/gpu_check.sh
refuses a machine without CUDA, keeps its time limits and, tried on a CPU, runs every check."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["--layers", "2", "--hidden", "64", "--steps", "2", "--warmup", "1"]


@pytest.mark.parametrize("mode,ratio", [([], "inner Adam step ratio"), (["--host-only"], "host bookkeeping ratio")])
def test_benchmark_prints_its_ratios(mode, ratio):
    proc = subprocess.run([sys.executable, "benchmarks/optimizer_overhead.py", *TINY, *mode],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for base in ("global", "plain"):
        m = re.search(rf"{ratio} \(distinct / {base}\): (\d+\.\d+)", proc.stdout)
        assert m and float(m.group(1)) > 0, proc.stdout
    if not mode:  # the whole step from its parts: forward+backward and the optimizer part apart
        for base in ("global", "plain"):
            m = re.search(rf"train step from its parts \(distinct / {base}\): (\d+\.\d+) \(optimizer part [+-]\d", proc.stdout)
            assert m and float(m.group(1)) > 0, proc.stdout
    groups = {name: int(n) for name, n in re.findall(r"^\s+(\w+)\s*:\s+(\d+) param groups", proc.stdout, re.M)}
    assert groups["plain"] == groups["global"] == 2 and groups["distinct"] > 2, proc.stdout
    if mode:  # the tensors each variant hands to the foreach ops: more rows for distinct groups
        tensors = {name: int(n) for name, n in re.findall(r"^\s+(\w+)\s*:.*\|\s+(\d+) tensors through", proc.stdout, re.M)}
        assert set(tensors) == {"plain", "global", "distinct"}, proc.stdout
        assert 0 < tensors["plain"] <= tensors["distinct"], proc.stdout


def _gpu_check(tmp_path, **env):
    run_env = {**os.environ, "PYTHON": sys.executable, **env}
    run_env.pop("OUT", None)
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out")], cwd=REPO, env=run_env,
                          capture_output=True, text=True, timeout=600)


def test_gpu_check_refuses_a_machine_without_cuda(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = _gpu_check(tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: torch sees no CUDA device here; these checks need a GPU (run the CPU suite instead)"]
    assert not (tmp_path / "out").exists()  # no output left behind


def test_gpu_check_runs_each_check_within_its_limit_and_the_whole_within_its_budget(tmp_path):
    # eight checks of up to 8 s each (the benchmarks take longer) cannot all fit in 30 s with the set-up
    start = time.monotonic()
    proc = _gpu_check(tmp_path, GPU_CHECK_ON_CPU="1", GPU_CHECK_BUDGET="30", CHECK_TIMEOUT="8")
    wall = time.monotonic() - start
    summary = (tmp_path / "out" / "summary.txt").read_text()
    lines = re.findall(r"^== (\w+): (ok|FAILED, exit 124 \(over (\d+) s\)|NOT RUN \(the 30 s budget is spent\))",
                       summary, re.M)
    assert [name for name, *_ in lines] == ["grouped_adam_tests", "bench_bf16_distopt_8x512", "bench_fp32_4x64",
                                            "bench_fp32_8x512", "bench_lr_only_8x512", "loss_memory_bf16_128k",
                                            "pretrain_bf16_logging_recompute", "deterministic_reruns"], summary
    assert lines[-1][1].startswith("NOT RUN"), summary
    assert all(int(limit) <= 8 for *_, limit in lines if limit), summary
    assert wall < 30 + 8, summary  # the budget, and the last check's few seconds of grace
    failed = sum(not result.startswith("ok") for _, result, _ in lines)
    assert proc.returncode == failed, summary


@pytest.mark.slow
def test_gpu_check_runs_every_check_on_a_tiny_model(tmp_path):
    proc = _gpu_check(tmp_path, GPU_CHECK_ON_CPU="1", CHECK_TIMEOUT="300",
                      BENCH_SHAPE="--layers 2 --hidden 64 --steps 2 --warmup 1 --seq 16",
                      LOSS_SHAPE="--batch 2 --seq 16 --vocab 512 --rounds 2",
                      PRETRAIN_SHAPE="--num-layers 2 --hidden-size 64 --num-attention-heads 2 --seq-length 32")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert len(re.findall(r"^== \w+: ok \(\d+ s\)$", summary, re.M)) == 8, summary
    assert re.search(r"^  deterministic reruns: 10 iterations, lm loss, z loss, grad norm bit-identical$", summary,
                     re.M), summary
    assert re.search(r"^  peak memory ratio \(fused / autograd\): \d", summary, re.M), summary
    # the cdp-pretrain check: its last log line, with the logging the GPU run is there to try
    assert re.search(r"^  +iteration 20/20 .*throughput per GPU: .* params norm: .* num zeros: ", summary, re.M), summary
    assert re.search(r"^  \d+ passed", summary, re.M), summary  # the grouped Adam tests
    assert len(re.findall(r"train step from its parts \(distinct / plain\): \d", summary)) == 4, summary
    for name in ("grouped_adam_tests", "bench_fp32_4x64", "bench_bf16_distopt_8x512"):
        assert (tmp_path / "out" / f"{name}.log").stat().st_size > 0


def test_deterministic_reruns_finds_the_first_difference():
    from benchmarks.deterministic_reruns import first_difference

    run = {1: {"lm_loss": 5.5, "z_loss": 1e-3, "grad_norm": 2.0}, 2: {"lm_loss": 5.25, "z_loss": 1e-3, "grad_norm": 1.5}}
    assert first_difference(run, {k: dict(v) for k, v in run.items()}) is None
    other = {k: dict(v) for k, v in run.items()}
    other[2]["grad_norm"] = 1.5000000000000002  # one ulp
    assert first_difference(run, other) == "grad_norm differs at iteration 2: 1.5 and 1.5000000000000002"
    assert first_difference(run, {1: run[1]}) == "the runs logged different iterations ([1, 2] and [1])"
    assert first_difference({}, {}) == "the runs logged different iterations ([] and [])"
