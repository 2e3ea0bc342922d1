"""benchmarks/fig2_lr_transfer.py: the pure parts (LR grid parsing, argmin / drift with
diverged runs) and a --quick end-to-end smoke run whose table, JSON and PNGs are checked for
form, and whose argmin / drift fields are recomputed from the JSON losses (no assertion on
the physics)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from ._reproduction import quick_run

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("fig2_lr_transfer", REPO / "benchmarks" / "fig2_lr_transfer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- pure parts ---------------------------------------------------------------------------------
def test_parse_lrs_exponents_values_and_ranges():
    b = _bench()
    assert b.parse_lrs("-10:-8") == [2.0**-10, 2.0**-9, 2.0**-8]
    assert b.parse_lrs("-4:-3:0.5") == [2.0**-4, 2.0**-3.5, 2.0**-3]
    assert b.parse_lrs("2^-3,-5,1e-3") == sorted([2.0**-3, 2.0**-5, 1e-3])
    assert b.parse_lrs("-6,-6") == [2.0**-6]
    for bad in ("", "x", "-4:-6", "-4:-2:0"):
        with pytest.raises(b.Fig2Error):
            b.parse_lrs(bad)


def test_summarise_skips_diverged_and_measures_drift():
    b = _bench()
    lrs = [2.0**e for e in (-8, -7, -6, -5)]
    rows = [
        [3.0, 2.5, 2.6, None],  # argmin 2^-7, parabola inside
        [None, None, None, None],  # all diverged
        [2.4, 2.2, None, None],  # argmin 2^-7 next to a diverged LR: no parabola
        [2.9, 2.8, 2.7, 2.6],  # argmin at the grid edge 2^-5
    ]
    s = b.summarise(lrs, rows)
    assert s["argmin_log2"] == [-7, None, -7, -5]
    assert s["best_loss"] == [2.5, None, 2.2, 2.6]
    assert s["drift_log2"] == 2 and s["spread_log2"] == 2
    assert s["fit_log2"][1:] == [None, None, None]
    # vertex of the parabola through (-8, 3.0), (-7, 2.5), (-6, 2.6)
    assert s["fit_log2"][0] == pytest.approx(-7 + 0.5 * (3.0 - 2.6) / (3.0 - 2 * 2.5 + 2.6))
    assert s["fit_drift_log2"] is None
    assert b.summarise(lrs, [[None] * 4, [1.0] * 4])["drift_log2"] is None
    assert b.mean_over_seeds([2.0, 4.0]) == 3.0 and b.mean_over_seeds([2.0, None]) is None


def test_variants_alpha_only_in_depth_sweep():
    b = _bench()
    assert b.variants(["sp", "completedp"], [0.5, 1.0], "width") == [("sp", 0.5), ("completedp", 0.5)]
    assert b.variants(["sp", "completedp"], [0.5, 1.0], "depth") == [("sp", 0.5), ("completedp", 0.5), ("completedp", 1.0)]


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    b = _bench()
    for argv in (["--lrs", "x"], ["--alphas", "2"], ["--widths", "64,100"], ["--parameterisations", "ntk"]):
        assert b.main([*argv, "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fig2_lr_transfer: error: "), err


# --- the smoke run ------------------------------------------------------------------------------
@pytest.mark.megatron
def test_quick_run_writes_a_well_formed_table_json_and_pngs(tmp_path):
    pytest.importorskip("megatron.core")
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig2"
    proc, data, table = quick_run("fig2_lr_transfer", "fig2", out)
    for word in ("width sweep", "depth sweep", "argmin", "drift"):
        assert word in table
    lrs = data["lrs"]
    assert lrs == sorted(lrs) and data["lr_log2"] == [math.log2(v) for v in lrs]
    assert len(lrs) == 3

    for sweep_name, sweep in data["sweeps"].items():
        assert sweep_name in ("width", "depth")
        sizes = sweep["sizes"]
        assert len(sizes) >= 2 and sweep["variants"]
        for vname, v in sweep["variants"].items():
            assert len(v["loss"]) == len(sizes) and all(len(row) == len(lrs) for row in v["loss"])
            # each mean loss is the mean of the runs' eval losses (null when diverged)
            for s, row in zip(sizes, v["loss"]):
                w, d = (s, sweep["fixed"].get("num_layers")) if sweep_name == "width" else (sweep["fixed"]["hidden_size"], s)
                for lr, loss in zip(lrs, row):
                    runs = [r for r in data["runs"] if r["parameterisation"] == v["parameterisation"]
                            and r["width"] == w and r["depth"] == d and r["lr"] == lr
                            and (r["alpha"] in (None, v["alpha"]) or d == min(data["config"]["depths"]))]
                    assert len(runs) == len(data["config"]["seeds"])
                    evals = [r["eval_loss"] for r in runs]
                    if any(e is None for e in evals):
                        assert loss is None and all(r["diverged"] for r in runs if r["eval_loss"] is None)
                    else:
                        assert loss == pytest.approx(sum(evals) / len(evals))
            # argmin and drift, recomputed from the losses
            for i, row in enumerate(v["loss"]):
                finite = [(x, j) for j, x in enumerate(row) if x is not None]
                if not finite:
                    assert v["argmin_lr"][i] is None
                    continue
                j = min(finite)[1]
                assert v["argmin_lr"][i] == lrs[j] and v["argmin_log2"][i] == pytest.approx(math.log2(lrs[j]))
                assert v["best_loss"][i] == row[j]
                assert f"{row[j]:.4f}*" in table
            am = v["argmin_log2"]
            if am[0] is None or am[-1] is None:
                assert v["drift_log2"] is None
            else:
                assert v["drift_log2"] == pytest.approx(am[-1] - am[0])
            assert vname in table

    for name in ("fig2_width.png", "fig2_depth.png"):
        raw = (out / name).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 5000
        import matplotlib.image

        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400


def test_report_and_plot_with_a_diverged_run(tmp_path):
    pytest.importorskip("matplotlib")
    b = _bench()
    lrs = [2.0**-8, 2.0**-6, 2.0**-4]
    rows = [[3.0, 2.5, None], [2.8, 2.6, 2.7]]
    v = {"parameterisation": "sp", "alpha": None, "loss": rows, **b.summarise(lrs, rows)}
    result = {
        "config": {"eval_batches": 1, "batch_size": 4, "seq_length": 32, "data": "random", "steps": 3,
                   "schedule": "constant", "seeds": [0], "head_dim": 16, "threads": 1, "vocab_size": 256},
        "lrs": lrs, "trainings": 6, "seconds": 1.0,
        "sweeps": {"width": {"sizes": [32, 64], "fixed": {"num_layers": 1}, "variants": {"sp": v}}},
    }
    table = b.format_report(result)
    assert "nan" in table and "2.5000*" in table and "2.6000*" in table and "+0.00" in table
    (path,) = b.plot(result, tmp_path)
    assert path.name == "fig2_width.png" and path.read_bytes()[:4] == b"\x89PNG"
