"""cdp-pretrain end to end on CPU (gloo): tiny models on --mock-data, as a user runs it.

Every run is a subprocess (``python -m cdp_megatron.pretrain``, or ``torch.distributed.run``
for 2 processes), checked through its exit code, output and ``--metrics-file``. Shapes are
tiny (hidden 64, 2 layers, seq 32, vocab 256) so that a 1-process run takes seconds; the
2-process layouts and the quick start are marked ``slow``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ..test_metrics import tensorboard_scalars

pytestmark = pytest.mark.megatron

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "examples" / "base.json"

ARCH = (
    "--normalization RMSNorm --swiglu --qk-layernorm --position-embedding-type rope "
    "--untie-embeddings-and-output-weights --disable-bias-linear"
)
# vocab: 255 ids + end-of-document = 256, padded to 256 on TP 1 and TP 2 alike.
TINY = (
    "--mock-data --vocab-size 255 --num-layers 2 --hidden-size 64 --num-attention-heads 4 "
    "--ffn-hidden-size 176 --seq-length 32 --micro-batch-size 4 --global-batch-size 8 "
    "--log-interval 1 " + ARCH
)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(args: str | list, nproc: int, env: dict | None,
             entry: tuple[str, ...] = ("-m", "cdp_megatron.pretrain")) -> tuple[list[str], dict]:
    """(argv, environment) of cdp-pretrain: ``python *entry *args`` for 1 process, torchrun for more."""
    argv = shlex.split(args) if isinstance(args, str) else list(args)
    if nproc == 1:
        cmd = [sys.executable, *entry, *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               "-m", "cdp_megatron.pretrain", *argv]
    # NVTE_*: megatron-core sets them in this process's environment when a test here builds a model
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK") and not k.startswith("NVTE_")}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")])
    full_env.setdefault("OMP_NUM_THREADS", "1" if nproc > 1 else "2")
    full_env.update(env or {})
    return cmd, full_env


def run(args: str | list, tmp_path: Path, *, nproc: int = 1, env: dict | None = None, timeout: int = 300,
        entry: tuple[str, ...] = ("-m", "cdp_megatron.pretrain")):
    """Run cdp-pretrain (1 process: ``python *entry *args``); returns the CompletedProcess
    (stdout and stderr merged)."""
    cmd, full_env = _command(args, nproc, env, entry)
    return subprocess.run(cmd, cwd=tmp_path, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


def ok(result) -> str:
    assert result.returncode == 0, result.stdout[-6000:]
    return result.stdout


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_losses(path: Path) -> dict[int, float]:
    return {r["iteration"]: r["lm_loss"] for r in records(path) if "lm_loss" in r and not r.get("eval")}


def grad_norms(path: Path) -> dict[int, float]:
    return {r["iteration"]: r["grad_norm"] for r in records(path) if "grad_norm" in r and not r.get("eval")}


def logged(path: Path, key: str) -> dict[int, float]:
    """``key`` of every training record (--log-params-norm: params_norm, --log-num-zeros-in-grad:
    num_zeros_in_grad); every record must have it."""
    return {r["iteration"]: r[key] for r in records(path) if not r.get("eval")}


def logged_lrs(args: str, tmp_path: Path, name: str) -> tuple[str, dict[int, float]]:
    """Run cdp-pretrain with ``args`` (1 process); its output and the lr logged at each iteration."""
    out = ok(run(args + f" --metrics-file {name}", tmp_path))
    return out, {r["iteration"]: r["lr"] for r in records(tmp_path / name)}


# the logged values that every layout must reproduce: losses, grad and params norms, zero-grad counts
LOG_NORMS = " --log-params-norm --log-num-zeros-in-grad"


def assert_same_run(path: Path, reference: Path, iterations) -> None:
    _assert_close(train_losses(path), train_losses(reference), iterations)
    # the printed norms (TP/PP/DP-sharded, each tensor counted once), and the zero counts (~10^4,
    # mostly the embedding rows of tokens not in the batch) within 0.1%: a sum that cancels
    # to exactly 0 in one order of float additions may not in another, but a tensor counted
    # twice (or a shard missed) would change the count by far more
    _assert_close(grad_norms(path), grad_norms(reference), iterations)
    _assert_close(logged(path, "params_norm"), logged(reference, "params_norm"), iterations)
    zeros, reference_zeros = logged(path, "num_zeros_in_grad"), logged(reference, "num_zeros_in_grad")
    for i in iterations:
        assert abs(zeros[i] - reference_zeros[i]) <= max(2, 1e-3 * reference_zeros[i]), (i, zeros[i], reference_zeros[i])


@pytest.fixture(scope="module")
def spec20(tmp_path_factory) -> Path:
    """examples/base.json with its base batch and duration set to the tiny runs' (8 x 32
    tokens, 20 iterations): width 1/4 and depth 1/2 still transfer, the SDE factors are 1."""
    raw = json.loads(BASE.read_text())
    raw.pop("$schema", None)
    raw["base"].update(global_batch_size=8, seq_length=32, train_iters=20)
    path = tmp_path_factory.mktemp("spec") / "base20.json"
    path.write_text(json.dumps(raw))
    return path


def cdp20(spec: Path) -> str:
    return f"{TINY} --train-iters 20 --eval-interval 10 --eval-iters 2 --cdp-base {spec}"


@pytest.fixture(scope="module")
def reference(spec20, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted 1-process run (dropout on, Megatron's default 0.1)."""
    tmp = tmp_path_factory.mktemp("reference")
    ok(run(cdp20(spec20) + " --metrics-file ref.jsonl", tmp))
    return train_losses(tmp / "ref.jsonl")


# ------------------------------------------------------------------------ one process
def test_plain_mock_run_metrics_and_loss_decrease(tmp_path):
    out = ok(run(TINY + " --train-iters 12 --lr 3e-3 --lr-warmup-iters 2 --lr-decay-style cosine "
                 "--eval-interval 6 --eval-iters 2 --metrics-file m.jsonl --tensorboard-dir tb "
                 "--log-validation-ppl-to-tensorboard", tmp_path))
    assert "hyperparameters (plain Megatron): lr 0.003" in out
    assert " iteration 12/12 |" in out and "tokens/s:" in out and "grad norm:" in out
    assert "first iteration done" in out
    rows = records(tmp_path / "m.jsonl")
    train = [r for r in rows if not r.get("eval")]
    evals = [r for r in rows if r.get("eval")]
    assert [r["iteration"] for r in train] == list(range(1, 13))
    for r in train:
        for key in ("iteration", "consumed_tokens", "lm_loss", "z_loss", "lr", "grad_norm", "iteration_time_s"):
            assert isinstance(r[key], (int, float)), key
        assert r["consumed_tokens"] == r["iteration"] * 8 * 32
        assert r["z_loss"] > 0 and r["iteration_time_s"] > 0
    # Warmup from 0 over 2 iterations (the lr applied at each update), then cosine.
    assert train[0]["lr"] == 0.0 and math.isclose(train[1]["lr"], 1.5e-3) and math.isclose(train[2]["lr"], 3e-3)
    assert [(r["iteration"], sorted(r)) for r in evals] == [
        (6, ["elapsed_s", "eval", "iteration", "val_loss", "val_z_loss"]),
        (12, ["elapsed_s", "eval", "iteration", "val_loss", "val_z_loss"]),
    ]
    losses = [r["lm_loss"] for r in train]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3
    assert evals[1]["val_loss"] < losses[0]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    tb = tensorboard_scalars(tmp_path / "tb")
    assert tb["train/lm_loss"] == pytest.approx({r["iteration"]: r["lm_loss"] for r in train})
    assert tb["valid/lm_loss_ppl"] == pytest.approx({r["iteration"]: math.exp(r["val_loss"]) for r in evals})


def test_tensorboard_points_at_their_own_interval(tmp_path):
    """--tensorboard-log-interval 3 with --log-interval 4: TensorBoard gets iterations 3, 6, 9, 12
    (with the params norm, computed there too, and the timers and world size asked for), the
    metrics file 4, 8, 12; --log-throughput."""
    from cdp_megatron.metrics import gpt_flops_per_iteration

    out = ok(run(TINY + " --train-iters 12 --lr 3e-3 --eval-iters 0 --log-interval 4 --tensorboard-log-interval 3 "
                 "--tensorboard-dir tb --metrics-file m.jsonl --log-params-norm --log-throughput "
                 "--log-timers-to-tensorboard --timing-log-level 1 --log-world-size-to-tensorboard "
                 "--tensorboard-queue-size 5", tmp_path))
    rows = records(tmp_path / "m.jsonl")
    assert [r["iteration"] for r in rows] == [4, 8, 12]
    # --log-throughput: the model's FLOPs (TINY's shape) per second of the window's mean iteration
    flops = gpt_flops_per_iteration(global_batch_size=8, seq_length=32, num_layers=2, hidden_size=64,
                                    num_attention_heads=4, num_query_groups=4, ffn_hidden_size=176, swiglu=True,
                                    padded_vocab_size=256)
    for r in rows:
        assert r["tflops_per_gpu"] == pytest.approx(flops / r["iteration_time_s"] / 1e12, rel=1e-9)
    assert any(" iteration 12/12 " in line and "| throughput per GPU: " in line for line in out.splitlines())
    tb = tensorboard_scalars(tmp_path / "tb")
    assert sorted(tb["train/lm_loss"]) == sorted(tb["train/params_norm"]) == sorted(tb["train/tflops_per_gpu"]) \
        == [3, 6, 9, 12]
    assert sorted(tb["train/iteration_time_s"]) == sorted(tb["train/optimizer_step_s"]) == [3, 6, 9, 12]
    assert tb["train/world_size"] == dict.fromkeys([3, 6, 9, 12], 1.0)
    assert tb["train/params_norm"][12] == pytest.approx(rows[-1]["params_norm"])
    assert tb["train/lr"][12] == pytest.approx(rows[-1]["lr"])


@pytest.fixture(scope="module")
def byte_corpus(tmp_path_factory) -> dict[str, str]:
    """Two small ByteTokenizer datasets (ids 0..255, end-of-document 256): "tr" and "va"."""
    from cdp_megatron.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("byte_corpus")
    docs = [f"Scene {i}. " + " ".join(f"word{(i * 7 + j) % 23}" for j in range(40)) for i in range(30)]
    prefixes = {}
    for name, texts in (("tr", docs), ("va", [d.upper()[::-1] for d in docs])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in texts))
        prefixes[name] = preprocess(root / f"{name}.jsonl", root / name, "ByteTokenizer",
                                    append_eod=True).output_prefixes["text"]
    return prefixes


def test_validation_data_of_its_own(byte_corpus, tmp_path):
    """--train-data-path / --valid-data-path (Megatron-LM's): the validation loss is the
    --valid-data-path's, and the training does not depend on it."""
    prefixes = byte_corpus
    data = TINY.replace("--mock-data --vocab-size 255", "--tokenizer-type ByteTokenizer")
    runs = {}
    for valid in ("va", "tr"):
        out = ok(run(f"{data} --train-iters 4 --lr 1e-3 --eval-interval 4 --eval-iters 1 --metrics-file {valid}.jsonl "
                     f"--train-data-path {prefixes['tr']} --valid-data-path {prefixes[valid]}", tmp_path))
        assert f"  data: train {prefixes['tr']}, valid {prefixes[valid]};" in out
        runs[valid] = records(tmp_path / f"{valid}.jsonl")
    assert train_losses(tmp_path / "va.jsonl") == train_losses(tmp_path / "tr.jsonl")
    val = {k: [r["val_loss"] for r in rows if r.get("eval")] for k, rows in runs.items()}
    assert len(val["va"]) == len(val["tr"]) == 1 and abs(val["va"][0] - val["tr"][0]) > 0.01, val
    # the same from a --per-split-data-args-path file (Megatron-LM's, for long blends)
    (tmp_path / "splits.json").write_text(json.dumps({"train": [prefixes["tr"]], "valid": [prefixes["va"]]}))
    out = ok(run(f"{data} --train-iters 4 --lr 1e-3 --eval-interval 4 --eval-iters 1 --metrics-file file.jsonl "
                 "--per-split-data-args-path splits.json", tmp_path))
    assert "  data: train 1 prefix from splits.json, valid 1 prefix from splits.json;" in out
    assert train_losses(tmp_path / "file.jsonl") == train_losses(tmp_path / "va.jsonl")
    assert val_losses(tmp_path / "file.jsonl") == val_losses(tmp_path / "va.jsonl")


@pytest.mark.parametrize("full", [False, True], ids=["eval-iters", "full-validation"])
def test_multiple_validation_sets(byte_corpus, tmp_path, full):
    """--multiple-validation-sets (Megatron-LM's): each --valid-data-path prefix is evaluated on its
    own, with exactly the loss a run with that prefix alone gets (with --full-validation, each over
    its own whole split); the validation loss is their unweighted mean; the log, the metrics file
    and TensorBoard have each set by name. Training does not change."""
    prefixes = byte_corpus
    data = TINY.replace("--mock-data --vocab-size 255", "--tokenizer-type ByteTokenizer")
    flags = (f"{data} --train-iters 4 --lr 1e-3 --eval-interval 2 --eval-iters 1 --train-data-path {prefixes['tr']}"
             + (" --full-validation" if full else ""))
    alone = {}
    for name in ("va", "tr"):
        ok(run(f"{flags} --valid-data-path {prefixes[name]} --metrics-file {name}.jsonl", tmp_path))
        alone[name] = val_losses(tmp_path / f"{name}.jsonl")
    out = ok(run(f"{flags} --valid-data-path {prefixes['va']} {prefixes['tr']} --multiple-validation-sets "
                 "--metrics-file m.jsonl --tensorboard-dir tb --log-validation-ppl-to-tensorboard", tmp_path))
    assert f"valid {prefixes['va']} {prefixes['tr']} (2 validation sets, evaluated apart)" in out
    names = {"va": Path(prefixes["va"]).name, "tr": Path(prefixes["tr"]).name}
    evals = [r for r in records(tmp_path / "m.jsonl") if r.get("eval")]
    assert [r["iteration"] for r in evals] == [2, 4]
    for r in evals:
        sets = {key: r["sets"][names[key]]["val_loss"] for key in names}
        assert sets == {key: alone[key][r["iteration"]] for key in names}
        assert r["val_loss"] == pytest.approx((sets["va"] + sets["tr"]) / 2, rel=1e-12)
        line = f" validation set {names['va']} at iteration {r['iteration']} | lm loss: {sets['va']:.6E} |"
        assert line in out
    assert train_losses(tmp_path / "m.jsonl") == train_losses(tmp_path / "va.jsonl")
    scalars = tensorboard_scalars(tmp_path / "tb")
    assert scalars[f"valid/{names['tr']}/lm_loss"] == pytest.approx(alone["tr"])
    assert f"valid/{names['va']}/lm_loss_ppl" in scalars and "valid/lm_loss" in scalars
    if full:
        assert out.count(f"validation: set {names['va']} whole, ") == 1


