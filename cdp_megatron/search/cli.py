"""``cdp-search``: per-module hyperparameter search on a proxy (method.md sections 5 and 6).

    cdp-search --base examples/base.json --space kronecker --search lr,weight_decay \\
        --trials 200 --workers 4 --study kron-lr -- <cdp-pretrain flags of the proxy>
    cdp-search --study kron-lr                        # rerun: resume / top up to --trials
    cdp-search --study kron-lr --storage URL          # another machine joins (same command)
    cdp-search --study kron-lr --trials 0 --export best.json

The study (an Optuna study in an RDB storage, SQLite ``<output-dir>/search.db`` by default)
holds everything: its configuration (base spec, space, searched hyperparameters, bounds,
sampler, proxy flags) is stored in the study's user attributes, so a rerun or a joining
worker needs only ``--study`` (and ``--storage``); giving a different value for any of
those is an error rather than a silently different experiment. ``--trials`` is the total
number of finished trials the study should reach (COMPLETE, diverged and timed-out trials,
and trials whose trainer crashed), so rerunning the same command continues where it stopped.

Interruption. Ctrl-C or SIGTERM kills the running proxies; their trials are marked FAIL
(``status`` = ``interrupted``) and their parameters enqueued again. A worker killed with
SIGKILL leaves its trial RUNNING: on restart, RUNNING trials of dead processes on this host
are marked FAIL and re-enqueued at once; those of other hosts are failed and re-enqueued by
Optuna's heartbeat once they have been silent for ``--heartbeat`` x 3 seconds. Interrupted
trials never count toward ``--trials`` and completed trials are never run twice.

Exit codes: 0 done; 1 a worker stopped after ``--max-failures`` consecutive crashed trials;
2 bad input (one line on stderr: unknown hyperparameter, space or sampler, a storage that
cannot be opened, a --trainer that cannot be run, proxy flags that cdp-pretrain's own checks
refuse (with the default trainer, checked in this process before anything is created), a
proxy that fails before training, a configuration that contradicts the study's), the study
left as it was and no new storage file or trial folder; 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from cdp_megatron.argtypes import nonneg_int, output_dir_problem, output_file_problem, positive_float, positive_int
from cdp_megatron.requirements import megatron_problem, missing_problem
from cdp_megatron.spec import HYPERPARAMETERS, Spec, SpecError, load_spec
from cdp_megatron.search.spaces import (
    DEFAULT_BOUNDS,
    DEFAULT_SPACE,
    GRID_SPACE,
    PAPER_GRID,
    SPACES,
    SearchSpace,
    SpaceError,
    parse_search,
)

__all__ = ["main", "build_parser", "SAMPLERS", "CONFIG_ATTR"]

PROG = "cdp-search"
SAMPLERS: tuple[str, ...] = ("trust-region", "random", "cmaes", "tpe", "grid-global")
CONFIG_ATTR = "cdp_search"
"""Study user attribute holding the search configuration (a JSON object)."""
CONFIG_VERSION = 1
DEFAULT_OUTPUT_DIR = "cdp_search"
DEFAULT_TRIALS = 100
# Configuration that defines the experiment: a joining worker or a rerun must agree.
_IDENTITY = {
    "base_spec": "--base",
    "space": "--space",
    "search": "--search",
    "bounds": "--bounds",
    "sampler": "--sampler",
    "patience": "--patience",
    "trainer_args": "the proxy flags after --",
}


class CliError(Exception):
    """Bad input: printed as one line, exit code 2."""


class TooManyFailures(RuntimeError):
    """A worker saw --max-failures crashed trials in a row."""


# ------------------------------------------------------------------------------ arguments


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _bound(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(?:(?:\^|\*\*)\s*([0-9.eE+-]+))?\s*", text)
    try:
        value = float(m.group(1)) ** float(m.group(2)) if m and m.group(2) else float(text)
    except (ValueError, AttributeError, OverflowError):
        raise argparse.ArgumentTypeError(f"invalid bound {text!r}: write 2^-6, 0.015625 or 1e-2") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"bound {text!r} must be a positive finite number")
    return value


def _study_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty study name: give one such as kron-lr")
    return text


def _bounds(text: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"invalid --bounds {text!r}: give LOW,HIGH such as 2^-6,2^6")
    low, high = _bound(parts[0]), _bound(parts[1])
    if not low < high:  # an empty box: every trial would be the base
        raise argparse.ArgumentTypeError(f"invalid --bounds {text!r}: LOW must be less than HIGH, e.g. 2^-6,2^6")
    return low, high


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        usage=f"{PROG} [options] [-- <cdp-pretrain flags of the proxy>]",
        description="Search per-type and per-depth hyperparameter multipliers of a base spec on a proxy "
        "(trust-region random search, method.md section 6). Every trial trains the proxy with cdp-pretrain "
        "--cdp-base <trial spec>; the flags after -- describe the proxy run (shape, data, evaluation).",
    )
    s = p.add_argument_group("the search (stored in the study; a rerun may omit them)")
    s.add_argument("--base", metavar="BASE_JSON", help="base spec whose multipliers are the centre of the search")
    s.add_argument("--space", choices=SPACES, help=f"search space (default {DEFAULT_SPACE}; grid-global implies global)")
    s.add_argument("--search", metavar="HP[,HP...]",
                   help=f"hyperparameters to search, some of {','.join(HYPERPARAMETERS)} (default lr; with "
                   "grid-global: lr,eps,beta1,beta2,weight_decay)")
    s.add_argument("--bounds", type=_bounds, metavar="LOW,HIGH", help="range of every multiplier (default 2^-6,2^6)")
    s.add_argument("--sampler", choices=SAMPLERS,
                   help="trust-region (default), random / cmaes / tpe over the same box, or grid-global: the "
                   "paper's random search of the global hyperparameters over a discrete grid")
    s.add_argument("--patience", type=positive_int, help="trust-region: trials without improvement before the radius "
                   "shrinks by 0.7 (default 100)")
    r = p.add_argument_group("running")
    r.add_argument("--trials", type=nonneg_int, help=f"total finished trials the study should reach (default: the "
                   f"study's, or {DEFAULT_TRIALS} for a new study; 0: run nothing)")
    r.add_argument("--workers", type=positive_int, default=1, help="worker processes on this machine (default 1)")
    r.add_argument("--storage", metavar="URL", help="Optuna RDB URL (default sqlite:///<output-dir>/search.db)")
    r.add_argument("--study", type=_study_name, metavar="NAME", help="study name (default: derived from space, search and sampler; "
                   "without --base: the storage's only study)")
    r.add_argument("--seed", type=nonneg_int, help="sampler seed (default: drawn once and stored in the study)")
    r.add_argument("--trial-timeout", type=positive_float, metavar="S", help="seconds a proxy run may take; then it is "
                   "killed and recorded as diverged (timeout) with its last loss")
    r.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR",
                   help=f"per-trial folders go to DIR/<study>/trial_<n> (default {DEFAULT_OUTPUT_DIR}; a study "
                   "name that is not a plain file name gets its folder name plus a hash)")
    r.add_argument("--trainer", metavar="CMD", help="trainer command prefix (default: python -m cdp_megatron.pretrain)")
    r.add_argument("--init-from", metavar="STUDY", help="a new study starts from the best trial of STUDY (same "
                   "storage and base), projected onto this space")
    r.add_argument("--heartbeat", type=nonneg_int, default=60, metavar="S",
                   help="heartbeat of running trials in seconds; a trial silent for 3x this is failed and "
                   "re-enqueued (default 60; 0: off)")
    r.add_argument("--max-failures", type=positive_int, default=5, metavar="N",
                   help="stop a worker after N crashed trials in a row (default 5)")
    r.add_argument("--export", metavar="BEST_JSON", help="write the best non-diverged trial as a base.json")
    r.add_argument("--quiet", action="store_true", help="no per-trial progress lines")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """(cdp-search flags, proxy flags after the first --, or None without --)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, None


