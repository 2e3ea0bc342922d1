"""benchmarks/fig8_interpolation.py: the pure parts (the log-LR interpolation between two specs:
exact ends, geometric mean halfway, per-depth and per-layer factors, specs that differ in more
than LRs; the argmin / vertex / gain / gap summary; bad flags) and a --quick end-to-end run
through cdp-convert and cdp-pretrain whose outputs are checked for form (no assertion on the
physics)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import fig8_interpolation as f8
from cdp_megatron.spec import Spec, load_spec

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "docs" / "results" / "fig11" / "specs"


@pytest.fixture(scope="module")
def ends() -> tuple[Spec, Spec]:
    return load_spec(SPECS / "best_global.json"), load_spec(SPECS / "best_type.json")


def _raw(spec: Spec) -> dict:
    return copy.deepcopy(spec.to_dict())


# --- the interpolation ---------------------------------------------------------------------------
def test_ends_reproduce_the_two_specs_exactly(ends):
    g, ty = ends
    for t, spec in ((0.0, g), (1.0, ty)):
        got = f8.interpolate(g, ty, t)
        assert f8.effective_lrs(got) == f8.effective_lrs(spec)  # exact, not approx
        # everything else is the global spec's (and the two agree on it)
        assert got.base == g.base and got.globals == g.globals
    # t = 0 of the fig11 pair is the global spec itself, multipliers included
    assert f8.interpolate(g, ty, 0.0).multipliers == g.multipliers


def test_halfway_is_the_geometric_mean_and_the_line_extrapolates(ends):
    g, ty = ends
    e0, e1 = f8.effective_lrs(g), f8.effective_lrs(ty)
    half = f8.effective_lrs(f8.interpolate(g, ty, 0.5))
    assert half.keys() == e0.keys()
    for k in e0:
        assert half[k] == pytest.approx(math.sqrt(e0[k] * e1[k]), rel=1e-12)
    beyond = f8.effective_lrs(f8.interpolate(g, ty, 1.5))
    for k in e0:  # lr(1.5) = lr1 * (lr1 / lr0) ** 0.5
        assert beyond[k] == pytest.approx(e1[k] * math.sqrt(e1[k] / e0[k]), rel=1e-12)
    # the per-type multipliers of the fig11 pair really differ, so the line is not a point
    assert len({round(v, 9) for v in f8.type_lr_multipliers(ty, g.globals.lr).values()}) > 5


def test_every_lr_factor_is_interpolated(ends):
    g, _ = ends
    raw = _raw(g)
    raw["global"]["lr"] = 0.004
    raw["multipliers"] = {"type": {"q": {"lr": 2.0, "weight_decay": 0.5}, "output": {"lr": 0.25}},
                          "depth": {"lr": [1.0, 4.0]}, "layer": {"mlp_up": {"lr": [0.5, 2.0]}}}
    other = _raw(g)
    other["multipliers"] = {"type": {"q": {"weight_decay": 0.5}, "v": {"lr": 3.0}}}
    a, b = Spec.from_dict(raw), Spec.from_dict(other)
    ea, eb = f8.effective_lrs(a), f8.effective_lrs(b)
    assert ea[("mlp_up", 2, "weight")] == pytest.approx(0.004 * 4.0 * 2.0)
    for t in (0.0, 0.3, 1.0, 2.0):
        got = f8.effective_lrs(f8.interpolate(a, b, t))
        for k in ea:
            assert got[k] == pytest.approx(math.exp((1 - t) * math.log(ea[k]) + t * math.log(eb[k])), rel=1e-12)
    # the non-LR multiplier both share survives
    assert f8.interpolate(a, b, 0.5).multipliers.type_mult("q", "weight_decay") == 0.5


def test_log_lerp_ends_are_exact():
    assert f8.log_lerp(0.1, 0.3, 0) == 0.1 and f8.log_lerp(0.1, 0.3, 1) == 0.3
    assert f8.log_lerp(0.008, 0.008, -0.5) == 0.008
    assert f8.log_lerp(1.0, 4.0, 0.5) == pytest.approx(2.0)


@pytest.mark.parametrize("change", [
    lambda r: r["global"].update(weight_decay=0.2),
    lambda r: r["base"].update(hidden_size=128, num_attention_heads=4, num_query_groups=4),
    lambda r: r["multipliers"]["type"]["q"].update(weight_decay=2.0),
    lambda r: r["multipliers"].update(depth={"init_std": [1.0, 2.0]}),
])
def test_specs_that_differ_in_more_than_lrs_are_refused(ends, change):
    g, ty = ends
    raw = _raw(ty)
    change(raw)
    with pytest.raises(f8.Fig8Error, match="differ in their"):
        f8.interpolate(g, Spec.from_dict(raw), 0.5)


def test_specs_that_differ_in_lr_only_are_accepted(ends):
    g, ty = ends
    raw = _raw(ty)
    raw["global"]["lr"] = 0.016  # a different global LR is just another LR factor
    raw["multipliers"]["type"]["q"] = {}  # an empty entry means 1, as an absent one
    f8.check_same_line(g, Spec.from_dict(raw))
    with pytest.raises(f8.Fig8Error, match="finite"):
        f8.interpolate(g, ty, float("nan"))


# --- the summary ---------------------------------------------------------------------------------
def test_line_summary():
    ts = [-0.5, 0.0, 0.5, 1.0, 1.5]
    s = f8.line_summary(ts, [2.3, 2.2, 2.1, 2.15, 2.3])
    assert s["argmin_t"] == 0.5 and s["min_loss"] == 2.1
    assert s["gain"] == pytest.approx(-0.05) and s["gap"] == pytest.approx(0.05)
    # vertex of the parabola through (0, 2.2), (0.5, 2.1), (1, 2.15)
    assert s["vertex_t"] == pytest.approx(0.5 + 0.5 * (2.2 - 2.15) / (2 * (2.2 - 2 * 2.1 + 2.15)))
    # an argmin at the edge of the grid has no vertex; a diverged (None) point is skipped
    s = f8.line_summary(ts, [2.3, 2.2, None, 2.0, 1.9])
    assert s["argmin_t"] == 1.5 and s["vertex_t"] is None and s["gap"] == pytest.approx(0.1)
    assert f8.line_summary(ts, [None] * 5)["argmin_t"] is None


# --- the command line ----------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--ts", "0.5,1"], "must include 0"),
    (["--ts", "0,1,x"], "comma-separated numbers"),
    (["--ts", "0,1,1"], "distinct"),
    (["--sizes", "4:4"], "WIDTH:DEPTH:TOKENS"),
    (["--sizes", "4:0:2"], "WIDTH:DEPTH:TOKENS"),
    (["--seeds", "1,a"], "comma-separated numbers"),
    (["--global-spec", "no/such.json"], "no such file"),
    (["--eval-iters", "0"], "positive integer"),
    (["--bogus"], "unrecognized"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, argv, message):
    rc = f8.main(["--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err and err.startswith("fig8_interpolation: error:")


def test_bad_inputs_fail_before_training(tmp_path, capsys, ends):
    bad = tmp_path / "bad.json"
    raw = _raw(ends[1])
    raw["global"]["weight_decay"] = 0.3
    bad.write_text(json.dumps(raw))
    rc = f8.main(["--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--type-spec", str(bad)])
    assert rc == 2 and "differ in their global section" in capsys.readouterr().err
    bad.write_text("{")
    rc = f8.main(["--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--type-spec", str(bad)])
    assert rc == 2 and "malformed JSON" in capsys.readouterr().err
    rc = f8.main(["--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--sizes", "1.25:1:1"])
    assert rc == 2 and "fractional number of heads or layers" in capsys.readouterr().err
    assert not (tmp_path / "work" / "runs").exists()


# --- end to end ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_end_to_end(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.fig8_interpolation", "--quick", "--output", str(out),
                           "--work-dir", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "fig8.json").read_text())
    assert (out / "fig8.png").stat().st_size > 0
    table = (out / "fig8_table.txt").read_text()
    assert "L(1)-L(0)" in table and "t=0.5" in table
    assert result["config"]["ts"] == [0.0, 0.5, 1.0]
    assert [s["shape"]["num_layers"] for s in result["sizes"]] == [1, 2]
    for size in result["sizes"]:
        assert [r["t"] for r in size["runs"]] == [0.0, 0.5, 1.0]
        for r in size["runs"]:
            assert r["final_val_loss"] is not None and math.isfinite(r["final_val_loss"])
        vals = [r["final_val_loss"] for r in size["runs"]]
        assert size["summary"]["min_loss"] == min(vals)
        assert size["summary"]["gain"] == pytest.approx(vals[2] - vals[0])
    # one conversion per (size, t), one training run per (size, t, seed)
    assert sum("cdp_megatron.convert" in c for c in result["commands"]) == 6
    assert sum("cdp_megatron.pretrain" in c for c in result["commands"]) == 6
    # a rerun with the same work folder reuses the finished runs
    proc = subprocess.run([sys.executable, "-m", "benchmarks.fig8_interpolation", "--quick", "--output", str(out),
                           "--work-dir", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr.count("reusing") == 6
    again = json.loads((out / "fig8.json").read_text())
    assert [r["final_val_loss"] for s in again["sizes"] for r in s["runs"]] == \
        [r["final_val_loss"] for s in result["sizes"] for r in s["runs"]]
