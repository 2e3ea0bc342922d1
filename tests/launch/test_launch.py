"""launch/pretrain.sh and launch/slurm_example.sbatch, run as subprocesses.

Every run gets a controlled environment: PATH is a temporary directory holding only the
stubs a test puts there (python, nvidia-smi, scontrol, srun), so nothing from the host
(a real GPU, a real SLURM job) leaks in. Dry runs execute no external program.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "pretrain.sh"
SBATCH = REPO / "launch" / "slurm_example.sbatch"
README = REPO / "launch" / "README.md"
BASH = shutil.which("bash") or "/bin/bash"
PREFIX = "launch/pretrain.sh: error: "

pytestmark = pytest.mark.skipif(not Path(BASH).exists(), reason="bash is not installed")


def torchrun(*, nnodes=1, rank=0, nproc=1, addr="127.0.0.1", port=6000, args=("--quickstart",)):
    """The command the launcher must print, with `python` found on PATH."""
    return shlex.join(
        ["python", "-m", "torch.distributed.run",
         "--nnodes", str(nnodes), "--node-rank", str(rank), "--nproc-per-node", str(nproc),
         "--master-addr", addr, "--master-port", str(port),
         "-m", "cdp_megatron.pretrain", *args]
    )


@pytest.fixture
def bin_dir(tmp_path):
    """A PATH directory with a `python` that runs this interpreter."""
    path = tmp_path / "bin"
    path.mkdir()
    stub(path, "python", f'exec {shlex.quote(sys.executable)} "$@"')
    return path


def stub(directory: Path, name: str, body: str) -> Path:
    script = directory / name
    script.write_text(f"#!{BASH}\n{body}\n")
    script.chmod(0o755)
    return script


def launch(bin_dir, *args, env=None, cwd=None, timeout=30):
    full_env = {"PATH": str(bin_dir), "HOME": str(bin_dir.parent)}
    full_env.update(env or {})
    return subprocess.run(
        [BASH, str(LAUNCHER), *args], env=full_env, cwd=cwd or bin_dir.parent,
        capture_output=True, text=True, timeout=timeout,
    )


def dry_run(bin_dir, *args, env=None):
    result = launch(bin_dir, "--dry-run", *args, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


# ---- single node ---------------------------------------------------------------------

def test_dry_run_single_node_default_runs_the_quickstart(bin_dir):
    assert dry_run(bin_dir) == torchrun() + "\n"


def test_dry_run_with_only_a_separator_still_runs_the_quickstart(bin_dir):
    assert dry_run(bin_dir, "--") == torchrun() + "\n"


@pytest.mark.parametrize(
    "args, env, nproc",
    [
        (["--nproc", "2"], {}, 2),
        (["--nproc=3"], {}, 3),
        ([], {"NPROC_PER_NODE": "4"}, 4),
        (["--nproc", "2"], {"NPROC_PER_NODE": "4"}, 2),  # the option beats the variable
        ([], {"GPUS_PER_NODE": "8"}, 8),
        ([], {"NPROC_PER_NODE": "08", "GPUS_PER_NODE": "8"}, 8),  # leading zero: decimal
    ],
)
def test_processes_per_node(bin_dir, args, env, nproc):
    assert dry_run(bin_dir, *args, env=env) == torchrun(nproc=nproc) + "\n"


def test_python_from_PYTHON(bin_dir):
    out = dry_run(bin_dir, env={"PYTHON": sys.executable})
    assert shlex.split(out)[0] == sys.executable


def test_explicit_multi_node_variables(bin_dir):
    env = {"NNODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29500", "GPUS_PER_NODE": "8"}
    out = dry_run(bin_dir, "--num-layers", "2", env=env)
    assert out == torchrun(nnodes=4, rank=3, nproc=8, addr="10.0.0.1", port=29500,
                           args=["--num-layers", "2"]) + "\n"


# ---- GPU detection (nvidia-smi stub) -------------------------------------------------

NVIDIA_SMI_4 = """printf '%s\\n' \\
    'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)' \\
    'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)' \\
    '  MIG 1g.10gb     Device  0: (UUID: MIG-0)' \\
    'GPU 2: NVIDIA H100 80GB HBM3 (UUID: GPU-2)' \\
    'GPU 3: NVIDIA H100 80GB HBM3 (UUID: GPU-3)'"""


@pytest.mark.parametrize(
    "env, nproc",
    [
        ({}, 4),
        ({"CUDA_VISIBLE_DEVICES": "1,3"}, 2),
        ({"CUDA_VISIBLE_DEVICES": ""}, 1),  # no GPU visible: one CPU process
        ({"CUDA_VISIBLE_DEVICES": "-1"}, 1),
        ({"GPUS_PER_NODE": "2"}, 2),
        ({"NPROC_PER_NODE": "1"}, 1),
    ],
)
def test_gpus_from_nvidia_smi(bin_dir, env, nproc):
    stub(bin_dir, "nvidia-smi", NVIDIA_SMI_4)
    assert dry_run(bin_dir, env=env) == torchrun(nproc=nproc) + "\n"


def test_failing_nvidia_smi_is_an_error_not_a_silent_cpu_run(bin_dir):
    stub(bin_dir, "nvidia-smi", "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    assert_fails(launch(bin_dir, "--dry-run"), "GPUS_PER_NODE")


# ---- SLURM ---------------------------------------------------------------------------

SLURM_2_NODES = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NNODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "node[07-08]",
    "SLURM_GPUS_ON_NODE": "8",
}


def test_dry_run_two_node_slurm_without_scontrol(bin_dir):
    out = dry_run(bin_dir, "--num-layers", "2", env=SLURM_2_NODES)
    assert out == (
        "python -m torch.distributed.run --nnodes 2 --node-rank 1 --nproc-per-node 8"
        " --master-addr node07 --master-port 6000 -m cdp_megatron.pretrain --num-layers 2\n"
    )


def test_slurm_uses_scontrol_when_present(bin_dir):
    log = bin_dir.parent / "scontrol.args"
    stub(bin_dir, "scontrol", f'echo "$@" > {shlex.quote(str(log))}; printf "gpu-a12\\ngpu-a13\\n"')
    out = dry_run(bin_dir, env=SLURM_2_NODES)
    assert out == torchrun(nnodes=2, rank=1, nproc=8, addr="gpu-a12") + "\n"
    assert log.read_text().split() == ["show", "hostnames", "node[07-08]"]


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node07", "node07"),
        ("node07,node08", "node07"),
        ("node[007-010,012]", "node007"),
        ("a[1,3-4],b2", "a1"),
        ("gpu[3,1]", "gpu3"),  # SLURM's order, not sorted
        ("rack1-gpu[3-4]-ib", "rack1-gpu3-ib"),
        ("n[1-2]x[5-6],m1", "n1x5"),
    ],
)
def test_first_host_of_a_nodelist_without_scontrol(bin_dir, nodelist, first):
    out = dry_run(bin_dir, env={**SLURM_2_NODES, "SLURM_JOB_NODELIST": nodelist})
    assert shlex.split(out)[shlex.split(out).index("--master-addr") + 1] == first


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100:4"}, 4),
        ({"SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "2"}, 2),
        ({"SLURM_GPUS_ON_NODE": "0"}, 1),  # a CPU allocation
        ({"GPUS_PER_NODE": "4"}, 4),  # explicit beats SLURM
        ({"MASTER_ADDR": "10.1.1.1"}, 8),
        ({"NNODES": "2", "NODE_RANK": "1"}, 8),  # agreeing with SLURM is fine
    ],
)
def test_slurm_overrides(bin_dir, extra, expected):
    args = shlex.split(dry_run(bin_dir, env={**SLURM_2_NODES, **extra}))
    assert args[args.index("--nproc-per-node") + 1] == str(expected)
    addr = extra.get("MASTER_ADDR", "node07")
    assert args[args.index("--master-addr") + 1] == addr


def test_single_node_slurm_job_uses_loopback(bin_dir):
    env = {**SLURM_2_NODES, "SLURM_NNODES": "1", "SLURM_NODEID": "0"}
    assert dry_run(bin_dir, env=env) == torchrun(nproc=8) + "\n"


# ---- forwarding ----------------------------------------------------------------------

AWKWARD = [
    "--data-path", "/data/my corpus/text_document",
    "--tensorboard-dir", "it's \"quoted\"",
    "--note", "$HOME `id` $(id) ; | & * ? ~ !",
    "--empty", "",
    "--unicode", "données",
    "--backslash", "a\\b",
    "--tabs", "a\tb",
]


def test_arguments_are_forwarded_verbatim_in_the_dry_run(bin_dir):
    out = dry_run(bin_dir, *AWKWARD)
    assert out.count("\n") == 1
    argv = shlex.split(out)
    assert argv[argv.index("cdp_megatron.pretrain") + 1:] == AWKWARD


def test_launcher_options_are_recognised_anywhere_before_the_separator(bin_dir):
    out = launch(bin_dir, "--num-layers", "2", "--dry-run", "--nproc", "2", "--", "--dry-run",
                 "--nproc", "5", "--")
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout)
    assert argv[argv.index("--nproc-per-node") + 1] == "2"
    assert argv[argv.index("cdp_megatron.pretrain") + 1:] == [
        "--num-layers", "2", "--dry-run", "--nproc", "5", "--"]


RECORDER = """\
import json, os, sys
if sys.argv[1:2] == ["-c"]:  # the launcher's import check
    if os.environ.get("FAKE_MISSING"):
        print(os.environ["FAKE_MISSING"])
        sys.exit(0)
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
with open(os.environ["ARGV_OUT"], "w") as f:
    json.dump(sys.argv[1:], f)
