"""cdp-search-report: PNG plots and the summary of studies made with the fake trainer."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("matplotlib")

from cdp_megatron.search.cli import main as search, study_folder  # noqa: E402
from cdp_megatron.search.report import main as report  # noqa: E402

HERE = Path(__file__).resolve().parent
EXAMPLE = str(HERE.parents[1] / "examples" / "base.json")
FAKE = shlex.join([sys.executable, str(HERE / "fake_trainer.py")])
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    common = ["--output-dir", str(out), "--trainer", FAKE, "--base", EXAMPLE, "--quiet"]
    # A trust-region study with a crashed and diverged trials, and a random-search baseline.
    assert search([*common, "--study", "tr", "--search", "lr,residual", "--trials", "6",
                   "--", "--train-iters", "4", "--fake-crash-trials", "2"]) == 0
    assert search([*common, "--study", "rand", "--sampler", "random", "--space", "type", "--trials", "5",
                   "--", "--train-iters", "4"]) == 0
    return f"sqlite:///{out / 'search.db'}"


def test_report_writes_plots_and_summary(storage, tmp_path, capsys):
    out = tmp_path / "rep"
    assert report(["--storage", storage, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("loss_vs_trial.png", "best_so_far.png", "multipliers_tr.png", "multipliers_rand.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    assert "tr " in printed and "rand" in printed and "trust-region" in printed and "random" in printed
    assert "lr (multiplier x base" in printed and "residual (multiplier x base" in printed
    assert (out / "summary.txt").read_text().strip() in printed
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["study"]: r for r in summary["studies"]}
    assert rows["tr"]["done"] == 6 and rows["tr"]["failed"] == 1 and rows["tr"]["radius"] == 1.0
    assert rows["rand"]["radius"] is None
    tr = summary["best"]["tr"]
    assert tr["tables"]["lr"]["columns"][0] == "-" and len(tr["tables"]["lr"]["columns"]) == 5
    assert "q" in tr["tables"]["lr"]["keys"] and tr["tables"]["residual"]["keys"] == ["attention", "mlp"]


def test_report_of_chosen_studies(storage, tmp_path, capsys):
    out = tmp_path / "one"
    assert report(["--storage", storage, "--study", "rand", "--output", str(out)]) == 0
    assert (out / "multipliers_rand.png").exists() and not (out / "multipliers_tr.png").exists()
    assert "tr " not in capsys.readouterr().out.split("\n\n")[0]


def test_studies_whose_names_differ_in_odd_characters_get_their_own_plot(tmp_path, capsys):
    # "a/b" and "a_b" both wrote multipliers_a_b.png: the second overwrote the first.
    out = tmp_path / "out"
    for name in ("a_b", "a/b"):
        assert search(["--output-dir", str(out), "--trainer", FAKE, "--base", EXAMPLE, "--quiet", "--study", name,
                       "--trials", "2", "--", "--train-iters", "4"]) == 0
    assert report(["--storage", f"sqlite:///{out / 'search.db'}", "--output", str(tmp_path / "rep")]) == 0
    plots = sorted(p.name for p in (tmp_path / "rep").glob("multipliers_*.png"))
    assert plots == sorted(f"multipliers_{study_folder(n)}.png" for n in ("a_b", "a/b")) and len(set(plots)) == 2
    assert "multipliers_a_b.png" in plots
    capsys.readouterr()


def test_report_bad_input(storage, tmp_path, capsys):
    assert report(["--storage", storage, "--study", "nope", "--output", str(tmp_path / "x")]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
    missing = tmp_path / "typo.db"  # opening it would create an empty database file
    assert report(["--storage", f"sqlite:///{missing}", "--output", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == (f"cdp-search-report: error: --storage sqlite:///{missing}: {missing} does not "
                                       "exist; give the storage of a cdp-search run (by default <output-dir>/search.db)\n")
    assert report(["--storage", "sqlite:////nonexistent-folder/x.db", "--output", str(tmp_path / "x")]) == 2
    assert "/nonexistent-folder/x.db does not exist" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert report(["--storage", storage, "--output", str(tmp_path / "f")]) == 2
    assert capsys.readouterr().err == f"cdp-search-report: error: --output {tmp_path / 'f'}: exists and is not a folder; give a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
