"""``cdp-search-report``: plots and a summary of cdp-search studies (paper Figures 11 and 12).

    cdp-search-report --storage sqlite:///cdp_search/search.db --output report/
    cdp-search-report --storage URL --study kron-lr --study random-lr --output report/

Writes to --output:

- ``loss_vs_trial.png``: one panel per study, the loss of every trial against its number:
  completed trials as dots, diverged ones (their last finite loss) as red crosses, timed-out
  ones as orange crosses, crashed ones as grey triangles on the top edge, and the best-so-far
  line over the non-diverged trials. Values above the plotted range sit on the top edge.
- ``best_so_far.png``: the best-so-far lines of all studies on one axis (samplers compared
  at equal trial counts, like Figure 12).
- ``multipliers_<study>.png`` (``<study>``: the study's trial-folder name, as ``cdp-search``
  makes it): the best trial's multipliers, as written by ``--export`` (base spec x search),
  per searched hyperparameter: a heatmap of log2 multipliers of type (rows) x layer
  (columns; types outside the layers in the column "-").
- ``summary.txt`` (also printed) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from cdp_megatron.argtypes import output_dir_problem
from cdp_megatron.requirements import missing_problem
from cdp_megatron.search.cli import (
    CONFIG_ATTR, CliError, _new_sqlite_file, _Parser, _redact, open_storage, study_folder, trial_counts,
)

__all__ = ["main", "study_rows", "best_multiplier_table"]

PROG = "cdp-search-report"


def _classify(trial) -> str | None:
    """ok, diverged, timeout, failed; None for trials that are not results (running,
    waiting, interrupted, or stopped by a configuration error)."""
    from optuna.trial import TrialState

    from cdp_megatron.search.objective import STATUS_ATTR, counts_toward_budget

    if trial.state in (TrialState.RUNNING, TrialState.WAITING) or not counts_toward_budget(trial):
        return None
    if trial.state == TrialState.FAIL:
        return "failed"
    status = trial.user_attrs.get(STATUS_ATTR)
    if status in ("diverged", "timeout"):
        return status
    return "diverged" if trial.user_attrs.get("diverged") else "ok"


def _points(study) -> list[tuple[int, str, float | None]]:
    out = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        kind = _classify(t)
        if kind is not None:
            out.append((t.number, kind, t.value))
    return out


def _best_so_far(points) -> tuple[list[int], list[float]]:
    xs, ys, best = [], [], math.inf
    for number, kind, value in points:
        if kind == "ok" and value is not None and math.isfinite(value):
            best = min(best, value)
        if math.isfinite(best):
            xs.append(number)
            ys.append(best)
    return xs, ys


def _y_range(points) -> tuple[float, float] | None:
    ok = sorted(v for _, k, v in points if k == "ok" and v is not None and math.isfinite(v))
    values = [v for _, _, v in points if v is not None and math.isfinite(v)]
    if not values:
        return None
    if len(ok) >= 3:
        lo = ok[0]
        top = min(max(values), lo + 3.0 * (ok[len(ok) // 2] - lo) + 1e-3)
    else:
        lo, top = min(values), max(values)
    pad = 0.05 * (top - lo) or 0.05
    return lo - pad, top + pad


def _plot_trials(ax, study, points, config) -> None:
    from matplotlib.ticker import MaxNLocator

    style = {"ok": ("o", "tab:blue", "completed"), "diverged": ("x", "tab:red", "diverged (last finite loss)"),
             "timeout": ("x", "tab:orange", "timeout (last loss)")}
    yr = _y_range(points)
    top = yr[1] if yr else 1.0
    for kind, (marker, color, label) in style.items():
        xs = [n for n, k, v in points if k == kind and v is not None]
        ys = [min(v, top) if math.isfinite(v) else top for n, k, v in points if k == kind and v is not None]
        if xs:
            ax.scatter(xs, ys, marker=marker, color=color, s=14 if marker == "o" else 22, label=label,
                       alpha=0.8, clip_on=False, zorder=3)
    failed = [n for n, k, _ in points if k == "failed"]
    if failed:
        ax.scatter(failed, [top] * len(failed), marker="v", color="0.4", s=24, label="crashed", clip_on=False, zorder=3)
    bx, by = _best_so_far(points)
    if bx:
        ax.step(bx, by, where="post", color="k", linewidth=1.5, label="best so far", zorder=4)
    if yr:
        ax.set_ylim(*yr)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"{study.study_name}\n{config.get('sampler', '?')}, {config.get('space', '?')} "
                 f"({','.join(config.get('search', []))})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")


def best_multiplier_table(study, config) -> dict[str, Any] | None:
    """The best trial's total multipliers (base x search) per searched hyperparameter:
    {hp: {"keys": [...], "columns": ["-", 1, ..., L], "log2": [[...], ...]}} (None = no
    such group), plus the trial; None when the study has no stable trial."""
    from cdp_megatron.search.sampler import best_trial
    from cdp_megatron.search.spaces import SearchSpace, to_spec
    from cdp_megatron.spec import Spec

    try:
        best = best_trial(study)
    except ValueError:
        return None
    base = Spec.from_dict(config["base_spec"])
    space = SearchSpace(base, config["space"], config["search"], bounds=tuple(config["bounds"]))
    m = to_spec(base, best.params).multipliers
    L = base.base.shape.num_layers
    tables = {}
    for hp in config["search"]:
        keys = space.keys(hp)
        rows = []
        for key, inside in keys:
            if inside:
                rows.append([None] + [math.log2(m.type_mult(key, hp) * m.depth_mult(hp, l) * m.layer_mult(key, hp, l))
                                      for l in range(1, L + 1)])
            else:
                rows.append([math.log2(m.type_mult(key, hp))] + [None] * L)
        tables[hp] = {"keys": [k for k, _ in keys], "columns": ["-", *range(1, L + 1)], "log2": rows}
    return {"trial": best.number, "value": best.value, "params": dict(best.params), "tables": tables}


def _plot_multipliers(path: Path, study, table: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    hps = list(table["tables"])
    fig, axes = plt.subplots(1, len(hps), figsize=(0.9 + 0.55 * (len(table["tables"][hps[0]]["columns"]) + 3) * len(hps),
                                                     1.2 + 0.3 * max(len(t["keys"]) for t in table["tables"].values())),
                             squeeze=False)
    for ax, hp in zip(axes[0], hps, strict=True):
        t = table["tables"][hp]
        used = [j for j in range(len(t["columns"])) if any(row[j] is not None for row in t["log2"])]
        t = {"keys": t["keys"], "columns": [t["columns"][j] for j in used],
             "log2": [[row[j] for j in used] for row in t["log2"]]}
        data = np.array([[np.nan if v is None else v for v in row] for row in t["log2"]], dtype=float)
        vmax = max(1e-6, float(np.nanmax(np.abs(data)))) if np.isfinite(data).any() else 1.0
        im = ax.imshow(data, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(t["columns"])), [str(c) for c in t["columns"]], fontsize=7)
        ax.set_yticks(range(len(t["keys"])), t["keys"], fontsize=7)
        ax.set_xlabel("layer")
        ax.set_title(f"{hp}: log2 multiplier", fontsize=9)
        if data.shape[1] <= 17:
            for (i, j), v in np.ndenumerate(data):
                if np.isfinite(v):
                    ax.text(j, i, f"{2 ** v:.2g}", ha="center", va="center", fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle(f"{study.study_name}: best trial {table['trial']} ({table['value']:.4f}), multipliers x base", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def study_rows(studies) -> list[dict[str, Any]]:
    """One summary row per (study, config)."""
    from cdp_megatron.search.cli import _state

    rows = []
    for study, config in studies:
        trials = study.get_trials(deepcopy=False)
        c = trial_counts(trials)
        state = _state(trials, config) if config else None
        inc = state.incumbent if state else None
        rows.append({
            "study": study.study_name,
            "sampler": config.get("sampler", "?"),
            "space": config.get("space", "?"),
            "search": ",".join(config.get("search", [])),
            "done": c["done"], "ok": c["ok"], "diverged": c["diverged"], "timeout": c["timeout"], "failed": c["failed"],
            "best": inc.value if inc else None,
            "best_trial": inc.number if inc else None,
            "radius": state.radius if state and config.get("sampler") == "trust-region" else None,
        })
    return rows


def _format_rows(rows: list[dict[str, Any]]) -> str:
    head = ["study", "sampler", "space", "search", "trials", "ok", "diverged", "timeout", "failed", "best", "trial", "radius"]
    body = [[r["study"], r["sampler"], r["space"], r["search"], str(r["done"]), str(r["ok"]), str(r["diverged"]),
             str(r["timeout"]), str(r["failed"]), "-" if r["best"] is None else f"{r['best']:.4f}",
             "-" if r["best_trial"] is None else str(r["best_trial"]),
             "-" if r["radius"] is None else f"{r['radius']:.3f}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])


def _format_table(table: dict[str, Any]) -> str:
    lines = []
    for hp, t in table["tables"].items():
        cols = t["columns"]
        used = [j for j in range(len(cols)) if any(row[j] is not None for row in t["log2"])]
        kw = max(len(k) for k in t["keys"])
        lines.append(f"  {hp} (multiplier x base; columns: layer, '-' outside the layers)")
        lines.append("    " + " " * kw + "  " + "  ".join(f"{str(cols[j]):>6}" for j in used))
        for key, row in zip(t["keys"], t["log2"], strict=True):
            cells = "  ".join(f"{2 ** row[j]:>6.3g}" if row[j] is not None else f"{'':>6}" for j in used)
            lines.append(f"    {key:<{kw}}  {cells}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Plots (PNG) and a summary table of cdp-search studies.")
    p.add_argument("--storage", required=True, metavar="URL", help="the Optuna storage of the studies")
    p.add_argument("--study", action="append", metavar="NAME", help="a study to report (repeatable; default: all)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the PNG files and summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    problem = missing_problem("optuna", "matplotlib")  # optuna brings numpy
    if problem:
        raise CliError(problem)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    problem = output_dir_problem("--output", args.output)
    if problem:
        raise CliError(problem)
    missing_file = _new_sqlite_file(args.storage)
    if missing_file is not None:  # opening it would create an empty database
        raise CliError(f"--storage {_redact(args.storage)}: {missing_file} does not exist; give the storage of a "
                       "cdp-search run (by default <output-dir>/search.db)")
    storage = open_storage(args.storage)
    names = optuna.study.get_all_study_names(storage)
    wanted = args.study or names
    missing = [n for n in wanted if n not in names]
    if missing:
        raise CliError(f"no study {', '.join(map(repr, missing))} in {_redact(args.storage)} (it has: {', '.join(names) or 'none'})")
    if not wanted:
        raise CliError(f"{_redact(args.storage)} holds no study")
    studies = []
    for name in wanted:
        study = optuna.load_study(study_name=name, storage=storage)
        studies.append((study, study.user_attrs.get(CONFIG_ATTR) or {}))
    out = Path(args.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # changed since the check above
        raise CliError(f"--output {out}: cannot create ({e.strerror})") from None

    n = len(studies)
    cols = min(n, 3)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.5 * cols, 4.2 * rows_n), squeeze=False)
    for ax, (study, config) in zip(axes.flat, studies):
        _plot_trials(ax, study, _points(study), config)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "loss_vs_trial.png", dpi=110)
    plt.close(fig)
    written = ["loss_vs_trial.png"]

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for study, config in studies:
        bx, by = _best_so_far(_points(study))
        if bx:
            ax.step(bx, by, where="post", label=f"{study.study_name} ({config.get('sampler', '?')})")
    ax.set_xlabel("trial")
    ax.set_ylabel("best final validation loss so far")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "best_so_far.png", dpi=110)
    plt.close(fig)
    written.append("best_so_far.png")

    rows = study_rows(studies)
    text = [_format_rows(rows)]
    details: dict[str, Any] = {}
    for study, config in studies:
        if not config:
            continue
        table = best_multiplier_table(study, config)
        if table is None:
            continue
        details[study.study_name] = table
        fname = "multipliers_" + study_folder(study.study_name) + ".png"
        _plot_multipliers(out / fname, study, table)
        written.append(fname)
        text.append(f"\n{study.study_name}: best trial {table['trial']}, validation loss {table['value']:.4f}")
        text.append(_format_table(table))
    summary = "\n".join(text)
    print(summary)
    (out / "summary.txt").write_text(summary + "\n")
    (out / "summary.json").write_text(json.dumps({"studies": rows, "best": details}, indent=1) + "\n")
    written += ["summary.txt", "summary.json"]
    print(f"\n{PROG}: wrote {', '.join(written)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