"""


@pytest.fixture
def recorder(bin_dir, tmp_path):
    """A PYTHON that records the argv it is exec'd with instead of starting torchrun."""
    script = tmp_path / "recorder"
    script.write_text(f"#!{sys.executable}\n{RECORDER}")
    script.chmod(0o755)
    (tmp_path / "cdp_megatron").mkdir()  # importable from the cwd, like a checkout
    (tmp_path / "cdp_megatron" / "__init__.py").write_text("")
    return script


def test_real_run_execs_the_exact_argv(bin_dir, recorder, tmp_path):
    out_file = tmp_path / "argv.json"
    args = [*AWKWARD, "--newline", "two\nlines"]
    result = launch(bin_dir, "--nproc", "2", "--", *args,
                    env={"PYTHON": str(recorder), "ARGV_OUT": str(out_file)})
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert json.loads(out_file.read_text()) == [
        "-m", "torch.distributed.run", "--nnodes", "1", "--node-rank", "0",
        "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", "6000",
        "-m", "cdp_megatron.pretrain", *args]


def test_real_run_fails_fast_when_the_package_is_not_importable(bin_dir, recorder, tmp_path):
    out_file = tmp_path / "argv.json"
    result = launch(bin_dir, env={"PYTHON": str(recorder), "ARGV_OUT": str(out_file),
                                  "FAKE_MISSING": "cdp_megatron"})
    assert_fails(result, "cdp_megatron")
    assert not out_file.exists()