# -------------------------------------------------------------------------------- storage


def _redact(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _retry_stale(study, trial) -> None:
    """Heartbeat callback: a trial whose worker went silent runs again."""
    params = dict(trial.params) or dict(trial.system_attrs.get("fixed_params") or {})
    if params:
        study.enqueue_trial(params, user_attrs={"retry_of": trial.number})


def _serialise_sqlite(engine) -> None:
    """Run every SQLite transaction as BEGIN IMMEDIATE, in WAL mode.

    SQLite ignores SELECT ... FOR UPDATE, so with pysqlite's deferred transactions two worker
    processes can both read an enqueued trial as WAITING and both claim it (Optuna's
    ``_pop_waiting_trial_id``): the same trial would run twice. An immediate transaction takes
    the write lock before its first read, which makes read-then-update atomic across
    processes (the SQLAlchemy recipe for pysqlite transactions; the lock timeout is the
    connection's ``timeout``). Server databases (PostgreSQL, MySQL) lock rows properly.

    WAL with synchronous=NORMAL: Optuna commits every parameter and attribute on its own, and
    a rollback-journal commit costs an fsync (~15 ms here, ~1 s per trial); in WAL mode a
    commit survives the death of the process (SIGKILL) and only an OS crash or power cut can
    lose the last few. WAL needs the file on a local disk (not NFS): for several machines use
    a server database."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, connection_record):
        dbapi_connection.isolation_level = None  # pysqlite must not emit its own BEGIN
        try:
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
            dbapi_connection.execute("PRAGMA synchronous=NORMAL")
        except Exception:  # a file system without shared memory: keep the rollback journal
            pass

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened by RDBStorage.__init__ predate the listeners


def open_storage(url: str, heartbeat: int = 0):
    """An Optuna RDBStorage; SQLite gets a long lock timeout (several workers share a file)."""
    import optuna

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    if heartbeat:
        # Optuna 4.9 renamed failed_trial_callback to heartbeat_stale_trial_callback.
        accepted = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
        callback = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in accepted else "failed_trial_callback"
        kwargs.update(heartbeat_interval=heartbeat, grace_period=3 * heartbeat, **{callback: _retry_stale})
    try:
        for attempt in range(6):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    storage = optuna.storages.RDBStorage(url, **kwargs)
                break
            except Exception as e:
                # Several processes opening a new database at once race to create its tables
                # and stamp its schema version: the losers see a duplicate or a lock; retry.
                racing = "IntegrityError" in type(e).__name__ or any(m in str(e) for m in ("locked", "already exists"))
                if attempt == 5 or not racing:
                    raise
                time.sleep(0.2 * (attempt + 1))
        if url.startswith("sqlite"):
            _serialise_sqlite(storage.engine)
        return storage
    except Exception as e:  # sqlalchemy / driver errors: any of them means "cannot open"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CliError(
            f"--storage {_redact(url)}: cannot open ({type(e).__name__}: {first[:200]}); "
            "check the URL, that its folder exists and that the database server is reachable"
        ) from None


def study_folder(name: str) -> str:
    """The folder of a study's trials under ``--output-dir``: the name itself where it is a
    plain file name, else the name with other characters replaced by ``_`` and a short hash of
    the name appended, so that two studies never share a folder (``a/b`` and ``a_b``) and no
    name (``..``, ``.``) leads out of ``--output-dir``."""
    safe = re.sub(r"[^A-Za-z0-9_.+=-]", "_", name)
    if safe == name and name.strip("."):
        return name
    return f"{safe.strip('.') or 'study'}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def default_storage_url(output_dir: str) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'search.db'}"


# --------------------------------------------------------------------------------- config


def _study_names(storage) -> list[str]:
    import optuna

    return optuna.study.get_all_study_names(storage)


def _spec_dict(spec: Spec) -> dict:
    return json.loads(json.dumps(spec.to_dict()))


def _given_config(args: argparse.Namespace, trainer_args: list[str] | None) -> dict[str, Any]:
    """The configuration entries the user gave explicitly on this command line."""
    given: dict[str, Any] = {}
    if args.base is not None:
        try:
            given["base_spec"] = _spec_dict(load_spec(args.base))
        except SpecError as e:  # its message usually starts with the path: name it once
            message = str(e).removeprefix(f"{args.base}: ")
            raise CliError(message if args.base in message else f"--base {args.base}: {message}") from None
    if args.sampler is not None:
        given["sampler"] = args.sampler
    if args.space is not None:
        if args.sampler == "grid-global" and args.space != "global":
            raise CliError(f"--sampler grid-global searches the global hyperparameters; drop --space {args.space}")
        given["space"] = args.space
    if given.get("sampler") == "grid-global":
        given["space"] = GRID_SPACE
    if args.search is not None:
        try:
            given["search"] = list(parse_search(args.search))
        except SpaceError as e:
            raise CliError(f"--search {args.search}: {e}") from None
    if args.bounds is not None:
        given["bounds"] = list(args.bounds)
    if args.patience is not None:
        given["patience"] = args.patience
    if trainer_args is not None:
        given["trainer_args"] = list(trainer_args)
    if args.trainer is not None:
        try:
            command = shlex.split(args.trainer)
        except ValueError as e:
            raise CliError(f"--trainer {args.trainer}: {e}; give the command as a shell would, e.g. "
                           "--trainer 'python train.py'") from None
        if not command:
            raise CliError("--trainer is empty; give a command, e.g. --trainer 'python train.py', or drop it "
                           "for cdp-pretrain")
        _check_trainer_command(command)
        given["trainer_command"] = command
    if args.trial_timeout is not None:
        given["trial_timeout"] = args.trial_timeout
    if args.seed is not None:
        given["seed"] = args.seed
    if args.trials:  # --trials 0 runs nothing and leaves the study's total as it is
        given["trials"] = args.trials
    return given


def _fmt_value(v: Any) -> str:
    if isinstance(v, dict):
        return "a different spec"
    if isinstance(v, list) and v and isinstance(v[0], str):
        return shlex.join(v) if len(shlex.join(v)) < 80 else shlex.join(v)[:77] + "..."
    return str(v)


def merge_config(
    stored: dict[str, Any] | None, given: dict[str, Any], study: str, *, started: bool = True
) -> dict[str, Any]:
    """The study's configuration with this command line's updates. An identity entry (base,
    space, search, bounds, sampler, patience, proxy flags) that differs from the stored one is
    an error once the study has ``started`` (has a finished or running trial that counts); a
    study whose trials all failed before training takes the new values."""
    if stored is None:
        if "base_spec" not in given:
            raise CliError(f"study {study!r} does not exist yet; give --base to create it")
        config: dict[str, Any] = {
            "version": CONFIG_VERSION,
            "space": DEFAULT_SPACE,
            "search": ["lr"],
            "bounds": list(DEFAULT_BOUNDS),
            "sampler": "trust-region",
            "patience": 100,
            "trainer_args": [],
            "trainer_command": None,
            "trial_timeout": None,
            "seed": None,
            "trials": DEFAULT_TRIALS,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        config.update(given)
        if config["sampler"] == "grid-global":
            config["space"] = GRID_SPACE
            if "search" not in given:  # the paper's baseline searches all five
                config["search"] = list(PAPER_GRID)
        if config["seed"] is None:
            config["seed"] = int.from_bytes(os.urandom(4), "little") >> 1
        return config
    for key, flag in _IDENTITY.items():
        if started and key in given and given[key] != stored.get(key):
            raise CliError(
                f"study {study!r} was created with {flag} = {_fmt_value(stored.get(key))}, not {_fmt_value(given[key])}; "
                "drop it to continue that study, or give another --study"
            )
    config = dict(stored)
    config.update({k: v for k, v in given.items() if started is False or k not in _IDENTITY})
    if not started and config["sampler"] == "grid-global":
        config["space"] = GRID_SPACE
    return config


def _build_space(config: dict[str, Any]) -> SearchSpace:
    try:
        base = Spec.from_dict(config["base_spec"])
        return SearchSpace(base, config["space"], config["search"], bounds=tuple(config["bounds"]))
    except (SpecError, SpaceError) as e:
        raise CliError(str(e)) from None


def _check_trainer_command(command: list[str]) -> None:
    if shutil.which(command[0]) is None:
        raise CliError(f"--trainer {shlex.join(command)}: {command[0]} is not an executable file or a command on "
                       "PATH; check the path")


def _check_proxy_flags(trainer_args: list[str], base_spec: dict, base_name: str) -> None:
    """Run cdp-pretrain's own checks (``pretrain_args.parse_args``: no torch, nothing written)
    on the proxy flags and the base spec, as trial 0 would: a proxy that cannot start fails
    here, before the study or a trial folder exists, not after the first trial."""
    import tempfile

    from cdp_megatron.pretrain_args import ArgsError, parse_args

    if any(t in ("-h", "--help") for t in trainer_args):
        raise CliError("--help in the proxy flags: see cdp-pretrain --help; remove it")
    with tempfile.TemporaryDirectory(prefix="cdp-search-") as folder:
        path = os.path.join(folder, "base.json")
        Path(path).write_text(json.dumps(base_spec))
        try:
            parse_args([*trainer_args, "--cdp-base", path])
        except ArgsError as e:
            message = str(e).replace(f"--cdp-base {path}", base_name).replace(path, base_name)
            raise CliError(f"the proxy flags after --: {message}") from None
    problem = megatron_problem()  # the default trainer runs in this interpreter's environment
    if problem:
        raise CliError(f"the proxy (cdp-pretrain) cannot start: {problem}")


def _new_sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL that does not exist yet (opening it would create it), else None."""
    if not url.startswith("sqlite"):
        return None
    try:
        from sqlalchemy.engine import make_url

        database = make_url(url).database
    except Exception:
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database)
    return None if path.exists() else path


