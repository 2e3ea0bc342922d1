"""TrustRegionSampler: the box, the incumbent, the radius schedule, divergence, seeding,
enqueued trials and asynchronous workers on one SQLite study (method.md section 6)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from optuna.distributions import (  # noqa: E402
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState  # noqa: E402

from cdp_megatron.search import (  # noqa: E402
    DIVERGED_ATTR,
    TrustRegionSampler,
    best_trial,
    trust_region_state,
)
from cdp_megatron.search.synthetic import CliffBowl, make_objective  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WIDE = FloatDistribution(2.0**-8, 2.0**8, log=True)
EPS = 1e-9

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(sampler, direction="minimize"):
    return optuna.create_study(sampler=sampler, direction=direction)


def _ask(study, space):
    """Ask a trial and sample every parameter of ``space``; returns (trial, params)."""
    trial = study.ask(space)
    return trial, dict(trial.params)


def _tell(study, trial, value, *, diverged=False):
    trial.set_user_attr(DIVERGED_ATTR, diverged)
    study.tell(trial, value)


def _assert_in_box(params, center, radius, space):
    for name, x in params.items():
        dist = space[name]
        assert dist.low <= x <= dist.high, (name, x)
        c = min(max(math.log2(center.get(name, 1.0)), math.log2(dist.low)), math.log2(dist.high))
        assert abs(math.log2(x) - c) <= radius + EPS, (name, x, center, radius)


def test_samples_stay_in_box_and_bounds():
    space = {
        "wide": WIDE,
        "narrow": FloatDistribution(1.0, 1.5, log=True),  # box [0.5, 2] clipped to bounds
        "above_one": FloatDistribution(4.0, 64.0, log=True),  # centre 1 clipped to 4
    }
    study = _study(TrustRegionSampler(seed=0, patience=4))
    objective = CliffBowl(
        names=tuple(space), optimum=(2.0, 0.3, 3.0), weights=(1.0, 1.0, 1.0), cliffs=(1.5, 9, 9)
    )
    for _ in range(60):
        state = study.sampler.state(study)
        center = state.incumbent.params if state.incumbent else {}
        trial, params = _ask(study, space)
        _assert_in_box(params, center, state.radius, space)
        result = objective.evaluate(params)
        _tell(study, trial, result.value, diverged=result.diverged)
    assert study.sampler.radius(study) < 1.0  # the run went through at least one shrink
    # Uniform on the box intersected with the bounds, not sampled then clipped (which would
    # put a point mass on the bounds).
    narrow = [t.params["narrow"] for t in study.trials]
    assert not any(x in (1.0, 1.5) for x in narrow)
    before_any = [t for t in study.trials if t.number == 0][0].params
    assert 4.0 <= before_any["above_one"] <= 8.0


def test_box_follows_incumbent():
    space = {"x": WIDE, "y": WIDE}
    study = _study(TrustRegionSampler(seed=1))
    study.add_trial(
        optuna.trial.create_trial(params={"x": 8.0, "y": 0.5}, distributions=space, value=1.0)
    )
    for _ in range(20):
        trial, params = _ask(study, space)
        assert 2 - EPS <= math.log2(params["x"]) <= 4 + EPS
        assert -2 - EPS <= math.log2(params["y"]) <= 0 + EPS
        _tell(study, trial, 2.0)  # worse: the incumbent stays
    study.add_trial(
        optuna.trial.create_trial(params={"x": 0.25, "y": 32.0}, distributions=space, value=0.5)
    )
    for _ in range(20):
        trial, params = _ask(study, space)
        assert -3 - EPS <= math.log2(params["x"]) <= -1 + EPS
        assert 4 - EPS <= math.log2(params["y"]) <= 6 + EPS
        _tell(study, trial, 2.0)
    assert best_trial(study).params == {"x": 0.25, "y": 32.0}


def test_radius_shrinks_exactly_after_patience():
    space = {"x": WIDE}
    sampler = TrustRegionSampler(seed=2, patience=3)
    study = _study(sampler)
    expected = []

    def step(value, **kw):
        trial, params = _ask(study, space)
        _tell(study, trial, value, **kw)
        expected.append(sampler.radius(study))

    step(1.0)  # first trial: improves
    step(2.0)
    step(1.0)  # equal is not an improvement
    assert expected == [1.0, 1.0, 1.0]
    step(0.5, diverged=True)  # diverged: counts, however good its last finite loss
    assert sampler.radius(study) == pytest.approx(0.7, rel=1e-12)
    step(3.0)
    step(0.9)  # improvement: counter restarts, r does not grow back
    step(3.0)
    step(3.0)
    assert sampler.radius(study) == pytest.approx(0.7, rel=1e-12)
    failed = study.ask(space)
    study.tell(failed, state=TrialState.FAIL)  # a failed trial counts too
    assert sampler.radius(study) == pytest.approx(0.49, rel=1e-12)
    state = sampler.state(study)
    assert (state.n_shrinks, state.stale, state.n_finished, state.n_diverged) == (2, 0, 9, 2)
    # New trials are drawn from the shrunk box around the incumbent (x of the 0.9 trial).
    centre = best_trial(study).params
    for _ in range(10):
        trial, params = _ask(study, space)
        _assert_in_box(params, centre, 0.49, space)
        _tell(study, trial, 5.0)


@pytest.mark.parametrize("direction, best", [("minimize", 1.0), ("maximize", 3.0)])
def test_incumbent_follows_the_study_direction(direction, best):
    study = _study(TrustRegionSampler(seed=3), direction)
    for value in (2.0, 3.0, 1.0):
        trial, _ = _ask(study, {"x": WIDE})
        _tell(study, trial, value)
    state = study.sampler.state(study)
    assert state.incumbent.values[0] == best and best_trial(study).values[0] == best
    assert state.stale == (0 if direction == "minimize" else 1)  # trials since the best


@pytest.mark.parametrize(
    "direction, good, bad", [("minimize", -100.0, 1.0), ("maximize", 100.0, -1.0)]
)
def test_diverged_trials_never_become_incumbent(direction, good, bad):
    space = {"x": WIDE}
    study = _study(TrustRegionSampler(seed=3), direction)
    trial, _ = _ask(study, space)
    _tell(study, trial, good, diverged=True)
    with pytest.raises(ValueError, match="no completed, non-diverged trial"):
        best_trial(study)
    assert study.sampler.state(study).incumbent is None
    trial, _ = _ask(study, space)
    _tell(study, trial, bad)
    pruned = study.ask(space)
    pruned.report(good, step=1)
    study.tell(pruned, state=TrialState.PRUNED)  # recorded with its last reported value
    assert study.trials[-1].value == good
    trial, _ = _ask(study, space)
    _tell(study, trial, 2 * good, diverged=True)
    assert best_trial(study).number == 1
    assert study.sampler.state(study).incumbent.number == 1
    assert study.best_trial.number != 1  # Optuna's own best would pick a diverged trial
    # ... and the box is centred on trial 1, not on a diverged one.
    centre = study.trials[1].params
    for _ in range(10):
        trial, params = _ask(study, space)
        _assert_in_box(params, centre, 1.0, space)
        _tell(study, trial, 2 * good, diverged=True)


def _history(seed, n_trials=40):
    problem = CliffBowl.random(4, seed=0)
    base = make_objective(problem)

    def objective(trial):
        trial.suggest_int("layers", 1, 8)
        trial.suggest_categorical("act", ["gelu", "relu", "swiglu"])
        return base(trial)

    study = _study(TrustRegionSampler(seed=seed, patience=5))
    study.optimize(objective, n_trials=n_trials)
    return [t.params for t in study.trials], study


def test_same_seed_same_trials():
    first, study = _history(seed=7)
    again, _ = _history(seed=7)
    other, _ = _history(seed=8)
    assert first == again
    assert first != other
    assert study.sampler.radius(study) < 1.0  # the histories went through shrinks
    assert len({tuple(sorted(p.items())) for p in first}) == len(first)


def test_non_float_params_use_independent_sampler():
    space = {
        "n": IntDistribution(1, 4),
        "c": CategoricalDistribution(["a", "b"]),
        "stepped": FloatDistribution(0.0, 1.0, step=0.25),
    }
    study = _study(TrustRegionSampler(seed=4))
    seen = []
    for _ in range(30):
        trial, params = _ask(study, space)
        seen.append(params)
        _tell(study, trial, 1.0)
    assert {p["n"] for p in seen} == {1, 2, 3, 4}
    assert {p["c"] for p in seen} == {"a", "b"}
    assert {p["stepped"] for p in seen} <= {0.0, 0.25, 0.5, 0.75, 1.0}


def test_float_param_must_be_positive():
    study = _study(TrustRegionSampler(seed=5))
    with pytest.raises(ValueError, match="log2 space"):
        study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=1)


def test_enqueued_trial_runs_first_and_becomes_centre():
    start = {"x": 16.0, "y": 0.125}
    problem = CliffBowl(
        names=("x", "y"), optimum=(4.0, -3.0), weights=(1.0, 1.0), cliffs=(9.0, 9.0), coupling=0.0
    )
    study = _study(TrustRegionSampler(seed=6))
    study.enqueue_trial(start)
    study.optimize(make_objective(problem), n_trials=15)
    assert study.trials[0].params == start
    assert best_trial(study).number == 0  # the optimum: stays the incumbent
    for t in study.trials[1:]:
        _assert_in_box(t.params, start, 1.0, {"x": WIDE, "y": WIDE})


def test_pending_enqueued_trial_is_the_centre_for_other_workers():
    start = {"x": 0.01}
    space = {"x": FloatDistribution(1e-4, 1.0, log=True)}
    study = _study(TrustRegionSampler(seed=7))
    study.enqueue_trial(start)
    running = study.ask(space)  # a worker picks up the enqueued trial and is still training
    assert running.params == start
    for _ in range(5):  # other workers sample meanwhile
        trial, params = _ask(study, space)
        _assert_in_box(params, start, 1.0, space)
        study.tell(trial, state=TrialState.FAIL)


def test_trust_region_state_rejects_multi_objective():
    study = optuna.create_study(
        directions=["minimize", "minimize"], sampler=TrustRegionSampler(seed=0)
    )
    with pytest.raises(ValueError, match="multi-objective"):
        study.sampler.radius(study)
    with pytest.raises(ValueError, match="direction"):
        trust_region_state([], optuna.study.StudyDirection.NOT_SET)


_WORKER = textwrap.dedent(
    """
    import sys, time
    import optuna
    from cdp_megatron.search import TrustRegionSampler
    from cdp_megatron.search.synthetic import CliffBowl, make_objective

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, n_trials = sys.argv[1], int(sys.argv[2])
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    study = optuna.load_study(study_name="shared", storage=storage,
                              sampler=TrustRegionSampler(seed=0, patience=4))
    objective = make_objective(CliffBowl.random(3, seed=0))

    def slow(trial):
        time.sleep(0.02)  # let the two workers interleave
        return objective(trial)

    study.optimize(slow, n_trials=n_trials)
    """
)


def test_two_processes_share_one_sqlite_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'search.db'}"
    storage = optuna.storages.RDBStorage(url)
    optuna.create_study(study_name="shared", storage=storage)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    n = 12
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), url, str(n)], env=env, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    for w in workers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err.decode()
    study = optuna.load_study(
        study_name="shared", storage=storage, sampler=TrustRegionSampler(seed=0)
    )
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(2 * n))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # Both workers use seed 0, but streams are per trial number: no two trials coincide.
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 2 * n
    # Every process derives the same state from storage.
    assert study.sampler.state(study).incumbent.number == best_trial(study).number


def test_baseline_samplers_are_optunas_own_and_unknown_names_fail():
    import optuna

    from cdp_megatron.search.sampler import baseline_sampler

    assert isinstance(baseline_sampler("random", 0), optuna.samplers.RandomSampler)
    assert isinstance(baseline_sampler("cmaes", 0), optuna.samplers.CmaEsSampler)
    assert isinstance(baseline_sampler("tpe", 0), optuna.samplers.TPESampler)
    with pytest.raises(ValueError, match="unknown baseline sampler 'grid'"):
        baseline_sampler("grid", 0)
