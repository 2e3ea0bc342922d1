"""The search objective: one proxy training run per trial, as a subprocess.

For trial n the objective writes the trial's spec (base spec x the trial's multipliers) to
``<trials_dir>/trial_<n>/base.json`` and runs

    <command> <trainer args> --cdp-base trial_<n>/base.json --metrics-file trial_<n>/metrics.jsonl

with stdout and stderr in ``trial_<n>/log.txt`` (all three files are kept). The command is
``python -m cdp_megatron.pretrain`` (``cdp-pretrain``) by default and injectable, so tests
and other trainers can stand in as long as they write the same metrics file (see
``cdp_megatron.metrics``): training lines with ``iteration`` and ``lm_loss``, evaluation
lines ``{"eval": true, "val_loss": ...}`` and, when a run diverges, exit code 3 and a last
line ``{"diverged": true, "last_finite_loss": ...}``. A subprocess isolates the search from
the trainer: a crash, a hang or leaked memory costs one trial, never the search.

Every trial ends in one of these outcomes (user attribute ``status``):

================  ========  ===================================================================
status            state     value
================  ========  ===================================================================
``ok``            COMPLETE  the final validation loss (the last evaluation line)
``diverged``      COMPLETE  the last finite training loss (``diverged`` = True: the sampler
                            counts it as evaluated but never makes it the incumbent); a run
                            with no finite loss at all reports ln(vocab_size), the loss of an
                            untrained model
``timeout``       COMPLETE  as diverged: the run exceeded the time limit; the last loss seen
``crashed``       FAIL      none: the trainer failed after training started, or failed before
                            training once some trial of the study had succeeded (``log`` and
                            ``error`` name the log file and its last line)
``interrupted``   FAIL      none: the worker was interrupted; the parameters are enqueued again
``config-error``  FAIL      none: the first run failed before training, or the trainer command
                            cannot be started on this machine; the search stops
================  ========  ===================================================================

A trainer that fails before training (a non-zero exit other than 3 with no training line
in the metrics file, or a clean exit without any validation loss) while no trial of the study
has completed is a configuration problem, not a bad point: the objective raises
:class:`ProxyConfigError`, which stops the search with the log's path.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdp_megatron.search.sampler import DIVERGED_ATTR
from cdp_megatron.search.spaces import SearchSpace

__all__ = [
    "DEFAULT_TRAINER",
    "RESERVED_FLAGS",
    "DIVERGED_EXIT_CODE",
    "STATUS_ATTR",
    "ProxyConfigError",
    "TrialFailed",
    "RunResult",
    "ProxyObjective",
    "read_metrics",
    "run_proxy",
    "counts_toward_budget",
    "process_start_time",
]

DEFAULT_TRAINER: tuple[str, ...] = (sys.executable, "-m", "cdp_megatron.pretrain")
DIVERGED_EXIT_CODE = 3
"""cdp-pretrain's exit code for a run whose loss became non-finite."""
RESERVED_FLAGS: tuple[str, ...] = ("--cdp-base", "--cdp-config", "--metrics-file")
"""Trainer flags the objective sets itself for every trial."""
STATUS_ATTR = "status"
_KILL_GRACE_S = 5.0


class ProxyConfigError(RuntimeError):
    """The proxy run fails before training and no trial of the study has succeeded yet: the
    trainer command or its flags are wrong. Stops the search (the message names the log)."""


class TrialFailed(RuntimeError):
    """One trial's trainer crashed; the study records it as FAIL and the search goes on."""


def counts_toward_budget(trial) -> bool:
    """Trials that count toward ``--trials``: every COMPLETE (ok, diverged, timeout) or PRUNED
    trial and the FAIL trials whose trainer crashed; not the ones a dead or interrupted worker
    left behind (their parameters run again)."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get(STATUS_ATTR) == "crashed"


def process_start_time(pid: int) -> str | None:
    """Start time of a process (Linux /proc, in clock ticks since boot), to tell a live worker
    from a new process that reused its pid; None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