def test_no_mmap_bin_files_reads_the_same_samples(byte_corpus):
    """--no-mmap-bin-files (Megatron-LM's): megatron's file reader instead of the memory map,
    the same samples."""
    from cdp_megatron.pretrain import _build_datasets
    from cdp_megatron.pretrain_args import parse_args

    data = TINY.replace("--mock-data --vocab-size 255", "--tokenizer-type ByteTokenizer")
    samples, readers = [], []
    for flag in ("", " --no-mmap-bin-files"):
        args = parse_args(shlex.split(f"{data} --train-iters 4 --lr 1e-3 --eval-iters 0 --train-data-path "
                                      f"{byte_corpus['tr']}{flag}"), world_size=1)
        train, _ = _build_datasets(args)
        readers.append(type(train.dataset.bin_reader).__name__)
        samples.append([train[i]["tokens"].tolist() for i in range(8)])
    assert readers == ["_MMapBinReader", "_FileBinReader"]
    assert samples[0] == samples[1]


def test_grad_norm_counts_every_segment_of_a_fused_tensor_once(tmp_path):
    """The printed grad norm (Megatron's, over the optimizer's main params) when q, k and v have
    their own groups, each a view into the fused linear_qkv, equals the norm of the run where
    they share one group: the first step's gradients do not depend on the lrs (same init)."""
    raw = json.loads(BASE.read_text())
    raw.pop("$schema", None)
    raw["base"].update(parameterisation="sp", global_batch_size=8, seq_length=32, train_iters=1)
    raw["multipliers"] = {}
    (tmp_path / "one.json").write_text(json.dumps(raw))
    raw["multipliers"] = {"type": {"q": {"lr": 2.0}, "v": {"lr": 0.5}, "mlp_gate": {"lr": 3.0}}}
    (tmp_path / "split.json").write_text(json.dumps(raw))
    norms = {}
    for name in ("one", "split"):
        out = ok(run(f"{TINY} --train-iters 1 --eval-iters 0 --hidden-dropout 0 --attention-dropout 0 "
                     f"--cdp-base {name}.json --metrics-file {name}.jsonl", tmp_path))
        norms[name] = records(tmp_path / f"{name}.jsonl")[0]["grad_norm"]
        assert ("q           weight" in out) and norms[name] > 0
    assert math.isclose(norms["split"], norms["one"], rel_tol=1e-6), norms


def test_null_tokenizer_reads_data_tokenized_elsewhere(byte_corpus, tmp_path):
    """--tokenizer-type NullTokenizer --vocab-size 256 reads the byte dataset as ids 0..255 with
    end-of-document 256, exactly as ByteTokenizer does: the same run. A --vocab-size too small
    for the data stops at the first batch with one line, not an index error in the embedding."""
    common = (TINY.replace("--mock-data --vocab-size 255", "") + f" --data-path {byte_corpus['tr']} --lr 1e-3 "
              "--train-iters 3 --eval-iters 0 --split 1,0,0")
    # (the ByteTokenizer run reads megatron's GPTDataset through 2 DataLoader workers: the same samples)
    ok(run(common + " --tokenizer-type ByteTokenizer --num-workers 2 --metrics-file byte.jsonl", tmp_path))
    out = ok(run(common + " --tokenizer-type NullTokenizer --vocab-size 256 --metrics-file null.jsonl", tmp_path))
    assert "vocab 384 (padded from 257)" in out
    assert train_losses(tmp_path / "null.jsonl") == train_losses(tmp_path / "byte.jsonl")
    lines = []
    for workers in (0, 1):  # read here, and by a DataLoader worker
        small = run(common + f" --tokenizer-type NullTokenizer --vocab-size 100 --num-workers {workers}", tmp_path)
        assert small.returncode == 2 and "Traceback" not in small.stdout, small.stdout[-3000:]
        lines.append(small.stdout.strip().splitlines()[-1])
    last = lines[0]
    assert last.startswith("cdp-pretrain: error: training sample ") and last.endswith(
        ", outside the 101 ids of --tokenizer-type NullTokenizer: the data was tokenized with another tokenizer "
        "(or --vocab-size is too small)"), last
    assert int(last.split("holds token id ")[1].split(",")[0]) > 100
    assert lines[1] == last


# Counts the process's gc.disable() and gc.collect() calls into $GC_LOG at exit (on PYTHONPATH,
# Python imports it at start-up).
_GC_SPY = """
import atexit, gc, os
_calls = []
_collect, _disable = gc.collect, gc.disable
def _counted_collect(*args, **kwargs):
    _calls.append("collect")
    return _collect(*args, **kwargs)
def _counted_disable():
    _calls.append("disable")
    _disable()
gc.collect, gc.disable = _counted_collect, _counted_disable
atexit.register(lambda: open(os.environ["GC_LOG"], "w").write(" ".join(_calls)))
"""


def test_manual_gc_collects_at_the_chosen_points_and_changes_no_loss(spec20, reference, tmp_path):
    """--manual-gc: automatic collection off, gc.collect() at the start, every
    --manual-gc-interval iterations and around each evaluation (not with --no-manual-gc-eval);
    the losses are the run's without it."""
    (tmp_path / "spy").mkdir()
    (tmp_path / "spy" / "sitecustomize.py").write_text(_GC_SPY)
    counts = {}
    for name, flags in (("off", ""), ("on", " --manual-gc --manual-gc-interval 3"),
                        ("no-eval", " --manual-gc --manual-gc-interval 3 --no-manual-gc-eval")):
        env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "spy"), str(REPO)]), "GC_LOG": str(tmp_path / name)}
        ok(run(cdp20(spec20) + f" --metrics-file {name}.jsonl" + flags, tmp_path, env=env))
        assert train_losses(tmp_path / f"{name}.jsonl") == reference, name
        calls = (tmp_path / name).read_text().split()
        counts[name] = (calls.count("disable"), calls.count("collect"))
    # 20 iterations, evaluations at 10 and 20: 1 at the start + 6 (3, 6, .., 18) + 2 x 2 around them
    assert counts["on"][0] == counts["off"][0] + 1
    assert counts["on"][1] - counts["off"][1] == 1 + 6 + 4
    assert counts["no-eval"][1] - counts["off"][1] == 1 + 6


# Appends the target functions of the multiprocessing processes each Python process started to
# $PROCESS_LOG at its exit (DataLoader workers are such processes; so is what a checkpoint
# save may start).
_PROCESS_SPY = """
import atexit, multiprocessing.process, os
_started = []
_start = multiprocessing.process.BaseProcess.start
def _counted_start(self):
    _started.append(getattr(self._target, "__qualname__", "?"))
    _start(self)
multiprocessing.process.BaseProcess.start = _counted_start
atexit.register(lambda: open(os.environ["PROCESS_LOG"], "a").write("".join(name + "\\n" for name in _started)))
"""


def _workers_started(log: Path) -> int:
    names = log.read_text().split() if log.exists() else []
    log.unlink(missing_ok=True)
    return names.count("_worker_loop")  # torch.utils.data's worker function


def test_data_loader_workers_read_the_same_samples(spec20, reference, tmp_path):
    """--num-workers N: N worker processes read the training samples, the same samples in the
    same order (the dropout masks too: the loader draws from a generator of its own), before
    and after a resume."""
    (tmp_path / "spy").mkdir()
    (tmp_path / "spy" / "sitecustomize.py").write_text(_PROCESS_SPY)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "spy"), str(REPO)]), "PROCESS_LOG": str(tmp_path / "n")}
    out = ok(run(cdp20(spec20) + " --num-workers 2 --save ckpt --exit-interval 10 --metrics-file m.jsonl", tmp_path,
                 env=env))
    assert "training samples read by 2 worker processes" in next(l for l in out.splitlines() if "  data:" in l)
    assert _workers_started(tmp_path / "n") == 2
    ok(run(cdp20(spec20) + " --num-workers 1 --load ckpt --metrics-file m.jsonl", tmp_path, env=env))
    assert _workers_started(tmp_path / "n") == 1
    assert train_losses(tmp_path / "m.jsonl") == reference
    refused = run(cdp20(spec20) + " --distributed-backend nccl", tmp_path)
    assert refused.returncode == 2 and refused.stdout.strip().splitlines()[-1] == (
        "cdp-pretrain: error: --distributed-backend nccl: this run is on a CPU, where cdp-pretrain uses gloo; give "
        "--distributed-backend gloo or leave it out"), refused.stdout[-3000:]
    ok(run(cdp20(spec20) + " --distributed-backend gloo --exit-interval 1", tmp_path, env=env))
    assert _workers_started(tmp_path / "n") == 0


def test_pytorch_profiler_traces_the_chosen_steps(tmp_path):
    """--profile --use-pytorch-profiler --profile-step-start 2 --profile-step-end 4 (Megatron-LM's
    flags): a torch.profiler trace of iterations 3 and 4 in --tensorboard-dir, written after
    iteration 4's log line; --profile alone (an nsys range) is refused on a CPU."""
    import re

    plain = TINY + " --lr 1e-3 --train-iters 6 --eval-iters 0 --tensorboard-dir tb"
    out = ok(run(plain + " --profile --use-pytorch-profiler --profile-step-start 2 --profile-step-end 4", tmp_path))
    # our log lines start with a space; torch's profiler adds notes of its own (USDT:, ERROR:, ...)
    lines = [line for line in out.splitlines() if line.startswith(" ")]
    done = lines.index(" profiled iterations 3-4 on rank 0: torch.profiler trace in tb")
    assert lines[done - 1].startswith(" iteration 4/6 |"), lines[done - 3:done + 1]
    (trace,) = (tmp_path / "tb").glob("rank0.*.pt.trace.json")
    names = [event.get("name", "") for event in json.loads(trace.read_text())["traceEvents"]]
    # two training steps: megatron's schedule ran twice while the profiler recorded
    assert sum(bool(re.search(r"schedules\.py\(\d+\): forward_backward_", name)) for name in names) == 2
    assert "aten::mm" in names
    refused = run(plain + " --profile --profile-step-start 2 --profile-step-end 4", tmp_path)
    assert refused.returncode == 2 and refused.stdout.strip().splitlines()[-1] == (
        "cdp-pretrain: error: --profile without --use-pytorch-profiler marks an nsys capture range, which needs a GPU; "
        "add --use-pytorch-profiler for a torch.profiler trace"), refused.stdout[-3000:]


def test_empty_unused_memory_level(spec20, reference, tmp_path, monkeypatch):
    """--empty-unused-memory-level, as Megatron-LM: level 1 empties the CUDA cache after each
    forward-backward and evaluation batch, 2 after each optimizer step too; the same losses."""
    import torch

    from cdp_megatron.pretrain import _empty_unused_memory

    # where it is called in a run: counted by level (20 steps; 2 evaluations of 2 batches)
    count = ("import sys, collections, atexit, cdp_megatron.pretrain as p; calls = collections.Counter(); "
             "inner = p._empty_unused_memory; "
             "p._empty_unused_memory = lambda device, level, at_least: (calls.update([at_least]), "
             "inner(device, level, at_least)); "
             "atexit.register(lambda: print('calls', dict(sorted(calls.items())))); sys.exit(p.main(sys.argv[1:]))")
    out = ok(run(cdp20(spec20) + " --empty-unused-memory-level 2 --metrics-file m.jsonl", tmp_path, entry=("-c", count)))
    assert out.strip().splitlines()[-1] == "calls {1: 24, 2: 20}"
    assert train_losses(tmp_path / "m.jsonl") == reference
    # what a call does: only on a GPU, only from its level up
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    for device, level, at_least in (("cpu", 2, 1), ("cuda", 0, 1), ("cuda", 1, 2), ("cuda", 1, 1), ("cuda", 2, 2)):
        _empty_unused_memory(device, level, at_least)
    assert len(emptied) == 2


def test_grad_reduce_in_bf16(spec20, tmp_path):
    """--grad-reduce-in-bf16 (with --bf16): megatron-core's gradient buffers are bf16 (fp32 by
    default); a Complete(d)P run trains as with fp32 gradients, within bf16 rounding."""
    probe = ("import sys, cdp_megatron.integration.model as m, cdp_megatron.pretrain as p; inner = m.wrap_ddp\n"
             "def wrapped(*a, **k):\n"
             "    chunks = inner(*a, **k)\n"
             "    print('grad buffers', sorted({str(b.grad_dtype) for c in chunks for b in c.buffers}))\n"
             "    return chunks\n"
             "m.wrap_ddp = wrapped; sys.exit(p.main(sys.argv[1:]))")
    flags = cdp20(spec20) + " --bf16 --hidden-dropout 0 --attention-dropout 0 --eval-iters 0 --train-iters 10"
    out = ok(run(flags + " --metrics-file fp32.jsonl", tmp_path, entry=("-c", probe)))
    assert "grad buffers ['torch.float32']" in out
    out = ok(run(flags + " --grad-reduce-in-bf16 --metrics-file bf16.jsonl", tmp_path, entry=("-c", probe)))
    assert "grad buffers ['torch.bfloat16']" in out
    fp32, bf16 = train_losses(tmp_path / "fp32.jsonl"), train_losses(tmp_path / "bf16.jsonl")
    assert fp32[1] == bf16[1] and fp32 != bf16  # the same first forward, other updates
    assert bf16 == pytest.approx(fp32, rel=2e-2)