def test_real_run_checks_settings_before_starting(bin_dir, recorder, tmp_path):
    out_file = tmp_path / "argv.json"
    result = launch(bin_dir, env={"PYTHON": str(recorder), "ARGV_OUT": str(out_file),
                                  "MASTER_PORT": "0"})
    assert_fails(result, "MASTER_PORT")
    assert not out_file.exists()


# ---- bad settings --------------------------------------------------------------------

def assert_fails(result, name):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(PREFIX) and name in lines[0], lines[0]


BAD_SETTINGS = {
    "multi-node without MASTER_ADDR": ({"NNODES": "2", "NODE_RANK": "1"}, [], "MASTER_ADDR"),
    "multi-node without NODE_RANK": ({"NNODES": "2", "MASTER_ADDR": "h0"}, [], "NODE_RANK"),
    "NODE_RANK == NNODES": ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h0"}, [],
                            "NODE_RANK"),
    "NODE_RANK on a single node": ({"NODE_RANK": "1"}, [], "NODE_RANK"),
    "NNODES not an integer": ({"NNODES": "two"}, [], "NNODES"),
    "NNODES decimal": ({"NNODES": "1.5"}, [], "NNODES"),
    "NNODES zero": ({"NNODES": "0"}, [], "NNODES"),
    "NNODES with spaces": ({"NNODES": " 2"}, [], "NNODES"),
    "NODE_RANK negative": ({"NODE_RANK": "-1"}, [], "NODE_RANK"),
    "NNODES with a newline": ({"NNODES": "1\n2"}, [], "NNODES"),
    "MASTER_PORT too large": ({"MASTER_PORT": "70000"}, [], "MASTER_PORT"),
    "MASTER_PORT zero": ({"MASTER_PORT": "0"}, [], "MASTER_PORT"),
    "MASTER_PORT not an integer": ({"MASTER_PORT": "60o0"}, [], "MASTER_PORT"),
    "MASTER_ADDR with a space": ({"MASTER_ADDR": "node 1"}, [], "MASTER_ADDR"),
    "GPUS_PER_NODE zero": ({"GPUS_PER_NODE": "0"}, [], "GPUS_PER_NODE"),
    "GPUS_PER_NODE zero under SLURM with GPUs": ({**SLURM_2_NODES, "GPUS_PER_NODE": "0"}, [],
                                                 "GPUS_PER_NODE"),
    "GPUS_PER_NODE not an integer": ({"GPUS_PER_NODE": "8x"}, [], "GPUS_PER_NODE"),
    "GPUS_PER_NODE disagrees with NPROC_PER_NODE": (
        {"GPUS_PER_NODE": "8", "NPROC_PER_NODE": "4"}, [], "GPUS_PER_NODE"),
    "NPROC_PER_NODE zero": ({"NPROC_PER_NODE": "0"}, [], "NPROC_PER_NODE"),
    "--nproc zero": ({}, ["--nproc", "0"], "--nproc"),
    "--nproc without a value": ({}, ["--nproc"], "--nproc"),
    "--nproc= empty": ({}, ["--nproc="], "--nproc"),
    "PYTHON missing": ({"PYTHON": "/nonexistent/python"}, [], "PYTHON"),
    "SLURM NODE_RANK exported to every node": ({**SLURM_2_NODES, "NODE_RANK": "0"}, [],
                                               "NODE_RANK"),
    "NNODES disagrees with SLURM": ({**SLURM_2_NODES, "NNODES": "4"}, [], "NNODES"),
    "SLURM_NODEID out of range": ({**SLURM_2_NODES, "SLURM_NODEID": "2"}, [], "SLURM_NODEID"),
    "SLURM_NNODES not an integer": ({**SLURM_2_NODES, "SLURM_NNODES": "2(x1)"}, [],
                                    "SLURM_NNODES"),
    "SLURM without a node list": ({**SLURM_2_NODES, "SLURM_JOB_NODELIST": ""}, [],
                                  "MASTER_ADDR"),
    "SLURM node list unreadable": ({**SLURM_2_NODES, "SLURM_JOB_NODELIST": "node[07-"}, [],
                                   "SLURM_JOB_NODELIST"),
    "SLURM several tasks per node": (
        {**SLURM_2_NODES, "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "16"}, [],
        "SLURM_STEP_NUM_TASKS"),
    "SLURM_GPUS_ON_NODE not an integer": ({**SLURM_2_NODES, "SLURM_GPUS_ON_NODE": "a"}, [],
                                          "SLURM_GPUS_ON_NODE"),
}


