"""Run one cdp-pretrain command twice with ``--deterministic-mode`` and compare the runs bit for bit.

    python benchmarks/deterministic_reruns.py [--out DIR] -- <cdp-pretrain flags>

Each run writes its own ``--metrics-file`` (in DIR, default a temporary folder); every logged
iteration's lm loss, z loss and grad norm must be equal as floats (no tolerance). Prints one
line, ``deterministic reruns: N iterations, lm loss, z loss and grad norm bit-identical``, and
exits 0; or names the first value that differs and exits 1. On GPUs the command needs
``NCCL_ALGO`` set to a deterministic algorithm (``--deterministic-mode`` refuses it otherwise;
this script sets ``Ring`` where it is unset). ``benchmarks/gpu_check.sh`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

KEYS = ("lm_loss", "z_loss", "grad_norm")


def _records(path: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {r["iteration"]: r for r in rows if "lm_loss" in r and not r.get("eval")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for the two metrics files and logs (default: a temporary one)")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="cdp-pretrain's flags, after --")
    args = parser.parse_args(argv)
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    if not flags:
        parser.error("give cdp-pretrain's flags after --")
    if any(flag.split("=")[0] == "--metrics-file" for flag in flags):
        parser.error("--metrics-file is set here, one per run; leave it out")
    out = Path(args.out or tempfile.mkdtemp(prefix="deterministic_reruns_"))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NCCL_ALGO": os.environ.get("NCCL_ALGO", "Ring")}
    runs = []
    for i in (1, 2):
        metrics = out / f"rerun{i}.jsonl"
        with open(out / f"rerun{i}.log", "w", encoding="utf-8") as log:
            rc = subprocess.run([sys.executable, "-m", "cdp_megatron.pretrain", *flags, "--deterministic-mode",
                                 "--metrics-file", str(metrics)], env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            print(f"deterministic reruns: run {i} failed with exit code {rc} (see {out / f'rerun{i}.log'})")
            return 1
        runs.append(_records(metrics))
    difference = first_difference(*runs)
    if difference:
        print(f"deterministic reruns: {difference}")
        return 1
    print(f"deterministic reruns: {len(runs[0])} iterations, {', '.join(k.replace('_', ' ') for k in KEYS)} "
          "bit-identical")
    return 0


def first_difference(first: dict[int, dict], second: dict[int, dict]) -> str | None:
    """The first value (in iteration order, then KEYS) where two runs' records differ, or None."""
    if not first or sorted(first) != sorted(second):
        return f"the runs logged different iterations ({sorted(first)} and {sorted(second)})"
    for iteration in sorted(first):
        for key in KEYS:
            a, b = first[iteration].get(key), second[iteration].get(key)
            if a != b:
                return f"{key} differs at iteration {iteration}: {a!r} and {b!r}"
    return None


if __name__ == "__main__":
    sys.exit(main())
