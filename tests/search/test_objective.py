"""The proxy objective: one trainer subprocess per trial, with a fake trainer that writes
cdp-pretrain's metrics file (tests/search/fake_trainer.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from optuna.trial import TrialState  # noqa: E402

from cdp_megatron.search import DIVERGED_ATTR, best_trial  # noqa: E402
from cdp_megatron.search.objective import (  # noqa: E402
    ProxyConfigError,
    ProxyObjective,
    TrialFailed,
    counts_toward_budget,
    read_metrics,
    run_proxy,
)
from cdp_megatron.search.spaces import SearchSpace  # noqa: E402
from cdp_megatron.spec import load_spec  # noqa: E402
from ._procs import processes_mentioning

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FAKE = (sys.executable, str(HERE / "fake_trainer.py"))
BASE = load_spec(REPO / "examples" / "base.json")

optuna.logging.set_verbosity(optuna.logging.ERROR)


def _spec_text(trial: int = 0, **params) -> str:
    space = SearchSpace(BASE, "type", ["lr"])
    p = space.center() | params
    return json.dumps(space.to_spec(p, provenance={"trial": trial}).to_dict())


def _run(tmp_path, *flags, trial=0, timeout=None, **params):
    return run_proxy(FAKE, list(flags), _spec_text(trial, **params), tmp_path / f"trial_{trial}", timeout=timeout,
                     untrained_loss=math.log(384))


# ------------------------------------------------------------------------------ run_proxy


def test_ok_run_returns_the_last_validation_loss_and_keeps_the_files(tmp_path):
    res = _run(tmp_path, "--train-iters", "6", "--eval-interval", "3")
    assert res.status == "ok" and res.returncode == 0 and res.iteration == 6
    records = read_metrics(res.files["metrics"])
    evals = [r for r in records if r.get("eval")]
    assert len(evals) == 2 and res.value == evals[-1]["val_loss"]
    folder = Path(res.files["dir"])
    assert {p.name for p in folder.iterdir()} >= {"base.json", "metrics.jsonl", "log.txt"}
    assert load_spec(folder / "base.json").provenance["trial"] == 0
    log = (folder / "log.txt").read_text()
    assert "--cdp-base" in log.splitlines()[0] and "fake trainer" in log


def test_diverged_run_reports_its_last_finite_loss(tmp_path):
    res = _run(tmp_path, **{"type/output/lr": 8.0})  # past the fake's output-lr cliff
    assert res.status == "diverged" and res.returncode == 3
    last = read_metrics(res.files["metrics"])[-1]
    assert last["diverged"] and res.value == last["last_finite_loss"]


def test_timeout_kills_the_run_and_reports_the_last_loss(tmp_path):
    start = time.monotonic()
    res = _run(tmp_path, "--fake-hang-trials", "0", timeout=1.5)
    assert time.monotonic() - start < 15
    assert res.status == "timeout" and res.returncode is not None
    train = [r for r in read_metrics(res.files["metrics"]) if "lm_loss" in r]
    assert res.value == train[-1]["lm_loss"]
    assert not processes_mentioning(res.files["spec"])  # the trainer is gone


def test_crash_after_training_started(tmp_path):
    res = _run(tmp_path, "--fake-crash-trials", "0")
    assert res.status == "crashed" and res.returncode == 1 and res.value is None
    assert "illegal memory access" in res.message


def test_failure_before_training_and_a_run_without_evaluation(tmp_path):
    res = _run(tmp_path, "--fake-fail")
    assert res.status == "not-started" and res.returncode == 2
    assert "data/missing.bin not found" in res.message
    res = _run(tmp_path, "--fake-no-eval", trial=1)
    assert res.status == "not-started" and "no validation loss" in res.message


def test_missing_trainer_is_not_started(tmp_path):
    res = run_proxy([sys.executable, str(tmp_path / "nope.py")], [], _spec_text(), tmp_path / "t")
    assert res.status == "not-started" and res.returncode == 2


def test_a_trainer_command_that_cannot_start_is_not_started_and_logged(tmp_path):
    res = run_proxy([str(tmp_path / "no-such-trainer")], [], _spec_text(), tmp_path / "t")
    assert res.status == "not-started" and res.returncode is None
    assert "cannot start the trainer" in res.message and "no-such-trainer" in res.message
    assert "cannot start the trainer" in Path(res.files["log"]).read_text()


def test_read_metrics_skips_a_line_cut_short(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"iteration": 1, "lm_loss": 5.0}\n{"eval": true, "val_loss": "nan"}\n{"iteration": 2, "lm_lo')
    assert read_metrics(path) == [{"iteration": 1, "lm_loss": 5.0}, {"eval": True, "val_loss": "nan"}]
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_stale_metrics_of_an_earlier_attempt_are_removed(tmp_path):
    folder = tmp_path / "trial_0"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"eval": true, "iteration": 9, "val_loss": 0.5}\n')
    res = _run(tmp_path)
    assert res.value != 0.5 and sum(1 for r in read_metrics(res.files["metrics"]) if r.get("eval")) == 1


# --------------------------------------------------------------------------- the objective


def _objective(tmp_path, *flags, timeout=None, space=None):
    space = space or SearchSpace(BASE, "kronecker", ["lr"])
    return ProxyObjective(space, list(flags), tmp_path / "trials", command=FAKE, timeout=timeout,
                          provenance={"study": "test"})


def test_objective_sets_status_and_diverged_attributes(tmp_path):
    space = SearchSpace(BASE, "type", ["lr"])
    obj = _objective(tmp_path, space=space)
    study = optuna.create_study()
    study.enqueue_trial(space.center())
    study.enqueue_trial(space.center() | {"type/output/lr": 8.0})
    study.optimize(obj, n_trials=2)
    ok, div = study.trials
    assert ok.state == div.state == TrialState.COMPLETE
    assert ok.user_attrs["status"] == "ok" and ok.user_attrs[DIVERGED_ATTR] is False
    assert div.user_attrs["status"] == "diverged" and div.user_attrs[DIVERGED_ATTR] is True
    assert best_trial(study).number == 0
    folder = Path(ok.user_attrs["trial_dir"])
    assert folder == (tmp_path / "trials" / "trial_00000").resolve()
    spec = load_spec(folder / "base.json")
    assert spec.provenance["study"] == "test" and spec.provenance["params"] == ok.params
    assert Path(ok.user_attrs["log"]).is_file()


def test_first_trial_failing_before_training_stops_the_search(tmp_path):
    obj = _objective(tmp_path, "--fake-fail")
    study = optuna.create_study()
    with pytest.raises(ProxyConfigError, match=r"failed before training .*see .*trial_00000/log.txt"):
        study.optimize(obj, n_trials=3, catch=(TrialFailed,))
    (t,) = study.trials
    assert t.state == TrialState.FAIL and t.user_attrs["status"] == "config-error"
    assert not counts_toward_budget(t)


def test_later_failures_are_isolated_failed_trials(tmp_path):
    obj = _objective(tmp_path, "--fake-crash-trials", "1")
    study = optuna.create_study()
    study.optimize(obj, n_trials=3, catch=(TrialFailed,))
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    crashed = study.trials[1]
    assert crashed.user_attrs["status"] == "crashed" and crashed.user_attrs["log"].endswith("trial_00001/log.txt")
    assert "illegal memory access" in crashed.user_attrs["error"]
    assert counts_toward_budget(crashed)
    # Failing before training, once a trial has succeeded, is a crashed trial, not a stop.
    obj2 = _objective(tmp_path, "--fake-fail")
    study.optimize(obj2, n_trials=1, catch=(TrialFailed,))
    assert study.trials[-1].user_attrs["status"] == "crashed"


def test_a_trainer_that_cannot_start_stops_the_search_even_after_successes(tmp_path):
    study = optuna.create_study()
    study.optimize(_objective(tmp_path), n_trials=1, catch=(TrialFailed,))
    space = SearchSpace(BASE, "kronecker", ["lr"])
    missing = ProxyObjective(space, [], tmp_path / "trials", command=[str(tmp_path / "gone")])
    with pytest.raises(ProxyConfigError, match="cannot start the trainer"):
        study.optimize(missing, n_trials=1, catch=(TrialFailed,))
    assert study.trials[-1].user_attrs["status"] == "config-error"


def test_timeout_is_a_diverged_trial(tmp_path):
    obj = _objective(tmp_path, "--fake-hang-trials", "0", timeout=1.5)
    study = optuna.create_study()
    study.optimize(obj, n_trials=1)
    (t,) = study.trials
    assert t.state == TrialState.COMPLETE and t.user_attrs["status"] == "timeout" and t.user_attrs[DIVERGED_ATTR]
    assert math.isfinite(t.value)


def test_reserved_flags_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="--metrics-file is set by the search"):
        _objective(tmp_path, "--metrics-file=x.jsonl")
    with pytest.raises(ValueError, match="--cdp-base"):
        _objective(tmp_path, "--cdp-base", "b.json")


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler for the test: a shell without job control starts its
    background jobs with SIGINT ignored, and Python then keeps it ignored (a CI started with
    `cmd &` would otherwise see no KeyboardInterrupt)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_interrupt_kills_the_trainer_and_enqueues_the_point_again(tmp_path, ctrl_c_raises):
    obj = _objective(tmp_path, "--fake-interrupt-parent")
    study = optuna.create_study()
    with pytest.raises(KeyboardInterrupt):
        study.optimize(obj, n_trials=1)
    first, retry = study.trials
    assert first.state == TrialState.FAIL and first.user_attrs["status"] == "interrupted"
    assert retry.state == TrialState.WAITING and retry.user_attrs["retry_of"] == 0
    assert retry.system_attrs["fixed_params"] == first.params
    assert not counts_toward_budget(first)
    folder = Path(first.user_attrs["trial_dir"])
    assert first.user_attrs["pid"] == os.getpid() and (folder / "log.txt").exists()
    assert not processes_mentioning(str(folder / "base.json"))  # the trainer was killed
