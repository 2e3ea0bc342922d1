"""benchmarks/fig11_module_transfer.py: the pure parts (tokens to reach a loss with
interpolation, the speed-up, the never-reached and diverged cases, the metrics curves, the
study chain, bad flags) and a --quick end-to-end run through cdp-search, cdp-convert and
cdp-pretrain whose outputs are checked for form and for consistency with each other (no
assertion on the physics)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import fig11_module_transfer as f11

REPO = Path(__file__).resolve().parents[1]


# --- pure parts ---------------------------------------------------------------------------------
def test_first_reach_interpolates_between_evaluations():
    tokens, losses = [100, 200, 300, 400], [3.0, 2.5, 2.0, 1.8]
    assert f11.first_reach(tokens, losses, 2.5) == 200  # exactly on an evaluation
    assert f11.first_reach(tokens, losses, 2.25) == pytest.approx(250)  # halfway between 200 and 300
    assert f11.first_reach(tokens, losses, 1.9) == pytest.approx(350)
    assert f11.first_reach(tokens, losses, 3.5) == 100  # already there at the first evaluation
    assert f11.first_reach(tokens, losses, 1.7) is None  # never reached
    # the first crossing counts, not a later one after a bump
    assert f11.first_reach([1, 2, 3, 4], [3.0, 2.0, 2.6, 1.5], 2.5) == pytest.approx(1.5)
    # a diverged (non-finite) evaluation is skipped: interpolate from the last finite one
    assert f11.first_reach([100, 200, 300], [3.0, float("nan"), 2.0], 2.5) == pytest.approx(200)
    assert f11.first_reach([100, 200], [None, 2.0], 2.5) == 200
    assert f11.first_reach([], [], 1.0) is None


def test_speedup_against_the_baselines_final_loss():
    base = ([100, 200, 300, 400], [3.0, 2.6, 2.3, 2.2])
    faster = ([100, 200, 300, 400], [2.8, 2.4, 2.0, 1.9])  # reaches 2.2 at 250
    s = f11.speedup(base, faster)
    assert s["target_loss"] == 2.2 and s["baseline_tokens"] == 400
    assert s["tokens"] == pytest.approx(250) and s["speedup"] == pytest.approx(400 / 250)
    assert f11.speedup(base, base)["speedup"] == pytest.approx(1.0)
    slower = ([100, 200, 300, 400], [3.2, 2.9, 2.5, 2.3])
    assert f11.speedup(base, slower) == {"target_loss": 2.2, "baseline_tokens": 400, "tokens": None, "speedup": None}
    # a baseline that dipped below its final loss earlier reaches it earlier than its end
    bumpy = ([100, 200, 300, 400], [3.0, 2.1, 2.3, 2.2])
    assert f11.speedup(bumpy, bumpy)["baseline_tokens"] == pytest.approx(100 + 0.8 / 0.9 * 100)
    # a diverged baseline has no level to reach
    assert f11.speedup(([100, 200], [3.0, None]), faster)["speedup"] is None


def test_curves_from_a_metrics_file():
    records = [
        {"iteration": 5, "lm_loss": 4.0, "consumed_tokens": 2560},
        {"iteration": 10, "lm_loss": "nan"},
        {"eval": True, "iteration": 10, "val_loss": 3.5},
        {"diverged": True, "iteration": 11, "last_finite_loss": 3.9},
    ]
    c = f11.curves(records, 512)
    assert c == {"train_tokens": [2560, 5120], "train_loss": [4.0, None], "val_tokens": [5120], "val_loss": [3.5]}


def test_seed_mean_curves():
    assert f11.mean_curve([[3.0, 2.0], [1.0, 4.0]]) == [2.0, 3.0]
    assert f11.mean_curve([[3.0, 2.0, 1.0], [1.0, None]]) == [2.0, None, None]  # a seed diverged at step 2
    one = {"train_tokens": [1, 2], "train_loss": [3.0, 2.0], "val_tokens": [2], "val_loss": [2.5],
           "diverged": False, "final_val_loss": 2.5}
    two = {**one, "train_loss": [3.2, 2.2], "val_loss": [2.7], "final_val_loss": 2.7}
    m = f11.seed_mean([one, two])
    assert m["val_loss"] == [pytest.approx(2.6)] and m["final_val_loss"] == pytest.approx(2.6)
    assert m["final_train_loss"] == pytest.approx(2.1) and m["spread"] == pytest.approx(0.2) and not m["diverged"]
    bad = f11.seed_mean([one, {**two, "diverged": True, "final_val_loss": None, "val_loss": [None]}])
    assert bad["diverged"] and bad["final_val_loss"] is None and bad["spread"] is None


def test_study_chain_and_proxy_flags():
    args = f11.parse_args(["--output", "/tmp/never-written", "--search", "lr"])
    chain = f11.studies(args)
    assert [(s["space"], s["study"], s["init_from"]) for s in chain] == [
        ("global", "global-lr", None), ("type", "type-lr", "global-lr"), ("kronecker", "kron-lr", "type-lr")]
    args = f11.parse_args(["--output", "/tmp/never-written", "--kron-init", "global", "--search", "lr,init_std"])
    assert f11.studies(args)[2]["init_from"] == "global-lr+init_std"
    flags = f11.proxy_flags(args, "data/x")
    assert flags[flags.index("--hidden-size") + 1] == "64" and flags[flags.index("--eval-interval") + 1] == "150"
    spec = f11.proxy_spec(args)
    from cdp_megatron.spec import Spec

    Spec.from_dict(spec)  # a valid base.json
    assert spec["base"]["parameterisation"] == "completedp"


def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys):
    for argv in (["--hidden", "65"], ["--width", "0x"], ["--search", "lr,foo"], ["--layers", "3", "--depth", "1.5x"],
                 ["--bogus"], ["--work-dir", str(tmp_path / "o" / "w")]):
        assert f11.main([*argv, "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fig11_module_transfer: error: "), err
    assert not (tmp_path / "o").exists()


def _fake_result() -> dict:
    tok = [1024, 2048, 3072]
    runs = {}
    for space, vals in (("global", [3.0, 2.6, 2.4]), ("type", [2.9, 2.4, 2.2]), ("kronecker", [3.1, None, None])):
        runs[space] = {"train_tokens": tok, "train_loss": vals, "val_tokens": tok, "val_loss": vals, "seconds": 1.0,
                       "diverged": vals[-1] is None, "train_iters": 6, "final_val_loss": vals[-1],
                       "final_train_loss": vals[-1]}
    for space in runs:
        runs[space]["reach"] = f11.speedup((tok, runs["global"]["val_loss"]), (tok, runs[space]["val_loss"]))
        runs[space]["spread"] = None if runs[space]["diverged"] else 0.01
        runs[space]["seeds"] = [{**runs[space], "seed": seed} for seed in (1, 2)]
    studies = {s: {"study": f"{s}-lr", "space": s, "init_from": None, "trials": 2, "ok": 1, "diverged": 1,
                   "best_value": 2.5, "best_trial": 0, "seconds": 1.0, "points": [[0, "ok", 2.5], [1, "diverged", 3.0]],
                   "best_so_far": [[0, 2.5], [1, 2.5]]} for s in f11.SPACE_ORDER}
    return {"proxy": {"shape": {"hidden_size": 32, "num_layers": 1, "alpha": 0.5, "train_iters": 10,
                                "global_batch_size": 4, "seq_length": 32}, "studies": studies},
            "target": {"shape": {"hidden_size": 64, "num_layers": 2}, "ratios": {"width": 2, "depth": 2, "tokens": 1},
                       "tokens_per_step": 128, "runs": runs}, "seconds": 3.0}


def test_report_and_plot_with_a_diverged_target(tmp_path):
    pytest.importorskip("matplotlib")
    result = _fake_result()
    table = f11.format_report(result)
    assert "diverged" in table and "never" in table
    # type reaches the global's final 2.4 at its second evaluation: 3072 / 2048 tokens
    assert "1.50x" in table and "2048" in table and "1.00x" in table
    paths = f11.plot(result, tmp_path)
    assert [p.name for p in paths] == ["fig11_search.png", "fig11_target.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


# --- the smoke run ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.megatron
def test_quick_run_end_to_end(tmp_path):
    pytest.importorskip("megatron.core")
    pytest.importorskip("optuna")
    pytest.importorskip("matplotlib")
    out, work = tmp_path / "fig11", tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.fig11_module_transfer", "--quick", "--output", str(out),
         "--work-dir", str(work)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "fig11.json").read_text())  # strict JSON
    table = (out / "fig11_table.txt").read_text()
    assert table.strip() in proc.stdout

    from cdp_megatron.spec import load_spec

    # the searches: 2 trials each, chained, best = the minimum of the ok trials = the export
    studies = data["proxy"]["studies"]
    assert list(studies) == list(f11.SPACE_ORDER)
    assert [s["init_from"] for s in studies.values()] == [None, "global-lr", "type-lr"]
    for space, s in studies.items():
        assert s["trials"] == 2 == len(s["points"])
        ok = [v for _, k, v in s["points"] if k == "ok"]
        assert s["best_value"] == min(ok)
        spec = load_spec(out / s["best_spec"])
        assert spec.provenance["val_loss"] == pytest.approx(s["best_value"])
        assert spec.provenance["space"] == space
        assert f"{s['best_value']:.4f}" in table
        assert f"search {s['study']}" in proc.stderr

    # the targets: 2x wider and deeper, same tokens; curves and speed-ups recomputed
    target = data["target"]
    assert target["shape"]["hidden_size"] == 64 and target["shape"]["num_layers"] == 2
    runs = target["runs"]
    seeds = data["config"]["target_seeds"]
    base = (runs["global"]["val_tokens"], runs["global"]["val_loss"])
    for space, r in runs.items():
        assert r["val_tokens"][-1] == r["train_iters"] * target["tokens_per_step"] == 10 * 4 * 32
        if not r["diverged"]:
            assert r["final_val_loss"] == pytest.approx(r["val_loss"][-1]) and 1.0 < r["final_val_loss"] < 7.0
        assert r["reach"] == f11.speedup(base, (r["val_tokens"], r["val_loss"]))
        assert [one["seed"] for one in r["seeds"]] == seeds
        for g, one in zip(runs["global"]["seeds"], r["seeds"]):
            assert one["reach"] == f11.speedup((g["val_tokens"], g["val_loss"]), (one["val_tokens"], one["val_loss"]))
        if not r["diverged"]:
            finals = [one["final_val_loss"] for one in r["seeds"]]
            assert r["final_val_loss"] == pytest.approx(sum(finals) / len(finals))
        tgt = json.loads((out / r["target_spec"]).read_text())
        assert tgt["kind"] == "cdp-megatron target" and tgt["ratios"]["width"] == 2
        if r["reach"]["speedup"] is not None:
            assert f"{r['reach']['speedup']:.2f}x" in table
    assert runs["global"]["reach"]["speedup"] == pytest.approx(1.0) or runs["global"]["diverged"]
    assert len(seeds) == 2 and len(data["commands"]) == 3 + 1 + 3 + 3 * len(seeds)
    for name in ("cdp_megatron.search.cli", "cdp_megatron.convert", "cdp_megatron.pretrain"):
        assert any(f"-m {name} " in c for c in data["commands"])
    for name in ("fig11_search.png", "fig11_target.png", "report/loss_vs_trial.png"):
        raw = (out / name).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 5000
    assert math.isfinite(data["seconds"])
    # nothing heavy in the results folder
    assert not list(out.rglob("*.db")) and not list(out.rglob("*.bin")) and not list(out.rglob("trial_*"))
