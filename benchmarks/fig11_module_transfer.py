"""Figures 11 a/c and 1/8 of the paper at small scale: per-module LR multipliers searched on
a tiny proxy, transferred to a wider and deeper target, against the tuned global LR.

    python -m benchmarks.fig11_module_transfer --output docs/results/fig11          # defaults
    python -m benchmarks.fig11_module_transfer --quick --output /tmp/fig11_smoke    # CI smoke

(from the repository root; needs optuna, matplotlib and megatron-core). Everything goes
through the product's own command-line tools, each run as a subprocess with this Python
(``python -m`` of the module behind each console script):

1. the proxy: a Complete(d)P base spec (``proxy_base.json``: width 64, 2 layers, 64-token
   sequences, 8 sequences a step, 150 steps by default) on the byte-level Shakespeare corpus
   (``data/shakespeare_text_document`` when present, else built with ``cdp-prepare-corpus``
   into the work folder);
2. ``cdp-search`` (trust-region sampler, one SQLite storage): ``global-lr`` (one LR
   multiplier) from the base; ``type-lr`` (one LR multiplier per type) started from the best
   global; ``kron-lr`` (type x depth, the paper's Kronecker factorisation) started from the
   best per-type result (paper Figure 11 c; ``--kron-init global`` starts it from the best
   global instead); ``--export`` writes each study's best as a base.json; then
   ``cdp-search-report`` on the storage;
3. ``cdp-convert BEST --width 4x --depth 4x --tokens 2x --format megatron-args -o
   target.json`` for each best spec;
4. ``cdp-pretrain`` with those flags (``--cdp-config target.json``), the same data and
   evaluation batches, ``--metrics-file``, once per ``--target-seeds`` seed (init and data
   order; every configuration gets the same seeds).

Speed-up (paper Figure 1 / 8: 1.32x): L* = the global run's final validation loss;
T(run) = the tokens at which run's validation curve first reaches L*, linearly interpolated
between the two evaluations around the crossing (the first evaluation's tokens when it is
already at or below L*; never reached: none); speed-up = T(global) / T(run), on the seed-mean
validation curves, and per seed (each run against the global run of its seed). A diverged
evaluation (non-finite loss) is skipped. The validation curve is evaluated every
``--target-eval-interval`` steps on the same ``--eval-iters`` batches.

Outputs in --output: ``fig11.json`` (configuration, commands, every trial's loss, the curves,
the speed-ups), ``fig11_table.txt`` (the printed table), ``fig11_search.png`` (best-so-far
loss per study against its trial number, and the chained view: all trials in the order run),
``fig11_target.png`` (train and validation loss against tokens at the target),
``specs/`` (the proxy base, the best spec of each study, the converted targets) and
``report/`` (cdp-search-report). Trial folders, logs, the storage and the data stay in
``--work-dir``. Progress on stderr. Rerunning with the same --work-dir continues the
searches (cdp-search tops a study up to its trial count) and retrains the targets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmarks.fig2_lr_transfer import _Parser, cli_main, parse_with_quick
from cdp_megatron.argtypes import positive_float, positive_int
from cdp_megatron.convert import parse_ratio, write_atomic
from cdp_megatron.search.objective import DIVERGED_EXIT_CODE, read_metrics

PROG = "fig11_module_transfer"
SPACE_ORDER = ("global", "type", "kronecker")
LABELS = {"global": "global LR", "type": "per-type LRs", "kronecker": "per-type x per-depth LRs"}
COLORS = {"global": "tab:gray", "type": "tab:blue", "kronecker": "tab:red"}
DEFAULT_DATA = Path("data/shakespeare_text_document")
# The architecture switches of the spec (cdp-convert --format megatron-args prints them for
# the target) and the flags every run shares (ByteTokenizer: 257 ids, padded to 384).
ARCH_FLAGS = ("--normalization RMSNorm --swiglu --qk-layernorm --position-embedding-type rope "
              "--untie-embeddings-and-output-weights --disable-bias-linear").split()
COMMON_FLAGS = ("--hidden-dropout 0 --attention-dropout 0 --make-vocab-size-divisible-by 192 "
                "--tokenizer-type ByteTokenizer --split 949,50,1").split()
VOCAB_SIZE = 384


class Fig11Error(ValueError):
    """Bad input; the message names the flag and the fix (exit code 2)."""


class StepFailed(RuntimeError):
    """A product command failed; the message names it and its log (exit code 1)."""


# --------------------------------------------------------------------------- pure parts


def first_reach(tokens: Sequence[float], losses: Sequence[float | None], level: float) -> float | None:
    """Tokens at which a loss curve first gets to ``level`` or below: linear interpolation
    between the last evaluation above it and the first at or below it; the first evaluation's
    tokens when it is already there; None when never reached. Non-finite (diverged) points are
    skipped."""
    prev: tuple[float, float] | None = None
    for t, v in zip(tokens, losses):
        if v is None or not math.isfinite(v):
            continue
        if v <= level:
            if prev is None:
                return float(t)
            t0, v0 = prev
            return t0 + (v0 - level) / (v0 - v) * (t - t0)
        prev = (float(t), float(v))
    return None


def speedup(baseline: tuple[Sequence[float], Sequence[float | None]],
            run: tuple[Sequence[float], Sequence[float | None]]) -> dict[str, float | None]:
    """Speed-up of ``run`` over ``baseline`` (each a (tokens, val losses) curve) in tokens to
    reach the baseline's final loss: T(baseline) / T(run); None when the run never reaches it
    or the baseline has no finite final loss."""
    finite = [v for v in baseline[1] if v is not None and math.isfinite(v)]
    if not finite or baseline[1][-1] is None or not math.isfinite(baseline[1][-1]):
        return {"target_loss": None, "baseline_tokens": None, "tokens": None, "speedup": None}
    level = float(baseline[1][-1])
    t_base = first_reach(*baseline, level)
    t_run = first_reach(*run, level)
    return {"target_loss": level, "baseline_tokens": t_base, "tokens": t_run,
            "speedup": None if t_run is None or not t_run > 0 else t_base / t_run}


def curves(records: list[dict], tokens_per_step: int) -> dict[str, list]:
    """Train and validation curves of a cdp-pretrain metrics file, against tokens."""
    train = [r for r in records if "lm_loss" in r and isinstance(r.get("iteration"), (int, float))]
    evals = [r for r in records if r.get("eval") and "val_loss" in r]

    def num(v):
        try:
            v = float(v)
        except (TypeError, ValueError):
            return None
        return v if math.isfinite(v) else None

    return {
        "train_tokens": [int(r["iteration"]) * tokens_per_step for r in train],
        "train_loss": [num(r["lm_loss"]) for r in train],
        "val_tokens": [int(r["iteration"]) * tokens_per_step for r in evals],
        "val_loss": [num(r["val_loss"]) for r in evals],
    }


def mean_curve(curves_: Sequence[Sequence[float | None]]) -> list[float | None]:
    """Pointwise mean of loss curves over seeds (same evaluation steps); None where any seed
    has no finite value (diverged, or stopped early)."""
    n = max((len(c) for c in curves_), default=0)
    out: list[float | None] = []
    for i in range(n):
        vals = [c[i] if i < len(c) else None for c in curves_]
        out.append(None if any(v is None or not math.isfinite(v) for v in vals) else sum(vals) / len(vals))
    return out


def seed_mean(per_seed: list[dict]) -> dict:
    """The seed-mean run: mean train and validation curves (tokens of the longest run) and the
    mean final losses (None when a seed diverged); ``spread``: max - min final val loss."""
    longest = max(per_seed, key=lambda r: len(r["val_tokens"]))
    finals = [r["final_val_loss"] for r in per_seed]
    ok = all(v is not None for v in finals)
    train = mean_curve([r["train_loss"] for r in per_seed])
    val = mean_curve([r["val_loss"] for r in per_seed])
    return {
        "train_tokens": max((r["train_tokens"] for r in per_seed), key=len), "train_loss": train,
        "val_tokens": longest["val_tokens"], "val_loss": val,
        "diverged": any(r["diverged"] for r in per_seed),
        "final_val_loss": val[-1] if ok and val else None,
        "final_train_loss": train[-1] if ok and train else None,
        "spread": max(finals) - min(finals) if ok else None,
    }


def proxy_spec(cfg: argparse.Namespace) -> dict:
    """The proxy's base spec (Complete(d)P, alpha 1/2; multipliers all 1)."""
    return {
        "schema_version": 1,
        "description": f"fig11 proxy: {cfg.layers} layers of width {cfg.hidden} on byte-level Shakespeare, "
                       f"{cfg.iters} steps of {cfg.batch} x {cfg.seq} tokens",
        "base": {"hidden_size": cfg.hidden, "num_layers": cfg.layers, "num_attention_heads": cfg.heads,
                 "ffn_hidden_size": cfg.ffn, "seq_length": cfg.seq, "global_batch_size": cfg.batch,
                 "train_iters": cfg.iters, "vocab_size": VOCAB_SIZE, "parameterisation": "completedp",
                 "alpha": 0.5},
        "global": {"lr": cfg.lr, "lr_warmup_fraction": 0.05, "weight_decay": 0.1},
    }


