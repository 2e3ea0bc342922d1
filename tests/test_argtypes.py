"""The argparse helpers every command line shares (standard library only)."""

import argparse
import os

import pytest

from cdp_megatron.argtypes import is_number, join_negative_values, nonneg_int, output_file_problem, positive_float, positive_int


def test_join_negative_values_attaches_only_negative_numbers_to_number_flags():
    takes = {"--lr", "--width"}.__contains__
    neg = lambda v: v[1:2].isdigit() or v[1:] in ("inf", "nan")  # noqa: E731
    argv = ["--lr", "-1", "--width", "-inf", "--name", "-3", "--lr", "--x", "--", "--lr", "-2"]
    assert join_negative_values(argv, takes, neg) == [
        "--lr=-1", "--width=-inf", "--name", "-3", "--lr", "--x", "--", "--lr", "-2"
    ]
    assert join_negative_values(["--lr"], takes, neg) == ["--lr"]


def test_output_file_problem(tmp_path):
    assert output_file_problem("--out", tmp_path / "a.json", "a.json") is None
    assert output_file_problem("--out", tmp_path, "a.json") == f"--out {tmp_path}: is a folder; give a file name, e.g. a.json"
    missing = tmp_path / "no" / "a.json"
    assert output_file_problem("--out", missing, "a.json") == f"--out {missing}: folder {missing.parent} does not exist; create it first"
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert "is not writable" in output_file_problem("--out", ro / "a.json", "a.json")


@pytest.mark.parametrize(
    "kind, text, value",
    [(positive_int, "2e3", 2000), (nonneg_int, "0", 0), (positive_float, "1e-3", 1e-3)],
)
def test_number_types_accept(kind, text, value):
    assert kind(text) == value


@pytest.mark.parametrize(
    "kind, text",
    [(positive_int, "0"), (positive_int, "-3"), (positive_int, "1.5"), (positive_int, "inf"), (nonneg_int, "-1"),
     (positive_float, "0"), (positive_float, "nan"), (positive_float, "inf"), (positive_float, "x")],
)
def test_number_types_refuse_with_argparse_errors(kind, text):
    with pytest.raises(argparse.ArgumentTypeError):
        kind(text)


def test_is_number():
    assert all(map(is_number, ["1", "-1e-3", "inf", "-nan", " 2 "])) and not any(map(is_number, ["", "x", "1,0", "2x"]))