def test_log_memory_to_tensorboard(spec20, tmp_path, monkeypatch):
    """A CPU run refuses it in one line (there is no GPU memory to log); on a GPU the four
    torch.cuda.memory_stats() values Megatron-LM writes (benchmarks/gpu_check.sh runs it)."""
    import torch

    from cdp_megatron.pretrain import _gpu_memory

    refused = run(cdp20(spec20) + " --log-memory-to-tensorboard --tensorboard-dir tb", tmp_path)
    assert refused.returncode == 2 and refused.stdout.strip().splitlines()[-1] == (
        "cdp-pretrain: error: --log-memory-to-tensorboard writes GPU memory (torch.cuda.memory_stats), and this run "
        "is on a CPU; leave it out"), refused.stdout[-3000:]
    stats = {"reserved_bytes.all.current": 4096, "allocated_bytes.all.current": 2048,
             "allocated_bytes.all.peak": 3072, "allocation.all.current": 7, "active.all.current": 5}
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda: stats)
    assert _gpu_memory() == {"reserved_bytes": 4096.0, "allocated_bytes": 2048.0, "max_allocated_bytes": 3072.0,
                             "allocation_count": 7.0}


def test_cdp_base_example_spec(tmp_path):
    """examples/base.json as shipped, resolved at the shape, batch and duration of the flags."""
    out = ok(run(f"{TINY} --train-iters 20 --eval-interval 20 --eval-iters 1 --cdp-base {BASE} "
                 "--metrics-file m.jsonl --cdp-z-loss 1e-3", tmp_path))
    assert "Complete(d)P: --cdp-base" in out and "parameterisation completedp" in out
    assert "flags owned by Complete(d)P" in out and "--lr " in out and "--init-method-std" in out
    # The classification table with the per-group values, printed once.
    assert out.count("type        param   layers") == 1 and "mlp_gate" in out and "init_std" in out
    losses = train_losses(tmp_path / "m.jsonl")
    assert sum(losses[i] for i in (18, 19, 20)) / 3 < losses[1] - 0.3


@pytest.fixture(scope="module")
def qkv_bias_spec(spec20, tmp_path_factory) -> Path:
    """spec20 with biases on q, k and v only (--add-qkv-bias, Qwen2) and a multiplier on k's."""
    raw = json.loads(spec20.read_text())
    raw["base"]["add_qkv_bias"] = True
    raw["multipliers"].setdefault("type", {})["k.bias"] = {"lr": 4.0}
    path = tmp_path_factory.mktemp("spec") / "qkv_bias.json"
    path.write_text(json.dumps(raw))
    return path


def qkv_bias_run(spec: Path) -> str:
    return cdp20(spec) + " --add-qkv-bias --hidden-dropout 0 --attention-dropout 0 --metrics-file m.jsonl" + LOG_NORMS


def test_qkv_bias_only(qkv_bias_spec, tmp_path):
    """--add-qkv-bias: linear_qkv has a bias (its q, k, v parts in their own groups, k's lr x4)
    and no other linear layer has one."""
    out = ok(run(qkv_bias_run(qkv_bias_spec), tmp_path))
    table = out[out.index("type        param   layers"):].splitlines()
    bias_rows = {line.split()[0]: line.split() for line in table[1:] if len(line.split()) > 2 and line.split()[1] == "bias"}
    assert set(bias_rows) == {"q", "k", "v"}, table
    # 2 layers x 64 q (4 heads) and 2 x 64 k and v (4 query groups of 16): the lr column, k's x4
    assert [bias_rows[t][2:5] for t in "qkv"] == [["1-2", "2", "128"]] * 3
    lrs = {t: [float(v) for v in bias_rows[t][5].rstrip("*").split("..")] for t in "qk"}  # first..last layer
    assert lrs["k"] == pytest.approx([4 * lr for lr in lrs["q"]], rel=1e-3)
    losses = train_losses(tmp_path / "m.jsonl")
    assert sum(losses[i] for i in (18, 19, 20)) / 3 < losses[1] - 0.3


@pytest.mark.slow
def test_qkv_bias_on_two_tensor_parallel_ranks_matches_one_process(qkv_bias_spec, tmp_path):
    ok(run(qkv_bias_run(qkv_bias_spec).replace("m.jsonl", "ref.jsonl"), tmp_path))
    ok(run(qkv_bias_run(qkv_bias_spec) + " --tensor-model-parallel-size 2", tmp_path, nproc=2))
    assert_same_run(tmp_path / "m.jsonl", tmp_path / "ref.jsonl", range(1, 21))


def test_checkpoint_without_resume_record_is_refused_in_one_line(spec20, tmp_path):
    """A checkpoint saved before the resume record (simulated by a save with the record
    switched off; the stored format differs across megatron-core versions) loaded with other
    hyperparameters: Megatron's own group matching refuses it, and the refusal is one line."""
    save = ("import sys, cdp_megatron.pretrain as p; p.resume_record = lambda args: None; "
            "sys.exit(p.main(sys.argv[1:]))")
    saved = run(cdp20(spec20) + " --save old --save-interval 2 --exit-interval 2 --eval-iters 0", tmp_path,
                entry=("-c", save))
    assert saved.returncode == 0 and (tmp_path / "old" / "iter_0000002").is_dir(), saved.stdout[-4000:]
    raw = json.loads(spec20.read_text())
    raw["multipliers"]["type"]["v"]["lr"] *= 2
    (tmp_path / "v2.json").write_text(json.dumps(raw))
    refused = run(cdp20(tmp_path / "v2.json") + " --load old", tmp_path)
    assert refused.returncode == 2, refused.stdout[-4000:]
    assert "Traceback" not in refused.stdout
    assert refused.stdout.strip().splitlines()[-1] == (
        "cdp-pretrain: error: --load old/iter_0000002: the checkpoint's optimizer groups do not match this run's "
        "hyperparameters; resume with the spec and flags it was saved with (through the duration rule a changed "
        "--train-iters moves every hyperparameter of --cdp-base), or --save to a new folder")
    # The same checkpoint with the hyperparameters it was saved with still resumes.
    out = ok(run(cdp20(spec20) + " --load old --exit-interval 3 --eval-iters 0", tmp_path))
    assert "starting at iteration 2" in out


def test_rotary_options_reach_the_model_and_a_resume_with_another_base_is_refused(tmp_path):
    plain = TINY + " --lr 3e-3 --eval-iters 0 --train-iters 2"
    ok(run(plain + " --rotary-base 100 --save ck --metrics-file a.jsonl", tmp_path))
    ok(run(plain + " --metrics-file b.jsonl", tmp_path))
    # Llama 3.1's scaling moves the frequencies of wavelength > 2048 (here those of base 10000's
    # slowest pairs), the interpolation every position
    out = ok(run(plain + " --use-rope-scaling --rope-scaling-factor 32 --metrics-file c.jsonl", tmp_path))
    assert next(line for line in out.splitlines() if line.startswith("  model:")).endswith(
        ", rope base 10000, Llama 3.1 frequency scaling x32")
    ok(run(plain + " --rotary-seq-len-interpolation-factor 4 --metrics-file d.jsonl", tmp_path))
    out = ok(run(plain + " --rotary-interleaved --metrics-file e.jsonl", tmp_path))
    assert next(line for line in out.splitlines() if line.startswith("  model:")).endswith(
        ", rope base 10000, interleaved pairs")
    # the same initial weights (--seed), other positions: another loss from the first step
    first = {name: train_losses(tmp_path / f"{name}.jsonl")[1] for name in "abcde"}
    assert len(set(first.values())) == 5, first
    refused = run(plain.replace("--train-iters 2", "--train-iters 4") + " --load ck", tmp_path)
    assert refused.returncode == 2 and refused.stdout.strip().splitlines()[-1] == (
        "cdp-pretrain: error: --load ck/iter_0000002: the checkpoint was trained with other rotary positions "
        "(--rotary-base 100 there, 10000 here); resume with the flags it was saved with, or start from its weights "
        "with --finetune"), refused.stdout[-4000:]


def test_pretrained_checkpoint_starts_from_its_weights_then_resumes_from_load(tmp_path):
    # Megatron-LM's requeue-safe fine-tuning: --load ck --save ck --pretrained-checkpoint base
    common = TINY + " --eval-iters 0 --lr-warmup-iters 1"
    ok(run(common + " --lr 3e-3 --train-iters 2 --save base", tmp_path))
    tune = common + " --lr 1e-3 --train-iters 4"
    ok(run(tune + " --load base --finetune --metrics-file ref.jsonl", tmp_path))
    first = ok(run(tune + " --pretrained-checkpoint base --load ck --save ck --exit-interval 2 --metrics-file a.jsonl",
                   tmp_path))
    assert "--load ck: no checkpoint there; starting from the weights of --pretrained-checkpoint" in first
    assert ("loaded the weights of base/iter_0000002 (--pretrained-checkpoint): starting at iteration 0 with this "
            "run's optimizer, schedule and data") in first
    again = ok(run(tune + " --pretrained-checkpoint base --load ck --save ck --metrics-file b.jsonl", tmp_path))
    assert "loading checkpoint ck/iter_0000002" in again and "--pretrained-checkpoint)" not in again
    a, b = train_losses(tmp_path / "a.jsonl"), train_losses(tmp_path / "b.jsonl")
    assert sorted(a) == [1, 2] and sorted(b) == [3, 4] and {**a, **b} == train_losses(tmp_path / "ref.jsonl")
    refused = run(tune + " --pretrained-checkpoint nothing-here", tmp_path)
    assert refused.returncode == 2 and refused.stdout.strip().splitlines()[-1] == (
        "cdp-pretrain: error: --pretrained-checkpoint nothing-here: no checkpoint there; give the folder of the run "
        "to start from")


def test_skip_train_evaluates_the_checkpoint_and_trains_nothing(tmp_path):
    plain = TINY + " --lr 3e-3 --eval-iters 2 --eval-interval 4 --train-iters 4"
    ok(run(plain + " --save ck --metrics-file a.jsonl", tmp_path))
    trained = records(tmp_path / "a.jsonl")[-1]
    assert trained["eval"] and trained["iteration"] == 4
    # the weights of iteration 4 on the same validation batches: the same loss; --train-iters does
    # not matter, nor the optimizer's hyperparameters
    out = ok(run(plain.replace("--train-iters 4", "--train-iters 2").replace("3e-3", "1e-2")
                 + " --load ck --skip-train --save ck --metrics-file b.jsonl", tmp_path))
    assert "loaded the weights of ck/iter_0000004 (--skip-train): evaluating them, at iteration 4" in out
    assert " note: nothing is saved to --save ck (--skip-train)" in out
    (evaluated,) = records(tmp_path / "b.jsonl")
    assert evaluated["eval"] and evaluated["iteration"] == 4
    assert (evaluated["val_loss"], evaluated["val_z_loss"]) == (trained["val_loss"], trained["val_z_loss"])
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["iter_0000004", "latest_checkpointed_iteration.txt"]
    # a --load without a checkpoint is a mistake here, not the initial weights
    refused = run(plain + " --load empty --skip-train", tmp_path)
    assert refused.returncode == 2 and refused.stdout.strip().splitlines()[-1] == (
        "cdp-pretrain: error: --skip-train --load empty: no checkpoint there; give the folder of the run to evaluate")


@pytest.mark.parametrize("bf16", ["", " --bf16"], ids=["fp32", "bf16"])
def test_fused_cross_entropy_trains_as_the_autograd_loss(tmp_path, bf16):
    plain = TINY + f" --lr 3e-3 --eval-iters 1 --eval-interval 4 --train-iters 4 --cdp-z-loss 1e-2{bf16}"
    ok(run(plain + " --metrics-file a.jsonl", tmp_path))
    out = ok(run(plain + " --cross-entropy-loss-fusion --metrics-file b.jsonl", tmp_path))
    assert next(line for line in out.splitlines() if line.startswith("  data:")).endswith(
        "; z-loss 0.01, fused cross-entropy")
    a, b = records(tmp_path / "a.jsonl"), records(tmp_path / "b.jsonl")
    assert len(a) == len(b) == 5 and b[-1]["eval"]
    for x, y in zip(a, b):  # the first loss equal within rounding, then the updates too
        for key in ("lm_loss", "z_loss", "grad_norm", "val_loss", "val_z_loss"):
            if key in x:
                assert math.isclose(x[key], y[key], rel_tol=1e-5 if not bf16 else 1e-3), (key, x, y)


def test_squared_relu_is_another_function_of_the_same_weights(tmp_path):
    plain = TINY.replace(" --swiglu", "") + " --lr 3e-3 --eval-iters 0 --train-iters 2"
    ok(run(plain + " --metrics-file a.jsonl", tmp_path))
    out = ok(run(plain + " --squared-relu --metrics-file b.jsonl", tmp_path))
    assert next(line for line in out.splitlines() if line.startswith("  model:")).endswith(", squared-ReLU MLP")
    a, b = train_losses(tmp_path / "a.jsonl"), train_losses(tmp_path / "b.jsonl")
    assert len(a) == len(b) == 2 and a[1] != b[1], (a, b)