@pytest.mark.parametrize("env, args, name", BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_bad_setting_fails_naming_the_variable(bin_dir, env, args, name):
    assert_fails(launch(bin_dir, "--dry-run", *args, env=env), name)


def test_python_missing_from_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_fails(launch(empty, "--dry-run"), "PYTHON")


def test_python3_is_the_fallback(tmp_path):
    path = tmp_path / "bin"
    path.mkdir()
    stub(path, "python3", f'exec {shlex.quote(sys.executable)} "$@"')
    out = launch(path, "--dry-run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("python3 -m torch.distributed.run ")


# ---- help, README, sbatch ------------------------------------------------------------

def test_help_is_the_readme_usage(bin_dir):
    result = launch(bin_dir, "--help")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("Usage: launch/pretrain.sh")
    assert result.stdout.rstrip("\n") in README.read_text(), "launch/README.md: paste the --help text"


def test_sbatch_example_parses():
    result = subprocess.run([BASH, "-n", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# srun stand-in: drops srun's own options and runs the command as node 0 with --dry-run.
FAKE_SRUN = """\
while [[ $1 == -* ]]; do shift; done
cmd=$1; shift
exec "$cmd" --dry-run "$@"
"""


def test_sbatch_example_builds_the_expected_command(bin_dir):
    stub(bin_dir, "srun", FAKE_SRUN)
    os.symlink(BASH, bin_dir / "bash")  # for the launcher's `#!/usr/bin/env bash`
    env = {"PATH": str(bin_dir), "HOME": str(bin_dir.parent), "SLURM_SUBMIT_DIR": str(REPO),
           "SLURM_JOB_ID": "123456", "SLURM_NNODES": "8", "SLURM_NODEID": "0",
           "SLURM_JOB_NODELIST": "gpu[001-008]", "SLURM_GPUS_ON_NODE": "8"}
    result = subprocess.run([BASH, str(SBATCH)], env=env, cwd=bin_dir.parent,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[:15] == ["python", "-m", "torch.distributed.run", "--nnodes", "8",
                         "--node-rank", "0", "--nproc-per-node", "8",
                         "--master-addr", "gpu001", "--master-port", str(20000 + 123456 % 20000),
                         "-m", "cdp_megatron.pretrain"]
    forwarded = argv[15:]
    flags = dict(zip(forwarded, forwarded[1:]))
    assert flags["--cdp-base"] == "examples/base.json"
    assert flags["--num-layers"] == "24" and flags["--hidden-size"] == "2048"
    assert flags["--num-attention-heads"] == "16" and flags["--seq-length"] == "2048"
    assert flags["--global-batch-size"] == "512"
    assert flags["--tensor-model-parallel-size"] == "2"
    assert flags["--tokenizer-type"] == "GPT2BPETokenizer"
    assert {"--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather", "--bf16",
            "--data-path", "--save", "--load", "--train-iters", "--exit-signal-handler"} <= set(forwarded)
    assert flags["--exit-duration-in-mins"] == "2850"  # half an hour before the 48-hour limit
    _check_with_cdp_pretrain(forwarded, world_size=64, tmp_path=bin_dir.parent)


def _check_with_cdp_pretrain(forwarded: list[str], world_size: int, tmp_path) -> None:
    """The forwarded flags pass cdp-pretrain's own checks (the spec against the shape
    included) on the job's world size; only the data (mock data with GPT-2's tokenizer), the
    checkpoint folder and Transformer Engine (which the cluster has, for --sequence-parallel)
    stand in for the cluster's."""
    import importlib.util
    from unittest import mock

    pytest.importorskip("torch")
    from cdp_megatron.pretrain_args import parse_args

    argv = list(forwarded)
    i = argv.index("--data-path")
    argv[i:i + 2] = ["--mock-data"]
    for flag in ("--save", "--load", "--tensorboard-dir", "--metrics-file"):
        i = argv.index(flag)
        argv[i + 1] = str(tmp_path / flag.strip("-"))
    real = importlib.util.find_spec
    with mock.patch.object(importlib.util, "find_spec",
                           lambda name, *a: object() if name == "transformer_engine" else real(name, *a)):
        args = _parse_in(REPO, parse_args, argv, world_size)
    assert args.target is not None and args.data_parallel_size == world_size // 2
    assert args.lr_decay_style == "cosine" and args.train_iters == 23000


def _parse_in(directory, parse_args, argv, world_size):
    old = os.getcwd()
    os.chdir(directory)  # --cdp-base examples/base.json is relative to the repository
    try:
        return parse_args(argv, world_size=world_size)
    finally:
        os.chdir(old)


# ---- end to end: real torchrun, two CPU processes ------------------------------------

FAKE_PRETRAIN = """\
import json, os, sys
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
with open(os.path.join(os.environ["OUT_DIR"], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], **{k: os.environ[k] for k in keys}}, f)
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_through_torchrun(bin_dir, tmp_path):
    pytest.importorskip("torch.distributed.run")
    package = tmp_path / "cdp_megatron"  # stands in for the real entry point, from the cwd
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "pretrain.py").write_text(FAKE_PRETRAIN)
    port = free_port()
    args = ["--micro-batch-size", "1", "--note", "two words 'q'"]
    result = launch(bin_dir, "--nproc", "2", *args, timeout=120,
                    env={"PYTHON": sys.executable, "MASTER_PORT": str(port),
                         "OUT_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen == {"argv": args, "RANK": str(rank), "LOCAL_RANK": str(rank),
                        "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