def _check_trainer_args(trainer_args: list[str]) -> None:
    from cdp_megatron.search.objective import RESERVED_FLAGS

    for token in trainer_args:
        flag = token.split("=", 1)[0]
        if flag in RESERVED_FLAGS:
            raise CliError(f"{flag} in the proxy flags: cdp-search sets it for every trial; remove it")
        if flag in ("--save", "--load"):  # one folder for all trials: each would resume another's run
            raise CliError(f"{flag} in the proxy flags: every trial would share one checkpoint folder and a "
                           "trial would resume another trial's run (other hyperparameters); remove it")
        if flag in _EARLY_EXIT_FLAGS:  # a trial that stops early exits 0 with an earlier loss as its last
            raise CliError(f"{flag} in the proxy flags: a trial would stop before --train-iters and its last "
                           "validation loss would count as the final one; remove it (--trial-timeout limits a trial)")


_EARLY_EXIT_FLAGS = ("--exit-interval", "--exit-duration-in-mins", "--exit-signal-handler")


def _default_study_name(config: dict[str, Any]) -> str:
    return f"{config['space']}-{'+'.join(config['search'])}-{config['sampler']}"


# ----------------------------------------------------------------------------- samplers


def make_sampler(config: dict[str, Any], *, worker_index: int = 0, n_existing: int = 0):
    """The study's sampler for one worker. The trust-region sampler draws per trial number, so
    every worker uses the study's seed; Optuna's samplers draw from a sequential stream, so
    each worker (and each resumed run) gets its own stream derived from (seed, trials already
    in the study, worker index), else two workers would propose the same points."""
    import numpy as np

    from cdp_megatron.search.sampler import TrustRegionSampler, baseline_sampler

    name, seed = config["sampler"], int(config["seed"])
    if name == "trust-region":
        return TrustRegionSampler(seed=seed, patience=int(config["patience"]))
    stream = int(np.random.SeedSequence([seed, n_existing, worker_index]).generate_state(1)[0])
    if name not in SAMPLERS:
        raise CliError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")
    return baseline_sampler("random" if name == "grid-global" else name, stream)


