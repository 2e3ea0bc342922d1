"""Start-up time of ``cdp-convert`` (issue 2: "--help and a conversion complete in well under
half a second"; it must not import torch or megatron).

Runs, each in a fresh interpreter and ``--repeats`` times, and prints the median wall time:

- ``python -c pass`` (the interpreter's own start-up, for reference);
- ``cdp-convert --help``;
- ``cdp-convert examples/base.json --width 4x --depth 4x -o <tmp>/target.json``.

It runs ``python -m cdp_megatron.convert`` from this checkout, and also the installed
``cdp-convert`` console script when one is on PATH. Then it reports which heavy packages
(torch, megatron, numpy) the conversion imported, from ``python -X importtime`` and from
``sys.modules``. It reports; it asserts nothing (timings depend on the machine).

    python benchmarks/convert_startup.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "base.json"
HEAVY = ("torch", "megatron", "numpy")


def _env() -> dict[str, str]:
    # import the package from this checkout even when it is not installed
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def _time(cmd: list[str], repeats: int) -> tuple[float, float, float, int]:
    """Median, min and max wall seconds of ``cmd`` in fresh processes, and its exit code."""
    times, rc = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
        rc = rc or r.returncode
    return statistics.median(times), min(times), max(times), rc


def _importtime(cmd_tail: list[str]) -> tuple[set[str], int, float, float]:
    """Top-level packages imported, number of modules, total import time (s) and the part
    spent in cdp_megatron's own modules (s), from ``python -X importtime``."""
    r = subprocess.run([sys.executable, "-X", "importtime", *cmd_tail], cwd=ROOT, env=_env(), capture_output=True, text=True)
    tops, count, total_us, ours_us = set(), 0, 0, 0
    for line in r.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, _, name = (x.strip() for x in line[len("import time:"):].split("|"))
        count += 1
        tops.add(name.split(".")[0])
        total_us += int(self_us)
        if name.split(".")[0] == "cdp_megatron":
            ours_us += int(self_us)
    return tops, count, total_us / 1e6, ours_us / 1e6


def _sys_modules(out: Path) -> list[str]:
    code = (
        "import sys\n"
        "from cdp_megatron.convert import main\n"
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    main([{str(EXAMPLE)!r}, '--width', '4x', '--depth', '4x', '-o', {str(out)!r}])\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True)
    return r.stdout.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9, help="runs per command (default 9)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "target.json"
        convert_args = [str(EXAMPLE), "--width", "4x", "--depth", "4x", "-o", str(out)]
        module = [sys.executable, "-m", "cdp_megatron.convert"]
        rows = [
            ("python -c pass (interpreter start-up)", [sys.executable, "-c", "pass"]),
            ("python -m cdp_megatron.convert --help", [*module, "--help"]),
            ("python -m cdp_megatron.convert base.json --width 4x --depth 4x -o t.json", [*module, *convert_args]),
        ]
        script = shutil.which("cdp-convert")
        if script:
            rows += [
                ("cdp-convert --help", [script, "--help"]),
                ("cdp-convert base.json --width 4x --depth 4x -o t.json", [script, *convert_args]),
            ]

        print(f"python {sys.version.split()[0]} ({sys.executable}), {args.repeats} fresh processes per command")
        print(f"console script cdp-convert: {script or 'not on PATH (not installed here)'}")
        print()
        width = max(len(name) for name, _ in rows)
        print(f"{'command':<{width}}  median_s  min_s   max_s   rc")
        for name, cmd in rows:
            med, lo, hi, rc = _time(cmd, args.repeats)
            print(f"{name:<{width}}  {med:8.3f}  {lo:6.3f}  {hi:6.3f}  {rc}")

        tops, count, total_s, ours_s = _importtime(["-m", "cdp_megatron.convert", *convert_args])
        heavy_seen = sorted(tops & set(HEAVY))
        in_modules = _sys_modules(out)
        print()
        print(
            f"-X importtime (conversion): {count} modules imported in {total_s * 1000:.1f} ms, "
            f"{ours_s * 1000:.1f} ms of it in cdp_megatron's own modules"
        )
        print(f"  heavy packages imported (torch, megatron, numpy): {', '.join(heavy_seen) if heavy_seen else 'none'}")
        print(f"  sys.modules after main(): {', '.join(in_modules) if in_modules else 'no torch, megatron or numpy module'}")


if __name__ == "__main__":
    main()
