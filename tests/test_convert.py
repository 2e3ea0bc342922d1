"""The cdp-convert command line: ratios, outputs (table, json, megatron-args, -o), --explain,
absolute targets, composition through files, and every bad input (exit code 2, one line on
stderr, no file written)."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cdp_megatron.convert import main, parse_ratio
from cdp_megatron.spec import load_spec
from cdp_megatron.target import load_target, resolve, scaled_shape

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "base.json"
GROUP_KEYS = {"type", "layer", "param", "lr", "min_lr", "weight_decay", "eps", "beta1", "beta2", "init_std"}


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """cdp-convert in a fresh interpreter, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "cdp_megatron.convert", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """main() in-process; argparse's own errors exit through SystemExit."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def write_spec(tmp_path: Path, edit=None, name="base.json") -> Path:
    raw = json.loads(EXAMPLE.read_text())
    raw.pop("$schema")
    if edit:
        edit(raw)
    p = tmp_path / name
    p.write_text(json.dumps(raw))
    return p


# --------------------------------------------------------------------------- ratios


@pytest.mark.parametrize(
    "text,value", [("4x", 4.0), ("4", 4.0), ("0.5x", 0.5), ("x4", 4.0), ("2.5", 2.5), (" 8x ", 8.0), (".25x", 0.25)]
)
def test_ratio_accepted(text, value):
    assert parse_ratio(text) == value


@pytest.mark.parametrize("text", ["0", "0x", "-1", "-2x", "abc", "", "x", "4y", "nan", "inf", "4xx4", "1e400"])
def test_ratio_rejected(text):
    # "0.5x" is in both messages: "invalid ratio ...: write it as 4x, 4, 0.5x or x4" and
    # "... must be a positive ratio such as 2x or 0.5x" (zero, negative, infinite)
    with pytest.raises(argparse.ArgumentTypeError, match="0.5x"):
        parse_ratio(text)


@pytest.mark.parametrize("text", ["0", "-1", "-2x", "-0.5x", "- x2"])
def test_ratio_not_positive_says_so(text):
    with pytest.raises(argparse.ArgumentTypeError, match="must be a positive ratio such as 2x or 0.5x"):
        parse_ratio(text)


# --------------------------------------------------------------------------- the main command


def test_width_4x_depth_4x_prints_table_and_writes_valid_target(tmp_path):
    out = tmp_path / "target.json"
    r = cli("examples/base.json", "--width", "4x", "--depth", "4x", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "alpha = 0.5" in r.stdout and "completedp" in r.stdout
    assert "hidden 1024, layers 16" in r.stdout
    for type_ in ("embedding", "q", "mlp_down", "q_norm", "final_norm", "output"):
        assert f"\n{type_} " in r.stdout
    assert "residual_mult[attention]" in r.stdout and f"wrote {out}" in r.stdout
    # the target: load_target accepts it (it re-resolves and checks every number)
    t = load_target(out)
    raw = json.loads(out.read_text())
    assert raw["schema_version"] == 1 and raw["alpha"] == 0.5 and raw["parameterisation"] == "completedp"
    assert raw["ratios"] == {"width": 4.0, "depth": 4.0, "batch": 1.0, "tokens": 1.0}
    assert raw["train_iters"] == 200 and raw["shape"]["num_layers"] == 16 and raw["shape"]["hidden_size"] == 1024
    assert set(raw["residual_mult"]) == {"attention", "mlp"}
    assert all(len(v) == 16 for v in raw["residual_mult"].values())
    types = set()
    for g in raw["groups"]:
        assert set(g) == GROUP_KEYS
        assert g["param"] in ("weight", "bias")
        assert (g["layer"] is None) == (g["type"] in ("embedding", "position_embedding", "final_norm", "output"))
        assert g["layer"] is None or 1 <= g["layer"] <= 16
        types.add(g["type"])
    assert types == {"embedding", "q", "k", "v", "attn_out", "mlp_gate", "mlp_up", "mlp_down", "attn_norm", "mlp_norm",
                     "q_norm", "k_norm", "final_norm", "output"}  # fmt: skip
    # the file equals the in-process resolution
    spec = load_spec(EXAMPLE)
    expected = resolve(spec, scaled_shape(spec.base.shape, width=4, depth=4))
    assert raw == json.loads(json.dumps(expected.to_dict()))
    assert t.groups == expected.groups
    assert [f for f in os.listdir(tmp_path)] == ["target.json"]  # no temp file left behind


def test_table_states_alpha_one(tmp_path, capsys):
    p = write_spec(tmp_path, lambda r: r["base"].update(alpha=1.0, parameterisation="completep"))
    rc, out, _ = run_main(capsys, p, "--depth", "2x")
    assert rc == 0 and "completep, alpha = 1" in out and "output_mult: 1" in out


def test_format_json(tmp_path, capsys):
    out = tmp_path / "t.json"
    rc, stdout, err = run_main(capsys, EXAMPLE, "--width", "2x", "--format", "json", "-o", out)
    assert rc == 0 and err == ""
    printed = json.loads(stdout)
    assert printed == json.loads(out.read_text())
    assert printed["kind"] == "cdp-megatron target" and all(set(g) == GROUP_KEYS for g in printed["groups"])
    # without -o nothing is written
    rc, stdout2, _ = run_main(capsys, EXAMPLE, "--width", "2x", "--format", "json")
    assert rc == 0 and json.loads(stdout2) == printed


def _megatron_parser() -> argparse.ArgumentParser:
    # The Megatron-LM flags cdp-convert may print, as Megatron's arguments.py declares them.
    p = argparse.ArgumentParser(exit_on_error=False)
    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--num-query-groups", "--ffn-hidden-size",
                 "--seq-length", "--max-position-embeddings", "--global-batch-size", "--train-iters",
                 "--lr-warmup-iters"):  # fmt: skip
        p.add_argument(flag, type=int)
    for flag in ("--lr", "--min-lr", "--weight-decay", "--adam-beta1", "--adam-beta2", "--adam-eps", "--init-method-std"):
        p.add_argument(flag, type=float)
    p.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    p.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"])
    p.add_argument("--position-embedding-type", choices=["learned_absolute", "rope", "mrope", "relative", "none"])
    for flag in ("--swiglu", "--qk-layernorm", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
                 "--group-query-attention"):  # fmt: skip
        p.add_argument(flag, action="store_true")
    p.add_argument("--cdp-config")
    return p


def test_format_megatron_args(tmp_path, capsys):
    out = tmp_path / "target.json"
    rc, stdout, err = run_main(capsys, EXAMPLE, "--width", "4x", "--depth", "2x", "--batch", "2x", "--tokens", "8x",
                               "--format", "megatron-args", "-o", out)  # fmt: skip
    # stderr: only the warning that the rule moves the betas towards 1 (m_B / m_D = 1/4)
    assert rc == 0 and err.count("\n") == 1 and err.startswith("cdp-convert: warning: the batch/duration rule"), err
    assert len(stdout.strip().splitlines()) == 1
    ns = _megatron_parser().parse_args(shlex.split(stdout))  # every flag is one Megatron knows
    t = load_target(out)
    glob = t.global_hyperparameters
    assert ns.cdp_config == str(out)
    assert (ns.hidden_size, ns.num_layers, ns.num_attention_heads, ns.ffn_hidden_size) == (1024, 8, 16, 2816)
    assert ns.global_batch_size == 32 and ns.train_iters == t.train_iters == 200 * 8 // 2
    assert ns.lr_decay_style == "cosine" and ns.lr_warmup_iters == t.lr_warmup_iters
    for key in ("lr", "min_lr", "weight_decay", "adam_eps", "adam_beta1", "adam_beta2", "init_method_std"):
        assert math.isclose(getattr(ns, key), glob[key], rel_tol=1e-5), key
    # the SDE factors are in the global values: sqrt(m_B/m_D) = 1/2
    assert math.isclose(ns.lr, 0.004 * 0.5, rel_tol=1e-5)
    assert math.isclose(ns.adam_beta1, 1 - 0.1 * 2 / 8, rel_tol=1e-5)
    assert ns.swiglu and ns.qk_layernorm and ns.untie_embeddings_and_output_weights and ns.disable_bias_linear
    assert ns.seq_length == ns.max_position_embeddings == t.shape.seq_length == 128
    assert (ns.normalization, ns.position_embedding_type) == ("RMSNorm", "rope")
    # 16 heads in 16 query groups: plain multi-head attention, no GQA flags
    assert not ns.group_query_attention and ns.num_query_groups is None
    # GQA: Megatron-LM reads --num-query-groups only together with --group-query-attention
    rc, stdout, _ = run_main(capsys, EXAMPLE, "--width", "4x", "--num-query-groups", "4", "--format", "megatron-args")
    ns = _megatron_parser().parse_args(shlex.split(stdout))
    assert rc == 0 and ns.group_query_attention and (ns.num_attention_heads, ns.num_query_groups) == (16, 4)
    # without -o the config path defaults to target.json
    rc, stdout, _ = run_main(capsys, EXAMPLE, "--format", "megatron-args")
    assert rc == 0 and _megatron_parser().parse_args(shlex.split(stdout)).cdp_config == "target.json"


def test_explain_shows_the_decomposition_and_it_multiplies_back(capsys, tmp_path):
    rc, out, _ = run_main(capsys, EXAMPLE, "--width", "4x", "--depth", "2x", "--batch", "2x", "--explain")
    assert rc == 0
    head, _, body = out.partition("explain: value = base x sde x cdp x type x depth")
    assert body, out
    lines = [l for l in body.splitlines() if l.strip()][1:]  # after the rest of the explain line
    assert lines[0].split() == ["type", "layer", "param", "hp", "value", "base", "sde", "cdp", "type_mult", "depth_mult"]
    rows = [l.split() for l in lines[2:]]
    hps = {r[3] for r in rows}
    assert hps == {"lr", "weight_decay", "eps", "1-beta1", "1-beta2", "init_std"}
    checked = 0
    for r in rows:
        value, *factors = (float(x) for x in r[4:])
        product = math.prod(factors)
        # each printed number has 4 significant digits
        assert math.isclose(product, value, rel_tol=3e-3, abs_tol=0.0), r
        checked += 1
    assert checked > 100
    # a spot check: q at layer 1, lr = base x sqrt(2) x m_N^-1 m_L^-1/2 x 0.8 x depth(1)
    q1 = next(r for r in rows if r[:4] == ["q", "1", "weight", "lr"])
    assert [float(x) for x in q1[5:]] == pytest.approx([0.004, 2**0.5, 4**-1 * 2**-0.5, 0.8, 1.2], rel=1e-3)
    # the JSON form carries the exact factors
    target = tmp_path / "t.json"
    rc, _, _ = run_main(capsys, EXAMPLE, "--width", "4x", "--depth", "2x", "--batch", "2x", "--explain", "-o", target)
    raw = json.loads(target.read_text())
    for g in raw["groups"]:
        for hp, f in g["factors"].items():
            value = 1 - g[hp] if hp.startswith("beta") else g[hp]
            assert math.isclose(f["base"] * f["sde"] * f["cdp"] * f["type"] * f["depth"], value, rel_tol=1e-12), (g, hp)


def test_per_layer_table(capsys):
    rc, out, _ = run_main(capsys, EXAMPLE, "--depth", "2x", "--per-layer")
    assert rc == 0
    q_rows = [l for l in out.splitlines() if l.startswith("q ")]
    assert len(q_rows) > 1  # the per-depth lr multipliers differ between layers


def test_absolute_targets_equal_the_ratio_form(capsys):
    ratios = ["--width", "4x", "--depth", "4x", "--batch", "2x", "--tokens", "10x"]
    rc, by_ratio, _ = run_main(capsys, EXAMPLE, *ratios, "--format", "json")
    assert rc == 0
    base_tokens = 200 * 16 * 128
    absolute = ["--hidden-size", "1024", "--num-layers", "16", "--num-attention-heads", "16", "--ffn-hidden-size", "2816",
                "--global-batch-size", "32"]  # fmt: skip
    rc, by_tokens, _ = run_main(capsys, EXAMPLE, *absolute, "--train-tokens", f"{base_tokens * 10:g}", "--format", "json")
    assert rc == 0
    iters = str(base_tokens * 10 // (32 * 128))
    rc, by_iters, _ = run_main(capsys, EXAMPLE, *absolute, "--train-iters", iters, "--format", "json")
    assert rc == 0
    assert json.loads(by_ratio) == json.loads(by_tokens) == json.loads(by_iters)
    # a hidden size alone scales heads and FFN with it, as --width does
    rc, by_hidden, _ = run_main(capsys, EXAMPLE, "--hidden-size", "1024", *ratios[2:], "--format", "json")
    assert json.loads(by_hidden) == json.loads(by_ratio)


def test_head_dim_change_warns(capsys, tmp_path):
    rc, out, err = run_main(capsys, EXAMPLE, "--hidden-size", "512", "--num-attention-heads", "4")
    assert rc == 0 and "warning: head dimension changes from 64 to 128" in out
    rc, out, err = run_main(capsys, EXAMPLE, "--hidden-size", "512", "--num-attention-heads", "4", "--format", "json")
    assert rc == 0 and "warning: head dimension" in err and json.loads(out)["warnings"]
    rc, out, err = run_main(capsys, EXAMPLE, "--width", "2x", "--format", "json")
    assert rc == 0 and err == "" and json.loads(out)["warnings"] == []


def test_one_x_changes_nothing(capsys):
    rc, a, _ = run_main(capsys, EXAMPLE, "--format", "json")
    ones = ["--width", "1x", "--depth", "x1", "--batch", "1", "--tokens", "1.0x"]
    rc2, b, _ = run_main(capsys, EXAMPLE, *ones, "--format", "json")
    assert rc == rc2 == 0 and a == b
    spec = load_spec(EXAMPLE)
    t = json.loads(a)
    assert t["ratios"] == {"width": 1.0, "depth": 1.0, "batch": 1.0, "tokens": 1.0}
    assert t["train_iters"] == 200
    assert t["groups"] == json.loads(json.dumps(resolve(spec).to_dict()))["groups"]


# --------------------------------------------------------------------------- composition through files


@pytest.mark.parametrize(
    "flags",
    [["--width"], ["--depth"], ["--batch"], ["--tokens"], ["--width", "--depth", "--batch", "--tokens"]],
    ids=["width", "depth", "batch", "tokens", "all"],
)
def test_composition_2x_then_2x_is_4x_through_files(tmp_path, capsys, flags):
    t2, t22, t4 = tmp_path / "t2.json", tmp_path / "t22.json", tmp_path / "t4.json"
    two = [x for f in flags for x in (f, "2x")]
    four = [x for f in flags for x in (f, "4x")]
    assert run_main(capsys, EXAMPLE, *two, "-o", t2)[0] == 0
    assert run_main(capsys, t2, *two, "-o", t22)[0] == 0
    assert run_main(capsys, EXAMPLE, *four, "-o", t4)[0] == 0
    a, b = json.loads(t22.read_text()), json.loads(t4.read_text())
    assert a == b
    assert a["ratios"] == {k: (4.0 if f"--{k}" in flags else 1.0) for k in ("width", "depth", "batch", "tokens")}
    # and converting a target by 1x reproduces it
    t4again = tmp_path / "t4again.json"
    assert run_main(capsys, t4, "-o", t4again)[0] == 0
    assert json.loads(t4again.read_text()) == b


def test_composition_through_subprocesses(tmp_path):
    t2, t22, t4 = tmp_path / "t2.json", tmp_path / "t22.json", tmp_path / "t4.json"
    assert cli(str(EXAMPLE), "--width", "2x", "--depth", "2", "-o", str(t2)).returncode == 0
    assert cli(str(t2), "--width", "x2", "--depth", "2x", "-o", str(t22)).returncode == 0
    assert cli(str(EXAMPLE), "--width", "4", "--depth", "4x", "-o", str(t4)).returncode == 0
    assert t22.read_text() == t4.read_text()


# --------------------------------------------------------------------------- bad input

BAD_SPECS = {
    "malformed JSON": ("{\"schema_version\": 1,", "malformed JSON"),
    "unknown type": (lambda r: r["multipliers"]["type"].update(qkv={"lr": 2.0}), "multipliers.type.qkv"),
    "wrong depth length": (lambda r: r["multipliers"]["depth"].update(lr=[1.0, 1.0]), "multipliers.depth.lr"),
    "nan multiplier": ("NAN", "multipliers.type.q.lr"),
    "unknown schema version": (lambda r: r.update(schema_version=7), "schema_version"),
    "hidden not divisible by heads": (lambda r: r["base"].update(num_attention_heads=3), "base.hidden_size"),
    "beta outside [0, 1)": (lambda r: r["global"].update(adam_beta2=1.0), "global.adam_beta2"),
}


def _bad_spec_file(tmp_path: Path, case: str) -> Path:
    edit, _ = BAD_SPECS[case]
    if edit == "NAN":
        p = write_spec(tmp_path, name="in.json")
        p.write_text(p.read_text().replace('"lr": 0.8', '"lr": NaN', 1))
        return p
    if isinstance(edit, str):
        p = tmp_path / "in.json"
        p.write_text(edit)
        return p
    return write_spec(tmp_path, edit, name="in.json")


def _assert_clean_failure(rc, out, err, words, outdir: Path, inputs: set[str]):
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cdp-convert: error: "), err
    for w in words:
        assert w in lines[0], (w, err)
    assert out == ""
    assert set(os.listdir(outdir)) == inputs, "an output or temporary file was left behind"


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_spec_file(tmp_path, capsys, case):
    src = _bad_spec_file(tmp_path, case)
    rc, out, err = run_main(capsys, src, "--width", "2x", "-o", tmp_path / "target.json")
    _assert_clean_failure(rc, out, err, [BAD_SPECS[case][1]], tmp_path, {"in.json"})


BAD_ARGS = {
    "bad ratio abc": (["--width", "abc"], ["--width", "abc"]),
    "zero ratio": (["--depth", "0"], ["--depth", "'0'"]),
    "negative ratio": (["--batch", "-1"], ["--batch"]),
    "ratio 0x": (["--tokens", "0x"], ["--tokens"]),
    "width and hidden size": (["--width", "2x", "--hidden-size", "512"], ["--width", "--hidden-size"]),
    "depth and num layers": (["--depth", "2x", "--num-layers", "8"], ["--depth", "--num-layers"]),
    "tokens and train iters": (["--tokens", "2x", "--train-iters", "8"], ["--tokens", "--train-iters"]),
    "train tokens and train iters": (["--train-tokens", "1e7", "--train-iters", "8"], ["--train-tokens", "--train-iters"]),
    "non-integer depth": (["--depth", "1.3x"], ["num_layers", "5.2", "whole number"]),
    "non-integer width": (["--width", "1.3x"], ["hidden_size", "whole number"]),
    "hidden not divisible by heads": (["--hidden-size", "500"], ["num_attention_heads"]),
    "inf hidden size": (["--hidden-size", "inf"], ["--hidden-size", "inf"]),
    "huge hidden size": (["--hidden-size", "1e400"], ["--hidden-size"]),
    "inf train tokens": (["--train-tokens", "inf"], ["--train-tokens"]),
    "fractional layers": (["--num-layers", "7.5"], ["--num-layers"]),
    "beta pushed out of range": (["--batch", "16x"], ["beta1", "outside [0, 1)"]),
    "unknown flag": (["--widht", "2x"], ["--widht"]),
    "unknown format": (["--format", "yaml"], ["--format", "yaml"]),
    # argparse alone reads '-2x' as an option and says "expected one argument"
    "negative ratio 2x": (["--width", "-2x"], ["--width", "'-2x' must be a positive ratio such as 2x or 0.5x"]),
    "negative ratio, abbreviated flag": (["--wid", "-0.5x"], ["--width", "positive ratio"]),
    "negative ratio with =": (["--tokens=-2x"], ["--tokens", "positive ratio"]),
    "negative absolute": (["--hidden-size", "-1e3"], ["--hidden-size", "positive integer"]),
    "infinite ratio": (["--width", "1e400"], ["--width", "finite ratio"]),
    # argparse alone keeps the last
    "width twice": (["--width", "2x", "--width", "4x"], ["--width", "twice"]),
    "absolute twice": (["--num-layers", "8", "--num-layers=16"], ["--num-layers", "twice"]),
    "output twice": (["-o", "other.json"], ["-o/--output", "twice"]),
    "format twice": (["--format", "json", "--format", "table"], ["--format", "twice"]),
    # flags that would change nothing
    "per-layer with json": (["--per-layer", "--format", "json"], ["--per-layer", "--format table"]),
    "per-layer with megatron-args": (["--per-layer", "--format", "megatron-args"], ["--per-layer"]),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments(tmp_path, capsys, case):
    args, words = BAD_ARGS[case]
    src = write_spec(tmp_path, name="in.json")
    rc, out, err = run_main(capsys, src, *args, "-o", tmp_path / "target.json")
    _assert_clean_failure(rc, out, err, words, tmp_path, {"in.json"})


def test_missing_input_file(tmp_path, capsys):
    rc, out, err = run_main(capsys, tmp_path / "nope.json", "-o", tmp_path / "target.json")
    _assert_clean_failure(rc, out, err, ["nope.json", "no such file"], tmp_path, set())


def test_input_is_a_directory(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    rc, out, err = run_main(capsys, tmp_path / "d", "-o", tmp_path / "target.json")
    _assert_clean_failure(rc, out, err, ["is a directory"], tmp_path, {"d"})


def test_output_folder_missing(tmp_path, capsys):
    rc, out, err = run_main(capsys, EXAMPLE, "--width", "2x", "-o", tmp_path / "no" / "such" / "target.json")
    _assert_clean_failure(rc, out, err, ["does not exist"], tmp_path, set())


def test_output_folder_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    rc, out, err = run_main(capsys, EXAMPLE, "--width", "2x", "-o", tmp_path / "f" / "target.json")
    _assert_clean_failure(rc, out, err, [f"{tmp_path / 'f'} is a file, not a folder; choose another path"], tmp_path, {"f"})


def test_output_is_a_directory(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    rc, out, err = run_main(capsys, EXAMPLE, "-o", tmp_path / "d")
    _assert_clean_failure(rc, out, err, ["is a directory"], tmp_path, {"d"})
    assert os.listdir(tmp_path / "d") == []


def test_failure_leaves_an_existing_output_untouched(tmp_path, capsys):
    target = tmp_path / "target.json"
    target.write_text("previous")
    rc, _, err = run_main(capsys, EXAMPLE, "--depth", "1.3x", "-o", target)
    assert rc == 2 and target.read_text() == "previous"
    assert set(os.listdir(tmp_path)) == {"target.json"}


def test_explain_with_megatron_args_needs_an_output_file(tmp_path, capsys):
    rc, out, err = run_main(capsys, EXAMPLE, "--explain", "--format", "megatron-args")
    _assert_clean_failure(rc, out, err, ["--explain", "megatron-args", "-o"], tmp_path, set())
    # with -o it puts the factors in the file: accepted
    target = tmp_path / "t.json"
    rc, out, err = run_main(capsys, EXAMPLE, "--explain", "--format", "megatron-args", "-o", target)
    assert rc == 0 and err == "" and "--cdp-config" in out
    assert all("factors" in g for g in json.loads(target.read_text())["groups"])


def test_empty_output_name_is_refused(tmp_path, capsys):
    rc, out, err = run_main(capsys, EXAMPLE, "--width", "2x", "-o", "")
    _assert_clean_failure(rc, out, err, ["-o", "empty file name"], tmp_path, set())


@pytest.mark.parametrize("how", ["same path", "other spelling", "symlink", "hard link"])
def test_output_that_is_the_input_is_refused(tmp_path, capsys, how):
    src = write_spec(tmp_path, name="base.json")
    before = src.read_text()
    out = {"same path": src, "other spelling": tmp_path / "." / "base.json", "symlink": tmp_path / "link.json",
           "hard link": tmp_path / "hard.json"}[how]  # fmt: skip
    if how == "symlink":
        out.symlink_to(src)
    if how == "hard link":
        os.link(src, out)
    inputs = set(os.listdir(tmp_path))
    rc, stdout, err = run_main(capsys, src, "--width", "2x", "-o", out)
    _assert_clean_failure(rc, stdout, err, ["is the input", "choose another -o"], tmp_path, inputs)
    assert src.read_text() == before  # not replaced by a target (which a second run would compound)


def test_output_symlink_is_written_through(tmp_path, capsys):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    rc, _, err = run_main(capsys, EXAMPLE, "--width", "2x", "-o", link)
    assert rc == 0, err
    assert link.is_symlink() and os.readlink(link) == str(real)  # the link itself stays
    assert json.loads(real.read_text())["ratios"]["width"] == 2.0
    assert set(os.listdir(tmp_path)) == {"real.json", "link.json"}


def test_output_fifo_is_refused(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    rc, out, err = run_main(capsys, EXAMPLE, "--width", "2x", "-o", fifo)
    _assert_clean_failure(rc, out, err, ["not a regular file"], tmp_path, {"fifo"})
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # not replaced by a regular file


def test_output_file_mode(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        rc, _, _ = run_main(capsys, EXAMPLE, "-o", tmp_path / "new.json")
    finally:
        os.umask(old)
    assert rc == 0 and stat.S_IMODE(os.stat(tmp_path / "new.json").st_mode) == 0o640  # 0o666 & ~umask, not 0o600
    existing = tmp_path / "existing.json"
    existing.write_text("old")
    existing.chmod(0o664)
    rc, _, _ = run_main(capsys, EXAMPLE, "-o", existing)
    assert rc == 0 and stat.S_IMODE(os.stat(existing).st_mode) == 0o664 and existing.read_text() != "old"


def test_edited_target_as_input_is_rejected(tmp_path, capsys):
    t = tmp_path / "t.json"
    assert run_main(capsys, EXAMPLE, "--width", "2x", "-o", t)[0] == 0
    raw = json.loads(t.read_text())
    raw["groups"][0]["lr"] *= 3
    t.write_text(json.dumps(raw))
    rc, out, err = run_main(capsys, t, "--width", "2x", "-o", tmp_path / "t2.json")
    _assert_clean_failure(rc, out, err, ["regenerate"], tmp_path, {"t.json"})
    del raw["source_spec"]
    t.write_text(json.dumps(raw))
    rc, out, err = run_main(capsys, t, "--width", "2x", "-o", tmp_path / "t2.json")
    _assert_clean_failure(rc, out, err, ["source_spec"], tmp_path, {"t.json"})


@pytest.mark.parametrize(
    "args,words",
    [
        (["--width", "abc"], ["invalid ratio 'abc'"]),
        (["--depth", "1.3x"], ["num_layers"]),
        (["--width", "2x", "--hidden-size", "512"], ["--width", "--hidden-size"]),
    ],
)
def test_bad_input_in_a_fresh_process(tmp_path, args, words):
    r = cli(str(EXAMPLE), *args, "-o", str(tmp_path / "target.json"))
    _assert_clean_failure(r.returncode, r.stdout, r.stderr, words, tmp_path, set())


@pytest.mark.parametrize(
    "content,words",
    [
        ('{"description": "Exampl\u00e9"}'.encode("latin-1"), ["not UTF-8", "byte 23"]),
        (b"[" * 100_000 + b"]" * 100_000, ["nested too deeply"]),
        (b'{"schema_version": ' + b"9" * 5000 + b"}", ["malformed JSON", "digits"]),
    ],
    ids=["latin-1", "deep nesting", "5000-digit integer"],
)
def test_unreadable_json(tmp_path, capsys, content, words):
    src = tmp_path / "in.json"
    src.write_bytes(content)
    rc, out, err = run_main(capsys, src, "-o", tmp_path / "target.json")
    _assert_clean_failure(rc, out, err, words, tmp_path, {"in.json"})


def test_rule_value_error_is_one_line(tmp_path, capsys, monkeypatch):
    # rules.sde_factors' own check (ratios positive and finite), should the spec checks let
    # an infinite ratio through (--tokens 1e305 did): one line, not a traceback
    from cdp_megatron import convert as convert_module, rules

    monkeypatch.setattr(convert_module, "resolve", lambda spec, shape: rules.sde_factors(1.0, math.inf))
    rc, out, err = run_main(capsys, EXAMPLE, "-o", tmp_path / "target.json")
    _assert_clean_failure(rc, out, err, ["ratios must be positive and finite"], tmp_path, set())


@pytest.mark.parametrize("args", [["--tokens", "1e305"], ["--batch", "1e300"], ["--width", "1e300"]])
def test_huge_ratio_is_one_short_line(tmp_path, capsys, args):
    rc, out, err = run_main(capsys, EXAMPLE, *args, "-o", tmp_path / "target.json")
    _assert_clean_failure(rc, out, err, [], tmp_path, set())
    assert len(err) < 250 and not re.search(r"[0-9]{20}", err), err


def test_malformed_json_in_a_fresh_process(tmp_path):
    bad = tmp_path / "base.json"
    bad.write_text("{\n  \"schema_version\": 1\n  \"base\": {}\n}")
    r = cli(str(bad), "-o", str(tmp_path / "target.json"))
    _assert_clean_failure(r.returncode, r.stdout, r.stderr, ["malformed JSON", "line 3"], tmp_path, {"base.json"})


# --------------------------------------------------------------------------- the table's honesty


def test_value_ranges_first_to_last_or_lowest_to_highest(tmp_path, capsys):
    # monotone over the layers: first..last (the README example)
    rc, out, _ = run_main(capsys, EXAMPLE, "--width", "4x", "--depth", "4x")
    q = next(l for l in out.splitlines() if l.startswith("q "))
    assert q.split()[3:5] == ["0.00048..0.00032", "4.8e-05..3.2e-05"]
    assert "(a..b: first layer .. last layer; --per-layer lists every layer)" in out
    # a bump in the middle: layer 2 has 4x the lr, first == last would read as constant
    p = write_spec(tmp_path, lambda r: r["multipliers"]["depth"].update(lr=[1, 4, 1, 1]))
    rc, out, _ = run_main(capsys, p)
    assert rc == 0
    q = next(l for l in out.splitlines() if l.startswith("q "))
    assert q.split()[3] == "0.0032..0.0128*"  # base 0.004 x type 0.8 x depth (1 .. 4)
    assert "a..b*: lowest .. highest, not monotone over the layers" in out
    rc, out, _ = run_main(capsys, p, "--per-layer")
    assert [l.split()[2:4] for l in out.splitlines() if l.startswith("q ")] == [
        ["1", "0.0032"], ["2", "0.0128"], ["3-4", "0.0032"]]  # fmt: skip


def _train_tokens_spec(tmp_path: Path, tokens: float) -> Path:
    return write_spec(tmp_path, lambda r: (r["base"].pop("train_iters"), r["base"].update(train_tokens=tokens)))


def test_tokens_line_shows_the_tokens_trained(tmp_path, capsys):
    rc, out, _ = run_main(capsys, EXAMPLE, "--width", "4x", "--depth", "4x")
    assert "4.096e+05 tokens = 200 iters (warmup 10)\n" in out and "warning" not in out  # whole iterations: as before
    # 3000 tokens at 2048 tokens a step: 1 step, 2048 tokens trained
    p = _train_tokens_spec(tmp_path, 3000)
    rc, out, _ = run_main(capsys, p)
    assert rc == 0 and "2048 tokens = 1 iters (warmup 0; 3000 tokens asked, rounded to whole iters)" in out
    assert "warning" not in out  # the ratio to the base is still 1
    # 2x: 6000 tokens -> 3 steps, 3x the base's 2048 trained tokens while the rules used m_D = 2
    rc, out, _ = run_main(capsys, p, "--tokens", "2x")
    assert rc == 0 and "6144 tokens = 3 iters (warmup 0; 6000 tokens asked" in out
    warning = next(l for l in out.splitlines() if l.startswith("warning: whole iterations"))
    assert "3x the base's tokens" in warning and "m_D = 2" in warning
    rc, out, err = run_main(capsys, p, "--tokens", "2x", "--format", "json")
    assert rc == 0 and "cdp-convert: warning: whole iterations train 3x" in err
    # within 1%: no warning
    p = _train_tokens_spec(tmp_path, 2048 * 200 + 100)
    rc, out, _ = run_main(capsys, p, "--tokens", "3x")
    assert rc == 0 and "warning: whole iterations" not in out


# --------------------------------------------------------------------------- stdout


@pytest.mark.parametrize("read_first_line", [True, False], ids=["head -1", "reader gone"])
def test_closed_pipe_is_quiet(tmp_path, read_first_line):
    # like `cdp-convert ... | head -1`: the reader closes while the table is still being written
    args = [sys.executable, "-m", "cdp_megatron.convert", str(EXAMPLE), "--depth", "16x", "--explain", "-o",
            str(tmp_path / "t.json")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    full = subprocess.run(args, env=env, capture_output=True, timeout=60)
    # more than a pipe buffer holds, so the first write returns only once the reader is gone and
    # the next one (the "wrote" line) meets the closed pipe
    assert full.returncode == 0 and len(full.stdout) > 4 * 65536
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if read_first_line:
        assert proc.stdout.readline().startswith(b"cdp-convert: ")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 1
    assert err == b""  # no BrokenPipeError traceback, no "Exception ignored" at exit


def test_full_stdout_is_one_line(tmp_path, capsys, monkeypatch):
    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Full())
    rc = main([str(EXAMPLE), "-o", str(tmp_path / "t.json")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err == "cdp-convert: error: cannot write the output (No space left on device); check where stdout goes\n"


# --------------------------------------------------------------------------- speed hygiene


def test_help():
    r = cli("--help")
    assert r.returncode == 0 and "--width" in r.stdout and "4x" in r.stdout and "--hidden-size" in r.stdout


def test_no_torch_or_megatron_import(tmp_path):
    code = (
        "import sys\n"
        "from cdp_megatron.convert import main\n"
        f"rc = main([{str(EXAMPLE)!r}, '--width', '4x', '--depth', '4x', '-o', {str(tmp_path / 't.json')!r}])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron'))\n"
        "print(rc, heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "0 []"


def test_ffn_ratio_change_warns(capsys):
    rc, out, _ = run_main(capsys, EXAMPLE, "--width", "2x", "--ffn-hidden-size", "4096", "--format", "json")
    warnings = json.loads(out)["warnings"]
    base = json.loads(run_main(capsys, EXAMPLE, "--format", "json")[1])["shape"]
    want = base["ffn_hidden_size"] * 2
    assert rc == 0 and len(warnings) == 1, warnings
    assert "ffn_hidden_size / hidden_size changes" in warnings[0] and f"--ffn-hidden-size {want}" in warnings[0]
    rc, out, _ = run_main(capsys, EXAMPLE, "--width", "2x", "--ffn-hidden-size", str(want), "--format", "json")
    assert rc == 0 and json.loads(out)["warnings"] == []


@pytest.mark.parametrize("flags", [(), ("--explain",), ("--per-layer",)], ids=["table", "explain", "per-layer"])
def test_table_lines_have_no_trailing_spaces(capsys, flags):
    rc, out, _ = run_main(capsys, str(EXAMPLE), "--width", "2x", "--depth", "2x", *flags)
    assert rc == 0
    assert [line for line in out.splitlines() if line != line.rstrip()] == []


def test_header_names_rule_choices_that_are_not_the_methods(tmp_path, capsys):
    """base.beta_rule "fixed" and weight_decay_rule "adamlh" are named on the first line (the
    method's own rules are not); the table then shows the base's betas at 4x the tokens."""
    raw = json.loads(EXAMPLE.read_text())
    rc, out, _ = run_main(capsys, EXAMPLE, "--tokens", "4x")
    assert rc == 0 and out.splitlines()[0] == "cdp-convert: completedp, alpha = 0.5"
    raw["base"].update(beta_rule="fixed", weight_decay_rule="adamlh")
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(raw))
    rc, out, err = run_main(capsys, path, "--tokens", "4x")
    assert rc == 0 and out.splitlines()[0] == "cdp-convert: completedp, alpha = 0.5, weight_decay_rule adamlh, beta_rule fixed"
    row = next(line for line in out.splitlines() if line.startswith("embedding"))
    assert row.split()[-3:-1] == ["0.9", "0.95"]  # examples/base.json's
    assert "beta" not in err  # no beta warning: the rule keeps them
