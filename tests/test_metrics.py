"""cdp_megatron.metrics: log lines, JSONL records, progress bar on a terminal, resume."""

from __future__ import annotations

import io
import json
import math

import pytest

from cdp_megatron.metrics import Metrics, gpt_flops_per_iteration


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _step(m: Metrics, i: int, loss: float = 2.0) -> dict | None:
    return m.iteration(i, lm_loss=loss, z_loss=0.01, lr=1e-3, grad_norm=0.5, iteration_time_s=0.5,
                       optimizer_step_s=0.1, consumed_samples=8 * i, consumed_tokens=256 * i, tokens=256)


def test_records_every_log_interval_and_at_the_end(tmp_path):
    out = io.StringIO()
    m = Metrics(train_iters=5, log_interval=2, metrics_file=tmp_path / "m.jsonl", stream=out)
    emitted = [_step(m, i, loss=float(i)) for i in range(1, 6)]
    m.evaluation(5, 1.5, 0.02)
    m.close()
    assert [r and r["iteration"] for r in emitted] == [None, 2, None, 4, 5]
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert rows[0]["lm_loss"] == 1.5  # mean over the window (iterations 1 and 2)
    assert rows[0]["tokens_per_s"] == 512.0 and rows[0]["consumed_tokens"] == 512
    assert rows[-1] == {"eval": True, "iteration": 5, "val_loss": 1.5, "val_z_loss": 0.02,
                        "elapsed_s": rows[-1]["elapsed_s"]}
    text = out.getvalue()
    assert " iteration 2/5 |" in text and "lm loss: 1.500000E+00" in text and "tokens/s: 512" in text
    assert "validation at iteration 5" in text


def test_flush_logs_a_window_cut_short_once(tmp_path):
    """A run about to stop (Ctrl-C, --exit-interval) flushes before its last save and
    evaluation: the iterations since the last log point come first, at the last of them,
    and close() does not log them again."""
    out = io.StringIO()
    m = Metrics(train_iters=100, log_interval=5, metrics_file=tmp_path / "m.jsonl", stream=out)
    for i in range(1, 8):
        _step(m, i, loss=float(i))
    m.flush()
    m.evaluation(7, 1.5, 0.02)
    m.close()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r.get("eval", False)) for r in rows] == [(5, False), (7, False), (7, True)]
    assert rows[1]["lm_loss"] == 6.5  # iterations 6 and 7
    assert out.getvalue().count(" iteration   7/100 |") == 1


def test_progress_bar_only_on_a_terminal():
    tty, pipe = _Terminal(), io.StringIO()
    for stream in (tty, pipe):
        m = Metrics(train_iters=3, log_interval=10, stream=stream)
        for i in range(1, 4):
            _step(m, i)
        m.close()
    assert "3/3" in tty.getvalue() and "training" in tty.getvalue()  # tqdm's bar
    assert "training" not in pipe.getvalue()


def test_divergence_record_keeps_the_last_finite_loss(tmp_path):
    m = Metrics(train_iters=10, log_interval=1, metrics_file=tmp_path / "m.jsonl", stream=io.StringIO())
    _step(m, 1, 3.0)
    _step(m, 2, 2.5)
    m.diverged(3, float("nan"))
    m.close()
    last = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])
    assert last == {"diverged": True, "iteration": 3, "lm_loss": "nan", "last_finite_loss": 2.5,
                    "last_finite_iteration": 2, "elapsed_s": last["elapsed_s"]}


def test_resume_keeps_records_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "m.jsonl"
    m = Metrics(train_iters=10, log_interval=1, metrics_file=path, stream=io.StringIO())
    for i in range(1, 8):
        _step(m, i)
    m.evaluation(5, 1.0, 0.0)
    m.close()
    with open(path, "a") as fh:
        fh.write('{"iteration": 8, "lm_lo')  # cut short by a crash
    m = Metrics(train_iters=10, log_interval=1, metrics_file=path, resume_from=5, stream=io.StringIO())
    _step(m, 6)
    m.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["iteration"], bool(r.get("eval"))) for r in rows] == [
        (1, False), (2, False), (3, False), (4, False), (5, False), (5, True), (6, False)]