def test_zero_centred_norm_gains_train_the_same_function_and_are_part_of_the_model(tmp_path):
    # --apply-layernorm-1p keeps each norm gain as weight + 1 (weight 0 at init): the same model, and,
    # as norm weights are not decayed (Megatron's default for 1-D weights), the same training up to
    # rounding. A checkpoint's norm weights hold gain - 1, so a model without it refuses them.
    plain = TINY + " --lr 3e-3 --eval-iters 0 --train-iters 4 --log-params-norm"
    ok(run(plain + " --metrics-file a.jsonl", tmp_path))
    out = ok(run(plain + " --apply-layernorm-1p --save ck --metrics-file b.jsonl", tmp_path))
    assert next(line for line in out.splitlines() if line.startswith("  model:")).endswith(
        ", zero-centred norm gains (1 + weight)")
    a, b = train_losses(tmp_path / "a.jsonl"), train_losses(tmp_path / "b.jsonl")
    assert len(a) == 4 and all(math.isclose(a[i], b[i], rel_tol=1e-5) for i in a), (a, b)
    # the norm weights are ~0 here, ~1 there: the squared parameter norms differ by the number of
    # gain elements (input, pre-MLP, q and k norms of 2 layers: 2 x (64 + 64 + 16 + 16), and the final 64),
    # within what 4 steps of lr <= 3e-3 move them
    norms = logged(tmp_path / "a.jsonl", "params_norm"), logged(tmp_path / "b.jsonl", "params_norm")
    assert all(abs(norms[0][i] ** 2 - norms[1][i] ** 2 - 384) < 384 * 2 * 4 * 3e-3 for i in a), norms
    refused = run(plain.replace("--train-iters 4", "--train-iters 6") + " --load ck --finetune", tmp_path)
    assert refused.returncode == 2 and refused.stdout.strip().splitlines()[-1] == (
        "cdp-pretrain: error: --load ck/iter_0000004: the checkpoint is of another model (--apply-layernorm-1p "
        "True there, False here); resume with the flags it was saved with, or --save to a new folder"), \
        refused.stdout[-4000:]


@pytest.mark.parametrize("recompute, printed", [
    ("--recompute-granularity full --recompute-method uniform --recompute-num-layers 1",
     "recomputing whole layers (uniform, 1 layer)"),
    ("--recompute-activations", "recomputing the core attention"),
    ("--recompute-granularity selective --recompute-modules mlp layernorm", "recomputing the MLP and the norms"),
], ids=["full", "selective", "modules"])
def test_activation_recomputation_gives_the_same_losses(spec20, reference, tmp_path, recompute, printed):
    # with dropout on (0.1): the recomputed forward must draw the same dropout masks
    # (that megatron recomputes with these fields, and exactly: test_model's recomputation test)
    from cdp_megatron.pretrain import config_overrides
    from cdp_megatron.pretrain_args import parse_args

    fields = config_overrides(parse_args(shlex.split(cdp20(spec20) + " " + recompute), world_size=1))
    assert fields["recompute_granularity"] == ("full" if "full" in recompute else "selective")
    assert fields.get("recompute_modules") == (["mlp", "layernorm"] if "modules" in recompute else None)
    out = ok(run(cdp20(spec20) + f" {recompute} --metrics-file m.jsonl", tmp_path))
    assert printed in next(line for line in out.splitlines() if line.startswith("cdp-pretrain: 1 process"))
    if "layernorm" in recompute:  # equal within float rounding (test_model's recomputation test says why)
        _assert_close(train_losses(tmp_path / "m.jsonl"), reference, range(1, 21))
    else:
        assert train_losses(tmp_path / "m.jsonl") == reference


def test_local_attention_backend_is_the_local_spec(spec20, reference, tmp_path):
    # --attention-backend local implies --transformer-impl local, which CPU runs use anyway:
    # the same model, the same losses, and the backend named at start-up
    out = ok(run(cdp20(spec20) + " --attention-backend local --metrics-file m.jsonl", tmp_path))
    assert "attention backend local" in next(line for line in out.splitlines() if line.startswith("  model:"))
    assert train_losses(tmp_path / "m.jsonl") == reference
    out = run(cdp20(spec20) + " --attention-backend local", tmp_path, env={"NVTE_FLASH_ATTN": "1"})
    assert out.returncode == 2 and "the environment sets NVTE_FLASH_ATTN=1" in out.stdout


def test_plain_resume_keeps_the_schedule_or_refuses_another(tmp_path):
    """A plain run resumed with another warmup, decay or decay style is refused in one line
    (Megatron's scheduler would take the checkpoint's values in place of the flags' without a
    word, while the start-up line printed the flags'); a longer run that gives the
    checkpoint's --lr-decay-iters resumes on the checkpoint's schedule."""
    plain = TINY + " --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --eval-iters 0"
    ok(run(plain + " --train-iters 12 --lr-warmup-iters 2 --save ck --save-interval 6 --exit-interval 6", tmp_path))
    refused = run(plain + " --train-iters 12 --lr-warmup-iters 3 --lr-decay-style linear --load ck", tmp_path)
    assert refused.returncode == 2, refused.stdout[-4000:]
    assert refused.stdout.strip().splitlines()[-1] == (
        "cdp-pretrain: error: --load ck/iter_0000006: the checkpoint was trained on another lr schedule "
        "(--lr-warmup-iters 2 there, 3 here; --lr-decay-style cosine there, linear here); resume with the flags it was "
        "saved with, or --save to a new folder")
    refused = run(plain + " --train-iters 16 --lr-warmup-iters 2 --load ck", tmp_path)
    assert refused.returncode == 2 and refused.stdout.strip().splitlines()[-1].endswith(
        "(--lr-decay-iters 12 there, 16 here); resume with the flags it was saved with (--lr-decay-iters defaults to "
        "--train-iters: give the checkpoint's to train longer on its schedule), or --save to a new folder"), \
        refused.stdout[-4000:]
    ok(run(plain + " --train-iters 16 --lr-decay-iters 12 --lr-warmup-iters 2 --load ck --metrics-file m.jsonl",
           tmp_path))
    lrs = {r["iteration"]: r["lr"] for r in records(tmp_path / "m.jsonl")}
    assert sorted(lrs) == list(range(7, 17))
    assert lrs[7] > lrs[12] > 3e-4 and all(lrs[i] == 3e-4 for i in range(13, 17)), lrs
    # A checkpoint saved before the record: Megatron's own check of the schedule, in one line.
    save = ("import sys, cdp_megatron.pretrain as p; p.resume_record = lambda args: None; "
            "sys.exit(p.main(sys.argv[1:]))")
    ok(run(plain + " --train-iters 12 --lr-warmup-iters 2 --save old --save-interval 6 --exit-interval 6", tmp_path,
           entry=("-c", save)))
    refused = run(plain + " --train-iters 12 --lr-warmup-iters 3 --load old", tmp_path)
    assert refused.returncode == 2, refused.stdout[-4000:]
    last = refused.stdout.strip().splitlines()[-1]
    assert last.startswith("cdp-pretrain: error: --load old/iter_0000006: the checkpoint does not match the flags (") \
        and "3" in last and "2" in last and "warmup" in last, last


def test_warmup_fraction_is_megatron_lms(tmp_path):
    """--lr-warmup-fraction 0.125 of 20 iterations is a warmup of 2.5 iterations, as in
    Megatron-LM (whose scheduler counts samples: 0.125 x 20 x the batch), not 2: the lrs are
    its formula's (the lr printed for iteration i is the schedule at step i - 1)."""
    out, lrs = logged_lrs(TINY + " --lr 1e-3 --min-lr 1e-4 --train-iters 20 --eval-iters 0 --lr-warmup-fraction 0.125",
                          tmp_path, "m.jsonl")
    assert "linear decay, warmup 2.5," in out

    def by_hand(step):
        if step <= 2.5:
            return 1e-3 * step / 2.5
        return 1e-3 - (1e-3 - 1e-4) * (step - 2.5) / (20 - 2.5)

    assert lrs == pytest.approx({i: by_hand(i - 1) for i in range(1, 21)}, rel=1e-12)


def test_schedule_in_samples_is_megatron_lms(tmp_path):
    """--train-samples 100 of global batches of 8: 12 iterations, and (as Megatron-LM, whose
    scheduler counts samples) a decay over 100 / 8 = 12.5 iterations, with a warmup fraction of
    it: the lr does not reach the min lr at the last iteration."""
    out, lrs = logged_lrs(TINY + " --lr 1e-3 --min-lr 1e-4 --train-samples 100 --eval-iters 0 --lr-warmup-fraction 0.1 "
                          "--lr-decay-style cosine", tmp_path, "m.jsonl")
    assert "cosine decay, warmup 1.25," in out

    def by_hand(step):
        if step <= 1.25:
            return 1e-3 * step / 1.25
        return 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * (step - 1.25) / (12.5 - 1.25)))

    assert lrs == pytest.approx({i: by_hand(i - 1) for i in range(1, 13)}, rel=1e-12)
    # the schedule in samples (Megatron-LM's Llama 3 example): decay 90 / 8 = 11.25 iterations,
    # warmup 12 / 8 = 1.5, WSD's linear final decay over 36 / 8 = 4.5; then the min lr
    out, lrs = logged_lrs(TINY + " --lr 1e-3 --min-lr 1e-4 --train-samples 100 --eval-iters 0 --lr-decay-samples 90 "
                          "--lr-warmup-samples 12 --lr-decay-style WSD --lr-wsd-decay-style linear "
                          "--lr-wsd-decay-samples 36", tmp_path, "s.jsonl")
    assert "WSD decay (the peak lr up to iteration 6.75, then linear to the min lr at 11.25), warmup 1.5," in out

    def wsd_by_hand(step):
        if step <= 1.5:
            return 1e-3 * step / 1.5
        if step > 11.25:
            return 1e-4
        return 1e-4 + (1e-3 - 1e-4) * (1 if step <= 6.75 else 1 - (step - 6.75) / 4.5)

    assert lrs == pytest.approx({i: wsd_by_hand(i - 1) for i in range(1, 13)}, rel=1e-12)


def test_decoupled_lr_reaches_the_embedding_and_output_groups_and_resumes(tmp_path):
    """--decoupled-lr / --decoupled-min-lr (plain runs, Megatron-LM's): the word embedding's and the
    output layer's groups peak and end there, every other group at --lr / --min-lr; printed at
    start-up, and a save and resume (distributed optimizer) equals the uninterrupted run."""
    show = ("import sys, cdp_megatron.integration.training as t, cdp_megatron.pretrain as p; inner = t.plain_optimizer\n"
            "def wrapped(*a, **k):\n"
            "    opt, sch = inner(*a, **k)\n"
            "    print('groups', sorted({(g['max_lr'], g['min_lr'], tuple(sorted({getattr(q, 'is_embedding_or_output_"
            "parameter', False) for q in g['params']}))) for g in opt.param_groups}))\n"
            "    return opt, sch\n"
            "t.plain_optimizer = wrapped; sys.exit(p.main(sys.argv[1:]))")
    flags = (TINY + " --lr 1e-3 --min-lr 1e-5 --decoupled-lr 5e-4 --decoupled-min-lr 4.5e-5 --train-iters 4 "
             "--eval-iters 0 --lr-decay-style cosine --metrics-file m.jsonl")
    out = ok(run(flags, tmp_path, entry=("-c", show)))
    assert "groups [(0.0005, 4.5e-05, (True,)), (0.001, 1e-05, (False,))]" in out
    assert "embedding and output lr 0.0005 (min 4.5e-05), " in next(
        line for line in out.splitlines() if "hyperparameters (plain Megatron)" in line)
    reference = train_losses(tmp_path / "m.jsonl")
    ok(run(flags.replace("m.jsonl", "p.jsonl").replace(" --decoupled-lr 5e-4 --decoupled-min-lr 4.5e-5", ""), tmp_path))
    assert train_losses(tmp_path / "p.jsonl")[2] != reference[2]  # the embedding's first update differed
    distopt = flags.replace("m.jsonl", "r.jsonl") + " --use-distributed-optimizer --save ck --save-interval 2"
    ok(run(distopt + " --exit-interval 2", tmp_path))
    ok(run(distopt + " --load ck", tmp_path))
    resumed = train_losses(tmp_path / "r.jsonl")
    assert [resumed[i] for i in (3, 4)] == pytest.approx([reference[i] for i in (3, 4)], rel=1e-6)


def test_wsd_schedule_and_a_resume_with_another_decay_is_refused(tmp_path):
    """--lr-decay-style WSD: warmup, the peak lr, then the last --lr-wsd-decay-iters decay to the
    min lr (megatron-core's scheduler; the lr printed for iteration i is the one it trained
    with, the schedule at step i - 1). Its scheduler does not keep the WSD fields in its state:
    the resume record does, so a resume with another final decay is refused."""
    wsd = (TINY + " --lr 1e-3 --min-lr 1e-4 --eval-iters 0 --train-iters 12 --lr-warmup-iters 2 --lr-decay-style WSD "
           "--lr-wsd-decay-iters 4")
    out = ok(run(wsd + " --lr-wsd-decay-style cosine --metrics-file m.jsonl --save ck --exit-interval 6", tmp_path))
    assert "WSD decay (the peak lr up to iteration 8, then cosine to the min lr at 12)" in out
    ok(run(wsd + " --lr-wsd-decay-style cosine --metrics-file m.jsonl --load ck", tmp_path))  # iterations 7..12
    lrs = {r["iteration"]: r["lr"] for r in records(tmp_path / "m.jsonl")}

    def by_hand(step):
        if step < 2:
            return 1e-3 * step / 2  # linear warmup from 0
        if step <= 8:
            return 1e-3
        return 1e-4 + 0.5 * (1 + math.cos(math.pi * (step - 8) / 4)) * (1e-3 - 1e-4)

    assert lrs == pytest.approx({i: by_hand(i - 1) for i in range(1, 13)}, rel=1e-12)
    refused = run(wsd + " --lr-wsd-decay-style cosine --lr-wsd-decay-iters 6 --load ck --ckpt-step 6", tmp_path)
    assert refused.returncode == 2 and refused.stdout.strip().splitlines()[-1].endswith(
        "the checkpoint was trained on another lr schedule (--lr-wsd-decay-iters 4 there, 6 here); resume with the "
        "flags it was saved with, or --save to a new folder"), refused.stdout[-4000:]
    refused = run(wsd + " --load ck --ckpt-step 6", tmp_path)  # the default final decay is exponential
    assert refused.returncode == 2 and "(--lr-wsd-decay-style cosine there, exponential here)" in refused.stdout


