"""Training metrics of ``cdp-pretrain``: log lines, a progress bar, TensorBoard, JSONL.

One :class:`Metrics` per run, active on global rank 0 only (other ranks get an inactive one
whose methods do nothing). Per iteration the loop calls :meth:`Metrics.iteration`; every
``log_interval`` iterations (and at the last one) it emits

- a human log line (iteration, lm loss, z loss, lr, grad norm, tokens/s, elapsed),
- one JSON object in ``--metrics-file`` (schema below),

and, as Megatron-LM does, every ``tensorboard_log_interval`` iterations (default 1: every
one) TensorBoard scalars under ``--tensorboard-dir`` of that iteration itself (not means
over a window): ``train/lm_loss``, ``train/z_loss``, ``train/lr``, ``train/grad_norm``,
``train/tokens_per_s``, and ``train/tflops_per_gpu``, ``train/params_norm`` /
``train/num_zeros_in_grad`` when they are logged; at evaluations ``valid/lm_loss``, and
``valid/lm_loss_ppl`` with ``log_validation_ppl`` (x axis: iteration), and the same under
``valid/<set>/`` for each of several validation sets;

and a tqdm progress bar advances every iteration when stdout is a terminal (log lines are
then written above it).

``--metrics-file`` JSONL, one object per line, flushed as written:

===========================  ===============================================================
record                       keys
===========================  ===============================================================
logged iteration             ``iteration``, ``consumed_samples``, ``consumed_tokens``,
                             ``lm_loss`` and ``z_loss`` (means over the iterations since
                             the last record, z_loss = z * mean(logsumexp^2), the term added
                             to the loss), ``lr`` (peak-normalised: the lr a group with
                             multiplier 1 has now), ``grad_norm`` (this iteration, before
                             clipping), ``iteration_time_s`` (mean; ``optimizer_step_s``
                             the optimizer's share of it), ``tokens_per_s``,
                             ``elapsed_s`` (since the process started); with
                             ``--log-throughput`` ``tflops_per_gpu`` (the model's
                             FLOPs, counted as Megatron-LM counts them, per second and
                             process, in 10^12); with
                             ``--log-params-norm`` ``params_norm`` (the L2 norm of all
                             weights after this iteration's update), with
                             ``--log-num-zeros-in-grad`` ``num_zeros_in_grad`` (gradient
                             elements that are exactly 0 this iteration)
evaluation                   ``eval: true``, ``iteration``, ``val_loss`` (cross-entropy, the
                             token mean over ``--eval-iters`` batches), ``val_z_loss``,
                             ``elapsed_s``; with several validation sets ``sets`` ({name:
                             {``val_loss``, ``val_z_loss``}}, and ``val_loss``/``val_z_loss``
                             are the sets' unweighted means)
skipped iteration            ``skipped: true``, ``iteration``, ``consumed_samples``,
                             ``consumed_tokens`` (``--iterations-to-skip``: its batch was
                             passed over, nothing trained)
divergence (last line)       ``diverged: true``, ``iteration`` (the first non-finite one),
                             ``last_finite_loss`` (lm_loss of the last finite iteration, null
                             if none), ``last_finite_iteration``
===========================  ===============================================================

Pure Python plus optional tqdm / tensorboard; no torch import unless TensorBoard is asked for.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["Metrics", "format_log_line", "gpt_flops_per_iteration", "PROCESS_START"]

# Wall-clock origin for ``elapsed_s``: when this module was first imported (the entry point
# imports it first thing), close enough to the process start for start-up timings.
PROCESS_START = time.time()


def gpt_flops_per_iteration(
    *,
    global_batch_size: int,
    seq_length: int,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    ffn_hidden_size: int,
    swiglu: bool,
    padded_vocab_size: int,
) -> float:
    """Floating-point operations of one training iteration of a dense GPT model, counted as
    Megatron-LM counts them for ``--log-throughput`` (``num_floating_point_operations``):
    every GEMM 3 times (forward, weight and data gradients) at 2 per multiply-add, per token

    - attention: 6 (h (q + k + v) + q s + q h), with q = h (the heads' width), k = v =
      h x groups / heads, and the causal half of the s x s scores (QK^T and its product with V),
    - MLP: 6 h ffn x (3 with SwiGLU, else 2),
    - logits: 6 h V (the padded vocabulary),

    times layers (attention and MLP) and global batch x sequence length. Norms, softmax,
    embeddings lookups and the optimizer are not counted."""
    head_dim = hidden_size / num_attention_heads
    q = head_dim * num_attention_heads
    kv = head_dim * num_query_groups
    attention = 6 * (hidden_size * (q + 2 * kv) + q * seq_length + q * hidden_size)
    mlp = 6 * hidden_size * ffn_hidden_size * (3 if swiglu else 2)
    logits = 6 * hidden_size * padded_vocab_size
    return float(global_batch_size * seq_length * (num_layers * (attention + mlp) + logits))


def _finite_or_none(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _json_float(value: float | None) -> Any:
    # JSON has no NaN/inf: write them as strings so that every line stays valid JSON.
    if value is None:
        return None
    value = float(value)
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _tflops_text(value: float) -> str:
    """Megatron-LM's one decimal, or three significant digits below 1 TFLOP/s (a small model, a
    CPU), where one decimal would print a running model as 0.0."""
    return f"{value:.1f}" if value >= 1 or value == 0 else f"{value:.3g}"


def _ppl(loss: float) -> float:
    """The perplexity of a loss (capped at e^700; NaN for a non-finite loss)."""
    return math.exp(min(loss, 700.0)) if math.isfinite(loss) else float("nan")


def format_log_line(record: dict, train_iters: int) -> str:
    """Megatron-style one-line summary of an iteration record."""
    width = len(str(train_iters))
    return (
        f" iteration {record['iteration']:>{width}}/{train_iters} |"
        f" consumed tokens: {record['consumed_tokens']} |"
        f" elapsed: {record['elapsed_s']:.1f} s |"
        f" lm loss: {record['lm_loss']:.6E} |"
        f" z loss: {record['z_loss']:.4E} |"
        f" lr: {record['lr']:.4E} |"
        f" grad norm: {record['grad_norm']:.4f} |"
        f" tokens/s: {record['tokens_per_s']:.0f} |"
        f" iter time: {1000 * record['iteration_time_s']:.1f} ms"
        + (f" | throughput per GPU: {_tflops_text(record['tflops_per_gpu'])} TFLOP/s"
           if record.get("tflops_per_gpu") is not None else "")
        + (f" | params norm: {record['params_norm']:.4f}" if record.get("params_norm") is not None else "")
        + (f" | num zeros: {record['num_zeros_in_grad']}" if record.get("num_zeros_in_grad") is not None else "")
    )


def _records_up_to(path: Path, iteration: int) -> list[str]:
    """The lines of an existing metrics file whose iteration is <= ``iteration``."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(record, dict) and not record.get("diverged") and record.get("iteration", 0) <= iteration:
            kept.append(line if line.endswith("\n") else line + "\n")
    return kept


