"""The argparse helpers every command line shares (standard library only)."""

import argparse
import os

import pytest

from cdp_megatron.argtypes import (
    is_number, join_negative_values, nonneg_int, output_dir_problem, output_file_problem, positive_float, positive_int,
)


def test_join_negative_values_attaches_only_negative_numbers_to_number_flags():
    takes = {"--lr", "--width"}.__contains__
    neg = lambda v: v[1:2].isdigit() or v[1:] in ("inf", "nan")  # noqa: E731
    argv = ["--lr", "-1", "--width", "-inf", "--name", "-3", "--lr", "--x", "--", "--lr", "-2"]
    assert join_negative_values(argv, takes, neg) == [
        "--lr=-1", "--width=-inf", "--name", "-3", "--lr", "--x", "--", "--lr", "-2"
    ]
    assert join_negative_values(["--lr"], takes, neg) == ["--lr"]


# A folder nobody can create anything in, root included (os.access says yes to root there).
UNWRITABLE = "/proc"
needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")


def _left_behind(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".cdp-write-check")]


def test_output_file_problem(tmp_path):
    assert output_file_problem("--out", tmp_path / "a.json", "a.json") is None
    assert not _left_behind(tmp_path)
    assert output_file_problem("--out", tmp_path, "a.json") == f"--out {tmp_path}: is a folder; give a file name, e.g. a.json"
    assert output_file_problem("--out", "", "a.json") == "--out: empty path; give a file name, e.g. a.json"
    missing = tmp_path / "no" / "a.json"
    assert output_file_problem("--out", missing, "a.json") == f"--out {missing}: folder {missing.parent} does not exist; create it first"
    # with make_parents the missing folders are fine (made later), and nothing is made now
    assert output_file_problem("--out", tmp_path / "no" / "deeper" / "a.json", "a.json", make_parents=True) is None
    assert not (tmp_path / "no").exists()
    (tmp_path / "f").write_text("x")
    assert output_file_problem("--out", tmp_path / "f" / "a.json", "a.json", make_parents=True) == (
        f"--out {tmp_path / 'f' / 'a.json'}: {tmp_path / 'f'} is a file, not a folder; choose another path")
    if os.geteuid() != 0:  # root writes anywhere a mode bit forbids
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert "Permission denied" in output_file_problem("--out", ro / "a.json", "a.json")


@needs_proc
def test_output_problems_are_found_by_trying_not_by_os_access():
    assert output_file_problem("--out", f"{UNWRITABLE}/a.json", "a.json") == (
        f"--out {UNWRITABLE}/a.json: cannot create files in {UNWRITABLE} (No such file or directory); check the "
        "permissions or choose another folder")
    assert output_dir_problem("--save", f"{UNWRITABLE}/ckpt/run1") == (
        f"--save {UNWRITABLE}/ckpt/run1: cannot create files in {UNWRITABLE} (No such file or directory); check the "
        "permissions or choose another folder")


def test_output_dir_problem(tmp_path):
    assert output_dir_problem("--save", tmp_path) is None
    assert output_dir_problem("--save", tmp_path / "new" / "deep") is None
    assert not (tmp_path / "new").exists() and not _left_behind(tmp_path)
    (tmp_path / "f").write_text("x")
    assert output_dir_problem("--save", tmp_path / "f") == f"--save {tmp_path / 'f'}: exists and is not a folder; give a folder"
    assert output_dir_problem("--save", tmp_path / "f" / "sub") == (
        f"--save {tmp_path / 'f' / 'sub'}: {tmp_path / 'f'} is a file, not a folder; choose another path")
    assert output_dir_problem("--save", "") == "--save: empty path; give a folder"
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert "Permission denied" in output_dir_problem("--save", ro / "ckpt")


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
