"""benchmarks/optimizer_overhead.py runs end to end on a tiny model and prints its ratios, in
both modes (whole steps, and --host-only with the foreach ops stubbed)."""

from __future__ import annotations

import re
import subprocess
import sys
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
