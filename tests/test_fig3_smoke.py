"""benchmarks/fig3_batch_transfer.py: the pure parts (the rebased specs against the product's
SDE rule, the run plan, the effective-weight-decay reading, flag errors) and a --quick
end-to-end smoke run whose table, JSON and PNGs are checked for form, and whose argmin /
drift fields are recomputed from the JSON losses (no assertion on the physics)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import fig3_batch_transfer as b
from cdp_megatron import rules
from cdp_megatron.coordcheck import CoordCheckConfig

from ._reproduction import quick_run

REPO = Path(__file__).resolve().parents[1]


def _base_spec(batch=8, steps=32, lr=2.0**-7, wd=0.5):
    cfg = CoordCheckConfig(parameterisation="completedp", widths=(64,), depths=(2,), steps=steps, batch_size=batch,
                           lr=lr, weight_decay=wd)
    return b.make_spec(cfg, "cosine", 0.1)


# --- pure parts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kappa", [0.5, 2.0, 4.0])
def test_rebased_specs_follow_the_products_sde_rule(kappa):
    base = _base_spec()
    g0, batch = base.globals, int(8 * kappa)
    f = rules.sde_factors(kappa, 1.0)
    rule, factors = b.rebased_spec(base, batch, b.RULE)
    none, _ = b.rebased_spec(base, batch, b.NO_RULE)
    no_wd, _ = b.rebased_spec(base, batch, b.NO_WD_RULE)
    for spec in (rule, none, no_wd):  # fixed tokens: iterations / kappa
        assert spec.base.shape.global_batch_size == batch
        assert spec.base.shape.train_tokens == base.base.shape.train_tokens
        assert spec.base.shape.train_iters == round(32 / kappa)
        assert spec.globals.lr_warmup_fraction == g0.lr_warmup_fraction
    g = rule.globals
    assert g.lr == pytest.approx(g0.lr * math.sqrt(kappa)) and g.weight_decay == pytest.approx(g0.weight_decay * math.sqrt(kappa))
    assert g.adam_eps == pytest.approx(g0.adam_eps / math.sqrt(kappa))
    assert 1 - g.adam_beta2 == pytest.approx((1 - g0.adam_beta2) * f.one_minus_beta)
    assert factors["lr"] == pytest.approx(f.lr) and factors["iterations"] == pytest.approx(1 / kappa)
    assert none.globals == g0  # no rule: the base hyperparameters
    assert no_wd.globals.weight_decay == g0.weight_decay and no_wd.globals.lr == g.lr and no_wd.globals.adam_eps == g.adam_eps
    base_again, _ = b.rebased_spec(base, 8, b.RULE)
    assert base_again.globals == g0
    with pytest.raises(ValueError):
        b.rebased_spec(base, batch, "half rule")


def test_run_plan_shares_the_base_batch():
    args = b.parse_args(["--batches", "4,8,16", "--base-batch", "8", "--lrs=-9,-8", "--wds=-1,1", "--output", "x"])
    lr_plan = b.run_plan(args, "lr")
    assert len(lr_plan) == 2 * (1 + 2 * 2) == len(set(lr_plan))
    assert {k for k, bb, _, _ in lr_plan if bb == 8} == {"base"}
    assert {k for k, bb, _, _ in lr_plan if bb != 8} == {b.RULE, b.NO_RULE}
    wd_plan = b.run_plan(args, "wd", 2.0**-7)
    assert {k for k, *_ in wd_plan} == {"base", b.RULE, b.NO_WD_RULE}
    assert all(lr == 2.0**-7 for _, _, lr, _ in wd_plan) and len(wd_plan) == 10


def test_effective_wd_shifts_by_half_log2_kappa():
    s = {"argmin_log2": [-1.0, 0.0, None, 2.0], "fit_log2": [-0.5, 0.25, None, None]}
    e = b.effective_wd([4, 8, 16, 32], 8, s)
    assert e["argmin_log2"] == [-0.5, 0.0, None, 1.0]  # minus 0.5 log2(B / 8)
    assert e["drift_log2"] == 1.5 and e["spread_log2"] == 1.5
    assert e["fit_log2"][:2] == [0.0, 0.25] and e["fit_drift_log2"] is None


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    for argv in (["--lrs", "x"], ["--wds=-1:-3"], ["--batches", "4,16"], ["--batches", "8,24"],
                 ["--parameterisation", "sp"], ["--sweeps", "lr,batch"], ["--seeds", "0,0"], ["--width", "100"],
                 ["--wd-lr=-7,-6"]):
        assert b.main([*argv, "--output", str(tmp_path / "o")]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fig3_batch_transfer: error: "), err


# --- the smoke run ------------------------------------------------------------------------------
@pytest.mark.megatron
def test_quick_run_writes_a_well_formed_table_json_and_pngs(tmp_path):
    pytest.importorskip("megatron.core")
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig3"
    proc, data, table = quick_run("fig3_batch_transfer", "fig3", out)
    for word in ("lr sweep", "wd sweep", "argmin", "drift", "wd/sqrt(kappa)"):
        assert word in table
    batches, base = data["batches"], data["config"]["base_batch"]
    assert batches == sorted(batches) and base in batches
    assert data["kappa"] == [x / base for x in batches]
    tokens = data["config"]["train_tokens"]
    for run in data["runs"]:  # fixed token budget, the rule's hyperparameters
        assert run["steps"] * run["batch"] * data["config"]["seq_length"] == tokens
        kappa = run["batch"] / base
        if run["variant"] in (b.RULE, "base"):
            assert run["lr"] == pytest.approx(run["base_lr"] * math.sqrt(kappa))
            assert run["weight_decay"] == pytest.approx(run["base_weight_decay"] * math.sqrt(kappa))
        elif run["variant"] == b.NO_RULE:
            assert run["lr"] == run["base_lr"] and run["weight_decay"] == run["base_weight_decay"]
        else:
            assert run["lr"] == pytest.approx(run["base_lr"] * math.sqrt(kappa))
            assert run["weight_decay"] == run["base_weight_decay"]

    assert set(data["sweeps"]) == {"lr", "wd"}
    for sweep_name, sweep in data["sweeps"].items():
        grid = sweep["grid"]
        assert grid == sorted(grid) and sweep["grid_log2"] == [math.log2(v) for v in grid]
        for vname, v in sweep["variants"].items():
            assert len(v["loss"]) == len(batches) and all(len(row) == len(grid) for row in v["loss"])
            for bb, row in zip(batches, v["loss"]):  # each mean is the mean of its runs
                for x, loss in zip(grid, row):
                    key = "base" if bb == base else vname
                    lr, wd = (x, sweep["fixed"]["weight_decay"]) if sweep_name == "lr" else (sweep["fixed"]["lr"], x)
                    runs = [r for r in data["runs"] if r["variant"] == key and r["batch"] == bb
                            and r["base_lr"] == lr and r["base_weight_decay"] == wd]
                    assert len(runs) == len(data["config"]["seeds"])
                    evals = [r["eval_loss"] for r in runs]
                    assert (loss is None) if None in evals else loss == pytest.approx(sum(evals) / len(evals))
            for i, row in enumerate(v["loss"]):  # argmin and drift, recomputed from the losses
                finite = [(x, j) for j, x in enumerate(row) if x is not None]
                if finite:
                    j = min(finite)[1]
                    assert v[f"argmin_{sweep_name}"][i] == grid[j] and v["argmin_log2"][i] == pytest.approx(math.log2(grid[j]))
                    assert f"{row[j]:.4f}*" in table
            am = v["argmin_log2"]
            assert v["drift_log2"] == (None if None in (am[0], am[-1]) else pytest.approx(am[-1] - am[0]))
            assert vname in table
    eff = data["sweeps"]["wd"]["effective"]
    raw = data["sweeps"]["wd"]["variants"][b.NO_WD_RULE]["argmin_log2"]
    assert eff["argmin_log2"] == [None if a is None else pytest.approx(a - 0.5 * math.log2(k))
                                  for a, k in zip(raw, data["kappa"])]

    import matplotlib.image

    for name in ("fig3_lr.png", "fig4_wd.png"):
        raw_png = (out / name).read_bytes()
        assert raw_png[:8] == b"\x89PNG\r\n\x1a\n" and len(raw_png) > 5000
        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