def run_flags(cfg: argparse.Namespace, data: str, eval_interval: int, log_interval: int, seed: int) -> list[str]:
    """Data, evaluation, logging and seed flags shared by proxy and target runs."""
    return [*COMMON_FLAGS, "--micro-batch-size", str(cfg.batch), "--data-path", data,
            "--eval-interval", str(eval_interval), "--eval-iters", str(cfg.eval_iters),
            "--log-interval", str(log_interval), "--seed", str(seed)]


def proxy_flags(cfg: argparse.Namespace, data: str) -> list[str]:
    shape = ["--num-layers", cfg.layers, "--hidden-size", cfg.hidden, "--num-attention-heads", cfg.heads,
             "--ffn-hidden-size", cfg.ffn, "--seq-length", cfg.seq, "--max-position-embeddings", cfg.seq,
             "--global-batch-size", cfg.batch, "--train-iters", cfg.iters]
    return [*map(str, shape), *ARCH_FLAGS, *run_flags(cfg, data, cfg.iters, max(1, cfg.iters // 4), cfg.seed)]


def studies(cfg: argparse.Namespace) -> list[dict]:
    """The three searches, in order: name, space, trials, the study it starts from."""
    search = "+".join(cfg.search)
    name = {s: f"{'kron' if s == 'kronecker' else s}-{search}" for s in SPACE_ORDER}
    init = {"global": None, "type": name["global"], "kronecker": name[cfg.kron_init]}
    trials = {"global": cfg.global_trials, "type": cfg.type_trials, "kronecker": cfg.kron_trials}
    return [{"space": s, "study": name[s], "trials": trials[s], "init_from": init[s]} for s in SPACE_ORDER]


# --------------------------------------------------------------------------- subprocesses


def product(module: str) -> list[str]:
    """The command of a console script (cdp-search = cdp_megatron.search.cli, ...) with this
    Python, so that the tool runs from this checkout's environment."""
    return [sys.executable, "-m", module]


def run_step(cmd: list[str], log: Path, progress: Callable[[str], None], *, echo: Callable[[str], bool] = lambda s: False,
             env: dict | None = None, ok_codes: tuple[int, ...] = (0,)) -> tuple[int, str, float]:
    """Run a product command, its output to ``log`` (and lines chosen by ``echo`` to the
    progress stream); returns (exit code, stdout+stderr, seconds). Any other exit code than
    ``ok_codes`` raises StepFailed with the command's last error line and the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    progress(f"$ {shlex.join(cmd)}")
    t0 = time.perf_counter()
    lines = []
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdin=subprocess.DEVNULL)
        try:
            for line in proc.stdout:
                f.write(line)
                f.flush()
                lines.append(line)
                if echo(line):
                    progress("  " + line.rstrip())
            proc.wait()
        except BaseException:
            proc.kill()
            raise
    dt = time.perf_counter() - t0
    text = "".join(lines)
    if proc.returncode not in ok_codes:
        errs = [ln for ln in text.splitlines() if "error" in ln.lower()] or text.splitlines()[-1:] or ["no output"]
        raise StepFailed(f"{cmd[2]} exited with {proc.returncode}: {errs[-1].strip()[:300]} (log: {log})")
    return proc.returncode, text, dt


# --------------------------------------------------------------------------- the experiment


def prepare_data(cfg: argparse.Namespace, work: Path, progress) -> str:
    if cfg.data_path:
        prefix = Path(cfg.data_path)
    elif Path(str(DEFAULT_DATA) + ".bin").exists():
        prefix = DEFAULT_DATA
    else:
        prefix = work / "data" / DEFAULT_DATA.name
        if not Path(str(prefix) + ".bin").exists():
            run_step([*product("cdp_megatron.data.corpus"), "--output-dir", str(prefix.parent),
                      "--tokenizer-type", "ByteTokenizer"], work / "logs" / "prepare_corpus.txt", progress,
                     echo=lambda s: s.startswith("cdp-"))
    if not (Path(str(prefix) + ".bin").exists() and Path(str(prefix) + ".idx").exists()):
        raise Fig11Error(f"--data-path {prefix}: no {prefix}.bin/.idx; give a Megatron indexed dataset prefix")
    return str(prefix.resolve())


def study_summary(storage: str, name: str) -> dict[str, Any]:
    """Every counted trial of a study (number, kind, value) and its best-so-far curve."""
    import optuna

    from cdp_megatron.search.report import _best_so_far, _points

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    points = _points(optuna.load_study(study_name=name, storage=storage))
    bx, by = _best_so_far(points)
    ok = [(v, n) for n, k, v in points if k == "ok" and v is not None]
    best = min(ok) if ok else (None, None)
    return {
        "points": [[n, k, v] for n, k, v in points],
        "best_so_far": [[x, y] for x, y in zip(bx, by)],
        "trials": len(points), "ok": sum(k == "ok" for _, k, _ in points),
        "diverged": sum(k in ("diverged", "timeout") for _, k, _ in points),
        "failed": sum(k == "failed" for _, k, _ in points),
        "best_value": best[0], "best_trial": best[1],
    }


def run(cfg: argparse.Namespace, out: Path, progress: Callable[[str], None]) -> dict:
    started = time.perf_counter()
    work = Path(cfg.work_dir).resolve()
    (out / "specs").mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, work, progress)
    base = work / "proxy_base.json"
    write_atomic(str(base), json.dumps(proxy_spec(cfg), indent=1) + "\n")
    storage = f"sqlite:///{work / 'search.db'}"
    proxy = proxy_flags(cfg, data)
    commands: list[str] = []
    result_studies: dict[str, dict] = {}
    best_specs: dict[str, Path] = {}
    env_proxy = {"OMP_NUM_THREADS": str(cfg.proxy_threads)}

    # 2. the searches
    for s in studies(cfg):
        best = work / f"best_{s['space']}.json"
        cmd = [*product("cdp_megatron.search.cli"), "--base", str(base), "--space", s["space"],
               "--search", ",".join(cfg.search), "--trials", str(s["trials"]), "--study", s["study"],
               "--storage", storage, "--output-dir", str(work / "search"), "--workers", str(cfg.workers),
               "--seed", str(cfg.search_seed), "--patience", str(cfg.patience),
               "--trial-timeout", str(cfg.trial_timeout), "--export", str(best)]
        if s["init_from"]:
            cmd += ["--init-from", s["init_from"]]
        cmd += ["--", *proxy]
        progress(f"search {s['study']}: {s['space']} space, {s['trials']} trials"
                 + (f", from the best of {s['init_from']}" if s["init_from"] else ""))
        _, _, dt = run_step(cmd, work / "logs" / f"search_{s['study']}.txt", progress,
                            echo=lambda ln: ln.startswith("[") or ln.startswith("cdp-search: study"), env=env_proxy)
        commands.append(shlex.join(cmd))
        summary = study_summary(storage, s["study"])
        result_studies[s["space"]] = {**s, **summary, "seconds": round(dt, 1), "best_spec": f"specs/best_{s['space']}.json"}
        best_specs[s["space"]] = best
        shutil.copyfile(best, out / "specs" / best.name)
    shutil.copyfile(base, out / "specs" / "proxy_base.json")
    report_cmd = [*product("cdp_megatron.search.report"), "--storage", storage, "--output", str(out / "report")]
    run_step(report_cmd, work / "logs" / "report.txt", progress)
    commands.append(shlex.join(report_cmd))

    # 3. + 4. convert and train the target
    ratios = ["--width", f"{cfg.width:g}x", "--depth", f"{cfg.depth:g}x", "--tokens", f"{cfg.tokens:g}x"]
    runs: dict[str, dict] = {}
    for space in SPACE_ORDER:
        target = work / f"target_{space}.json"
        conv = [*product("cdp_megatron.convert"), str(best_specs[space]), *ratios, "-o", str(target),
                "--format", "megatron-args"]
        _, text, _ = run_step(conv, work / "logs" / f"convert_{space}.txt", progress)
        commands.append(shlex.join(conv))
        shutil.copyfile(target, out / "specs" / target.name)
        tgt = json.loads(target.read_text())
        shape, iters = tgt["shape"], int(tgt["train_iters"])
        tokens_per_step = int(shape["global_batch_size"]) * int(shape["seq_length"])
        flags = shlex.split(next(ln for ln in text.splitlines() if "--cdp-config" in ln))
        per_seed = []
        for seed in cfg.target_seeds:
            metrics = work / "target" / space / f"seed{seed}" / "metrics.jsonl"
            metrics.unlink(missing_ok=True)  # cdp-pretrain appends
            cmd = [*product("cdp_megatron.pretrain"), *flags,
                   *run_flags(cfg, data, cfg.target_eval_interval, cfg.target_log_interval, seed),
                   "--metrics-file", str(metrics)]
            progress(f"target {space}, seed {seed}: {shape['num_layers']} layers x {shape['hidden_size']}, {iters} steps")
            rc, _, dt = run_step(cmd, metrics.parent / "log.txt", progress,
                                 echo=lambda ln: "validation at iteration" in ln,
                                 env={"OMP_NUM_THREADS": str(cfg.target_threads)}, ok_codes=(0, DIVERGED_EXIT_CODE))
            commands.append(shlex.join(cmd))
            c = curves(read_metrics(metrics), tokens_per_step)
            per_seed.append({
                "seed": seed, **c, "diverged": rc == DIVERGED_EXIT_CODE, "seconds": round(dt, 1),
                "final_val_loss": c["val_loss"][-1] if c["val_loss"] and rc == 0 else None,
                "final_train_loss": c["train_loss"][-1] if c["train_loss"] and rc == 0 else None,
            })
            progress(f"target {space}, seed {seed}: final validation loss {per_seed[-1]['final_val_loss']} ({dt:.0f} s)")
        runs[space] = {**seed_mean(per_seed), "seeds": per_seed, "train_iters": iters,
                       "seconds": round(sum(r["seconds"] for r in per_seed), 1), "target_spec": f"specs/{target.name}"}
    glob = runs["global"]
    for space in SPACE_ORDER:
        r = runs[space]
        r["reach"] = speedup((glob["val_tokens"], glob["val_loss"]), (r["val_tokens"], r["val_loss"]))
        for g, one in zip(glob["seeds"], r["seeds"]):
            one["reach"] = speedup((g["val_tokens"], g["val_loss"]), (one["val_tokens"], one["val_loss"]))
    return {
        "config": {k: v for k, v in vars(cfg).items() if k != "output"},
        "data": data,
        "proxy": {"shape": proxy_spec(cfg)["base"], "studies": result_studies},
        "target": {"shape": shape, "ratios": tgt["ratios"], "tokens_per_step": tokens_per_step, "runs": runs},
        "commands": commands,
        "seconds": round(time.perf_counter() - started, 1),
    }


# --------------------------------------------------------------------------- report


def _f(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def _speed(reach: dict) -> str:
    return "never" if reach["speedup"] is None else f"{reach['speedup']:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def format_report(result: dict) -> str:
    p, t = result["proxy"], result["target"]
    ps, ts = p["shape"], t["shape"]
    r = t["ratios"]
    out = [f"Figure 11 / 1 at small scale: proxy {ps['hidden_size']} x {ps['num_layers']} layers -> target "
           f"{ts['hidden_size']} x {ts['num_layers']} layers (width x{r['width']:g}, depth x{r['depth']:g}, "
           f"tokens x{r['tokens']:g}), completedp alpha {ps['alpha']:g}",
           "",
           f"proxy searches (final validation loss after {ps['train_iters']} steps of {ps['global_batch_size']} x "
           f"{ps['seq_length']} tokens; trust-region sampler)"]
    rows = [[s["study"], s["space"], s["init_from"] or "base", str(s["trials"]), str(s["ok"]), str(s["diverged"]),
             _f(s["best_value"]), str(s["best_trial"]), f"{s['seconds']:.0f}"] for s in p["studies"].values()]
    out += _table(["study", "space", "starts from", "trials", "ok", "diverged", "best", "trial", "seconds"], rows)
    runs = t["runs"]
    level = runs["global"]["reach"]["target_loss"]
    seeds = [r["seed"] for r in runs["global"]["seeds"]]
    out += ["", f"target ({runs['global']['train_iters']} steps of {t['tokens_per_step']} tokens, seeds "
            f"{', '.join(map(str, seeds))}; losses and speed-up on the seed-mean curves; speed-up = tokens for the "
            f"global run to reach its final validation loss {_f(level)} / tokens for this run; per seed: each run "
            "against the global run of the same seed)"]
    rows = []
    for space in SPACE_ORDER:
        run_ = runs[space]
        reach = run_["reach"]
        proxy_best = p["studies"][space]["best_value"]
        per = ", ".join(_speed(one["reach"]) for one in run_["seeds"])
        rows.append([LABELS[space], _f(proxy_best), "diverged" if run_["diverged"] else _f(run_["final_val_loss"]),
                     _f(run_["spread"]), _f(run_["final_train_loss"]),
                     "never" if reach["tokens"] is None else f"{reach['tokens']:.0f}", _speed(reach), per,
                     f"{run_['seconds']:.0f}"])
    out += _table(["multipliers", "proxy best", "target val", "seed spread", "target train", "tokens to reach",
                   "speed-up", "per seed", "seconds"], rows)
    out += ["", f"total {result['seconds']:.0f} s"]
    return "\n".join(out)


def plot(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    sts = result["proxy"]["studies"]
    fig, (ax_a, ax_c) = plt.subplots(1, 2, figsize=(12, 4.3))
    offset = 0
    for space in SPACE_ORDER:
        s = sts[space]
        bx = [x for x, _ in s["best_so_far"]]
        by = [y for _, y in s["best_so_far"]]
        if bx:
            ax_a.step(bx, by, where="post", color=COLORS[space], lw=1.8,
                      label=f"{s['study']} ({LABELS[space]}; from {s['init_from'] or 'base'})")
        ok = [(n, v) for n, k, v in s["points"] if k == "ok" and v is not None]
        bad = [(n, v) for n, k, v in s["points"] if k != "ok" and v is not None]
        ax_c.scatter([offset + n for n, _ in ok], [v for _, v in ok], s=10, color=COLORS[space], alpha=0.5)
        ax_c.scatter([offset + n for n, _ in bad], [v for _, v in bad], s=18, marker="x", color=COLORS[space])
        if bx:
            ax_c.step([offset + x for x in bx], by, where="post", color=COLORS[space], lw=1.8, label=s["study"])
        offset += s["trials"]
        ax_c.axvline(offset - 0.5, color="0.7", lw=0.8, ls=":")
    finals = [y for s in sts.values() for _, y in s["best_so_far"][:1] + s["best_so_far"][-1:]]
    if finals:
        lo, hi = min(finals), max(finals)
        pad = 0.1 * (hi - lo) or 0.05
        ax_a.set_ylim(lo - pad, hi + 3 * pad)
        ax_c.set_ylim(lo - pad, hi + 6 * pad)
    ax_a.set_title("(a) best so far, per study", fontsize=10)
    ax_c.set_title("(c) chained: global -> type -> kronecker (x: diverged)", fontsize=10)
    for ax in (ax_a, ax_c):
        ax.set_xlabel("trial" if ax is ax_a else "trial (all studies, in order)")
        ax.set_ylabel("proxy final validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ps = result["proxy"]["shape"]
    fig.suptitle(f"proxy searches: width {ps['hidden_size']}, {ps['num_layers']} layers, {ps['train_iters']} steps",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    path = out / "fig11_search.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)

    t = result["target"]
    runs = t["runs"]
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.3))
    level = runs["global"]["reach"]["target_loss"]
    vals = []
    for space in SPACE_ORDER:
        r = runs[space]
        sp = r["reach"]["speedup"]
        label = LABELS[space] + ("" if space == "global" else f" ({'never' if sp is None else f'{sp:.2f}x'})")
        ax_t.plot(r["train_tokens"], [float("nan") if v is None else v for v in r["train_loss"]],
                  color=COLORS[space], lw=1, alpha=0.8, label=LABELS[space])
        ax_v.plot(r["val_tokens"], [float("nan") if v is None else v for v in r["val_loss"]], marker="o", ms=3,
                  color=COLORS[space], label=label)
        for one in r["seeds"] if len(r["seeds"]) > 1 else []:
            ax_v.plot(one["val_tokens"], [float("nan") if v is None else v for v in one["val_loss"]], lw=0.7,
                      alpha=0.4, color=COLORS[space])
        vals += [v for v in r["val_loss"][len(r["val_loss"]) // 4:] if v is not None]
        if r["reach"]["tokens"] is not None and level is not None:
            ax_v.plot([r["reach"]["tokens"]], [level], marker="|", ms=14, mew=2, color=COLORS[space])
    if level is not None:
        ax_v.axhline(level, color="k", lw=0.8, ls="--", label="global's final val loss")
    if vals:
        ax_v.set_ylim(min(vals) - 0.03, max(vals) + 0.03)
        ax_t.set_ylim(min(vals) - 0.25, max(vals) + 0.5)
    n_seeds = len(runs["global"]["seeds"])
    for ax, what in ((ax_t, "training loss"), (ax_v, "validation loss")):
        ax.set_xlabel("tokens")
        ax.set_ylabel(what + (f" (mean of {n_seeds} seeds)" if n_seeds > 1 else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ts, rt = t["shape"], t["ratios"]
    fig.suptitle(f"target: width {ts['hidden_size']}, {ts['num_layers']} layers (x{rt['width']:g} wider, "
                 f"x{rt['depth']:g} deeper, x{rt['tokens']:g} tokens), best proxy multipliers transferred with cdp-convert",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    path = out / "fig11_target.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths


# --------------------------------------------------------------------------- CLI

QUICK = {"hidden": 32, "layers": 1, "heads": 1, "ffn": 64, "seq": 32, "batch": 4, "iters": 10, "eval_iters": 2,
         "global_trials": 2, "type_trials": 2, "kron_trials": 2, "width": 2.0, "depth": 2.0, "tokens": 1.0,
         "target_eval_interval": 5, "target_log_interval": 2, "patience": 2}


def _ratio(text: str) -> float:
    return parse_ratio(text)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, allow_abbrev=False, description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--output", metavar="DIR", required=True, help="folder for fig11.json, fig11_table.txt, PNGs, specs/, report/")
    a("--work-dir", metavar="DIR", help="trial folders, logs, storage, targets' metrics (default runs/fig11, "
      "with --quick runs/fig11_quick)")
    a("--data-path", metavar="PREFIX", help="Megatron dataset prefix of byte tokens (default data/shakespeare_text_document "
      "if present, else built into the work folder)")
    g = p.add_argument_group("proxy")
    a = g.add_argument
    a("--hidden", type=positive_int, default=64, help="proxy width (default %(default)s)")
    a("--layers", type=positive_int, default=2, help="proxy depth (default %(default)s)")
    a("--heads", type=positive_int, default=2, help="proxy attention heads (default %(default)s)")
    a("--ffn", type=positive_int, default=176, help="proxy FFN width per SwiGLU branch (default %(default)s)")
    a("--seq", type=positive_int, default=64, help="sequence length (default %(default)s)")
    a("--batch", type=positive_int, default=8, help="sequences per step, proxy and target (default %(default)s)")
    a("--iters", type=positive_int, default=150, help="proxy training steps (default %(default)s)")
    a("--lr", type=positive_float, default=0.008, help="base global LR of the proxy spec (default %(default)s)")
    a("--eval-iters", type=positive_int, default=8, help="validation batches, proxy and target (default %(default)s)")
    a("--seed", type=int, default=1234, help="trainer seed, every run (default %(default)s)")
    g = p.add_argument_group("search")
    a = g.add_argument
    a("--search", default="lr", help="hyperparameters searched, e.g. lr or lr,init_std (default %(default)s)")
    a("--global-trials", type=positive_int, default=6, help="(default %(default)s)")
    a("--type-trials", type=positive_int, default=16, help="(default %(default)s)")
    a("--kron-trials", type=positive_int, default=16, help="(default %(default)s)")
    a("--kron-init", choices=("type", "global"), default="type", help="study the kronecker search starts from "
      "(default %(default)s: paper Figure 11 c)")
    a("--patience", type=positive_int, default=6, help="trust-region patience (default %(default)s)")
    a("--search-seed", type=int, default=0, help="sampler seed (default %(default)s)")
    a("--workers", type=positive_int, default=1, help="cdp-search workers (default %(default)s)")
    a("--trial-timeout", type=positive_float, default=600, help="seconds per proxy trial (default %(default)s)")
    a("--proxy-threads", type=positive_int, default=1, help="OMP_NUM_THREADS of a proxy trial (default %(default)s)")
    g = p.add_argument_group("target")
    a = g.add_argument
    a("--width", type=_ratio, default=4.0, help="width ratio for cdp-convert (default 4x)")
    a("--depth", type=_ratio, default=4.0, help="depth ratio (default 4x)")
    a("--tokens", type=_ratio, default=2.0, help="training-tokens ratio (default 2x)")
    a("--target-eval-interval", type=positive_int, default=20, help="steps between evaluations (default %(default)s)")
    a("--target-log-interval", type=positive_int, default=5, help="steps between training-loss logs (default %(default)s)")
    a("--target-seeds", default="1234,1235", help="trainer seeds of the target runs, comma-separated; curves are "
      "averaged (default %(default)s)")
    a("--target-threads", type=positive_int, default=1, help="OMP_NUM_THREADS of a target run (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration (about a minute): overrides the sizes")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = parse_with_quick(build_parser(), argv, QUICK)
    if args.work_dir is None:
        args.work_dir = "runs/fig11_quick" if args.quick else "runs/fig11"
    try:
        args.target_seeds = [int(v) for v in args.target_seeds.split(",") if v.strip()]
    except ValueError:
        raise Fig11Error(f"--target-seeds {args.target_seeds!r}: give comma-separated integers") from None
    if not args.target_seeds or len(set(args.target_seeds)) != len(args.target_seeds):
        raise Fig11Error("--target-seeds: give one or more distinct integers")
    if args.hidden % args.heads:
        raise Fig11Error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    items = [s.strip() for s in args.search.split(",") if s.strip()]
    from cdp_megatron.search.spaces import SpaceError, parse_search

    try:
        args.search = list(parse_search(items))
    except SpaceError as e:
        raise Fig11Error(f"--search {args.search}: {e}") from None
    if args.depth * args.layers != round(args.depth * args.layers):
        raise Fig11Error(f"--depth {args.depth:g}x of {args.layers} layers is not a whole number of layers")
    out, work = Path(args.output), Path(args.work_dir)
    for flag, path in (("--output", out), ("--work-dir", work)):
        if path.exists() and not path.is_dir():
            raise Fig11Error(f"{flag}: {str(path)!r} is a file; give a folder")
    if work.resolve() == out.resolve() or out.resolve() in work.resolve().parents:
        raise Fig11Error("--work-dir: must lie outside --output (trial folders and logs do not belong in the results)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    def run_cli(args: argparse.Namespace, progress: Callable[[str], None]) -> dict:
        return run(args, Path(args.output), lambda line: progress(f"[{time.strftime('%H:%M:%S')}] {line}"))

    return cli_main(PROG, "fig11", argv, parse_args, run_cli, format_report, plot,
                    errors=(Fig11Error,), failures=(StepFailed,))


if __name__ == "__main__":
    sys.exit(main())
