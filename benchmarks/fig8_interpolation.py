"""Figure 8 of the paper at small scale: the loss along the line from the best global LR to the
best per-type LRs of a proxy, at several model sizes.

    python -m benchmarks.fig8_interpolation --output docs/results/fig8          # defaults
    python -m benchmarks.fig8_interpolation --quick --output /tmp/fig8_smoke    # CI smoke

(from the repository root; needs matplotlib and megatron-core). The two inputs are specs of
the same proxy (default: the best global-LR and best per-type-LR specs that
``benchmarks/fig11_module_transfer.py`` found, ``docs/results/fig11/specs/``). A spec's
effective LR of a (type, layer) group is ``global.lr x type x depth x layer`` LR multipliers
(``cdp_megatron.target``; absent = 1). For each t of ``--ts`` the benchmark writes the spec
whose effective LRs are, group by group,

    lr(t) = exp((1 - t) log lr_global + t log lr_type)      (t = 0: global, t = 1: per-type)

(each factor interpolated in log space, so the product is too; every other hyperparameter
must be the same in both inputs), then, for each size of ``--sizes`` (width:depth:tokens
ratios), ``cdp-convert SPEC --width W --depth D --tokens T --format megatron-args`` and
``cdp-pretrain`` with those flags, the data, evaluation batches and seeds of fig11's target
runs. The paper (Figure 8) expects the per-type multipliers 1) to beat the global baseline
(L(1) < L(0)) at every size and 2) to stay near the optimum of this line as the model grows.

Outputs in --output: ``fig8.json`` (configuration, commands, the interpolated multipliers,
every run's final losses and curves), ``fig8_table.txt`` (the printed table) and ``fig8.png``
(final validation loss minus the t = 0 loss against t, one line per size, the argmin
marked; and the absolute losses). The interpolated specs, converted targets, logs and metrics
stay in ``--work-dir``; a finished run whose command and converted target are unchanged is
not trained again. Progress on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Sequence

from benchmarks.fig2_lr_transfer import _Parser, cli_main, parse_with_quick
from benchmarks.fig11_module_transfer import (
    Fig11Error, StepFailed, _f, _table, curves, prepare_data, product, run_flags, run_step, seed_mean,
)
from cdp_megatron.argtypes import positive_int
from cdp_megatron.convert import parse_ratio, write_atomic
from cdp_megatron.search.objective import DIVERGED_EXIT_CODE, read_metrics
from cdp_megatron.spec import Spec, SpecError, load_spec

PROG = "fig8_interpolation"
SPECS = Path("docs/results/fig11/specs")


class Fig8Error(ValueError):
    """Bad input; the message names the flag and the fix (exit code 2)."""


# --------------------------------------------------------------------------- pure parts


def effective_lrs(spec: Spec) -> dict[tuple[str, int | None, str], float]:
    """Peak LR of every (type, layer, param) group of the spec's base shape, before any
    transfer rule: global.lr x type x depth x layer LR multipliers (as cdp_megatron.target
    combines them)."""
    m = spec.multipliers
    out = {}
    for type_, layer, param in spec.base.shape.groups():
        key = type_ if param == "weight" else f"{type_}.bias"
        out[(type_, layer, param)] = (spec.globals.lr * m.type_mult(key, "lr") * m.depth_mult("lr", layer)
                                      * m.layer_mult(key, "lr", layer))
    return out


def log_lerp(a: float, b: float, t: float) -> float:
    """exp((1 - t) log a + t log b); exactly a at t = 0 (and wherever a == b) and b at t = 1."""
    if t == 0 or a == b:
        return a
    if t == 1:
        return b
    return math.exp((1 - t) * math.log(a) + t * math.log(b))


def _without_lr(spec: Spec) -> tuple:
    """Everything of a spec but its LRs (what both ends of the line must share); an entry
    left with no multiplier means 1, as an absent one does."""
    m = spec.multipliers

    def drop_lr(per_key: dict) -> dict:
        return {k: v for k, v in ((k, {h: x for h, x in hps.items() if h != "lr"}) for k, hps in per_key.items()) if v}

    return (spec.base, replace(spec.globals, lr=1.0), drop_lr(m.type),
            {h: v for h, v in m.depth.items() if h != "lr"}, drop_lr(m.layer))


def check_same_line(a: Spec, b: Spec) -> None:
    """Fig8Error unless the two specs differ in their LRs only."""
    names = ("base", "global section (other than lr)", "non-LR type multipliers", "non-LR depth multipliers",
             "non-LR layer multipliers")
    for name, x, y in zip(names, _without_lr(a), _without_lr(b)):
        if x != y:
            raise Fig8Error(f"the two specs differ in their {name}, not only in LRs: give two specs of the same "
                            "proxy (e.g. best_global.json and best_type.json of one fig11 run)")


def interpolate(global_spec: Spec, type_spec: Spec, t: float) -> Spec:
    """The spec at ``t`` on the log-LR line through the two specs (t = 0: ``global_spec``'s
    effective LRs, t = 1: ``type_spec``'s; every other setting from ``global_spec``, which must
    agree with ``type_spec`` in all of them). Each LR factor (global lr, per-type, per-depth,
    per-layer multiplier; absent = 1) is interpolated in log space, so every group's effective
    LR is exp((1 - t) log lr_0 + t log lr_1). Validated by Spec.from_dict."""
    if not math.isfinite(t):
        raise Fig8Error(f"t = {t!r}: give a finite number")
    check_same_line(global_spec, type_spec)
    g, s = global_spec.multipliers, type_spec.multipliers
    raw = global_spec.to_dict()
    raw["global"]["lr"] = log_lerp(global_spec.globals.lr, type_spec.globals.lr, t)
    mult = raw.setdefault("multipliers", {})
    for key in sorted({k for m in (g, s) for k, hps in m.type.items() if "lr" in hps}):
        mult.setdefault("type", {}).setdefault(key, {})["lr"] = log_lerp(g.type_mult(key, "lr"),
                                                                         s.type_mult(key, "lr"), t)
    layers = range(1, global_spec.base.shape.num_layers + 1)
    if "lr" in g.depth or "lr" in s.depth:
        mult.setdefault("depth", {})["lr"] = [log_lerp(g.depth_mult("lr", i), s.depth_mult("lr", i), t) for i in layers]
    for key in sorted({k for m in (g, s) for k, hps in m.layer.items() if "lr" in hps}):
        mult.setdefault("layer", {}).setdefault(key, {})["lr"] = [
            log_lerp(g.layer_mult(key, "lr", i), s.layer_mult(key, "lr", i), t) for i in layers]
    raw["description"] = (f"fig8: LRs at t = {t:g} on the log-LR line from the global (t = 0) to the per-type "
                          "(t = 1) spec")
    raw["provenance"] = {"tool": PROG, "t": t, "t0": global_spec.description, "t1": type_spec.description}
    try:
        return Spec.from_dict(raw)
    except SpecError as e:  # cannot happen for valid inputs; say so if it does
        raise Fig8Error(f"the interpolated spec at t = {t:g} is invalid: {e}") from None


def type_lr_multipliers(spec: Spec, lr: float) -> dict[str, float]:
    """Per-type effective LR relative to ``lr`` (layer 1 for layer types), for the report."""
    out = {}
    for (type_, layer, param), v in effective_lrs(spec).items():
        if param == "weight" and layer in (None, 1):
            out[type_] = v / lr
    return out


def line_summary(ts: Sequence[float], losses: Sequence[float | None]) -> dict:
    """Argmin of the loss along the line, the parabola vertex through the argmin and its two
    neighbours (when it is interior and the parabola opens upwards), and the two paper checks:
    gain = L(1) - L(0) (< 0: per-type beats global) and gap = L(1) - min L (0: t = 1 is the
    optimum of the grid)."""
    pts = sorted((t, v) for t, v in zip(ts, losses) if v is not None and math.isfinite(v))
    by_t = dict(pts)
    out = {"argmin_t": None, "min_loss": None, "vertex_t": None, "gain": None, "gap": None}
    if not pts:
        return out
    i = min(range(len(pts)), key=lambda j: pts[j][1])
    out["argmin_t"], out["min_loss"] = pts[i]
    if 0 < i < len(pts) - 1:
        (x0, y0), (x1, y1), (x2, y2) = pts[i - 1:i + 2]
        # vertex of the parabola through three points (x0 < x1 < x2)
        num = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
        den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
        if den != 0:
            out["vertex_t"] = x1 - 0.5 * num / den
    if 0.0 in by_t and 1.0 in by_t:
        out["gain"] = by_t[1.0] - by_t[0.0]
    if 1.0 in by_t:
        out["gap"] = by_t[1.0] - out["min_loss"]
    return out


# --------------------------------------------------------------------------- the experiment


def _train(cmd: list[str], target: Path, metrics: Path, env: dict, progress) -> tuple[int, float, bool]:
    """cdp-pretrain, unless ``metrics`` already holds the finished run of this very command and
    target JSON (done.json beside it holds both); returns (exit code, seconds, reused)."""
    stamp = metrics.parent / "done.json"
    key = {"cmd": shlex.join(cmd), "target_sha256": hashlib.sha256(target.read_bytes()).hexdigest()}
    done = json.loads(stamp.read_text()) if stamp.exists() and metrics.exists() else {}
    if all(done.get(k) == v for k, v in key.items()):
        progress(f"  reusing {metrics} ({done['seconds']:.0f} s when it ran)")
        return done["rc"], done["seconds"], True
    metrics.unlink(missing_ok=True)  # cdp-pretrain appends
    stamp.unlink(missing_ok=True)
    rc, _, dt = run_step(cmd, metrics.parent / "log.txt", progress, echo=lambda ln: "validation at iteration" in ln,
                         env=env, ok_codes=(0, DIVERGED_EXIT_CODE))
    write_atomic(str(stamp), json.dumps({**key, "rc": rc, "seconds": round(dt, 1)}) + "\n")
    return rc, round(dt, 1), False


def _seed_result(seed: int, rc: int, seconds: float, curve: dict) -> dict:
    """One training run: its curves and final losses (None unless it finished, rc 0)."""
    last = {k: curve[f"{k}_loss"][-1] if rc == 0 and curve[f"{k}_loss"] else None for k in ("val", "train")}
    return {"seed": seed, **curve, "diverged": rc == DIVERGED_EXIT_CODE, "seconds": seconds,
            "final_val_loss": last["val"], "final_train_loss": last["train"]}


def run(cfg: argparse.Namespace, out: Path, progress: Callable[[str], None]) -> dict:
    started = time.perf_counter()
    work = Path(cfg.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    specs = {}
    for flag, path in (("--global-spec", cfg.global_spec), ("--type-spec", cfg.type_spec)):
        try:
            specs[flag] = load_spec(path)
        except SpecError as e:
            raise Fig8Error(f"{flag}: {e}") from None
    g, ty = specs["--global-spec"], specs["--type-spec"]
    check_same_line(g, ty)
    shape = g.base.shape
    for w, d, _ in cfg.sizes:
        heads, layers = w * shape.num_attention_heads, d * shape.num_layers
        if heads != round(heads) or layers != round(layers):
            raise Fig8Error(f"--sizes {w:g}:{d:g}: gives a fractional number of heads or layers of the "
                            f"{shape.hidden_size} x {shape.num_layers}-layer proxy ({shape.num_attention_heads} heads)")
    data = prepare_data(cfg, work, progress)
    flags_cfg = argparse.Namespace(batch=shape.global_batch_size, eval_iters=cfg.eval_iters)
    env = {"OMP_NUM_THREADS": str(cfg.threads)}
    commands: list[str] = []
    reused = 0

    points = []
    for t in cfg.ts:
        spec = interpolate(g, ty, t)
        path = work / "specs" / f"t{t:+g}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(str(path), json.dumps(spec.to_dict(), indent=1) + "\n")
        points.append({"t": t, "spec": path, "global_lr": spec.globals.lr,
                       "type_lr_multipliers": type_lr_multipliers(spec, g.globals.lr)})
    progress(f"{len(cfg.ts)} specs on the line (t = {', '.join(f'{t:g}' for t in cfg.ts)}) in {work / 'specs'}")

    sizes = []
    for w, d, tok in cfg.sizes:
        size_runs, size_shape, iters = [], None, None
        for p in points:
            tag = f"w{w:g}_d{d:g}_tok{tok:g}"
            target = work / "targets" / tag / f"t{p['t']:+g}.json"
            conv = [*product("cdp_megatron.convert"), str(p["spec"]), "--width", f"{w:g}x", "--depth", f"{d:g}x",
                    "--tokens", f"{tok:g}x", "-o", str(target), "--format", "megatron-args"]
            target.parent.mkdir(parents=True, exist_ok=True)
            _, text, _ = run_step(conv, target.with_suffix(".convert.txt"), progress)
            commands.append(shlex.join(conv))
            tgt = json.loads(target.read_text())
            size_shape, iters = tgt["shape"], int(tgt["train_iters"])
            tokens_per_step = int(size_shape["global_batch_size"]) * int(size_shape["seq_length"])
            flags = shlex.split(next(ln for ln in text.splitlines() if "--cdp-config" in ln))
            per_seed = []
            for seed in cfg.seeds:
                metrics = work / "runs" / tag / f"t{p['t']:+g}" / f"seed{seed}" / "metrics.jsonl"
                cmd = [*product("cdp_megatron.pretrain"), *flags,
                       *run_flags(flags_cfg, data, cfg.eval_interval or iters, cfg.log_interval, seed),
                       "--metrics-file", str(metrics)]
                progress(f"size {size_shape['hidden_size']} x {size_shape['num_layers']} ({iters} steps), "
                         f"t = {p['t']:g}, seed {seed}")
                rc, dt, was_reused = _train(cmd, target, metrics, env, progress)
                reused += was_reused
                commands.append(shlex.join(cmd))
                per_seed.append(_seed_result(seed, rc, dt, curves(read_metrics(metrics), tokens_per_step)))
                progress(f"  final validation loss {_f(per_seed[-1]['final_val_loss'])} ({dt:.0f} s)")
            mean = seed_mean(per_seed)
            size_runs.append({"t": p["t"], "final_val_loss": mean["final_val_loss"],
                              "final_train_loss": mean["final_train_loss"], "spread": mean["spread"],
                              "diverged": mean["diverged"], "seeds": per_seed,
                              "seconds": round(sum(r["seconds"] for r in per_seed), 1)})
        val = [r["final_val_loss"] for r in size_runs]
        sizes.append({"ratios": {"width": w, "depth": d, "tokens": tok}, "shape": size_shape, "train_iters": iters,
                      "runs": size_runs, "summary": line_summary(cfg.ts, val),
                      "train_summary": line_summary(cfg.ts, [r["final_train_loss"] for r in size_runs])})
    return {
        "config": {k: v for k, v in vars(cfg).items() if k != "output"},
        "data": data,
        "proxy": asdict(shape),
        "line": [{**{k: v for k, v in p.items() if k != "spec"}, "spec": str(p["spec"])} for p in points],
        "sizes": sizes,
        "commands": commands,
        "seconds": round(time.perf_counter() - started, 1),
        "reused_runs": reused,
    }


# --------------------------------------------------------------------------- report


def _size_label(size: dict) -> str:
    s, r = size["shape"], size["ratios"]
    return f"{s['hidden_size']} x {s['num_layers']} ({r['width']:g}x/{r['depth']:g}x/{r['tokens']:g}x)"


def _delta(v: float | None, ref: float | None) -> str:
    return "-" if v is None or ref is None else f"{v - ref:+.4f}"


def format_report(result: dict) -> str:
    ts = result["config"]["ts"]
    seeds = result["config"]["seeds"]
    p = result["proxy"]
    out = [f"Figure 8 at small scale: log-LR line from the best global LR (t = 0) to the best per-type LRs (t = 1) "
           f"of the {p['hidden_size']} x {p['num_layers']}-layer proxy, at {len(result['sizes'])} sizes "
           f"(width/depth/tokens ratios to the proxy; seed{'s' if len(seeds) > 1 else ''} "
           f"{', '.join(map(str, seeds))}{', mean' if len(seeds) > 1 else ''})",
           "", "final validation loss"]
    head = ["size", "steps", *(f"t={t:g}" for t in ts), "best t", "vertex t", "L(1)-L(0)", "L(1)-min", "seconds"]
    rows = []
    for s in result["sizes"]:
        sm = s["summary"]
        rows.append([_size_label(s), str(s["train_iters"]),
                     *("diverged" if r["diverged"] else _f(r["final_val_loss"]) for r in s["runs"]),
                     _f(sm["argmin_t"], "g"), _f(sm["vertex_t"], ".2f"), _delta(sm["gain"], 0.0),
                     _delta(sm["gap"], 0.0), f"{sum(r['seconds'] for r in s['runs']):.0f}"])
    out += _table(head, rows)
    out += ["", "final validation loss minus the t = 0 (global LR) loss"]
    rows = []
    for s in result["sizes"]:
        ref = s["runs"][ts.index(0.0)]["final_val_loss"] if 0.0 in ts else None
        rows.append([_size_label(s), *(_delta(r["final_val_loss"], ref) for r in s["runs"])])
    out += _table(["size", *(f"t={t:g}" for t in ts)], rows)
    if len(seeds) > 1:
        out += ["", "per seed (paired: each seed's runs against its own t = 0 run): L(1)-L(0), best t"]
        rows = []
        for s in result["sizes"]:
            row = [_size_label(s)]
            for i in range(len(seeds)):
                sm = line_summary(ts, [r["seeds"][i]["final_val_loss"] for r in s["runs"]])
                row += [_delta(sm["gain"], 0.0), _f(sm["argmin_t"], "g")]
            rows.append(row)
        out += _table(["size", *(f"{h} s{seed}" for seed in seeds for h in ("L(1)-L(0)", "best t"))], rows)
    out += ["", "final training loss (last logged; the paper's Figure 8 plots training loss)"]
    rows = []
    for s in result["sizes"]:
        sm = s["train_summary"]
        rows.append([_size_label(s), *(_f(r["final_train_loss"]) for r in s["runs"]), _f(sm["argmin_t"], "g"),
                     _delta(sm["gain"], 0.0), _delta(sm["gap"], 0.0)])
    out += _table(["size", *(f"t={t:g}" for t in ts), "best t", "L(1)-L(0)", "L(1)-min"], rows)
    n = sum(len(r["seeds"]) for s in result["sizes"] for r in s["runs"])
    train = sum(r["seconds"] for s in result["sizes"] for r in s["runs"])
    out += ["", f"total {result['seconds']:.0f} s; {n} training runs of {train:.0f} s together"
            + (f", {result['reused_runs']} of them reused from the work folder" if result.get("reused_runs") else "")]
    return "\n".join(out)


def plot(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = result["config"]["ts"]
    fig, (ax_d, ax_a) = plt.subplots(1, 2, figsize=(12, 4.3))
    cmap = plt.get_cmap("viridis")
    n = len(result["sizes"])
    for i, s in enumerate(result["sizes"]):
        color = cmap(0.85 * i / max(1, n - 1))
        val = [float("nan") if r["final_val_loss"] is None else r["final_val_loss"] for r in s["runs"]]
        ref = val[ts.index(0.0)] if 0.0 in ts else float("nan")
        label = _size_label(s)
        ax_d.plot(ts, [v - ref for v in val], marker="o", ms=4, color=color,
                  label=label + (" (mean)" if len(s["runs"][0]["seeds"]) > 1 else ""))
        for i in range(len(s["runs"][0]["seeds"]) if len(s["runs"][0]["seeds"]) > 1 else 0):
            one = [float("nan") if r["seeds"][i]["final_val_loss"] is None else r["seeds"][i]["final_val_loss"]
                   for r in s["runs"]]
            ref_one = one[ts.index(0.0)] if 0.0 in ts else float("nan")
            ax_d.plot(ts, [v - ref_one for v in one], lw=0.8, ls=":", alpha=0.6, color=color)
        ax_a.plot(ts, val, marker="o", ms=4, color=color, label=label)
        sm = s["summary"]
        if sm["argmin_t"] is not None:
            ax_d.plot([sm["argmin_t"]], [sm["min_loss"] - ref], marker="*", ms=15, color=color, mec="k", mew=0.6)
            ax_a.plot([sm["argmin_t"]], [sm["min_loss"]], marker="*", ms=15, color=color, mec="k", mew=0.6)
    for ax in (ax_d, ax_a):
        for x, what in ((0, "global LR"), (1, "per-type LRs")):
            ax.axvline(x, color="0.6", lw=0.8, ls="--")
            ax.annotate(what, (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -12), textcoords="offset points",
                        fontsize=8, color="0.4")
        ax.set_xlabel("t  (LRs = exp((1-t) log global + t log per-type))")
        ax.grid(alpha=0.3)
    ax_d.axhline(0, color="k", lw=0.8)
    ax_d.set_ylabel("final val loss - loss at t = 0")
    ax_a.set_ylabel("final validation loss")
    ax_d.legend(fontsize=8, title="size (width/depth/tokens ratio)", title_fontsize=8)
    ax_d.set_title("(a) normalised per size; star: best t; dotted: single seeds", fontsize=10)
    ax_a.set_title("(b) absolute", fontsize=10)
    p = result["proxy"]
    seeds = result["config"]["seeds"]
    fig.suptitle(f"Figure 8 at small scale: multipliers from the {p['hidden_size']} x {p['num_layers']}-layer proxy, "
                 f"transferred with cdp-convert (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    path = out / "fig8.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


# --------------------------------------------------------------------------- CLI

QUICK = {"ts": "0,0.5,1", "sizes": "0.5:0.5:0.1,1:1:0.1", "seeds": "1234", "eval_iters": 2, "log_interval": 2}


def _numbers(flag: str, text: str, kind=float) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise Fig8Error(f"{flag} {text!r}: give comma-separated numbers") from None
    if not values or len(set(values)) != len(values) or not all(math.isfinite(v) for v in values):
        raise Fig8Error(f"{flag} {text!r}: give one or more distinct finite numbers")
    return values


def _sizes(text: str) -> list[tuple[float, float, float]]:
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        parts = item.split(":")
        try:
            if len(parts) != 3:
                raise argparse.ArgumentTypeError("")
            out.append(tuple(parse_ratio(v) for v in parts))
        except argparse.ArgumentTypeError:
            raise Fig8Error(f"--sizes {item!r}: write each size as WIDTH:DEPTH:TOKENS ratios, e.g. 4:4:2") from None
    if not out or len(set(out)) != len(out):
        raise Fig8Error(f"--sizes {text!r}: give one or more distinct sizes")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, allow_abbrev=False, description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--output", metavar="DIR", required=True, help="folder for fig8.json, fig8_table.txt, fig8.png")
    a("--work-dir", metavar="DIR", help="specs, targets, logs, metrics (default runs/fig8, with --quick "
      "runs/fig8_quick)")
    a("--global-spec", default=str(SPECS / "best_global.json"),
      help="t = 0: the best global-LR spec (default %(default)s)")
    a("--type-spec", default=str(SPECS / "best_type.json"),
      help="t = 1: the best per-type-LR spec (default %(default)s)")
    a("--ts", default="-0.5,0,0.5,1,1.5", help="positions on the line, comma-separated; must include 0 and 1; "
      "write --ts=-0.5,... (a leading minus needs the =) (default %(default)s)")
    a("--sizes", default="1:1:1,2:2:1.5,4:4:2", help="width:depth:tokens ratios to the proxy, comma-separated "
      "(default %(default)s: the proxy, a middle size, fig11's target)")
    a("--seeds", default="1234,1235", help="trainer seeds, comma-separated; losses are averaged (default %(default)s)")
    a("--eval-iters", type=positive_int, default=8, help="validation batches, as fig11 (default %(default)s)")
    a("--eval-interval", type=positive_int, help="steps between evaluations (default: once, at the end)")
    a("--log-interval", type=positive_int, default=5, help="steps between training-loss logs (default %(default)s)")
    a("--threads", type=positive_int, default=1, help="OMP_NUM_THREADS of a training run (default %(default)s)")
    a("--data-path", metavar="PREFIX", help="Megatron dataset prefix of byte tokens (default "
      "data/shakespeare_text_document if present, else built into the work folder)")
    a("--quick", action="store_true",
      help="tiny smoke configuration (about a minute): overrides --ts, --sizes and --seeds")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = parse_with_quick(build_parser(), argv, QUICK)
    if args.work_dir is None:
        args.work_dir = "runs/fig8_quick" if args.quick else "runs/fig8"
    args.ts = sorted(_numbers("--ts", args.ts))
    if 0.0 not in args.ts or 1.0 not in args.ts:
        raise Fig8Error(f"--ts {','.join(f'{t:g}' for t in args.ts)}: must include 0 (global) and 1 (per-type)")
    args.seeds = _numbers("--seeds", args.seeds, int)
    args.sizes = _sizes(args.sizes)
    for flag in ("--global-spec", "--type-spec"):
        path = Path(getattr(args, flag[2:].replace("-", "_")))
        if not path.is_file():
            raise Fig8Error(f"{flag} {str(path)!r}: no such file; give a spec (base.json)")
    out, work = Path(args.output), Path(args.work_dir)
    for flag, path in (("--output", out), ("--work-dir", work)):
        if path.exists() and not path.is_dir():
            raise Fig8Error(f"{flag}: {str(path)!r} is a file; give a folder")
    if work.resolve() == out.resolve() or out.resolve() in work.resolve().parents:
        raise Fig8Error("--work-dir: must lie outside --output (specs, logs and metrics do not belong in the results)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    def run_cli(args: argparse.Namespace, progress: Callable[[str], None]) -> dict:
        return run(args, Path(args.output), lambda line: progress(f"[{time.strftime('%H:%M:%S')}] {line}"))

    return cli_main(PROG, "fig8", argv, parse_args, run_cli, format_report, plot,
                    errors=(Fig8Error, Fig11Error), failures=(StepFailed,))


if __name__ == "__main__":
    sys.exit(main())
