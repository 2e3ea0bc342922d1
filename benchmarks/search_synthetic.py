"""Compare samplers on the cliffed synthetic objective with equal trial budgets.

    python -m benchmarks.search_synthetic --output runs/search_synthetic
    python -m benchmarks.search_synthetic --quick --output /tmp/search_smoke   # CI smoke

(from the repository root; needs the package's search extra: optuna, matplotlib).

For each dimension d and seed s, every sampler searches the same problem
(``CliffBowl.random(d, seed=s)``) over the same box [2^-6, 2^6]^d with the same number of
trials. "best" is the best loss among non-diverged trials (the optimum is 3.0); a seed with
no stable trial counts as inf. Prints, per d, the median best over seeds, its interquartile
range and the fraction of diverged trials, and writes ``best_so_far.png`` (median over
seeds of best-so-far minus the optimum, versus trial) and ``results.json`` to --output.
CMA-ES needs the ``cmaes`` package and is skipped with a message when it is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import optuna

from cdp_megatron.search import TrustRegionSampler
from cdp_megatron.search.sampler import baseline_sampler
from cdp_megatron.search.synthetic import CliffBowl, make_objective

LOW, HIGH = 2.0**-6, 2.0**6
SAMPLERS = ("trust-region", "random", "cma-es", "tpe")


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "trust-region":
        return TrustRegionSampler(seed=seed)
    return baseline_sampler({"cma-es": "cmaes"}.get(name, name), seed)


def run_one(task: tuple[str, int, int, int]) -> dict:
    """One search; returns per-trial values (number order) and divergence flags."""
    sampler_name, dim, seed, n_trials = task
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    problem = CliffBowl.random(dim, seed=seed)
    study = optuna.create_study(sampler=make_sampler(sampler_name, seed))
    start = time.perf_counter()
    study.optimize(make_objective(problem, low=LOW, high=HIGH), n_trials=n_trials)
    trials = sorted(study.trials, key=lambda t: t.number)
    return {
        "sampler": sampler_name,
        "dim": dim,
        "seed": seed,
        "values": [t.value for t in trials],
        "diverged": [bool(t.user_attrs["diverged"]) for t in trials],
        "floor": problem.floor,
        "seconds": time.perf_counter() - start,
    }


def best_so_far(run: dict) -> np.ndarray:
    stable = np.where(run["diverged"], np.inf, np.asarray(run["values"], dtype=float))
    return np.minimum.accumulate(stable)


def quantiles(x: np.ndarray, q: list[float], axis: int | None = None) -> np.ndarray:
    """Percentiles where inf (no stable trial) is the worst value rather than a NaN source."""
    big = np.finfo(float).max / 4
    out = np.percentile(np.where(np.isinf(x), big, x), q, axis=axis)
    return np.where(out >= big / 2, np.inf, out)


def summarise(runs: list[dict], samplers: list[str], dims: list[int]) -> list[dict]:
    rows = []
    for dim in dims:
        for name in samplers:
            mine = [r for r in runs if r["sampler"] == name and r["dim"] == dim]
            best = np.array([best_so_far(r)[-1] for r in mine])
            q25, med, q75 = quantiles(best, [25, 50, 75])
            diverged = np.mean([np.mean(r["diverged"]) for r in mine])
            rows.append(
                {
                    "dim": dim,
                    "sampler": name,
                    "median_best": float(med),
                    "q25": float(q25),
                    "q75": float(q75),
                    "diverged": float(diverged),
                    "seeds": len(mine),
                    "seconds": float(sum(r["seconds"] for r in mine)),
                }
            )
    return rows


def print_table(rows: list[dict], n_trials: int, seeds: int) -> None:
    for dim in sorted({r["dim"] for r in rows}):
        print(f"\nd={dim}, {n_trials} trials, {seeds} seeds", end=" ")
        print("(optimum 3.0; best = best loss over non-diverged trials)")
        print(f"{'sampler':<14} {'median best':>12} {'IQR':>20} {'diverged':>9} {'time':>7}")
        for r in (r for r in rows if r["dim"] == dim):
            iqr = f"[{r['q25']:.4f}, {r['q75']:.4f}]"
            print(
                f"{r['sampler']:<14} {r['median_best']:>12.4f} {iqr:>20} "
                f"{r['diverged']:>9.1%} {r['seconds']:>6.1f}s"
            )


def plot(runs: list[dict], samplers: list[str], dims: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(dims), figsize=(5.5 * len(dims), 4), squeeze=False)
    for ax, dim in zip(axes[0], dims, strict=True):
        for name in samplers:
            mine = [r for r in runs if r["sampler"] == name and r["dim"] == dim]
            regret = np.array([best_so_far(r) - r["floor"] for r in mine])
            trial = np.arange(1, regret.shape[1] + 1)
            q25, med, q75 = quantiles(regret, [25, 50, 75], axis=0)
            (line,) = ax.plot(trial, med, label=name)
            ax.fill_between(trial, q25, q75, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_yscale("log")
        ax.set_xlabel("trial")
        ax.set_ylabel("best-so-far loss - optimum (median, IQR)")
        ax.set_title(f"cliffed bowl, d={dim}, {len(mine)} seeds")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="10,20", help="comma-separated numbers of multipliers")
    parser.add_argument("--trials", type=int, default=300, help="trials per search")
    parser.add_argument("--seeds", type=int, default=7, help="seeds (problem and sampler) per dim")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--jobs", type=int, default=1, help="searches run in parallel")
    parser.add_argument("--output", type=Path, default=Path("runs/search_synthetic"))
    parser.add_argument("--quick", action="store_true", help="d=6, 40 trials, 2 seeds")
    args = parser.parse_args(argv)

    dims = [int(d) for d in args.dims.split(",")]
    n_trials, seeds = args.trials, args.seeds
    if args.quick:
        dims, n_trials, seeds = [6], 40, 2
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    for name in samplers:
        if name not in SAMPLERS:
            parser.error(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    if "cma-es" in samplers and importlib.util.find_spec("cmaes") is None:
        print(
            "skipping cma-es: optuna's CmaEsSampler needs the 'cmaes' package (pip install cmaes)"
        )
        samplers.remove("cma-es")

    tasks = [
        (name, dim, seed, n_trials) for dim in dims for name in samplers for seed in range(seeds)
    ]
    start = time.perf_counter()
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            runs = pool.map(run_one, tasks)
    else:
        runs = [run_one(t) for t in tasks]
    rows = summarise(runs, samplers, dims)
    print_table(rows, n_trials, seeds)

    args.output.mkdir(parents=True, exist_ok=True)
    plot(runs, samplers, dims, args.output / "best_so_far.png")
    (args.output / "results.json").write_text(
        json.dumps({"trials": n_trials, "seeds": seeds, "summary": rows, "runs": runs}, indent=1)
    )
    elapsed = time.perf_counter() - start
    print(f"\nwrote {args.output / 'best_so_far.png'} and results.json ({elapsed:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