def test_inactive_on_other_ranks(tmp_path):
    out = io.StringIO()
    m = Metrics(train_iters=2, log_interval=1, metrics_file=tmp_path / "m.jsonl", enabled=False, stream=out)
    assert _step(m, 1) is None
    m.close()
    assert out.getvalue() == "" and not (tmp_path / "m.jsonl").exists()


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_points_are_each_iterations_own_values(tmp_path):
    """As in Megatron-LM: a TensorBoard point every --tensorboard-log-interval iterations (default
    1) with that iteration's values, where the log line and the metrics file have means over
    the --log-interval window."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("torch")
    m = Metrics(train_iters=4, log_interval=2, metrics_file=tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb",
                stream=io.StringIO(), log_validation_ppl=True)
    for i in range(1, 5):
        _step(m, i, loss=float(i))
    m.evaluation(4, 1.5, 0.02)
    m.close()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["lm_loss"] for r in rows if not r.get("eval")] == [1.5, 3.5]  # window means
    tb = tensorboard_scalars(tmp_path / "tb")
    assert tb["train/lm_loss"] == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}  # each iteration's own
    assert tb["train/z_loss"] == pytest.approx(dict.fromkeys(range(1, 5), 0.01))
    assert tb["train/lr"] == pytest.approx(dict.fromkeys(range(1, 5), 1e-3))
    assert tb["train/grad_norm"] == dict.fromkeys(range(1, 5), 0.5)
    assert tb["train/tokens_per_s"] == dict.fromkeys(range(1, 5), 512.0)  # 256 tokens in 0.5 s
    assert tb["valid/lm_loss"] == {4: 1.5} and tb["valid/lm_loss_ppl"] == pytest.approx({4: math.exp(1.5)})
    # every 2nd iteration: the iteration's value at 2 and 4, not the window's mean; no perplexity without the flag
    m = Metrics(train_iters=4, log_interval=4, tensorboard_dir=tmp_path / "tb2", stream=io.StringIO(),
                tensorboard_log_interval=2)
    assert [m.wants_values_at(i) for i in range(1, 5)] == [False, True, False, True]
    for i in range(1, 5):
        _step(m, i, loss=float(i))
    m.evaluation(4, 1.5, 0.02)
    m.close()
    tb = tensorboard_scalars(tmp_path / "tb2")
    assert tb["train/lm_loss"] == {2: 2.0, 4: 4.0} and "valid/lm_loss_ppl" not in tb
    # without TensorBoard only the log points want values (on every rank alike)
    m = Metrics(train_iters=5, log_interval=2, enabled=False, tensorboard_dir=None)
    assert [m.wants_values_at(i) for i in range(1, 6)] == [False, True, False, True, True]


def test_timers_world_size_and_queue_size_in_tensorboard(tmp_path, monkeypatch):
    """--log-timers-to-tensorboard (the iteration time; with --timing-log-level 1 the optimizer
    step's too), --log-world-size-to-tensorboard, --tensorboard-queue-size (the writer's queue)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("torch")
    import torch.utils.tensorboard as tensorboard

    queues = []

    class Writer(tensorboard.SummaryWriter):
        def __init__(self, *args, **kwargs):
            queues.append(kwargs.get("max_queue"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tensorboard, "SummaryWriter", Writer)
    m = Metrics(train_iters=2, log_interval=2, tensorboard_dir=tmp_path / "tb1", stream=io.StringIO(), log_timers=1,
                log_world_size=True, world_size=4, tensorboard_queue_size=7)
    for i in (1, 2):
        _step(m, i)
    m.close()
    tb = tensorboard_scalars(tmp_path / "tb1")
    assert tb["train/iteration_time_s"] == {1: 0.5, 2: 0.5}
    assert tb["train/optimizer_step_s"] == pytest.approx({1: 0.1, 2: 0.1})
    assert tb["train/world_size"] == {1: 4.0, 2: 4.0}
    m = Metrics(train_iters=2, log_interval=2, tensorboard_dir=tmp_path / "tb0", stream=io.StringIO(), log_timers=0)
    for i in (1, 2):
        _step(m, i)
    m.close()
    tb = tensorboard_scalars(tmp_path / "tb0")
    assert "train/iteration_time_s" in tb and "train/optimizer_step_s" not in tb and "train/world_size" not in tb
    m = Metrics(train_iters=2, log_interval=2, tensorboard_dir=tmp_path / "tb", stream=io.StringIO())
    for i in (1, 2):
        _step(m, i)
    m.close()
    assert "train/iteration_time_s" not in tensorboard_scalars(tmp_path / "tb")
    assert queues == [7, None, None]  # torch's default queue (10) unless given


def test_params_norm_and_zero_counts_when_given(tmp_path):
    """--log-params-norm / --log-num-zeros-in-grad: in the record, the log line and TensorBoard
    at the logged iterations; absent (not null) from the records of a run without them."""
    out = io.StringIO()
    m = Metrics(train_iters=4, log_interval=2, metrics_file=tmp_path / "m.jsonl", stream=out,
                tensorboard_dir=tmp_path / "tb" if _has_tensorboard() else None)
    assert [m.logs_at(i) for i in range(1, 5)] == [False, True, False, True]
    for i in range(1, 5):
        m.iteration(i, lm_loss=2.0, z_loss=0.01, lr=1e-3, grad_norm=0.5, iteration_time_s=0.5, consumed_samples=8 * i,
                    consumed_tokens=256 * i, tokens=256, params_norm=10.0 + i if m.wants_values_at(i) else None,
                    num_zeros_in_grad=100 * i)
    m.close()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [(r["params_norm"], r["num_zeros_in_grad"]) for r in rows] == [(12.0, 200), (14.0, 400)]
    assert "| params norm: 12.0000 | num zeros: 200" in out.getvalue()
    if _has_tensorboard():
        tb = tensorboard_scalars(tmp_path / "tb")
        assert tb["train/params_norm"] == {i: 10.0 + i for i in range(1, 5)}  # every iteration is a TensorBoard point
        assert tb["train/num_zeros_in_grad"] == {i: 100 * i for i in range(1, 5)}
    m = Metrics(train_iters=1, metrics_file=tmp_path / "plain.jsonl", stream=out)
    _step(m, 1)
    m.close()
    record = json.loads((tmp_path / "plain.jsonl").read_text())
    assert "params_norm" not in record and "num_zeros_in_grad" not in record


def test_memory_at_the_tensorboard_points(tmp_path):
    """--log-memory-to-tensorboard: memory/<name> at each TensorBoard point, nowhere else."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("torch")
    m = Metrics(train_iters=4, log_interval=4, metrics_file=tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb",
                stream=io.StringIO(), tensorboard_log_interval=2)
    for i in range(1, 5):
        m.iteration(i, lm_loss=2.0, z_loss=0.01, lr=1e-3, grad_norm=0.5, iteration_time_s=0.5, consumed_samples=8 * i,
                    consumed_tokens=256 * i, tokens=256,
                    memory={"reserved_bytes": float(2**30 * i), "allocation_count": 100.0 * i})
    m.close()
    tb = tensorboard_scalars(tmp_path / "tb")
    assert tb["memory/reserved_bytes"] == {2: 2.0**31, 4: 2.0**32}
    assert tb["memory/allocation_count"] == {2: 200.0, 4: 400.0}
    assert "memory" not in (tmp_path / "m.jsonl").read_text()


def _has_tensorboard() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("tensorboard", "torch"))


def test_flops_per_iteration_as_megatron_lm_counts_them():
    """By hand, per token (x 6: three GEMMs per weight, two FLOPs per multiply-add), for hidden
    64, 4 heads, seq 32, SwiGLU ffn 176, padded vocabulary 256, 2 layers, batch 8:
    attention 6 (64 (64 + 64 + 64) + 64 x 32 + 64 x 64) = 110592 a layer, MLP 6 x 64 x 176 x 3
    = 202752 a layer, logits 6 x 64 x 256 = 98304; (2 (110592 + 202752) + 98304) x 8 x 32."""
    shape = dict(global_batch_size=8, seq_length=32, num_layers=2, hidden_size=64, num_attention_heads=4,
                 num_query_groups=4, ffn_hidden_size=176, swiglu=True, padded_vocab_size=256)
    assert gpt_flops_per_iteration(**shape) == (2 * (110592 + 202752) + 98304) * 8 * 32 == 185_597_952
    # GQA with 2 groups: k and v are 32 wide, 6 (64 (64 + 32 + 32) + 2048 + 4096) = 86016; no SwiGLU: x 2
    gqa = {**shape, "num_query_groups": 2, "swiglu": False}
    assert gpt_flops_per_iteration(**gqa) == (2 * (86016 + 6 * 64 * 176 * 2) + 98304) * 8 * 32


def test_throughput_per_gpu_in_the_record_and_the_log_line(tmp_path):
    out = io.StringIO()
    m = Metrics(train_iters=2, log_interval=2, metrics_file=tmp_path / "m.jsonl", stream=out,
                flops_per_iteration=4e12, world_size=4)
    for i in (1, 2):
        _step(m, i)  # 0.5 s an iteration
    m.close()
    record = json.loads((tmp_path / "m.jsonl").read_text())
    assert record["tflops_per_gpu"] == pytest.approx(4e12 / 0.5 / 4 / 1e12)  # 2.0
    assert "| throughput per GPU: 2.0 TFLOP/s" in out.getvalue()
    small = io.StringIO()  # a CPU's: three significant digits, not 0.0
    m = Metrics(train_iters=1, metrics_file=tmp_path / "small.jsonl", stream=small,
                flops_per_iteration=1.234e9, world_size=1)
    _step(m, 1)
    m.close()
    assert "| throughput per GPU: 0.00247 TFLOP/s" in small.getvalue()
    m = Metrics(train_iters=1, metrics_file=tmp_path / "plain.jsonl", stream=out)
    _step(m, 1)
    m.close()
    assert "tflops_per_gpu" not in json.loads((tmp_path / "plain.jsonl").read_text())


def test_a_skipped_iteration_at_a_log_point_logs_the_window_before_it(tmp_path):
    """--iterations-to-skip: a skipped iteration is always logged; where it falls on a log point
    (here 4, with log interval 2, and the last one, 6), the trained iterations of its window are
    logged first, at the last of them, so that none is lost."""
    out = io.StringIO()
    m = Metrics(train_iters=6, log_interval=2, metrics_file=tmp_path / "m.jsonl", stream=out)
    _step(m, 1, loss=1.0)
    _step(m, 2, loss=2.0)
    m.skipped(3, consumed_samples=24, consumed_tokens=768, samples=8)
    m.skipped(4, consumed_samples=32, consumed_tokens=1024, samples=8)  # an empty window: nothing before it
    _step(m, 5, loss=5.0)
    m.skipped(6, consumed_samples=48, consumed_tokens=1536, samples=8)
    m.close()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r.get("skipped", False), r.get("lm_loss")) for r in rows] == [
        (2, False, 1.5), (3, True, None), (4, True, None), (5, False, 5.0), (6, True, None)]
    assert rows[3]["consumed_samples"] == 40
    assert " iteration 6/6 | skipped (--iterations-to-skip): samples 40-47 not trained on" in out.getvalue()


def test_a_run_stopped_between_log_points_logs_its_last_iterations(tmp_path):
    """Stopped after iteration 3 of 10 with log interval 5 (an exit interval, a signal, an error):
    closing logs iterations 1-3; a divergence at 8 logs 6-7 before its final record."""
    m = Metrics(train_iters=10, log_interval=5, metrics_file=tmp_path / "m.jsonl", stream=io.StringIO())
    for i in (1, 2, 3):
        _step(m, i, loss=float(i))
    m.close()
    m.close()  # (twice: nothing more)
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["lm_loss"], r["consumed_samples"]) for r in rows] == [(3, 2.0, 24)]
    m = Metrics(train_iters=10, log_interval=5, metrics_file=tmp_path / "d.jsonl", stream=io.StringIO())
    for i in range(1, 8):
        _step(m, i, loss=float(i))
    m.diverged(8, float("nan"))
    m.close()
    rows = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r.get("lm_loss")) for r in rows[:2]] == [(5, 3.0), (7, 6.5)]
    assert rows[-1]["diverged"] and rows[-1]["last_finite_iteration"] == 7 and len(rows) == 3