def test_resume_with_another_sequence_length_counts_the_tokens_trained(tmp_path):
    """A plain run may resume on shorter sequences (rope, the same --max-position-embeddings):
    the consumed tokens go on from the checkpoint's count (they were samples x the new
    length), and a note says that the data is cut anew."""
    plain = TINY + " --max-position-embeddings 32 --lr 1e-3 --train-iters 6 --eval-iters 0 --metrics-file m.jsonl"
    ok(run(plain + " --save ck --save-interval 3 --exit-interval 3", tmp_path))
    out = ok(run(plain.replace("--seq-length 32", "--seq-length 16") + " --load ck", tmp_path))
    assert ("note: the checkpoint was trained on 32-token sequences, this run reads 16: it goes on at sample 24 of "
            "the 16-token samples") in out
    tokens = {r["iteration"]: r["consumed_tokens"] for r in records(tmp_path / "m.jsonl")}
    assert tokens == {1: 256, 2: 512, 3: 768, 4: 768 + 128, 5: 768 + 256, 6: 768 + 384}, tokens  # both runs


def test_resume_from_a_chosen_step_and_a_finished_run(tmp_path):
    """--ckpt-step resumes from an earlier checkpoint (exactly: the losses of the first run);
    a finished run started again (a requeued job) has nothing to train and exits 0; a
    checkpoint past --train-iters is refused."""
    plain = TINY + " --lr 1e-3 --train-iters 6 --eval-iters 0 --hidden-dropout 0 --attention-dropout 0"
    ok(run(plain + " --save ck --save-interval 3 --metrics-file first.jsonl", tmp_path))
    first = train_losses(tmp_path / "first.jsonl")
    out = ok(run(plain + " --load ck --metrics-file again.jsonl", tmp_path))
    assert "--load ck/iter_0000006: the run is already at --train-iters 6; nothing to train" in out
    assert not (tmp_path / "again.jsonl").exists() or not train_losses(tmp_path / "again.jsonl")
    out = ok(run(plain + " --load ck --ckpt-step 3 --metrics-file step3.jsonl", tmp_path))
    assert "loading checkpoint ck/iter_0000003" in out and "starting at iteration 3" in out
    assert train_losses(tmp_path / "step3.jsonl") == {i: first[i] for i in (4, 5, 6)}
    refused = run(plain.replace("--train-iters 6", "--train-iters 4") + " --lr-decay-iters 6 --load ck", tmp_path)
    assert refused.returncode == 2 and refused.stdout.strip().splitlines()[-1] == (
        "cdp-pretrain: error: --load ck/iter_0000006: the checkpoint is at iteration 6, past --train-iters 4; give a "
        "larger --train-iters to train on from it"), refused.stdout[-4000:]


def test_finetune_starts_from_the_weights_only(spec20, tmp_path):
    """--finetune takes the weights and nothing else: another spec's hyperparameters are not
    refused, the run starts at iteration 0, and after its first step (lr 0 in the warmup) the
    validation loss is the checkpoint's to the bit. bf16: the optimizer's fp32 main params
    must be reloaded from the weights, else that step copies the initial weights back."""
    saved = cdp20(spec20).replace("--eval-interval 10", "--eval-interval 6") + " --bf16 --metrics-file a.jsonl"
    ok(run(saved + " --save ck --exit-interval 6", tmp_path))
    (val,) = [r["val_loss"] for r in records(tmp_path / "a.jsonl") if r.get("eval")]
    raw = json.loads(spec20.read_text())
    raw["multipliers"]["type"]["v"]["lr"] *= 2  # a resume would be refused
    (tmp_path / "v2.json").write_text(json.dumps(raw))
    tuned = cdp20(tmp_path / "v2.json").replace("--eval-interval 10", "--eval-interval 1")
    out = ok(run(tuned + " --bf16 --load ck --finetune --exit-interval 1 --metrics-file b.jsonl", tmp_path))
    assert ("loaded the weights of ck/iter_0000006 (--finetune): starting at iteration 0 with this run's optimizer, "
            "schedule and data") in out and "starting at iteration 0" in out
    rows = records(tmp_path / "b.jsonl")
    assert [r["lr"] for r in rows if not r.get("eval")] == [0.0]
    assert [r["val_loss"] for r in rows if r.get("eval")] == [val]
    refused = run(tuned.replace("--num-layers 2", "--num-layers 4") + " --load ck --finetune", tmp_path)
    assert refused.returncode == 2 and refused.stdout.strip().splitlines()[-1] == (
        "cdp-pretrain: error: --load ck/iter_0000006: the checkpoint is of another model (--num-layers 2 there, 4 "
        "here); resume with the flags it was saved with, or --save to a new folder"), refused.stdout[-4000:]
    # --no-save-optim --no-save-rng: the weights alone, enough to fine-tune from (the same
    # validation loss to the bit); training cannot go on from them, which is refused in one line
    ok(run(saved + " --save light --exit-interval 6 --no-save-optim --no-save-rng", tmp_path))
    assert not (tmp_path / "light" / "iter_0000006" / "rng").exists() and (tmp_path / "ck" / "iter_0000006" / "rng").exists()
    ok(run(tuned + " --bf16 --load light --finetune --exit-interval 1 --metrics-file c.jsonl", tmp_path))
    assert [r["val_loss"] for r in records(tmp_path / "c.jsonl") if r.get("eval")] == [val]
    refused = run(saved + " --load light", tmp_path)
    assert refused.returncode == 2 and refused.stdout.strip().splitlines()[-1] == (
        "cdp-pretrain: error: --load light/iter_0000006: the checkpoint holds no optimizer state (saved with "
        "--no-save-optim), so training cannot go on from it; give --finetune to start from its weights"), \
        refused.stdout[-4000:]


def test_iterations_to_skip_pass_over_their_batches(tmp_path):
    """Megatron-LM's --iterations-to-skip: a skipped iteration's batch is passed over (the data
    goes on after it), nothing is trained and the lr schedule does not advance; a checkpoint
    carries the skips, and a resume goes on as the uninterrupted run."""
    flags = (TINY + " --lr 1e-3 --lr-warmup-iters 2 --lr-decay-iters 6 --train-iters 6 --hidden-dropout 0 "
             "--attention-dropout 0 --eval-iters 1")
    out = ok(run(flags + " --eval-interval 2 --metrics-file ref.jsonl --check-weight-hash-across-dp-replicas-interval 1",
                 tmp_path))
    # (one process, so one replica: the check is said to have nothing to compare)
    assert (" note: --check-weight-hash-across-dp-replicas-interval has nothing to compare with one data-parallel "
            "replica") in out and "replicas match" not in out
    # with a data loader worker, which must not read the skipped batch (it checks every sample index)
    out = ok(run(flags + " --eval-interval 3 --iterations-to-skip 6 3 --num-workers 1 --save ckpt --save-interval 3 "
                 "--metrics-file skip.jsonl", tmp_path))
    assert ("skipping iterations 3, 6 (--iterations-to-skip): their batches are passed over, nothing is trained and "
            "the lr schedule does not advance") in out
    assert " iteration 3/6 | skipped (--iterations-to-skip): samples 16-23 not trained on" in out
    reference, skipping = records(tmp_path / "ref.jsonl"), records(tmp_path / "skip.jsonl")
    assert [(r["iteration"], r["consumed_samples"]) for r in skipping if r.get("skipped")] == [(3, 24), (6, 48)]
    assert [r["consumed_samples"] for r in skipping if "lm_loss" in r] == [8, 16, 32, 40]
    losses, reference_losses = train_losses(tmp_path / "skip.jsonl"), train_losses(tmp_path / "ref.jsonl")
    assert sorted(losses) == [1, 2, 4, 5]
    assert [losses[1], losses[2]] == [reference_losses[1], reference_losses[2]]
    assert losses[4] != reference_losses[4]  # the batch of iteration 4, from the weights of iteration 2
    # nothing was trained at iteration 3: the weights evaluated there are those of iteration 2
    assert val_losses(tmp_path / "skip.jsonl")[3] == val_losses(tmp_path / "ref.jsonl")[2]
    # nor was the schedule stepped: iteration 4 has the lr of the reference's iteration 3, 5 that of 4
    lrs = {r["iteration"]: r["lr"] for r in skipping if "lr" in r}
    reference_lrs = {r["iteration"]: r["lr"] for r in reference if "lr" in r}
    assert [lrs[4], lrs[5]] == [reference_lrs[3], reference_lrs[4]] and lrs[4] != reference_lrs[4]
    # resumed after the first skip (read in the training process this time), it goes on alike; an
    # iteration listed before the checkpoint and trained there is named
    out = ok(run(flags + " --eval-interval 3 --iterations-to-skip 2 3 6 --load ckpt --ckpt-step 3 "
                 "--metrics-file resumed.jsonl", tmp_path))
    assert " note: the checkpoint's run skipped iteration 3 (--iterations-to-skip)" in out
    assert (" note: --iterations-to-skip 2: trained before the checkpoint (iteration 3), so not skipped; to skip it, "
            "resume from a checkpoint before it (--ckpt-step)") in out
    assert "skipping iteration 6 (--iterations-to-skip): its batch is passed over" in out
    def after_3(path):
        keys = ("iteration", "skipped", "consumed_samples", "lm_loss", "lr", "grad_norm")
        return [{k: r.get(k) for k in keys} for r in records(path) if r["iteration"] > 3 and not r.get("eval")]

    assert after_3(tmp_path / "resumed.jsonl") == after_3(tmp_path / "skip.jsonl")
    assert len(after_3(tmp_path / "resumed.jsonl")) == 3
    assert val_losses(tmp_path / "resumed.jsonl")[6] == val_losses(tmp_path / "skip.jsonl")[6]


def test_deterministic_mode(tmp_path):
    """--deterministic-mode (Megatron-LM's): torch's deterministic algorithms and megatron-core's
    deterministic embedding (an index in place of F.embedding, whose backward is not on GPUs),
    here on TP 1; on a CPU the same losses as without (the gradient sums may add in another
    order: within 1e-5)."""
    flags = TINY + " --lr 1e-3 --train-iters 3 --eval-iters 0 --metrics-file {}.jsonl"
    out = ok(run(flags.format("det") + " --deterministic-mode", tmp_path))
    assert ", deterministic kernels" in next(line for line in out.splitlines() if line.startswith("cdp-pretrain: "))
    ok(run(flags.format("plain"), tmp_path))
    _assert_close(train_losses(tmp_path / "det.jsonl"), train_losses(tmp_path / "plain.jsonl"), [1, 2, 3])


def test_logging_level_shows_megatrons_messages(tmp_path):
    said = "INFO megatron.core.optimizer: Setting up optimizer with config OptimizerConfig("
    assert said in ok(run(TINY + " --lr 1e-3 --train-iters 1 --eval-iters 0 --logging-level 20", tmp_path))
    assert said not in ok(run(TINY + " --lr 1e-3 --train-iters 1 --eval-iters 0", tmp_path))


def test_exit_duration_saves_and_stops_without_the_evaluation(tmp_path):
    """--exit-duration-in-mins (Megatron-LM's): the first iteration that ends past the limit
    (here every one: the start-up alone takes longer) saves and stops, skipping the evaluation
    due there; the run resumes from that checkpoint."""
    plain = TINY + " --lr 1e-3 --train-iters 6 --eval-interval 1 --eval-iters 1"
    out = ok(run(plain + " --save ck --exit-duration-in-mins 0.001", tmp_path))
    assert "exiting at iteration 1 (--exit-duration-in-mins 0.001: " in out and "validation at" not in out
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    out = ok(run(plain + " --load ck --exit-interval 2", tmp_path))
    assert "starting at iteration 1" in out and "exiting at iteration 2 (--exit-interval 2)" in out


def _popen(args: str, tmp_path: Path, nproc: int = 1, session: bool = False):
    """cdp-pretrain started as ``run`` starts it, without waiting for it; ``session``: in a
    process group of its own (a terminal's Ctrl-C reaches the whole group: os.killpg)."""
    cmd, env = _command(args, nproc, None)
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=session)


def _wait_for_iterations(path: Path, proc, n: int, timeout: float = 240) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not (path.exists() and len(path.read_text().splitlines()) >= n):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "the run did not reach the iterations in time"
        time.sleep(0.2)


CTRL_C_NOTICE = ("cdp-pretrain: Ctrl-C: stopping at the end of the iteration in progress, {}; Ctrl-C again to stop "
                 "at once")