# ---------------------------------------------------------------------------- progress


def trial_counts(trials) -> dict[str, int]:
    from optuna.trial import TrialState

    from cdp_megatron.search.objective import STATUS_ATTR, counts_toward_budget

    out = {"done": 0, "ok": 0, "diverged": 0, "timeout": 0, "failed": 0, "running": 0, "waiting": 0, "interrupted": 0}
    for t in trials:
        if t.state == TrialState.RUNNING:
            out["running"] += 1
        elif t.state == TrialState.WAITING:
            out["waiting"] += 1
        elif counts_toward_budget(t):
            out["done"] += 1
            status = t.user_attrs.get(STATUS_ATTR, "ok")
            key = {"ok": "ok", "diverged": "diverged", "timeout": "timeout"}.get(status, "failed")
            out[key] += 1
        else:
            out["interrupted"] += 1
    return out


def _counts_text(c: dict[str, int]) -> str:
    text = f"ok {c['ok']}, diverged {c['diverged']}, timeout {c['timeout']}, failed {c['failed']}"
    if c["interrupted"]:
        text += f"; not counted: {c['interrupted']} interrupted or stopped before training"
    return text


def _state(trials, config):
    from optuna.study import StudyDirection

    from cdp_megatron.search.sampler import trust_region_state

    return trust_region_state(trials, StudyDirection.MINIMIZE, patience=int(config.get("patience", 100)))


