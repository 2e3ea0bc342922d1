"""The cliffed synthetic objective and the sampler benchmark built on it."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from cdp_megatron.search.synthetic import CliffBowl, make_objective

REPO = Path(__file__).resolve().parents[2]


def _problem() -> CliffBowl:
    return CliffBowl(
        names=("lr_q", "lr_mlp", "init"),
        optimum=(0.5, -1.0, 2.0),
        weights=(0.02, 0.01, 0.005),
        cliffs=(0.25, 3.0, 7.0),
    )


def test_optimum_is_the_floor_and_stable():
    p = _problem()
    at_opt = p.evaluate({n: 2.0**c for n, c in zip(p.names, p.optimum, strict=True)})
    assert at_opt.value == pytest.approx(p.floor) and not at_opt.diverged
    off = p.evaluate([2.0**0.5, 2.0**-1.0, 2.0**2.5])
    assert not off.diverged and p.floor < off.value < p.untrained_loss


def test_bowl_is_coupled_and_saturates():
    p = _problem()
    opt = [2.0**c for c in p.optimum]
    # Shifting all multipliers together costs more than the separable sum (coupling > 0).
    together = p.evaluate([x * 2.0**-0.1 for x in opt]).value - p.floor
    apart = sum(
        p.evaluate([x * (2.0**-0.1 if i == j else 1.0) for j, x in enumerate(opt)]).value - p.floor
        for i in range(3)
    )
    assert together > apart
    far = p.evaluate([2.0**-40, 2.0**-40, 2.0**-40])
    assert not far.diverged and p.untrained_loss - 1e-3 < far.value <= p.untrained_loss


def test_cliffs_are_module_dependent():
    p = _problem()
    opt = [2.0**c for c in p.optimum]
    for i, t in enumerate(p.cliffs):
        below = list(opt)
        below[i] *= 2.0 ** (t - 1e-6)
        above = list(opt)
        above[i] *= 2.0 ** (t + 1e-6)
        assert not p.evaluate(below).diverged
        assert p.evaluate(above).diverged
    # lr_q diverges at 2^0.5 above its optimum, init only at 2^7 above it.
    assert p.evaluate([opt[0] * 1.5, opt[1], opt[2]]).diverged
    assert not p.evaluate([opt[0], opt[1], opt[2] * 100]).diverged


def test_diverged_value_is_last_finite_loss():
    p = _problem()
    opt = [2.0**c for c in p.optimum]
    values = []
    for excess in (1e-6, 0.5, 2.0, 8.0):
        r = p.evaluate([opt[0] * 2.0 ** (p.cliffs[0] + excess), opt[1], opt[2]])
        assert r.diverged and math.isfinite(r.value)
        values.append(r.value)
    at_cliff = p.evaluate([opt[0] * 2.0 ** (p.cliffs[0] - 1e-9), opt[1], opt[2]]).value
    # Just past the cliff: the loss at the cliff plus the missed annealing; further past it
    # the run blew up earlier and its last finite loss approaches the untrained loss.
    assert values[0] == pytest.approx(at_cliff + p.anneal_gap, abs=1e-4)
    assert values == sorted(values) and values[-1] < p.untrained_loss


@pytest.mark.parametrize("dim", [4, 10, 20])
def test_random_instances(dim):
    for seed in range(20):
        p = CliffBowl.random(dim, seed=seed)
        assert not p.evaluate([1.0] * dim).diverged  # the global default is stable
        assert min(p.cliffs) >= 0.25 - 1e-12 and max(p.cliffs) <= 7 + 1e-12
    assert CliffBowl.random(dim, seed=3) == CliffBowl.random(dim, seed=3)
    cliffs = [t for s in range(20) for t in CliffBowl.random(dim, seed=s).cliffs]
    assert max(cliffs) / min(cliffs) > 10  # thresholds differ by orders of magnitude in x


def test_bad_input():
    p = _problem()
    with pytest.raises(KeyError, match="unknown"):
        p.evaluate({"lr_q": 1.0, "lr_mlp": 1.0, "init": 1.0, "lr_k": 1.0})
    with pytest.raises(ValueError, match="expected 3"):
        p.evaluate([1.0, 1.0])
    with pytest.raises(ValueError, match="> 0"):
        p.evaluate([1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="same length"):
        CliffBowl(names=("a",), optimum=(0.0, 1.0), weights=(1.0,), cliffs=(1.0,))


def test_objective_marks_divergence():
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    p = _problem()
    study = optuna.create_study()
    study.enqueue_trial({"lr_q": 2.0**0.5, "lr_mlp": 0.5, "init": 4.0})
    study.enqueue_trial({"lr_q": 4.0, "lr_mlp": 0.5, "init": 4.0})
    study.optimize(make_objective(p), n_trials=2)
    ok, bad = study.trials
    assert ok.user_attrs["diverged"] is False and ok.value == pytest.approx(p.floor)
    assert bad.user_attrs["diverged"] is True and p.floor < bad.value < p.untrained_loss
    assert ok.distributions["init"].log


def test_benchmark_trust_region_beats_random(tmp_path, capsys):
    pytest.importorskip("optuna")
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location(
        "search_synthetic", REPO / "benchmarks" / "search_synthetic.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--dims", "8", "--trials", "100", "--seeds", "5", "--samplers", "trust-region,random"]
    assert bench.main([*argv, "--output", str(tmp_path)]) == 0
    assert "trust-region" in capsys.readouterr().out
    assert (tmp_path / "best_so_far.png").stat().st_size > 0
    summary = {
        r["sampler"]: r for r in json.loads((tmp_path / "results.json").read_text())["summary"]
    }
    assert summary["trust-region"]["median_best"] < summary["random"]["median_best"]
    assert summary["trust-region"]["diverged"] < summary["random"]["diverged"]
