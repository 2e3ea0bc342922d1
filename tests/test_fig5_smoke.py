"""benchmarks/fig5_duration_transfer.py: the pure parts (the rules' factors and predictions,
rebasing a spec onto a longer horizon or a bigger batch, flag errors) and a --quick end-to-end
smoke run whose table, JSON and PNGs are checked for form, and whose argmin / shift fields are
recomputed from the JSON losses (no assertion on the physics)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import fig5_duration_transfer as f5
from cdp_megatron.coordcheck import CoordCheckConfig
from cdp_megatron.target import resolve, scaled_shape

from ._reproduction import quick_run

REPO = Path(__file__).resolve().parents[1]


def _spec(lr: float = 2.0**-7, steps: int = 50):
    cfg = CoordCheckConfig(widths=(64,), depths=(2,), steps=steps, lr=lr, batch_size=8, seq_length=64)
    return f5.make_spec(cfg, "cosine", 0.1)


# --- pure parts ---------------------------------------------------------------------------------
def test_predicted_shift_is_minus_half_log2_kappa_at_fixed_batch_and_zero_otherwise():
    ks = [1, 2, 4]
    assert f5.predicted_shift_log2([1, 1, 1], ks, [1, 1, 1]) == pytest.approx([0, -0.5, -1])
    # the rules applied on the x axis (lr x 1/sqrt(kappa)): nothing left to move
    assert f5.predicted_shift_log2([1, 1, 1], ks, [1, 2**-0.5, 0.5]) == pytest.approx([0, 0, 0])
    # horizon grown through the batch (m_B = m_D): the rules say x1
    assert f5.predicted_shift_log2(ks, ks, [1, 1, 1]) == pytest.approx([0, 0, 0])
    assert f5.predicted_lr_factor(1, 4) == pytest.approx(0.5)


@pytest.mark.parametrize("batch, kappa", [(1, 4), (4, 4), (2, 2)])
def test_rebase_with_rules_trains_exactly_the_resolved_target(batch, kappa):
    spec = _spec()
    shape = scaled_shape(spec.base.shape, batch=batch, tokens=kappa)
    rebased, factors = f5.rebase(spec, shape, f5.ROUTES["iters_rule"][1])
    target = resolve(spec, shape)
    assert rebased.base.shape == shape and rebased.base.shape.train_iters == 50 * kappa // batch
    mine = {g.key: g.hyperparameters() for g in resolve(rebased).groups}
    for g in target.groups:
        for hp, v in g.hyperparameters().items():
            assert mine[g.key][hp] == pytest.approx(v, rel=1e-12) if v is not None else mine[g.key][hp] is None
    ratio = batch / kappa
    assert factors["lr"] == pytest.approx(math.sqrt(ratio))
    assert factors["eps"] == pytest.approx(math.sqrt(1 / ratio))
    assert factors["one_minus_beta1"] == pytest.approx(ratio) and factors["one_minus_beta2"] == pytest.approx(ratio)
    # warmup is a fraction of the (new) horizon, as the target's
    assert resolve(rebased).lr_warmup_iters == target.lr_warmup_iters


def test_rebase_without_rules_keeps_the_base_hyperparameters():
    spec = _spec()
    shape = scaled_shape(spec.base.shape, tokens=4)
    rebased, factors = f5.rebase(spec, shape)
    assert rebased.globals == spec.globals and rebased.base.shape.train_iters == 200
    assert set(factors.values()) == {1.0}
    with pytest.raises(ValueError):
        f5.rebase(spec, scaled_shape(spec.base.shape, width=2), f5.ROUTES["iters_rule"][1])
    with pytest.raises(ValueError, match="not rule-scaled"):
        f5.rebase(spec, shape, ("lr", "init_std"))


def test_rebase_with_base_betas_moves_only_lr_eps_and_weight_decay():
    """iters_rule_base_betas: the rules' lr, eps and weight decay, T0's betas, group by group."""
    spec = _spec()
    shape = scaled_shape(spec.base.shape, tokens=4)
    rebased, factors = f5.rebase(spec, shape, f5.ROUTES["iters_rule_base_betas"][1])
    ruled, base = resolve(spec, shape), resolve(spec)
    assert (factors["lr"], factors["eps"]) == (pytest.approx(0.5), pytest.approx(2))
    assert factors["one_minus_beta1"] == factors["one_minus_beta2"] == 1.0
    mine = {g.key: g.hyperparameters() for g in resolve(rebased).groups}
    at_base = {g.key: g.hyperparameters() for g in base.groups}
    for g in ruled.groups:
        hps = g.hyperparameters()
        assert mine[g.key]["lr"] == pytest.approx(hps["lr"], rel=1e-12)
        assert mine[g.key]["eps"] == pytest.approx(hps["eps"], rel=1e-12)
        assert (mine[g.key]["beta1"], mine[g.key]["beta2"]) == (at_base[g.key]["beta1"], at_base[g.key]["beta2"])
        assert hps["beta1"] != at_base[g.key]["beta1"]  # the rules would have moved them


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    for argv in (["--lrs", "x"], ["--kappas", "1"], ["--kappas", "1,0"], ["--kappas", "1,a"], ["--routes", "iters,foo"],
                 ["--width", "40"], ["--seeds", "0,0"], ["--warmup", "1.5"]):
        assert f5.main([*argv, "--output", str(tmp_path / "o")]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fig5_duration_transfer: error: "), err


def test_report_and_plots_with_a_diverged_run(tmp_path):
    pytest.importorskip("matplotlib")
    lrs = [2.0**-8, 2.0**-6, 2.0**-4]
    rows = [[3.0, 2.5, None], [2.8, 2.6, 2.7]]
    s = f5.summarise(lrs, rows)
    one = {"lr": 1.0, "eps": 1.0, "weight_decay": 1.0, "one_minus_beta1": 1.0, "one_minus_beta2": 1.0}
    v = {"description": "d", "rules_applied": False, "kappas": [1, 4], "batch_mult": [1, 1], "tokens_mult": [1, 4],
         "steps": [3, 12], "batch_size": [4, 4], "factors": [one, one], "loss": rows, **s,
         "shift_log2": [0.0, 0.0], "fit_shift_log2": [0.0, None], "predicted_shift_log2": [0.0, -1.0],
         "predicted_drift_log2": -1.0, "residual_log2": [0.0, 1.0], "residual_drift_log2": 1.0}
    result = {
        "config": {"parameterisation": "completedp", "width": 32, "depth": 1, "steps": 3, "batch_size": 4,
                   "seq_length": 32, "data": "random", "schedule": "constant", "seeds": [0], "threads": 1,
                   "eval_batches": 1, "vocab_size": 256},
        "lrs": lrs, "trainings": 6, "seconds": 1.0, "routes": {"iters": v},
    }
    table = f5.format_report(result)
    assert "nan" in table and "2.5000*" in table and "2.6000*" in table and "-1.00" in table and "+1.00" in table
    paths = f5.plot(result, tmp_path)
    assert [p.name for p in paths] == ["fig5_curves.png", "fig5_optimum.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


# --- the smoke run ------------------------------------------------------------------------------
@pytest.mark.megatron
def test_quick_run_writes_a_well_formed_table_json_and_pngs(tmp_path):
    pytest.importorskip("megatron.core")
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig5"
    proc, data, table = quick_run("fig5_duration_transfer", "fig5", out)
    lrs = data["lrs"]
    assert lrs == sorted(lrs) and len(lrs) == 3
    seeds = data["config"]["seeds"]
    assert set(data["routes"]) == {"iters", "iters_rule", "batch"}
    for route, v in data["routes"].items():
        assert f"route {route}:" in table
        kappas = v["kappas"]
        assert kappas == data["config"]["kappas"] and len(v["loss"]) == len(kappas)
        for j, (k, row) in enumerate(zip(kappas, v["loss"])):
            # the horizon: kappa x tokens, through the steps or the batch
            assert v["steps"][j] * v["batch_size"][j] == k * data["config"]["steps"] * data["config"]["batch_size"]
            for lr, loss in zip(lrs, row):
                runs = [r for r in data["runs"] if [route, k] in r["cells"] and r["base_lr"] == lr]
                assert sorted(r["seed"] for r in runs) == sorted(seeds)
                assert all(r["steps"] == v["steps"][j] and r["batch_size"] == v["batch_size"][j] for r in runs)
                # the peak LR trained is the grid LR times the factor the rules applied
                assert all(r["lr"] == pytest.approx(lr * v["factors"][j]["lr"]) for r in runs)
                evals = [r["eval_loss"] for r in runs]
                if any(e is None for e in evals):
                    assert loss is None
                else:
                    assert loss == pytest.approx(sum(evals) / len(evals))
            # argmin and shift, recomputed from the losses
            finite = [(x, c) for c, x in enumerate(row) if x is not None]
            if finite:
                c = min(finite)[1]
                assert v["argmin_log2"][j] == pytest.approx(math.log2(lrs[c])) and f"{row[c]:.4f}*" in table
        am = v["argmin_log2"]
        assert v["shift_log2"] == [None if a is None or am[0] is None else pytest.approx(a - am[0]) for a in am]
        assert v["predicted_shift_log2"][0] == 0
        assert v["residual_log2"] == [None if s is None else pytest.approx(s - p) for s, p in zip(v["shift_log2"], v["predicted_shift_log2"])]
    # the rules at fixed batch: lr x 1/sqrt(kappa) applied on one route, predicted as a shift on the other
    k = data["routes"]["iters"]["kappas"][-1]
    assert data["routes"]["iters"]["predicted_drift_log2"] == pytest.approx(-0.5 * math.log2(k))
    assert data["routes"]["iters_rule"]["factors"][-1]["lr"] == pytest.approx(k**-0.5)
    assert data["routes"]["batch"]["factors"][-1]["lr"] == pytest.approx(1.0)
    # kappa = 1 is one training per (lr, seed), shared by the three routes
    assert any(len(r["cells"]) == 3 for r in data["runs"])

    import matplotlib.image

    for name in ("fig5_curves.png", "fig5_optimum.png"):
        raw = (out / name).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 5000
        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