def test_ctrl_c_saves_at_the_end_of_the_iteration_and_stops(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) mid-run: the run says what
    comes next, finishes the iteration in progress, saves it and exits 130 with one line naming
    that checkpoint (it was a KeyboardInterrupt traceback, then a stop short of a save); a
    resume from it starts there. Saves every iteration: the signal lands in one often (where a
    KeyboardInterrupt could be swallowed by Python as the checkpoint writer forked)."""
    import signal

    plain = TINY + " --lr 1e-3 --train-iters 100000 --eval-iters 0 --metrics-file m.jsonl --save ck --save-interval 1"
    proc = _popen(plain, tmp_path, session=True)
    _wait_for_iterations(tmp_path / "m.jsonl", proc, 3)
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 130, out[-4000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out and "Exception ignored" not in out, out[-4000:]
    assert CTRL_C_NOTICE.format("saving a checkpoint to ck") in out.splitlines(), out[-4000:]
    last = out.strip().splitlines()[-1]
    stopped = max(train_losses(tmp_path / "m.jsonl"))
    assert last == (f"cdp-pretrain: interrupted after iteration {stopped} of 100000; the last checkpoint saved is "
                    f"ck/iter_{stopped:07d}: rerun with --load ck to resume"), last
    assert int((tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text()) == stopped >= 3
    proc = _popen(plain.replace("m.jsonl", "n.jsonl") + f" --load ck --exit-interval {stopped + 1}", tmp_path)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0 and f"starting at iteration {stopped}" in out, out[-4000:]
    proc = _popen(TINY + " --lr 1e-3 --train-iters 100000 --eval-iters 0 --metrics-file o.jsonl --num-workers 2",
                  tmp_path, session=True)  # its DataLoader workers get the signal too, and leave it to the run
    _wait_for_iterations(tmp_path / "o.jsonl", proc, 1)
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 130 and "Traceback" not in out, out[-4000:]
    assert CTRL_C_NOTICE.format("nothing is saved (no --save)") in out.splitlines(), out[-4000:]
    stopped = max(train_losses(tmp_path / "o.jsonl"))
    assert out.strip().splitlines()[-1] == (f"cdp-pretrain: interrupted after iteration {stopped} of 100000; nothing "
                                            "saved (no --save)"), out[-4000:]


def test_a_second_ctrl_c_stops_at_once(capfd):
    """The handler: the first Ctrl-C only sets the flag and says so (rank 0); one within a
    second is the same Ctrl-C (torchrun passes the terminal's on to its workers); a later one
    raises KeyboardInterrupt (and check() raises it again if Python swallowed it); a process
    forked from the run ignores it; other ranks say nothing."""
    from cdp_megatron.pretrain import _Interrupt

    now = [100.0]
    handler = _Interrupt(save="ck", say=True, clock=lambda: now[0], install=False)
    handler.check()
    handler._handle(2, None)
    assert handler.received and not handler.forced
    assert capfd.readouterr().err == "\n" + CTRL_C_NOTICE.format("saving a checkpoint to ck") + "\n"
    now[0] += 0.9
    handler._handle(2, None)  # torchrun's copy
    handler.check()
    now[0] += 0.2
    with pytest.raises(KeyboardInterrupt):
        handler._handle(2, None)
    assert handler.forced
    with pytest.raises(KeyboardInterrupt):
        handler.check()
    forked = _Interrupt(say=True, install=False)
    forked._pid = -1  # as in the checkpoint writer's forked process
    forked._handle(2, None)
    assert not forked.received
    quiet = _Interrupt(say=False, install=False)
    quiet._handle(2, None)
    assert quiet.received and capfd.readouterr().err == ""


def test_a_ctrl_c_during_a_helper_start_is_deferred():
    """_sigint_deferred: a SIGINT inside the block raises KeyboardInterrupt only on leaving
    it; a process started inside begins with SIGINT blocked (so a terminal's Ctrl-C cannot
    kill it before it ignores SIGINT); the handler and mask are restored. Another handler
    (a run's _Interrupt) stays in place and decides."""
    import signal

    from cdp_megatron.pretrain import _sigint_deferred

    def blocked_in_child() -> bool:
        status = subprocess.run([sys.executable, "-c", "print(open('/proc/self/status').read())"],
                                capture_output=True, text=True, check=True).stdout
        mask = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
        return bool(mask & (1 << (signal.SIGINT - 1)))

    import threading
    import time

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)  # a thread with SIGINT unblocked takes the signal,
    other.start()  # and Python runs the handler in the main thread at once: blocking alone would not defer
    reached_the_end = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with _sigint_deferred():
                assert blocked_in_child()
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                reached_the_end = True
    finally:
        stop.set()
        other.join()
    assert reached_the_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert not blocked_in_child()
    with _sigint_deferred():  # nothing received: nothing raised
        pass
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with _sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_start_up():
    from cdp_megatron.pretrain import _Run
    from cdp_megatron.pretrain_args import parse_args

    run = _Run(parse_args(shlex.split(TINY + " --lr 1e-3 --train-iters 20 --save ck")))
    assert run.interrupted() == "interrupted during start-up; nothing trained"
    run.at_iteration = run.started_at = 4  # resumed at 4, nothing saved since
    assert run.interrupted() == ("interrupted after iteration 4 of 20; no checkpoint saved since iteration 4 "
                                 "(--save-interval sets how often)")


def test_exit_signal_handler_saves_on_sigterm(tmp_path):
    """--exit-signal-handler: SIGTERM (a job's time limit) stops the run at the end of the
    iteration with a checkpoint of it and exit 0; without the flag SIGTERM kills the run."""
    import signal

    plain = TINY + " --lr 1e-3 --train-iters 100000 --eval-iters 0 --metrics-file m.jsonl --save ck"
    proc = _popen(plain + " --exit-signal-handler", tmp_path)
    _wait_for_iterations(tmp_path / "m.jsonl", proc, 3)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-4000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("exiting at iteration ") and last.endswith(" (SIGTERM received, --exit-signal-handler)"), last
    stopped = int(last.split()[3])
    assert stopped >= 3 and (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped)
    assert max(train_losses(tmp_path / "m.jsonl")) == stopped
    proc = _popen(plain.replace("m.jsonl", "n.jsonl").replace("--save ck", "--save ck2"), tmp_path)
    _wait_for_iterations(tmp_path / "n.jsonl", proc, 1)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGTERM and not (tmp_path / "ck2").exists()


@pytest.mark.slow
def test_exit_signal_handler_stops_every_rank_at_one_iteration(tmp_path):
    """SIGTERM that reaches one of two data-parallel ranks only: both stop after the same
    iteration and save one checkpoint (the flag is shared by an all-reduce)."""
    import signal

    import psutil

    proc = _popen(TINY + " --lr 1e-3 --train-iters 100000 --eval-iters 0 --metrics-file m.jsonl --save ck "
                  "--exit-signal-handler", tmp_path, nproc=2)
    _wait_for_iterations(tmp_path / "m.jsonl", proc, 3)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2, workers
    workers[1].send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-4000:]
    stops = [line for line in out.splitlines() if line.startswith("exiting at iteration ")]
    assert len(stops) == 1 and stops[0].endswith("(SIGTERM received, --exit-signal-handler)"), out[-4000:]
    stopped = int(stops[0].split()[3])
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped)


@pytest.mark.slow
def test_ctrl_c_under_torchrun_and_on_one_rank(tmp_path):
    """Under torchrun (two data-parallel ranks): a terminal's Ctrl-C, which each worker gets
    twice (from the terminal, then from torchrun; the two often arrive as one), saves and stops as on one process; a Ctrl-C
    that reaches one rank only (the terminal of one node of several) stops both after the same
    iteration, with one checkpoint of it and rank 0's line."""
    import signal

    import psutil

    for target, ck in (("group", "ck"), ("rank 1", "ck2")):
        metrics = tmp_path / f"{ck}.jsonl"
        proc = _popen(TINY + f" --lr 1e-3 --train-iters 100000 --eval-iters 0 --metrics-file {metrics.name} "
                      f"--save {ck}", tmp_path, nproc=2, session=True)
        _wait_for_iterations(metrics, proc, 3)
        if target == "group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            workers = psutil.Process(proc.pid).children()
            assert len(workers) == 2, workers
            workers[1].send_signal(signal.SIGINT)
        out = proc.communicate(timeout=300)[0]
        stopped = max(train_losses(metrics))
        line = (f"cdp-pretrain: interrupted after iteration {stopped} of 100000; the last checkpoint saved is "
                f"{ck}/iter_{stopped:07d}: rerun with --load {ck} to resume")
        assert line in out.splitlines() and "KeyboardInterrupt\n" not in out, (target, out[-6000:])
        assert int((tmp_path / ck / "latest_checkpointed_iteration.txt").read_text()) == stopped >= 3, target
        if target == "rank 1":  # (torchrun, stopped by the terminal's signal itself, reports none)
            assert "exitcode  : 130" in out, out[-6000:]  # torchrun's report of the workers' exit


@pytest.mark.slow
def test_weight_hash_check_across_data_parallel_replicas(tmp_path):
    """--check-weight-hash-across-dp-replicas-interval on two data-parallel ranks (distributed
    optimizer, overlapped param gather: the check sees the gathered weights): they match at the
    start and every 2 iterations; a weight changed on DP rank 1 stops both ranks with exit
    code 4 before that iteration's checkpoint, naming the tensor."""
    flags = (TINY + " --lr 1e-3 --train-iters 4 --eval-iters 0 --check-weight-hash-across-dp-replicas-interval 2 "
             "--micro-batch-size 2 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather")
    out = ok(run(flags, tmp_path, nproc=2))
    checks = [line for line in out.splitlines() if "data-parallel replicas match" in line]
    assert checks == [f" weights of the 2 data-parallel replicas match after iteration {i} "
                      "(--check-weight-hash-across-dp-replicas-interval)" for i in (0, 2, 4)], out[-4000:]
    failed = run(flags + " --save ck --save-interval 1", tmp_path, nproc=2,
                 env={"CDP_PRETRAIN_TEST_CORRUPT_REPLICA": "2"})
    assert failed.returncode != 0
    assert ("cdp-pretrain: error: the weights of the data-parallel replicas differ after iteration 2 "
            "(--check-weight-hash-across-dp-replicas-interval): embedding.word_embeddings.weight on DP rank 1. "
            ) in failed.stdout, failed.stdout[-4000:]
    assert "exitcode  : 4" in failed.stdout  # torchrun's report of the ranks' exit code
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


def test_divergence_stops_with_exit_3(tmp_path):
    result = run(TINY + " --train-iters 30 --lr 1e30 --clip-grad 0 --eval-iters 0 --metrics-file m.jsonl", tmp_path)
    assert result.returncode == 3, result.stdout[-4000:]
    assert "diverged at iteration" in result.stdout
    rows = records(tmp_path / "m.jsonl")
    last = rows[-1]
    assert last["diverged"] is True and last["iteration"] >= 2
    assert math.isfinite(last["last_finite_loss"]) and last["last_finite_iteration"] == last["iteration"] - 1
    assert train_losses(tmp_path / "m.jsonl")[last["last_finite_iteration"]] == last["last_finite_loss"]


def test_save_resume_equals_uninterrupted(spec20, reference, tmp_path):
    ok(run(cdp20(spec20) + " --save ckpt --save-interval 10 --exit-interval 10 --metrics-file m.jsonl", tmp_path))
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000010", "latest_checkpointed_iteration.txt"]
    assert max(train_losses(tmp_path / "m.jsonl")) == 10
    # A resume with other hyperparameters is refused before any tensor is read, naming them
    # (Megatron: "Cannot merge two lists with different lengths", or a list of identity tuples).
    raw = json.loads(spec20.read_text())
    raw["multipliers"]["type"]["v"]["lr"] *= 2
    (tmp_path / "v2.json").write_text(json.dumps(raw))
    refused = run(cdp20(tmp_path / "v2.json") + " --load ckpt --save ckpt --metrics-file m.jsonl", tmp_path)
    assert refused.returncode == 2, refused.stdout[-4000:]
    last = refused.stdout.strip().splitlines()[-1]
    assert last.startswith("cdp-pretrain: error: --load ckpt/iter_0000010: the checkpoint was trained with other "
                           "hyperparameters (v weight layers 1-2 lr "), last
    assert "Traceback" not in refused.stdout and max(train_losses(tmp_path / "m.jsonl")) == 10
    # Another padding of the same vocabulary (as on another TP size) names the flag that pads it alike.
    refused = run(cdp20(spec20) + " --make-vocab-size-divisible-by 512 --load ckpt --save ckpt", tmp_path)
    assert refused.returncode == 2, refused.stdout[-4000:]
    assert refused.stdout.strip().splitlines()[-1] == (
        "cdp-pretrain: error: --load ckpt/iter_0000010: the checkpoint is of another model (the padded vocabulary "
        "(the tokenizer's or --vocab-size, rounded up to a multiple of --make-vocab-size-divisible-by x TP) 256 there, "
        "512 here); give --make-vocab-size-divisible-by 256: on TP 1 it pads the vocabulary to the checkpoint's 256")
    # --no-initialization (Megatron-LM's): no init at all, the checkpoint's weights replace the
    # uninitialised ones; the same resume, to the bit
    out = ok(run(cdp20(spec20) + " --load ckpt --no-initialization --metrics-file noinit.jsonl", tmp_path))
    assert "note: the weights are not initialised (--no-initialization)" in out
    assert [train_losses(tmp_path / "noinit.jsonl")[i] for i in range(11, 21)] == [reference[i] for i in range(11, 21)]
    out = ok(run(cdp20(spec20) + " --load ckpt --save ckpt --metrics-file m.jsonl", tmp_path))
    assert "loading checkpoint" in out and "starting at iteration 10" in out
    resumed = train_losses(tmp_path / "m.jsonl")
    assert sorted(resumed) == list(range(1, 21))
    assert [resumed[i] for i in range(11, 21)] == [reference[i] for i in range(11, 21)]  # exact
    refused = run(cdp20(spec20) + " --load empty --no-initialization", tmp_path)
    assert refused.returncode == 2 and refused.stdout.strip().splitlines()[-1] == (
        "cdp-pretrain: error: --no-initialization: no checkpoint in --load empty to take the weights from; drop "
        "--no-initialization to start from scratch")
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "20"