class Metrics:
    """Metrics sinks of one run (see the module docstring).

    enabled: False on every rank but global rank 0 (all methods then do nothing).
    resume_from: the iteration a resumed run continues after: the metrics file keeps its
        records up to that iteration (those of a lost continuation are dropped) and grows
        from there; 0 starts a new file.
    progress: show a tqdm bar; default: when ``stream`` is a terminal and tqdm is installed.
    log_validation_ppl: also write the validation perplexity to TensorBoard.
    tensorboard_log_interval: iterations between TensorBoard points (each the iteration's own
        values).
    flops_per_iteration, world_size: with ``--log-throughput``, the model's floating-point
        operations per iteration (:func:`gpt_flops_per_iteration`) and the processes they
        are shared by: records get ``tflops_per_gpu``.
    """

    def __init__(
        self,
        *,
        train_iters: int,
        log_interval: int = 1,
        metrics_file: str | os.PathLike | None = None,
        tensorboard_dir: str | os.PathLike | None = None,
        resume_from: int = 0,
        enabled: bool = True,
        progress: bool | None = None,
        stream: TextIO | None = None,
        log_validation_ppl: bool = False,
        tensorboard_log_interval: int = 1,
        flops_per_iteration: float | None = None,
        world_size: int = 1,
        tensorboard_queue_size: int | None = None,
        log_timers: int | None = None,
        log_world_size: bool = False,
    ) -> None:
        self.enabled = enabled
        self.flops_per_iteration, self.world_size = flops_per_iteration, world_size
        # the same on every rank (values that take a collective are computed where they are wanted)
        self._tensorboard_every = tensorboard_log_interval if tensorboard_dir else None
        self.log_validation_ppl = log_validation_ppl
        # TensorBoard extras, Megatron-LM's: the timers up to this --timing-log-level, the world size
        self.log_timers, self.log_world_size = log_timers, log_world_size
        self.train_iters = train_iters
        self.log_interval = log_interval
        self.stream = stream if stream is not None else sys.stdout
        self._window: list[dict] = []
        self._pending: dict | None = None  # the last iteration of a window not yet logged (see flush)
        self.last_finite_loss: float | None = None
        self.last_finite_iteration: int | None = None
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        if metrics_file:
            path = Path(metrics_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = _records_up_to(path, resume_from) if resume_from > 0 else []
            self._file = open(path, "w", encoding="utf-8")
            self._file.writelines(kept)
            self._file.flush()
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=resume_from + 1 if resume_from else None,
                                     **({} if tensorboard_queue_size is None else {"max_queue": tensorboard_queue_size}))
        if progress is None:
            progress = bool(getattr(self.stream, "isatty", lambda: False)())
        if progress:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=train_iters, initial=resume_from, unit="it", dynamic_ncols=True,
                                 file=self.stream, desc="training")

    # ------------------------------------------------------------------------- output helpers
    def print(self, line: str) -> None:
        """A log line (above the progress bar when there is one)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    @staticmethod
    def elapsed() -> float:
        return time.time() - PROCESS_START

    # ------------------------------------------------------------------------------ records
    def logs_at(self, iteration: int) -> bool:
        """Whether ``iteration`` gets a log line and a metrics record."""
        return iteration % self.log_interval == 0 or iteration == self.train_iters

    def wants_values_at(self, iteration: int) -> bool:
        """Whether ``iteration`` is logged anywhere: a record, or a TensorBoard point. Every rank
        answers the same, so values that take a collective (the params norm) are computed at
        these iterations only."""
        return self.logs_at(iteration) or bool(self._tensorboard_every and iteration % self._tensorboard_every == 0)

    def iteration(
        self,
        iteration: int,
        *,
        lm_loss: float,
        z_loss: float,
        lr: float,
        grad_norm: float | None,
        iteration_time_s: float,
        optimizer_step_s: float | None = None,
        consumed_samples: int,
        consumed_tokens: int,
        tokens: int,
        params_norm: float | None = None,
        num_zeros_in_grad: int | None = None,
        memory: dict[str, float] | None = None,
    ) -> dict | None:
        """Record one finished iteration; returns the emitted record at log points, else None.

        tokens: tokens of this iteration (global batch x sequence length).
        params_norm / num_zeros_in_grad: recorded when given (where ``wants_values_at``).
        memory: written to TensorBoard (``memory/<name>``) at its points when given.
        """
        if math.isfinite(lm_loss):
            self.last_finite_loss, self.last_finite_iteration = float(lm_loss), iteration
        if not self.enabled:
            return None
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{lm_loss:.4f}", refresh=False)
        self._window.append(
            {"lm_loss": lm_loss, "z_loss": z_loss, "time": iteration_time_s, "tokens": tokens,
             "optimizer": optimizer_step_s}
        )
        if self._tb is not None and iteration % self._tensorboard_every == 0:
            point = {"lm_loss": lm_loss, "z_loss": z_loss, "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_s": tokens / iteration_time_s if iteration_time_s > 0 else None,
                     "tflops_per_gpu": self._tflops_per_gpu(1, iteration_time_s),
                     "params_norm": params_norm, "num_zeros_in_grad": num_zeros_in_grad}
            if self.log_timers is not None:
                point["iteration_time_s"] = iteration_time_s
                if self.log_timers >= 1:
                    point["optimizer_step_s"] = optimizer_step_s
            if self.log_world_size:
                point["world_size"] = self.world_size
            for key, value in point.items():
                value = _finite_or_none(value)
                if value is not None:
                    self._tb.add_scalar(f"train/{key}", value, iteration)
            for key, value in (memory or {}).items():
                self._tb.add_scalar(f"memory/{key}", value, iteration)
            if self.logs_at(iteration):  # on disk by the time the log line shows
                self._tb.flush()
        last = dict(iteration=iteration, consumed_samples=consumed_samples, consumed_tokens=consumed_tokens, lr=lr,
                    grad_norm=grad_norm, params_norm=params_norm, num_zeros_in_grad=num_zeros_in_grad)
        if not self.logs_at(iteration):
            self._pending = last
            return None
        return self._emit_window(**last)

    def flush(self) -> None:
        """Log the trained iterations of the window so far, at the last of them (a window that a
        skipped iteration, a divergence, a stop or the end of the run cuts short), so none is
        lost; a run about to stop calls it before its last save and evaluation, so that the
        lines come in order."""
        if self._pending is not None:
            self._emit_window(**self._pending)

    def _emit_window(self, *, iteration: int, consumed_samples: int, consumed_tokens: int, lr: float,
                     grad_norm: float | None, params_norm: float | None, num_zeros_in_grad: int | None) -> dict:
        """The log line and metrics record of the iterations since the last one (means over
        them; the other values are ``iteration``'s, the last of them)."""
        self._pending = None
        window, self._window = self._window, []
        seconds = sum(w["time"] for w in window)
        record = {
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "consumed_tokens": consumed_tokens,
            "lm_loss": sum(w["lm_loss"] for w in window) / len(window),
            "z_loss": sum(w["z_loss"] for w in window) / len(window),
            "lr": lr,
            "grad_norm": grad_norm,
            "iteration_time_s": seconds / len(window),
            "optimizer_step_s": (
                None if any(w["optimizer"] is None for w in window)
                else sum(w["optimizer"] for w in window) / len(window)
            ),
            "tokens_per_s": sum(w["tokens"] for w in window) / seconds if seconds > 0 else 0.0,
            "elapsed_s": self.elapsed(),
        }
        if self.flops_per_iteration is not None:
            record["tflops_per_gpu"] = self._tflops_per_gpu(len(window), seconds)
        if params_norm is not None:
            record["params_norm"] = float(params_norm)
        if num_zeros_in_grad is not None:
            record["num_zeros_in_grad"] = int(num_zeros_in_grad)
        self.print(format_log_line({**record, "grad_norm": grad_norm if grad_norm is not None else float("nan")},
                                   self.train_iters))
        self._write({k: _json_float(v) if isinstance(v, float) else v for k, v in record.items()})
        return record

    def _tflops_per_gpu(self, iterations: int, seconds: float) -> float | None:
        if self.flops_per_iteration is None or seconds <= 0:
            return None
        return self.flops_per_iteration * iterations / seconds / self.world_size / 1e12

    def evaluation(self, iteration: int, val_loss: float, val_z_loss: float,
                   sets: dict[str, tuple[float, float]] | None = None) -> dict | None:
        """Record a validation result; ``sets``: each validation set's (loss, z-loss) where there
        are several (``val_loss`` and ``val_z_loss`` are then their unweighted means)."""
        if not self.enabled:
            return None
        record = {"eval": True, "iteration": iteration, "val_loss": val_loss, "val_z_loss": val_z_loss,
                  "elapsed_s": self.elapsed()}
        if sets:
            record["sets"] = {name: {"val_loss": _json_float(loss), "val_z_loss": _json_float(z)}
                              for name, (loss, z) in sets.items()}
        mean = f" (the mean of {len(sets)} sets)" if sets else ""
        self.print(f" validation at iteration {iteration} | lm loss: {val_loss:.6E} | lm loss PPL: "
                   f"{_ppl(val_loss):.4E}{mean}")
        for name, (loss, _) in (sets or {}).items():
            self.print(f" validation set {name} at iteration {iteration} | lm loss: {loss:.6E} | lm loss PPL: "
                       f"{_ppl(loss):.4E}")
        self._write({k: _json_float(v) if isinstance(v, float) else v for k, v in record.items()})
        if self._tb is not None:
            for tag, loss in (("valid", val_loss), *((f"valid/{name}", loss) for name, (loss, _) in (sets or {}).items())):
                if math.isfinite(loss):
                    self._tb.add_scalar(f"{tag}/lm_loss", loss, iteration)
                    if self.log_validation_ppl and math.isfinite(_ppl(loss)):
                        self._tb.add_scalar(f"{tag}/lm_loss_ppl", _ppl(loss), iteration)
            self._tb.flush()
        return record

    def skipped(self, iteration: int, *, consumed_samples: int, consumed_tokens: int, samples: int) -> dict | None:
        """Record an iteration passed over (--iterations-to-skip): its ``samples`` samples, up to
        ``consumed_samples``, were not trained on. It advances the progress bar and is always
        logged (a log line and a record), whatever the log interval; where it falls on a log
        point, the trained iterations of the window before it are logged first (at the last of
        them), so none is lost."""
        if not self.enabled:
            return None
        if self._bar is not None:
            self._bar.update(1)
        if self.logs_at(iteration):
            self.flush()
        record = {"skipped": True, "iteration": iteration, "consumed_samples": consumed_samples,
                  "consumed_tokens": consumed_tokens, "elapsed_s": self.elapsed()}
        width = len(str(self.train_iters))
        self.print(f" iteration {iteration:>{width}}/{self.train_iters} | skipped (--iterations-to-skip): samples "
                   f"{consumed_samples - samples}-{consumed_samples - 1} not trained on, the lr schedule not advanced")
        self._write(record)
        return record

    def diverged(self, iteration: int, lm_loss: float) -> dict | None:
        """The final record of a run whose loss became NaN/inf at ``iteration`` (after that of
        the trained iterations not yet logged)."""
        if not self.enabled:
            return None
        self.flush()
        record = {
            "diverged": True,
            "iteration": iteration,
            "lm_loss": _json_float(lm_loss),
            "last_finite_loss": self.last_finite_loss,
            "last_finite_iteration": self.last_finite_iteration,
            "elapsed_s": self.elapsed(),
        }
        self.print(
            f" diverged at iteration {iteration}: lm loss {lm_loss} (last finite loss "
            f"{self.last_finite_loss} at iteration {self.last_finite_iteration}); stopping"
        )
        self._write(record)
        return record

    def close(self) -> None:
        """Log the iterations since the last log point (a run stopped between two: an exit
        interval, a signal, a time limit, an error), then close the sinks."""
        if self.enabled:
            self.flush()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None:
            self._file.close()
            self._file = None
