"""Shared check of a reproduction script's --quick run (benchmarks/fig*_*.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quick_run(module: str, stem: str, out: Path) -> tuple[subprocess.CompletedProcess, dict, str]:
    """``python -m benchmarks.<module> --quick --output out`` from the repository root: exit 0,
    one progress line per training with its time, strict JSON (NaN would not parse back as
    null) counting the same trainings, and the printed table saved as ``<stem>_table.txt``.
    Returns the process, the JSON and the table."""
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--quick", "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[")]
    data = json.loads((out / f"{stem}.json").read_text())
    assert len(run_lines) == data["trainings"] == len(data["runs"]) > 0
    assert all(" s, elapsed " in ln for ln in run_lines)
    assert all(ln.split("]")[0].endswith(f"/{data['trainings']}") for ln in run_lines)  # "[i/N] ..."
    table = (out / f"{stem}_table.txt").read_text()
    assert table.strip() in proc.stdout
    return proc, data, table