def test_crash_during_save_leaves_previous_checkpoint(spec20, reference, tmp_path):
    # Killed after writing iteration 10's files but before publishing them.
    result = run(cdp20(spec20) + " --save ckpt --save-interval 5 --metrics-file m.jsonl", tmp_path,
                 env={"CDP_PRETRAIN_TEST_CRASH_DURING_SAVE": "10"})
    assert result.returncode == 137, result.stdout[-4000:]
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    assert (ckpt / "iter_0000010.tmp").is_dir() and not (ckpt / "iter_0000010").exists()
    out = ok(run(cdp20(spec20) + " --load ckpt --save ckpt --save-interval 5 --metrics-file m.jsonl", tmp_path))
    assert "starting at iteration 5" in out
    resumed = train_losses(tmp_path / "m.jsonl")
    assert [resumed[i] for i in range(6, 21)] == [reference[i] for i in range(6, 21)]
    assert not any(p.name.endswith(".tmp") for p in ckpt.iterdir())


def test_non_persistent_checkpoints(tmp_path):
    """--non-persistent-save-interval with --non-persistent-ckpt-type global (Megatron-LM's): saves
    between the persistent ones to --save/non_persistent, which keeps only the latest; --load with
    the type resumes from it where it is the newer, exactly as the run went on."""
    flags = (TINY + " --train-iters 8 --lr 1e-3 --eval-iters 0 --save ck --save-interval 4 "
             "--non-persistent-save-interval 2 --non-persistent-ckpt-type global")
    # killed while saving iteration 8: the persistent checkpoint is of 4, the non-persistent one of 6
    result = run(flags + " --metrics-file m.jsonl", tmp_path, env={"CDP_PRETRAIN_TEST_CRASH_DURING_SAVE": "8"})
    assert result.returncode == 137, result.stdout[-4000:]
    assert " saved non-persistent checkpoint ck/non_persistent/iter_0000002 in " in result.stdout
    assert " saved checkpoint ck/iter_0000004 in " in result.stdout
    ck, np_dir = tmp_path / "ck", tmp_path / "ck" / "non_persistent"
    assert sorted(p.name for p in np_dir.iterdir()) == ["iter_0000006", "latest_checkpointed_iteration.txt"]
    assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    reference = train_losses(tmp_path / "m.jsonl")
    assert sorted(reference) == list(range(1, 9))
    # without the type, --load takes the persistent checkpoint (Megatron-LM's too)
    out = ok(run(flags.replace(" --non-persistent-save-interval 2 --non-persistent-ckpt-type global", "")
                 + " --load ck --exit-interval 5", tmp_path))
    assert "loading checkpoint ck/iter_0000004" in out and "non-persistent" not in out
    (ck / "iter_0000005").rename(tmp_path / "aside")  # the exit's save, out of the way
    (ck / "latest_checkpointed_iteration.txt").write_text("4\n")
    out = ok(run(flags + " --load ck --metrics-file r.jsonl", tmp_path))
    assert " note: loading the non-persistent checkpoint ck/non_persistent/iter_0000006 (newer than ck/iter_0000004)" in out
    assert "starting at iteration 6" in out
    resumed = train_losses(tmp_path / "r.jsonl")
    assert [resumed[i] for i in (7, 8)] == [reference[i] for i in (7, 8)]  # exact
    # once the persistent one is newer, it is loaded
    out = ok(run(flags + " --load ck", tmp_path))
    assert (" note: the non-persistent checkpoint ck/non_persistent/iter_0000006 is older than ck/iter_0000008; "
            "loading the latter") in out
    # a --load folder with only non-persistent checkpoints resumes from them
    (tmp_path / "only").mkdir()
    (np_dir).rename(tmp_path / "only" / "non_persistent")
    out = ok(run(flags.replace("--save ck", "--save only") + " --load only --train-iters 8", tmp_path))
    assert " note: loading the non-persistent checkpoint only/non_persistent/iter_0000006 (--load only holds no " \
           "persistent one)" in out


def test_save_retain_interval(tmp_path):
    """--save-retain-interval (Megatron-LM's): each save removes the older checkpoints that are
    not of a multiple of it; the latest stays, and so does what a resume needs."""
    flags = TINY + " --lr 1e-3 --lr-decay-iters 14 --eval-iters 0 --save ck --save-interval 2 --save-retain-interval 4"
    out = ok(run(flags + " --train-iters 10", tmp_path))
    assert " removed checkpoint of iteration 2 (--save-retain-interval 4)" in out
    assert " removed checkpoint of iteration 6 (--save-retain-interval 4)" in out
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "iter_0000004", "iter_0000008", "iter_0000010", "latest_checkpointed_iteration.txt"]
    out = ok(run(flags + " --train-iters 14 --load ck", tmp_path))
    assert "starting at iteration 10" in out
    assert out.index(" saved checkpoint ck/iter_0000012 in ") < out.index(" removed checkpoint of iteration 10 (")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir())[:-1] == [
        "iter_0000004", "iter_0000008", "iter_0000012", "iter_0000014"]


def test_load_without_checkpoint_starts_fresh(tmp_path):
    out = ok(run(TINY + " --train-iters 2 --lr 1e-3 --eval-iters 0 --load nothing-here", tmp_path))
    assert "no checkpoint there" in out and "starting at iteration 0" in out
    # ... unless asked not to, or fine-tuning (random weights are not a fine-tune)
    for flags, line in ((" --exit-on-missing-checkpoint",
                         "cdp-pretrain: error: --load nothing-here: no checkpoint there (--exit-on-missing-checkpoint)"),
                        (" --finetune --no-load-optim --no-load-rng",
                         "cdp-pretrain: error: --finetune --load nothing-here: no checkpoint there; give the folder of "
                         "the run to fine-tune from")):
        refused = run(TINY + " --train-iters 2 --lr 1e-3 --eval-iters 0 --load nothing-here --metrics-file m.jsonl"
                      + flags, tmp_path)
        assert refused.returncode == 2 and refused.stdout.strip().splitlines()[-1] == line, refused.stdout[-3000:]
        assert not (tmp_path / "m.jsonl").exists()


# ---------------------------------------------------------------------- two processes
LAYOUTS = {
    "DP2": "",
    "DP2-distopt": "--use-distributed-optimizer --num-workers 1",  # each DP rank's slice, read by a worker
    # buckets padded to 2^16 elements: other shard boundaries through the fused tensors' segments
    "DP2-distopt-padded-buckets": "--use-distributed-optimizer --overlap-grad-reduce --ddp-bucket-size 20000 "
                                  "--ddp-pad-buckets-for-high-nccl-busbw",
    "TP2": "--tensor-model-parallel-size 2",
    "PP2": "--pipeline-model-parallel-size 2",
    "TP2-distopt": "--tensor-model-parallel-size 2 --use-distributed-optimizer",
    "PP2-distopt": "--pipeline-model-parallel-size 2 --use-distributed-optimizer",
    # activation recomputation across a pipeline and under TP
    "PP2-recompute-full": "--pipeline-model-parallel-size 2 --recompute-granularity full --recompute-method block "
                          "--recompute-num-layers 1",
    "TP2-recompute-selective": "--tensor-model-parallel-size 2 --recompute-activations --recompute-modules core_attn "
                               "mlp layernorm",
}
FOUR_PROCESS_LAYOUTS = {
    "TP2PP2": "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2",
    "TP2PP2-distopt": "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --use-distributed-optimizer",
    "TP2DP2-distopt": "--tensor-model-parallel-size 2 --use-distributed-optimizer",
    # Megatron-LM's --use-tp-pp-dp-mapping: ranks 0, 1 are the two stages of DP rank 0
    "PP2DP2-tp-pp-dp": "--pipeline-model-parallel-size 2 --use-tp-pp-dp-mapping --use-distributed-optimizer",
}


@pytest.fixture(scope="module")
def reference_no_dropout_file(spec20, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reference_no_dropout")
    ok(run(cdp20(spec20) + " --hidden-dropout 0 --attention-dropout 0 --metrics-file ref.jsonl" + LOG_NORMS, tmp))
    return tmp / "ref.jsonl"


@pytest.fixture(scope="module")
def reference_no_dropout(reference_no_dropout_file) -> dict[int, float]:
    return train_losses(reference_no_dropout_file)


def val_losses(path: Path) -> dict[int, float]:
    return {r["iteration"]: r["val_loss"] for r in records(path) if r.get("eval")}


def _assert_close(losses: dict[int, float], reference: dict[int, float], iterations) -> None:
    for i in iterations:
        assert math.isclose(losses[i], reference[i], rel_tol=1e-5), (i, losses[i], reference[i])


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_process_layouts_match_one_process(layout, spec20, reference_no_dropout, reference_no_dropout_file,
                                              tmp_path):
    ok(run(cdp20(spec20) + " --hidden-dropout 0 --attention-dropout 0 --metrics-file m.jsonl " + LAYOUTS[layout]
           + LOG_NORMS, tmp_path, nproc=2))
    assert_same_run(tmp_path / "m.jsonl", reference_no_dropout_file, range(1, 21))


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(FOUR_PROCESS_LAYOUTS))
def test_four_process_layouts_match_one_process(layout, spec20, reference_no_dropout, reference_no_dropout_file,
                                               tmp_path):
    """(TP, PP, DP) = (2, 2, 1) and (2, 1, 2) on 4 gloo processes, examples/base.json's per-type
    and per-depth multipliers: the 20 losses, grad and params norms equal the 1-process run's
    within 1e-5, and the counts of zero gradients within 0.1%."""
    ok(run(cdp20(spec20) + " --hidden-dropout 0 --attention-dropout 0 --metrics-file m.jsonl "
           + FOUR_PROCESS_LAYOUTS[layout] + LOG_NORMS, tmp_path, nproc=4, timeout=900))
    assert_same_run(tmp_path / "m.jsonl", reference_no_dropout_file, range(1, 21))


@pytest.mark.slow
def test_tied_embeddings_on_a_pipeline_match_one_process(spec20, tmp_path):
    """Tied embeddings on PP=2 with the distributed optimizer: the last stage holds a copy of
    the embedding (its gradient is all-reduced with the first stage's, and the norms count
    it once); every logged value equals the 1-process run's. (With --cdp-base: the init of
    plain Megatron, as Megatron-LM's, depends on the pipeline layout.)"""
    raw = json.loads(spec20.read_text())
    raw["base"]["untie_embeddings_and_output_weights"] = False
    (tmp_path / "tied.json").write_text(json.dumps(raw))
    tied = (cdp20(tmp_path / "tied.json").replace(" --untie-embeddings-and-output-weights", "")
            + " --train-iters 10 --eval-iters 0 --hidden-dropout 0 --attention-dropout 0 --metrics-file m.jsonl"
            + LOG_NORMS)
    (tmp_path / "one").mkdir()
    (tmp_path / "pp2").mkdir()
    ok(run(tied, tmp_path / "one"))
    ok(run(tied + " --pipeline-model-parallel-size 2 --use-distributed-optimizer", tmp_path / "pp2", nproc=2))
    assert_same_run(tmp_path / "pp2" / "m.jsonl", tmp_path / "one" / "m.jsonl", range(1, 11))


def four_layers(spec20) -> str:
    four = cdp20(spec20).replace("--num-layers 2", "--num-layers 4").replace("--micro-batch-size 4", "--micro-batch-size 2")
    return four + " --hidden-dropout 0 --attention-dropout 0 --train-iters 20 --metrics-file m.jsonl"


@pytest.fixture(scope="module")
def reference_four_layers_file(spec20, tmp_path_factory) -> Path:
    """The 1-process run of the 4-layer model (the reference of the interleaved pipelines)."""
    tmp = tmp_path_factory.mktemp("reference_four_layers")
    ok(run(four_layers(spec20), tmp))
    return tmp / "m.jsonl"


VPP = " --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 "


@pytest.mark.slow
# plain: the two model chunks of a rank share the micro batches a DataLoader worker read
@pytest.mark.parametrize("optimizer", ["--num-workers 1", "--use-distributed-optimizer"], ids=["plain", "distopt"])
def test_virtual_pipeline_matches_one_process(optimizer, spec20, reference_four_layers_file, tmp_path):
    ok(run(four_layers(spec20) + VPP + optimizer, tmp_path, nproc=2))
    _assert_close(train_losses(tmp_path / "m.jsonl"), train_losses(reference_four_layers_file), range(1, 21))


@pytest.mark.slow
def test_microbatch_groups_on_an_interleaved_pipeline(spec20, reference_four_layers_file, tmp_path):
    """--microbatch-group-size-per-virtual-pipeline-stage 4 on PP 2 with two chunks a rank and 8
    micro batches (of 1 sample): another schedule (groups of 4, not 2), the same 20 losses."""
    flags = " --micro-batch-size 1 --microbatch-group-size-per-virtual-pipeline-stage 4"
    out = ok(run(four_layers(spec20).replace("--micro-batch-size 2", "") + VPP + flags, tmp_path, nproc=2))
    assert "VPP=2 (micro batches in groups of 4)" in out
    _assert_close(train_losses(tmp_path / "m.jsonl"), train_losses(reference_four_layers_file), range(1, 21))


@pytest.mark.slow
@pytest.mark.parametrize("flags", [
    "--overlap-grad-reduce --ddp-bucket-size 20000",
    "--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather --ddp-bucket-size 20000",
    # each bucket's forward starts the next one's all-gather (by default the schedule starts a chunk's)
    "--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather --no-align-param-gather "
    "--ddp-bucket-size 20000",
], ids=["overlap", "distopt-overlap-param-gather", "distopt-unaligned-param-gather"])
def test_overlapped_communication_on_an_interleaved_pipeline(flags, spec20, reference_four_layers_file, tmp_path):
    """PP=2 with two model chunks a rank (VPP) and DP=2 on 4 processes: the schedules get a
    no_sync/grad_sync function per chunk; only the first chunk is bucketed. The 20 training
    losses and both validation losses equal the 1-process run's within 1e-5."""
    out = ok(run(four_layers(spec20) + VPP + flags, tmp_path, nproc=4, timeout=900))
    assert "(buckets of 20000 elements)" in out
    if "param-gather" in flags:  # aligned by default (Megatron-LM's), on this interleaved pipeline
        assert ("aligned param gather" in out) == ("--no-align-param-gather" not in flags)
    _assert_close(train_losses(tmp_path / "m.jsonl"), train_losses(reference_four_layers_file), range(1, 21))
    val, val_reference = val_losses(tmp_path / "m.jsonl"), val_losses(reference_four_layers_file)
    assert sorted(val) == sorted(val_reference) == [10, 20]
    _assert_close(val, val_reference, [10, 20])


