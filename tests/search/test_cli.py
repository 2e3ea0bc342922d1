"""cdp-search end to end with a fake trainer (tests/search/fake_trainer.py): a small study,
resume, two workers on one SQLite study, SIGKILL and rerun, --export, baselines, and bad
input (one line, exit code 2, the study left as it was)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from optuna.trial import TrialState  # noqa: E402

from cdp_megatron import convert  # noqa: E402
from cdp_megatron.search import best_trial  # noqa: E402
from cdp_megatron.search.cli import CONFIG_ATTR, main, open_storage  # noqa: E402
from cdp_megatron.search.objective import counts_toward_budget, per_trial_tensorboard  # noqa: E402
from cdp_megatron.search.spaces import PAPER_GRID, SearchSpace, project, to_spec  # noqa: E402
from cdp_megatron.spec import load_spec  # noqa: E402
from ._procs import processes_mentioning  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
EXAMPLE = str(REPO / "examples" / "base.json")
FAKE = shlex.join([sys.executable, str(HERE / "fake_trainer.py")])

optuna.logging.set_verbosity(optuna.logging.ERROR)


def _args(tmp_path, *extra, proxy=("--train-iters", "4")):
    out = ["--output-dir", str(tmp_path / "out"), "--trainer", FAKE, *extra]
    return out + (["--", *proxy] if proxy is not None else [])


def _study(tmp_path, name):
    # open_storage: retries while another process is still creating the database
    return optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{tmp_path / 'out' / 'search.db'}"))


def _snapshot(study):
    return [(t.number, t.state, t.value, dict(t.params)) for t in study.get_trials(deepcopy=False)]


def _counted(study):
    return sum(counts_toward_budget(t) for t in study.get_trials(deepcopy=False))


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("cdp-search: error: ")
    return lines[0]


# ---------------------------------------------------------------------------- end to end


def test_small_study_resume_and_export(tmp_path, capsys):
    best_json = tmp_path / "best.json"
    rc = main(_args(tmp_path, "--base", EXAMPLE, "--study", "s", "--search", "lr,residual", "--trials", "6",
                    "--seed", "3", "--export", str(best_json)))
    out = capsys.readouterr().out
    assert rc == 0
    study = _study(tmp_path, "s")
    trials = study.get_trials()
    assert _counted(study) == 6 and len(trials) == 6
    assert trials[0].user_attrs["start"] == "base" and set(trials[0].params.values()) == {1.0}
    assert "[6/6] trial 5:" in out and "radius 1.000" in out and "best " in out
    config = study.user_attrs[CONFIG_ATTR]
    assert config["space"] == "kronecker" and config["search"] == ["lr", "residual"] and config["seed"] == 3
    for t in trials:
        folder = tmp_path / "out" / "s" / f"trial_{t.number:05d}"
        assert (folder / "base.json").is_file() and (folder / "metrics.jsonl").is_file() and (folder / "log.txt").is_file()

    # --export: a valid base.json with the best trial's multipliers and its provenance
    spec = load_spec(best_json)
    best = best_trial(study)
    assert spec.multipliers == to_spec(load_spec(EXAMPLE), best.params).multipliers
    assert spec.provenance["study"] == "s" and spec.provenance["trial"] == best.number
    assert spec.provenance["val_loss"] == best.value and spec.provenance["space"] == "kronecker"
    assert convert.main([str(best_json), "--width", "4x", "--depth", "2x"]) == 0
    capsys.readouterr()

    # Rerun with a larger total: continues, completed trials untouched, nothing repeated.
    before = _snapshot(study)
    assert main(_args(tmp_path, "--study", "s", "--trials", "9", proxy=None)) == 0
    after = _snapshot(study)
    assert after[:6] == before and len(after) == 9 and _counted(study) == 9
    assert "9/9" in capsys.readouterr().out

    # Export only (--trials 0; the storage's only study), and a rerun with nothing to do.
    again = tmp_path / "again.json"
    assert main(["--output-dir", str(tmp_path / "out"), "--trials", "0", "--export", str(again)]) == 0
    assert load_spec(again).multipliers == to_spec(load_spec(EXAMPLE), best_trial(study).params).multipliers
    assert main(_args(tmp_path, "--study", "s", proxy=None)) == 0
    assert len(study.get_trials()) == 9


def test_study_names_never_share_a_trial_folder_or_leave_the_output_dir(tmp_path, capsys):
    # "a/b" and "a_b" once both wrote to out/a_b/trial_00000 (each overwrote the other's log and
    # metrics), and "..", kept as it was, put the trial folders next to --output-dir.
    for name in ("a_b", "a/b", ".."):
        assert main(_args(tmp_path, "--base", EXAMPLE, "--study", name, "--trials", "2", "--quiet")) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(folders) == 3 and "a_b" in folders, folders
    assert not (tmp_path / "trial_00000").exists()
    for folder in folders:
        assert sorted(p.name for p in (out / folder).iterdir()) == ["trial_00000", "trial_00001"]


def test_each_trial_gets_its_own_tensorboard_folder(tmp_path, capsys):
    # --tensorboard-dir in the proxy flags once sent every trial's curves into one TensorBoard run.
    tb = tmp_path / "tb"
    assert main(_args(tmp_path, "--base", EXAMPLE, "--study", "s", "--trials", "2", "--quiet",
                      proxy=("--train-iters", "4", f"--tensorboard-dir={tb}"))) == 0
    capsys.readouterr()
    for n in (0, 1):
        command = shlex.split((tmp_path / "out" / "s" / f"trial_{n:05d}" / "log.txt").read_text().splitlines()[0][2:])
        assert f"--tensorboard-dir={tb / 's' / f'trial_{n:05d}'}" in command
    assert per_trial_tensorboard(["--tensorboard-dir", "tb", "--lr", "1"], Path("out/kron-lr/trial_00007")) == (
        ["--tensorboard-dir", str(Path("tb/kron-lr/trial_00007")), "--lr", "1"], Path("tb/kron-lr/trial_00007"))
    assert per_trial_tensorboard(["--lr", "1"], Path("out/s/trial_00000")) == (["--lr", "1"], None)


def test_two_workers_share_one_sqlite_study(tmp_path, capsys):
    rc = main(_args(tmp_path, "--base", EXAMPLE, "--study", "w", "--sampler", "random", "--trials", "10",
                    "--workers", "2", "--seed", "1", proxy=("--train-iters", "4", "--fake-sleep", "0.1")))
    assert rc == 0
    study = _study(tmp_path, "w")
    trials = study.get_trials()
    # The total is reached; two trials starting at the same instant may add one more.
    assert 10 <= _counted(study) <= 11
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both workers ran trials
    sampled = [tuple(sorted(t.params.items())) for t in trials[1:]]
    assert len(set(sampled)) == len(sampled)  # no point evaluated twice
    folders = {t.user_attrs["trial_dir"] for t in trials}
    assert len(folders) == len(trials)
    out = capsys.readouterr().out
    assert sum(line.startswith("[") for line in out.splitlines()) == len(trials)  # one line per trial


def test_rerun_after_sigkill_loses_no_completed_trial(tmp_path):
    cmd = [sys.executable, "-m", "cdp_megatron.search.cli",
           *_args(tmp_path, "--base", EXAMPLE, "--study", "k", "--trials", "8", "--quiet",
                  proxy=("--train-iters", "8", "--fake-sleep", "0.1"))]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = tmp_path / "out" / "search.db"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if db.exists():
                try:
                    study = _study(tmp_path, "k")
                except KeyError:
                    continue
                trials = study.get_trials(deepcopy=False)
                if _counted(study) >= 3 and any(t.state == TrialState.RUNNING and t.params for t in trials):
                    break
        else:
            pytest.fail("the search did not get going")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    study = _study(tmp_path, "k")
    before = _snapshot(study)
    completed = [s for s in before if s[1] == TrialState.COMPLETE]
    killed = [s for s in before if s[1] == TrialState.RUNNING]
    assert len(completed) >= 3 and len(killed) <= 1  # (0 only if it finished just before the kill)

    assert main(_args(tmp_path, "--study", "k", "--quiet", proxy=None)) == 0
    after = {t.number: t for t in study.get_trials()}
    for number, state, value, params in completed:  # nothing lost, nothing rerun
        assert after[number].state == state and after[number].value == value and after[number].params == params
    for number, _, _, params in killed:  # failed on restart and run again with its parameters
        dead = after[number]
        assert dead.state == TrialState.FAIL and dead.user_attrs["status"] == "interrupted"
        retries = [t for t in after.values() if t.user_attrs.get("retry_of") == number]
        # a trial killed while its parameters were still being sampled holds only some of
        # them (it never reached the trainer): the retry keeps those and samples the rest
        assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
        assert params.items() <= retries[0].params.items()
        assert not processes_mentioning(str(tmp_path / "out" / "k" / f"trial_{number:05d}"))  # died with the worker
    assert _counted(study) == 8
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in after.values())


# ------------------------------------------------------------------------------ samplers


@pytest.mark.parametrize("sampler", ["random", "cmaes", "tpe", "grid-global"])
def test_baseline_samplers(tmp_path, sampler, capsys):
    search = "lr,eps,beta2" if sampler == "grid-global" else "lr"
    assert main(_args(tmp_path, "--base", EXAMPLE, "--study", sampler, "--sampler", sampler, "--search", search,
                      "--trials", "4", "--quiet")) == 0
    study = _study(tmp_path, sampler)
    trials = study.get_trials()
    assert _counted(study) == 4 and "radius" not in capsys.readouterr().out
    if sampler == "grid-global":
        assert study.user_attrs[CONFIG_ATTR]["space"] == "global-grid"
        for t in trials:
            assert set(t.params) == {"grid/lr", "grid/eps", "grid/beta2"}
            assert t.params["grid/lr"] in PAPER_GRID["lr"]
    else:
        assert trials[0].user_attrs.get("start") == "base"
        names = SearchSpace(load_spec(EXAMPLE), "kronecker", ["lr"]).names
        assert all(set(t.params) == set(names) for t in trials)


def test_init_from_projects_the_best_of_another_study(tmp_path):
    assert main(_args(tmp_path, "--base", EXAMPLE, "--study", "coarse", "--space", "type", "--trials", "3",
                      "--quiet")) == 0
    assert main(_args(tmp_path, "--base", EXAMPLE, "--study", "fine", "--space", "uncoupled", "--trials", "2",
                      "--init-from", "coarse", "--quiet")) == 0
    coarse, fine = _study(tmp_path, "coarse"), _study(tmp_path, "fine")
    base = load_spec(EXAMPLE)
    expected = project(best_trial(coarse).params, SearchSpace(base, "type"), SearchSpace(base, "uncoupled")).params
    first = fine.get_trials()[0]
    assert first.params == pytest.approx(expected) and first.user_attrs["init_from"].startswith("coarse#")


def test_trial_timeout_records_a_diverged_trial(tmp_path):
    assert main(_args(tmp_path, "--base", EXAMPLE, "--study", "t", "--trials", "2", "--trial-timeout", "1.5",
                      "--quiet", proxy=("--train-iters", "4", "--fake-hang-trials", "1"))) == 0
    t = _study(tmp_path, "t").get_trials()[1]
    assert t.state == TrialState.COMPLETE and t.user_attrs["status"] == "timeout" and t.user_attrs["diverged"]


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def existing(tmp_path_factory):
    """(folder, study): a finished two-trial study in folder/out/search.db, shared by the tests
    that check it is left intact."""
    folder = tmp_path_factory.mktemp("existing")
    assert main(_args(folder, "--base", EXAMPLE, "--study", "s", "--trials", "2", "--quiet")) == 0
    return folder, _study(folder, "s")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--study", "s", "--search", "lr,momentum"], "unknown hyperparameter 'momentum'"),
        (["--study", "s", "--space", "type"], "was created with --space = kronecker, not type"),
        (["--study", "s", "--trials", "3", "--", "--train-iters", "5"], "was created with the proxy flags"),
        (["--study", "new"], "does not exist yet; give --base"),
        (["--study", "s", "--", "--metrics-file", "m.jsonl"], "--metrics-file in the proxy flags"),
        (["--study", "s", "--storage", "sqlite:////nonexistent-folder/x.db"], "cannot open"),
        (["--study", "s", "--storage", "search.db"], "not a database URL"),
        (["--study", "s", "--base", "/nonexistent/base.json"], "no such file"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_the_study_is_intact(existing, capsys, argv, message):
    folder, study = existing
    before = _snapshot(study)
    config = study.user_attrs[CONFIG_ATTR]
    capsys.readouterr()
    assert main(["--output-dir", str(folder / "out"), "--trainer", FAKE, *argv]) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert _snapshot(study) == before and study.user_attrs[CONFIG_ATTR] == config


def test_unknown_space_or_sampler_exit_2(tmp_path, capsys):
    for argv in (["--space", "per-head"], ["--sampler", "bayes"], ["--workers", "0"], ["--study", " "]):
        with pytest.raises(SystemExit) as e:
            main(["--base", EXAMPLE, "--output-dir", str(tmp_path / "out"), *argv])
        assert e.value.code == 2
        assert capsys.readouterr().err.startswith("cdp-search: error: argument ")
    assert not (tmp_path / "out").exists()  # nothing written


def test_proxy_failing_before_training_stops_with_the_log_path(existing, capsys):
    tmp_path, study = existing
    before = _snapshot(study)
    capsys.readouterr()
    rc = main(_args(tmp_path, "--base", EXAMPLE, "--study", "broken", "--trials", "5", "--quiet",
                    proxy=("--fake-fail",)))
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "failed before training" in line and "data/missing.bin not found" in line
    log = Path(line.split("see ")[-1])
    assert log.is_file() and log.name == "log.txt"
    broken = _study(tmp_path, "broken")
    (t,) = broken.get_trials()
    assert t.state == TrialState.FAIL and t.user_attrs["status"] == "config-error"
    assert _snapshot(study) == before
    # The study never started, so it takes corrected proxy flags.
    assert main(_args(tmp_path, "--study", "broken", "--quiet")) == 0
    assert _counted(broken) == 5 and broken.get_trials()[1].user_attrs.get("start") == "base"


def test_two_workers_stop_on_a_broken_proxy(tmp_path, capsys):
    rc = main(_args(tmp_path, "--base", EXAMPLE, "--study", "b", "--trials", "6", "--workers", "2", "--quiet",
                    proxy=("--fake-fail",)))
    assert rc == 2
    assert "failed before training" in _one_error_line(capsys.readouterr().err)
    assert _counted(_study(tmp_path, "b")) == 0


def test_export_without_a_stable_trial(tmp_path, capsys):
    rc = main(_args(tmp_path, "--base", EXAMPLE, "--study", "d", "--trials", "1", "--quiet",
                    "--export", str(tmp_path / "x.json"), proxy=("--fake-crash-trials", "0")))
    assert rc == 2
    assert "no completed, non-diverged trial" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x.json").exists()


def test_repeated_crashes_stop_the_worker(tmp_path, capsys):
    # Trial 0 (the base) succeeds; every later trial crashes after starting to train.
    rc = main(_args(tmp_path, "--base", EXAMPLE, "--study", "c", "--trials", "10", "--max-failures", "3", "--quiet",
                    proxy=("--fake-crash-trials", ",".join(str(i) for i in range(1, 20)))))
    assert rc == 1
    assert "3 trials in a row crashed" in capsys.readouterr().err
    assert _counted(_study(tmp_path, "c")) == 4


# ------------------------------------------------------------- bad input caught up front

# A proxy that cdp-pretrain accepts with examples/base.json (mock data: nothing to prepare).
PROXY = (
    "--num-layers 4 --hidden-size 256 --num-attention-heads 4 --ffn-hidden-size 704 --seq-length 128 "
    "--micro-batch-size 16 --global-batch-size 16 --train-iters 200 --normalization RMSNorm --swiglu "
    "--qk-layernorm --position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear "
    "--mock-data --vocab-size 256 --make-vocab-size-divisible-by 192 --eval-interval 200 --eval-iters 8"
).split()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--trainer", "/nonexistent/bin", "--", "--train-iters", "4"],
         "--trainer /nonexistent/bin: /nonexistent/bin is not an executable file or a command on PATH"),
        (["--trainer", "'unclosed", "--", "--train-iters", "4"], "--trainer 'unclosed: No closing quotation"),
        (["--trainer", "", "--", "--train-iters", "4"], "--trainer is empty"),
        # the default trainer: its own argument checks run before anything is created
        (["--trials", "1"], "the proxy flags after --: --num-layers is required"),
        (["--", *[f for f in PROXY if f != "--swiglu"]], "--base " + EXAMPLE + ": swiglu is True there"),
        (["--", *PROXY, "--help"], "--help in the proxy flags"),
        (["--", *PROXY, "--save", "ckpt"], "--save in the proxy flags: every trial would share one checkpoint folder "
                                           "and a trial would resume another trial's run (other hyperparameters); remove it"),
        (["--", *PROXY, "--load=ckpt"], "--load in the proxy flags: every trial would share"),
        (["--", *PROXY, "--exit-interval", "50"], "--exit-interval in the proxy flags: a trial would stop before "
                                                  "--train-iters and its last validation loss would count as the final "
                                                  "one; remove it (--trial-timeout limits a trial)"),
        (["--", *PROXY, "--exit-duration-in-mins=5"], "--exit-duration-in-mins in the proxy flags: a trial would stop"),
        (["--", *PROXY, "--exit-signal-handler"], "--exit-signal-handler in the proxy flags: a trial would stop"),
        (["--trials", "0"], "does not exist; --trials 0 has nothing to export"),
        (["--init-from", "nope", "--", *PROXY], "--init-from nope: no such study"),
    ],
)
def test_bad_input_creates_no_storage_and_no_trial(tmp_path, capsys, argv, message):
    assert main(["--base", EXAMPLE, "--output-dir", str(tmp_path / "out"), *argv]) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_export_path_is_checked_before_the_search(tmp_path, capsys):
    for export, message in ((tmp_path, "is a folder"), (tmp_path / "no" / "best.json", "folder")):
        assert main(_args(tmp_path, "--base", EXAMPLE, "--export", str(export))) == 2
        assert f"--export {export}: {message}" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_output_dir_that_cannot_be_made_is_refused_before_anything_runs(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    cases = [(tmp_path / "f", "exists and is not a folder; give a folder"),
             (tmp_path / "f" / "out", f"{tmp_path / 'f'} is a file, not a folder; choose another path")]
    if os.path.isdir("/proc/self"):  # nothing can be made in /proc, root included
        cases.append(("/proc/cdp_search", "cannot create files in /proc (No such file or directory); check the "
                                          "permissions or choose another folder"))
    for out, message in cases:
        argv = ["--base", EXAMPLE, "--output-dir", str(out), "--trainer", FAKE, "--", "--train-iters", "4"]
        assert main(argv) == 2
        assert _one_error_line(capsys.readouterr().err) == f"cdp-search: error: --output-dir {out}: {message}"
    # with --storage elsewhere the trials' folders still need --output-dir
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    assert main(["--base", EXAMPLE, "--storage", storage, "--output-dir", str(tmp_path / "f"), "--trainer", FAKE,
                 "--", "--train-iters", "4"]) == 2
    assert "--output-dir" in _one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_empty_bounds_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(_args(tmp_path, "--base", EXAMPLE, "--bounds", "1,1"))
    assert e.value.code == 2
    assert "LOW must be less than HIGH" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_missing_base_is_named_once(tmp_path, capsys):
    missing = str(tmp_path / "nosuch.json")
    assert main(_args(tmp_path, "--base", missing)) == 2
    assert _one_error_line(capsys.readouterr().err).count(missing) == 1


def test_valid_proxy_flags_pass_the_up_front_check():
    from cdp_megatron.search.cli import _check_proxy_flags, _spec_dict

    _check_proxy_flags(PROXY, _spec_dict(load_spec(EXAMPLE)), "--base " + EXAMPLE)


def test_export_error_counts_the_trials_as_the_summary_does(tmp_path, capsys):
    assert main(_args(tmp_path, "--base", EXAMPLE, "--study", "b", "--trials", "2", "--quiet",
                      proxy=("--fake-fail",))) == 2
    capsys.readouterr()
    assert main(["--output-dir", str(tmp_path / "out"), "--trials", "0", "--export", str(tmp_path / "x.json")]) == 2
    printed = capsys.readouterr()
    counts = "ok 0, diverged 0, timeout 0, failed 0; not counted: 1 interrupted or stopped before training"
    assert counts in printed.out and counts in _one_error_line(printed.err)
    assert not (tmp_path / "x.json").exists()