def progress_line(trial, trials, config: dict[str, Any]) -> str:
    """One line per finished trial: its outcome, the study's counts, best and radius."""
    from cdp_megatron.search.objective import STATUS_ATTR

    c = trial_counts(trials)
    state = _state(trials, config)
    status = trial.user_attrs.get(STATUS_ATTR, trial.state.name.lower())
    value = f" {trial.value:.4f}" if trial.value is not None else ""
    secs = trial.user_attrs.get("seconds")
    took = f" ({secs:.1f} s)" if isinstance(secs, (int, float)) else ""
    best = f"best {state.incumbent.value:.4f} (trial {state.incumbent.number})" if state.incumbent else "best -"
    radius = f" | radius {state.radius:.3f}" if config["sampler"] == "trust-region" else ""
    width = len(str(config["trials"]))
    return (
        f"[{c['done']:>{width}}/{config['trials']}] trial {trial.number}: {status}{value}{took} | {best} | "
        f"diverged {c['diverged'] + c['timeout']}, failed {c['failed']} | running {c['running']}{radius}"
    )


# ------------------------------------------------------------------------- stale trials


def _alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` (started at ``start``, see process_start_time) still runs."""
    from cdp_megatron.search.objective import process_start_time

    if Path("/proc/self/stat").exists():
        now = process_start_time(pid)
        return now is not None and (start is None or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dead_trials(study) -> list[int]:
    """Mark FAIL (status interrupted) the RUNNING trials whose worker process on this host is
    gone, and enqueue their parameters again. Returns their numbers."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    from cdp_megatron.search.objective import STATUS_ATTR

    host = socket.gethostname()
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") != host or not isinstance(t.user_attrs.get("pid"), int):
            continue
        if _alive(t.user_attrs["pid"], t.user_attrs.get("pid_start")):
            continue
        storage = study._storage
        try:
            storage.set_trial_user_attr(t._trial_id, STATUS_ATTR, "interrupted")
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue  # another process got there first
        _retry_stale(study, t)
        recovered.append(t.number)
    return recovered


# ------------------------------------------------------------------------------- workers


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_worker(payload: dict[str, Any], worker_index: int = 0, *, progress: bool = True) -> None:
    """Run trials until the study has ``config['trials']`` finished trials.

    Raises ProxyConfigError (the proxy fails before training and nothing has succeeded yet)
    or TooManyFailures."""
    import optuna
    from optuna.trial import TrialState

    from cdp_megatron.search.objective import DEFAULT_TRAINER, STATUS_ATTR, ProxyObjective, TrialFailed, counts_toward_budget

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    config = payload["config"]
    storage = open_storage(payload["storage"], payload["heartbeat"])
    study = optuna.load_study(study_name=payload["study"], storage=storage)
    study.sampler = make_sampler(config, worker_index=worker_index, n_existing=len(study.get_trials(deepcopy=False)))
    space = _build_space(config)
    objective = ProxyObjective(
        space,
        config["trainer_args"],
        payload["trials_dir"],
        command=config.get("trainer_command") or DEFAULT_TRAINER,
        timeout=config.get("trial_timeout"),
        env=payload.get("env"),
        provenance={"tool": PROG, "study": payload["study"]},
    )
    failures = {"n": 0, "last": ""}

    def after(study, trial) -> None:
        if trial.user_attrs.get(STATUS_ATTR) == "crashed":
            failures["n"] += 1
            failures["last"] = trial.user_attrs.get("error", "")
        elif trial.state == TrialState.COMPLETE:
            failures["n"] = 0
        if progress:
            print(progress_line(trial, study.get_trials(deepcopy=False), config), flush=True)

    total = int(config["trials"])
    while True:
        trials = study.get_trials(deepcopy=False)
        done = sum(counts_toward_budget(t) for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if done + running >= total:
            return
        study.optimize(objective, n_trials=1, catch=(TrialFailed,), callbacks=[after], gc_after_trial=False)
        if failures["n"] >= payload["max_failures"]:
            raise TooManyFailures(f"{failures['n']} trials in a row crashed; the last: {failures['last']}")


def _worker_process(payload: dict[str, Any], worker_index: int, errors) -> None:
    from cdp_megatron.search.objective import ProxyConfigError

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_worker(payload, worker_index, progress=False)
    except ProxyConfigError as e:
        errors.put((2, str(e)))
        sys.exit(2)
    except TooManyFailures as e:
        errors.put((1, str(e)))
        sys.exit(1)
    except CliError as e:
        errors.put((2, str(e)))
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def _run_parallel(payload: dict[str, Any], workers: int, study, config: dict[str, Any], quiet: bool) -> tuple[int, str]:
    """N worker processes on the shared storage; this process prints progress from storage."""
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker_process, args=(payload, i, errors), daemon=False) for i in range(workers)]
    for p in procs:
        p.start()
    reported: set[int] = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    code, message = 0, ""

    def report() -> None:
        trials = study.get_trials(deepcopy=False)
        for t in sorted(trials, key=lambda t: t.number):
            if t.state.is_finished() and t.number not in reported:
                reported.add(t.number)
                if not quiet:
                    print(progress_line(t, trials, config), flush=True)

    try:
        while any(p.is_alive() for p in procs):
            time.sleep(0.5)
            report()
            while not errors.empty():
                c, m = errors.get()
                if not code:
                    code, message = c, m
                    if c == 2:  # the proxy is misconfigured: stop the other workers too
                        for p in procs:
                            if p.is_alive():
                                p.terminate()
        for p in procs:
            p.join()
        report()
        while not errors.empty():
            c, m = errors.get()
            if not code:
                code, message = c, m
    except KeyboardInterrupt:
        # Ctrl-C in a terminal reaches the workers too; a signal sent to this process alone
        # does not: pass it on (SIGTERM) to workers still running after a moment.
        deadline = time.monotonic() + 3
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=60)
        raise
    if not code and any(p.exitcode not in (0, None) for p in procs):
        code, message = 1, f"worker exit codes {[p.exitcode for p in procs]}"
    return code, message


# -------------------------------------------------------------------------------- export


def export_best(study, config: dict[str, Any], path: str, storage_url: str) -> tuple[Any, Spec]:
    """Write the best non-diverged trial as a base.json (atomically)."""
    from cdp_megatron.convert import write_atomic
    from cdp_megatron.search.objective import counts_toward_budget
    from cdp_megatron.search.sampler import best_trial
    from cdp_megatron.search.spaces import to_spec

    trials = study.get_trials(deepcopy=False)
    try:
        best = best_trial(study)
    except ValueError:  # counted as in the summary line (best_trial's own counts lump failures together)
        c = trial_counts(trials)
        raise CliError(
            f"--export {path}: study {study.study_name!r} has no completed, non-diverged trial yet "
            f"({_counts_text(c)}); nothing to export"
        ) from None
    base = Spec.from_dict(config["base_spec"])
    provenance = {
        "tool": PROG,
        "study": study.study_name,
        "storage": _redact(storage_url),
        "trial": best.number,
        "val_loss": best.value,
        "space": config["space"],
        "search": config["search"],
        "bounds": config["bounds"],
        "sampler": config["sampler"],
        "trials_finished": sum(counts_toward_budget(t) for t in trials),
        "params": dict(best.params),
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    description = (
        f"cdp-search: best of study {study.study_name!r} ({config['space']} space, {','.join(config['search'])}; "
        f"trial {best.number}, validation loss {best.value:.4f})"
        + (f". Base: {base.description}" if base.description else "")
    )
    try:
        spec = to_spec(base, best.params, description=description, provenance=provenance)
        write_atomic(path, json.dumps(spec.to_dict(), indent=1) + "\n")
    except (SpecError, SpaceError) as e:
        raise CliError(f"--export {path}: {e}") from None
    return best, spec


# ---------------------------------------------------------------------------------- main


def _open_study(args, given, storage, url):
    import optuna

    names = _study_names(storage) if storage is not None else []
    name = args.study
    if name is None:
        if "base_spec" in given:
            probe = merge_config(None, {**given}, "?")
            name = _default_study_name(probe)
        elif len(names) == 1:
            name = names[0]
        elif not names:
            raise CliError(f"--storage {_redact(url)} holds no study; give --base to start one")
        else:
            raise CliError(f"--storage {_redact(url)} holds several studies ({', '.join(names)}); choose one with --study")
    stored = None
    study = None
    if name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        stored = study.user_attrs.get(CONFIG_ATTR)
        if stored is None:
            raise CliError(f"study {name!r} in {_redact(url)} was not created by cdp-search (no {CONFIG_ATTR} attribute)")
    return name, study, stored


def _enqueue_start(study, space: SearchSpace, config: dict[str, Any], init_from: str | None, storage) -> list[str]:
    """First trial of a new study: the base itself (all multipliers 1) or, with --init-from,
    the best trial of another study projected onto this space."""
    import optuna

    from cdp_megatron.search.sampler import best_trial
    from cdp_megatron.search.spaces import project

    notes = []
    if init_from:
        try:
            other = optuna.load_study(study_name=init_from, storage=storage)
        except KeyError:
            raise CliError(f"--init-from {init_from}: no such study in this storage") from None
        other_cfg = other.user_attrs.get(CONFIG_ATTR)
        if other_cfg is None:
            raise CliError(f"--init-from {init_from}: not a cdp-search study")
        source = _build_space(other_cfg)
        try:
            best = best_trial(other)
            proj = project(best.params, source, space)
        except (ValueError, SpaceError) as e:
            raise CliError(
                f"--init-from {init_from}: {e}"
                + ("; export it with --export and start from it with --base" if isinstance(e, SpaceError) else "")
            ) from None
        study.enqueue_trial(proj.params, user_attrs={"init_from": f"{init_from}#{best.number}"})
        notes.append(f"starting from trial {best.number} of study {init_from!r} ({best.value:.4f}), "
                     f"projected from the {source.kind} onto the {space.kind} space")
        if proj.clipped:
            notes.append(f"clipped to the bounds: {', '.join(proj.clipped[:8])}{' ...' if len(proj.clipped) > 8 else ''}")
        if proj.dropped:
            notes.append(f"not searched here, left at the base: {', '.join(proj.dropped)}")
    elif config["sampler"] != "grid-global":
        study.enqueue_trial(space.center(), user_attrs={"start": "base"})
        notes.append("trial 0 is the base spec itself (every multiplier 1)")
    return notes


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, trainer_args = split_argv(argv)
    args = build_parser().parse_args(ours)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        # SIGTERM (a scheduler, kill) stops the proxies and re-enqueues them, as Ctrl-C does
        return _main(args, trainer_args)
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; running trials were stopped and will run again: rerun the same command "
              "to resume", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace, trainer_args: list[str] | None) -> int:
    problem = missing_problem("optuna", *(["cmaes"] if args.sampler == "cmaes" else []))
    if problem:
        raise CliError(problem)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    given = _given_config(args, trainer_args)
    if "trainer_args" in given:
        _check_trainer_args(given["trainer_args"])
    if args.export:
        problem = output_file_problem("--export", args.export, "best.json")
        if problem:
            raise CliError(problem)
    if args.storage is None:
        problem = output_dir_problem("--output-dir", args.output_dir)  # the default storage goes there
        if problem:
            raise CliError(problem)
        url = default_storage_url(args.output_dir)
    else:
        url = args.storage
        if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url):
            raise CliError(f"--storage {url}: not a database URL; give e.g. sqlite:///search.db or "
                           "postgresql://user@host/db")
    # Everything the command line can get wrong is checked before the storage is touched.
    if "base_spec" in given:
        _build_space(merge_config(None, dict(given), "?"))
    # A SQLite file that does not exist yet holds no study: it is created only with the study,
    # once everything else has been checked (a refused command leaves no search.db behind).
    new_file = _new_sqlite_file(url)
    if new_file is not None and args.storage is not None and not new_file.parent.is_dir():
        new_file = None  # open_storage says why it cannot open
    storage = None if new_file is not None else open_storage(url)
    name, study, stored = _open_study(args, given, storage, url)
    counts = trial_counts(study.get_trials(deepcopy=False)) if study is not None else None
    started = counts is not None and bool(counts["done"] or counts["running"])
    config = merge_config(stored, given, name, started=started)
    space = _build_space(config)
    total = int(config["trials"]) if args.trials != 0 else 0
    trials_dir = Path(args.output_dir) / study_folder(name)
    if study is None and total == 0:
        raise CliError(f"study {name!r} does not exist; --trials 0 has nothing to export")
    if total and (counts is None or counts["done"] < total):  # trials will run
        problem = output_dir_problem("--output-dir", args.output_dir)  # their folders go there
        if problem:
            raise CliError(problem)
        if config.get("trainer_command"):
            _check_trainer_command(config["trainer_command"])  # a stored command, on this machine
        else:
            base_name = f"--base {args.base}" if args.base else f"the base spec of study {name!r}"
            _check_proxy_flags(config["trainer_args"], config["base_spec"], base_name)
    if study is None:
        if args.init_from and (storage is None or args.init_from not in _study_names(storage)):
            raise CliError(f"--init-from {args.init_from}: no such study in this storage")
        if storage is None:
            if args.storage is None:
                Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            storage = open_storage(url)
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True)
        if study.user_attrs.get(CONFIG_ATTR) is None:
            study.set_user_attr(CONFIG_ATTR, config)
        else:  # another worker created it a moment ago
            config = merge_config(study.user_attrs[CONFIG_ATTR], given, name)
    elif config != stored:
        study.set_user_attr(CONFIG_ATTR, config)

    recovered = recover_dead_trials(study)
    say = (lambda *a: None) if args.quiet else print
    if recovered:
        say(f"{PROG}: trials {recovered} were left running by a killed worker: marked failed, run again")
    counts = trial_counts(study.get_trials(deepcopy=False))
    code, message = 0, ""
    if counts["done"] < total:
        if counts["done"] == counts["running"] == counts["waiting"] == 0:
            for note in _enqueue_start(study, space, config, args.init_from, storage):
                say(f"{PROG}: {note}")
        elif args.init_from:
            say(f"{PROG}: note: study {name!r} already has trials; --init-from is ignored")
        say(
            f"{PROG}: study {name!r}: {config['space']} space, {len(space.dimensions)} multipliers "
            f"({','.join(config['search'])}), sampler {config['sampler']}, {counts['done']}/{total} trials done, "
            f"{args.workers} worker(s); storage {_redact(url)}; trials in {trials_dir}"
        )
        env = None
        if args.workers > 1 and "OMP_NUM_THREADS" not in os.environ:
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.workers))}
        payload = {
            "config": config,
            "storage": url,
            "study": name,
            "heartbeat": args.heartbeat,
            "trials_dir": str(trials_dir.resolve()),
            "max_failures": args.max_failures,
            "env": env,
        }
        if args.workers == 1:
            from cdp_megatron.search.objective import ProxyConfigError

            try:
                run_worker(payload, 0, progress=not args.quiet)
            except ProxyConfigError as e:
                raise CliError(str(e)) from None
            except TooManyFailures as e:
                code, message = 1, str(e)
        else:
            code, message = _run_parallel(payload, args.workers, study, config, args.quiet)
            if code == 2:
                raise CliError(message)
    trials = study.get_trials(deepcopy=False)
    counts = trial_counts(trials)
    state = _state(trials, config)
    best = f"best {state.incumbent.value:.4f} (trial {state.incumbent.number})" if state.incumbent else "no stable trial"
    say(f"{PROG}: study {name!r}: {counts['done']}/{config['trials']} trials ({_counts_text(counts)}); {best}")
    if args.export:
        best_t, _ = export_best(study, config, args.export, url)
        say(f"{PROG}: wrote {args.export} (trial {best_t.number}, validation loss {best_t.value:.4f})")
    if code:
        print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