# -------------------------------------------------------------------------------- metrics


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)  # "nan" / "inf" strings (metrics.py writes non-finite values so)
    except (TypeError, ValueError):
        return None


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON objects of a metrics file; a missing file is empty, and a line cut short by a
    kill (or any non-JSON line) is skipped."""
    records = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    records.append(obj)
    except FileNotFoundError:
        pass
    return records


def _last_finite_loss(records: list[dict]) -> float | None:
    """The last finite training or validation loss, in file order."""
    for r in reversed(records):
        for key in ("lm_loss", "val_loss", "last_finite_loss"):
            v = _number(r.get(key))
            if v is not None and math.isfinite(v):
                return v
    return None


def _trained(records: list[dict]) -> bool:
    return any("lm_loss" in r or r.get("eval") or r.get("diverged") for r in records)


@dataclass(frozen=True)
class RunResult:
    """Outcome of one proxy run (see the module docstring for the statuses)."""

    status: str
    """ok, diverged, timeout, crashed, or not-started (failed before training / no evaluation)."""
    value: float | None
    returncode: int | None
    iteration: int | None
    """Last iteration in the metrics file."""
    seconds: float
    message: str = ""
    """For failures: the last line of the log (or what is missing)."""
    files: dict[str, str] = field(default_factory=dict)


def _tail(path: Path) -> str:
    """The line of the log that explains a failure: the last line that says "error" among the
    last 50 (warnings often follow it), else the last line."""
    try:
        text = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    for line in reversed(text[-50:]):
        if "error" in line.lower() and not line.startswith("$ "):
            return line[:400]
    return text[-1][:400] if text and not text[-1].startswith("$ ") else ""


def _die_with_parent() -> None:  # runs in the child between fork and exec: no imports here
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a SIGKILLed worker takes its trainer along


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the trainer's process group (torchrun children included), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, _KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def per_trial_tensorboard(trainer_args: Sequence[str], trial_dir: Path) -> tuple[list[str], Path | None]:
    """The proxy flags with ``--tensorboard-dir DIR`` turned into ``DIR/<study>/trial_<n>``
    (``<study>/trial_<n>``: the last two parts of ``trial_dir``), so that every trial is a run
    of its own in ``tensorboard --logdir DIR`` instead of all trials' curves in one; and that
    folder (None without the flag)."""
    args, folder = list(trainer_args), None
    for i, token in enumerate(args):
        flag, eq, value = token.partition("=")
        if flag != "--tensorboard-dir":
            continue
        if not eq:
            if i + 1 >= len(args):
                break
            value = args[i + 1]
        folder = Path(value) / trial_dir.parent.name / trial_dir.name
        if eq:
            args[i] = f"--tensorboard-dir={folder}"
        else:
            args[i + 1] = str(folder)
    return args, folder


def run_proxy(
    command: Sequence[str],
    trainer_args: Sequence[str],
    spec_text: str,
    trial_dir: str | Path,
    *,
    timeout: float | None = None,
    untrained_loss: float = math.nan,
    env: Mapping[str, str] | None = None,
) -> RunResult:
    """Write ``trial_dir/base.json``, run the trainer on it and classify the outcome."""
    trial_dir = Path(trial_dir).resolve()
    trial_dir.mkdir(parents=True, exist_ok=True)
    spec_path, metrics_path, log_path = (trial_dir / n for n in ("base.json", "metrics.jsonl", "log.txt"))
    for stale in (metrics_path, log_path):  # cdp-pretrain appends to --metrics-file
        stale.unlink(missing_ok=True)
    spec_path.write_text(spec_text)
    trainer_args, tensorboard = per_trial_tensorboard(trainer_args, trial_dir)
    if tensorboard is not None:  # a trial run again (its worker was killed): only its last run's events
        shutil.rmtree(tensorboard, ignore_errors=True)
    cmd = [*command, *trainer_args, "--cdp-base", str(spec_path), "--metrics-file", str(metrics_path)]
    files = {"dir": str(trial_dir), "spec": str(spec_path), "metrics": str(metrics_path), "log": str(log_path)}
    start = time.monotonic()
    timed_out = False
    with open(log_path, "wb") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=None if env is None else dict(env),
                start_new_session=True,  # its own process group, killed as a whole
                preexec_fn=_die_with_parent if _PRCTL is not None else None,
            )
        except OSError as e:  # no such executable, not executable: returncode None (never started)
            why = f"cannot start the trainer {cmd[0]} ({e.strerror or e})"
            log.write(f"error: {why}\n".encode())
            return RunResult("not-started", None, None, None, time.monotonic() - start, why, files)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        except BaseException:  # KeyboardInterrupt, SystemExit: never leave a trainer behind
            _kill_group(proc)
            raise
    seconds = time.monotonic() - start
    rc = proc.returncode
    records = read_metrics(metrics_path)
    iterations = [int(r["iteration"]) for r in records if isinstance(r.get("iteration"), (int, float))]
    last_iteration = iterations[-1] if iterations else None

    def result(status: str, value: float | None, message: str = "") -> RunResult:
        return RunResult(status, value, rc, last_iteration, seconds, message, files)

    last_finite = _last_finite_loss(records)
    fallback = untrained_loss if last_finite is None else last_finite
    if timed_out:
        return result("timeout", fallback, f"exceeded the trial time limit of {timeout:g} s")
    diverged = next((r for r in reversed(records) if r.get("diverged")), None)
    if rc == DIVERGED_EXIT_CODE or diverged is not None:
        v = _number(diverged.get("last_finite_loss")) if diverged else None
        value = v if v is not None and math.isfinite(v) else fallback
        return result("diverged", value, f"diverged at iteration {diverged.get('iteration') if diverged else '?'}")
    if rc != 0:
        why = f"exit code {rc}" if rc > 0 else f"killed by signal {-rc}"
        status = "crashed" if _trained(records) else "not-started"
        return result(status, None, f"{why}: {_tail(log_path) or 'no output'}")
    evals = [r for r in records if r.get("eval") and "val_loss" in r]
    if not evals:
        return result(
            "not-started",
            None,
            "the trainer exited cleanly but wrote no validation loss to its metrics file; "
            "give the proxy flags an evaluation (e.g. --eval-iters 10 --eval-interval <train iters>)",
        )
    val = _number(evals[-1]["val_loss"])
    if val is None or not math.isfinite(val):
        return result("diverged", fallback, "non-finite validation loss")
    return result("ok", val)


# ------------------------------------------------------------------------------- objective


class ProxyObjective:
    """Optuna objective: sample the space, run the proxy, return the final validation loss.

    Args:
        space: The search space (its base spec is the centre).
        trainer_args: The proxy's flags (Megatron-LM style, as for cdp-pretrain), without
            :data:`RESERVED_FLAGS`.
        trials_dir: Folder of the per-trial folders ``trial_<number>``.
        command: The trainer command prefix (default :data:`DEFAULT_TRAINER`).
        timeout: Seconds a run may take; beyond it the run is killed and recorded as
            ``timeout`` (a diverged trial with the last loss seen). None: no limit.
        env: Environment of the trainer (default: this process's).
        provenance: Extra entries for every trial spec's ``provenance`` (e.g. the study).
    """

    def __init__(
        self,
        space: SearchSpace,
        trainer_args: Sequence[str],
        trials_dir: str | Path,
        *,
        command: Sequence[str] = DEFAULT_TRAINER,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        for token in trainer_args:
            if token.split("=", 1)[0] in RESERVED_FLAGS:
                raise ValueError(
                    f"{token.split('=', 1)[0]} is set by the search for every trial; remove it from the proxy flags"
                )
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.space = space
        self.trainer_args = list(trainer_args)
        self.trials_dir = Path(trials_dir)
        self.command = list(command)
        self.timeout = timeout
        self.env = env
        self.provenance = dict(provenance or {})
        self.untrained_loss = math.log(space.base.base.shape.vocab_size)

    def trial_dir(self, number: int) -> Path:
        return self.trials_dir / f"trial_{number:05d}"

    def __call__(self, trial) -> float:
        from optuna.trial import TrialState

        # Who runs this trial, so that a restarted worker on this host can tell a trial whose
        # worker was killed from one that another live worker is running.
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("pid_start", process_start_time(os.getpid()))
        params = self.space.sample(trial)
        spec = self.space.to_spec(
            params,
            provenance={**self.provenance, "trial": trial.number, "params": params},
        )
        folder = self.trial_dir(trial.number)
        trial.set_user_attr("trial_dir", str(folder.resolve()))
        try:
            res = run_proxy(
                self.command,
                self.trainer_args,
                json.dumps(spec.to_dict(), indent=1) + "\n",
                folder,
                timeout=self.timeout,
                untrained_loss=self.untrained_loss,
                env=self.env,
            )
        except (KeyboardInterrupt, SystemExit):
            trial.set_user_attr(STATUS_ATTR, "interrupted")
            trial.set_user_attr(DIVERGED_ATTR, False)
            # Run the same point again when the search resumes.
            trial.study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
            raise
        trial.set_user_attr("log", res.files.get("log"))
        trial.set_user_attr("seconds", round(res.seconds, 3))
        trial.set_user_attr("iteration", res.iteration)
        if res.status in ("ok", "diverged", "timeout"):
            trial.set_user_attr(STATUS_ATTR, res.status)
            trial.set_user_attr(DIVERGED_ATTR, res.status != "ok")
            if res.message:
                trial.set_user_attr("message", res.message)
            return float(res.value)
        trial.set_user_attr(DIVERGED_ATTR, False)
        trial.set_user_attr("error", res.message)
        trial.set_user_attr("returncode", res.returncode)
        never_ran = res.returncode is None  # the command itself cannot start here: stop even after successes
        if res.status == "not-started" and (
            never_ran or not trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        ):
            trial.set_user_attr(STATUS_ATTR, "config-error")
            raise ProxyConfigError(
                f"the proxy run of trial {trial.number} failed before training ({res.message}); "
                f"see {res.files['log']}"
            )
        trial.set_user_attr(STATUS_ATTR, "crashed")
        raise TrialFailed(f"trial {trial.number}: {res.message}; see {res.files['log']}")