# Megatron-LM's uneven splits of the 4 layers: 3 + 1, and the embedding and the loss counted as
# layers in 3 model chunks a rank (chunks of 0, 1, 1 and 1, 1, 0 layers: one holds only the
# embedding, one only the loss)
UNEVEN = " --pipeline-model-parallel-size 2 --decoder-first-pipeline-num-layers 3"
COUNTED = (" --pipeline-model-parallel-size 2 --account-for-embedding-in-pipeline-split "
           "--account-for-loss-in-pipeline-split --num-virtual-stages-per-pipeline-rank 3")


@pytest.mark.slow
@pytest.mark.parametrize("split,note", [
    (UNEVEN + " --use-distributed-optimizer", "(layers a stage: 3 | 1)"),
    (COUNTED + " --num-workers 1", "VPP=3 (layers a stage: 0,1,1 | 1,1,0; the embedding and loss counted as a layer)"),
    # Megatron-LM's layout: the embedding alone, two chunks of two layers, the loss alone
    (" --pipeline-model-parallel-size 2 --pipeline-model-parallel-layout E|(tt|)*2,L --num-workers 1",
     "VPP=2 (layers a stage: 0,2 | 2,0)"),
], ids=["first-stage-3-distopt", "embedding-and-loss-counted-vpp3", "layout-vpp2"])
def test_uneven_pipeline_stages_match_one_process(split, note, spec20, reference_four_layers_file, tmp_path):
    out = ok(run(four_layers(spec20) + split, tmp_path, nproc=2))
    assert f"TP=1 PP=2 {note} DP=1" in out
    _assert_close(train_losses(tmp_path / "m.jsonl"), train_losses(reference_four_layers_file), range(1, 21))


@pytest.mark.slow
def test_uneven_pipeline_checkpoints(spec20, reference_four_layers_file, tmp_path):
    """A checkpoint saved on the 3 + 1 split resumes on one process, as the uninterrupted run;
    the distributed optimizer's dp_reshardable state, bound to the stages' parameters, is
    refused on the even split of the same TP/PP, naming both splits."""
    ok(run(four_layers(spec20) + UNEVEN + " --save plain --save-interval 10 --exit-interval 10", tmp_path, nproc=2))
    assert "starting at iteration 10" in ok(run(four_layers(spec20) + " --load plain", tmp_path))
    _assert_close(train_losses(tmp_path / "m.jsonl"), train_losses(reference_four_layers_file), range(11, 21))
    flags = four_layers(spec20) + " --use-distributed-optimizer --save dist"
    ok(run(flags + UNEVEN + " --save-interval 10 --exit-interval 10", tmp_path, nproc=2))
    result = run(flags + " --load dist --pipeline-model-parallel-size 2", tmp_path, nproc=2)
    assert result.returncode != 0
    line = next(l for l in result.stdout.splitlines() if "dp_reshardable" in l)
    assert "saved on TP=1, PP=2 (layers a stage: 3 | 1); it resumes only on that layout (any DP size), not on " \
           "TP=1, PP=2." in line, line


# Overlapped communication in buckets of 20000 elements (the tiny model has ~7), with 2 micro
# batches a rank so that the reduction waits for the last one (no_sync).
OVERLAP = " --overlap-grad-reduce --ddp-bucket-size 20000 --micro-batch-size 2"
OVERLAP_LAYOUTS = {
    "DP2-overlap": OVERLAP,
    "DP2-distopt-overlap-param-gather": "--use-distributed-optimizer --overlap-param-gather" + OVERLAP,
    "PP2-overlap": "--pipeline-model-parallel-size 2" + OVERLAP,
    # the recomputed forward runs the param-gather pre-hooks a second time
    "DP2-distopt-overlap-param-gather-recompute": "--use-distributed-optimizer --overlap-param-gather "
                                                  "--recompute-granularity full --recompute-method uniform "
                                                  "--recompute-num-layers 1" + OVERLAP,
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(OVERLAP_LAYOUTS))
def test_overlapped_communication_matches_one_process(layout, spec20, reference_no_dropout, reference_no_dropout_file,
                                                      tmp_path):
    out = ok(run(cdp20(spec20) + " --hidden-dropout 0 --attention-dropout 0 --metrics-file m.jsonl "
                 + OVERLAP_LAYOUTS[layout] + LOG_NORMS, tmp_path, nproc=2))
    overlapped = "overlapped grad reduce and param gather" if "param-gather" in layout else "overlapped grad reduce"
    assert f"{overlapped} (buckets of 20000 elements)" in out
    # the params norm too: under --overlap-param-gather it is taken after the pending all-gather
    assert_same_run(tmp_path / "m.jsonl", reference_no_dropout_file, range(1, 21))
    val, val_reference = val_losses(tmp_path / "m.jsonl"), val_losses(reference_no_dropout_file)
    assert sorted(val) == sorted(val_reference) == [10, 20]
    _assert_close(val, val_reference, [10, 20])


@pytest.mark.slow
def test_fully_parallel_checkpoint_save_and_load(tmp_path):
    """Megatron-LM's default --ckpt-fully-parallel-save: on DP 2 both replicas write half of the
    tensors they hold alike (--no-ckpt-fully-parallel-save: rank 0 writes them all); a resume
    from it with --ckpt-fully-parallel-load trains exactly as the run went on."""
    flags = TINY + " --train-iters 4 --lr 1e-3 --eval-iters 0 --hidden-dropout 0 --attention-dropout 0"
    sizes = {}
    for name, extra in (("shared", ""), ("rank0", " --no-ckpt-fully-parallel-save")):
        ok(run(f"{flags} --save {name} --save-interval 2 --metrics-file {name}.jsonl{extra}", tmp_path, nproc=2))
        files = list((tmp_path / name / "iter_0000002").glob("__*.distcp"))
        sizes[name] = {rank: sum(f.stat().st_size for f in files if f.name.startswith(f"__{rank}_")) for rank in (0, 1)}
    shared, rank0 = sizes["shared"], sizes["rank0"]
    assert rank0[1] == 0 and min(shared.values()) > 0.4 * rank0[0], sizes
    assert abs(sum(shared.values()) - rank0[0]) < 0.05 * rank0[0], sizes
    whole = train_losses(tmp_path / "shared.jsonl")
    assert whole == train_losses(tmp_path / "rank0.jsonl")
    (tmp_path / "shared" / "latest_checkpointed_iteration.txt").write_text("2\n")
    out = ok(run(f"{flags} --load shared --ckpt-fully-parallel-load --metrics-file resumed.jsonl", tmp_path, nproc=2))
    assert "starting at iteration 2" in out
    resumed = train_losses(tmp_path / "resumed.jsonl")
    assert [resumed[i] for i in (3, 4)] == [whole[i] for i in (3, 4)]  # exact


@pytest.mark.slow
def test_overlapped_param_gather_saves_the_latest_weights(spec20, tmp_path):
    """--overlap-param-gather leaves the other ranks' parameter shards stale after a step until
    the next forward; a checkpoint saved there (no evaluation in between) must hold the step's
    weights: bf16 (the model's weights are loaded as saved), resumed exactly."""
    flags = (cdp20(spec20) + " --hidden-dropout 0 --attention-dropout 0 --eval-interval 20 --bf16 "
             "--use-distributed-optimizer --overlap-param-gather --metrics-file m.jsonl" + OVERLAP)
    (tmp_path / "whole").mkdir()
    ok(run(flags, tmp_path / "whole", nproc=2))
    ok(run(flags + " --save ckpt --save-interval 10 --exit-interval 10", tmp_path, nproc=2))
    assert "starting at iteration 10" in ok(run(flags + " --load ckpt", tmp_path, nproc=2))
    whole, resumed = train_losses(tmp_path / "whole" / "m.jsonl"), train_losses(tmp_path / "m.jsonl")
    assert [resumed[i] for i in range(11, 21)] == [whole[i] for i in range(11, 21)]  # exact


FULLY_RESHARDABLE = " --use-distributed-optimizer --dist-ckpt-optim-fully-reshardable"


@pytest.mark.slow
@pytest.mark.parametrize("layout,saved", [
    ("TP2", ""),
    ("PP2", ""),
    ("TP2-distopt", FULLY_RESHARDABLE),
    ("PP2-distopt", FULLY_RESHARDABLE + " --distrib-optim-fully-reshardable-mem-efficient"),
], ids=["TP2", "PP2", "TP2-distopt-fully-reshardable", "PP2-distopt-fully-reshardable-mem-efficient"])
def test_resume_on_another_layout(layout, saved, spec20, reference_no_dropout, tmp_path):
    flags = cdp20(spec20) + " --hidden-dropout 0 --attention-dropout 0 --save ckpt --metrics-file m.jsonl"
    ok(run(flags + " --save-interval 10 --exit-interval 10" + saved, tmp_path))
    out = ok(run(flags + " --load ckpt " + LAYOUTS[layout], tmp_path, nproc=2))
    assert "starting at iteration 10" in out
    _assert_close(train_losses(tmp_path / "m.jsonl"), reference_no_dropout, range(11, 21))


@pytest.mark.slow
def test_dp_reshardable_checkpoint_on_another_layout_is_refused(spec20, tmp_path):
    """The distributed optimizer's default format resumes on its own TP/PP only: another layout
    gets one line naming both layouts and the flag that makes the checkpoint reshardable."""
    flags = cdp20(spec20) + " --save ckpt --use-distributed-optimizer"
    ok(run(flags + " --save-interval 10 --exit-interval 10", tmp_path))
    result = run(flags + " --load ckpt --tensor-model-parallel-size 2", tmp_path, nproc=2)
    assert result.returncode != 0
    line = next(l for l in result.stdout.splitlines() if "dp_reshardable" in l)
    for words in ("TP=1, PP=1", "TP=2, PP=1", "--dist-ckpt-optim-fully-reshardable"):
        assert words in line, line
    # The ranks exit with one line, no traceback (torchrun's own ChildFailedError report follows).
    assert "cdp_megatron/integration" not in result.stdout, result.stdout[-3000:]


@pytest.mark.slow
def test_quickstart(tmp_path):
    """The README's quick start: prepare the corpus under ./data, preprocess, train with
    --cdp-base examples/base.json; the loss goes down (fewer iterations than the default)."""
    out = ok(run("--quickstart --train-iters 40 --eval-interval 40", tmp_path, timeout=600))
    assert "quickstart: preparing the Shakespeare byte corpus" in out
    assert (tmp_path / "data" / "shakespeare_text_document.bin").is_file()
    assert "quickstart: training loss went down" in out


@pytest.mark.slow
def test_virtual_pipeline_checkpoint_resumes_on_one_process(spec20, tmp_path):
    """A distributed-optimizer checkpoint saved on PP=2 with VPP (fully_reshardable) resumes on
    one process; the continued losses equal the uninterrupted 1-process run's."""
    four = cdp20(spec20).replace("--num-layers 2", "--num-layers 4").replace("--micro-batch-size 4", "--micro-batch-size 2")
    four += " --hidden-dropout 0 --attention-dropout 0 --metrics-file m.jsonl --use-distributed-optimizer"
    (tmp_path / "one").mkdir()
    ok(run(four, tmp_path / "one"))
    reference = train_losses(tmp_path / "one" / "m.jsonl")
    ok(run(four + " --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 --save ckpt"
           " --save-interval 10 --exit-interval 10 --dist-ckpt-optim-fully-reshardable", tmp_path, nproc=2))
    out = ok(run(four + " --load ckpt", tmp_path))
    assert "starting at iteration 10" in out
    _assert_close(train_losses(tmp_path / "m.jsonl"), reference, range(11, 21))


def test_full_validation_reads_the_whole_split(byte_corpus, tmp_path):
    """--full-validation (Megatron-LM's): each evaluation reads one epoch of the validation
    split in whole global batches, said in one line; its loss equals a run that evaluates that
    many batches with --eval-iters (the same samples, first to last)."""
    from cdp_megatron.pretrain import _build_datasets
    from cdp_megatron.pretrain_args import parse_args

    data = (TINY.replace("--mock-data --vocab-size 255", "--tokenizer-type ByteTokenizer")
            + f" --train-iters 4 --lr 1e-3 --eval-interval 4 --train-data-path {byte_corpus['tr']} "
            f"--valid-data-path {byte_corpus['va']}")
    _, valid = _build_datasets(parse_args(shlex.split(data + " --full-validation"), world_size=1))
    gbs = 8
    batches, left = divmod(len(valid), gbs)
    assert batches > 10
    out = ok(run(data + " --full-validation --metrics-file full.jsonl", tmp_path))
    assert (f"validation: the whole split, {batches} batches of {gbs} samples"
            + (f" ({left} samples, under one batch, left out)" if left else "") + " (--full-validation)") in out
    ok(run(data + f" --eval-iters {batches} --metrics-file iters.jsonl", tmp_path))
    ok(run(data + " --eval-iters 1 --metrics-file one.jsonl", tmp_path))
    full, iters, one = (val_losses(tmp_path / f"{name}.jsonl") for name in ("full", "iters", "one"))
    assert full == iters and list(full) == [4]
    assert abs(full[4] - one[4]) > 1e-4  # one batch is not the split
