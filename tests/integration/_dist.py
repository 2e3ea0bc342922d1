"""Run a picklable function on N gloo processes and collect per-rank results.

``run_distributed(fn, world_size, *args, **kwargs)`` runs ``fn(*args, **kwargs)`` on
``world_size`` processes, each with the CUDA-on-CPU shim active (``cpu_runner``) and a fresh
gloo process group on a free port, and returns the return values indexed by rank. A
failing rank fails the caller with every failing rank's traceback.

Processes are started with ``spawn`` and, by default, KEPT for the next call with the same
world size: importing torch and megatron costs ~4 s a process, more than most tests. Each
call still gets a new process group; megatron's model-parallel state is destroyed after
it. ``reuse=False`` (or the environment variable ``CDP_DIST_FRESH=1``) gives fresh
processes. A pool in which a rank died or hung is killed and replaced.

``fn`` must be importable by the children: a module-level function of an importable
module (e.g. ``tests.integration.test_x``; spawn passes the parent's ``sys.path`` on).
"""

from __future__ import annotations

import atexit
import functools
import gc
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

__all__ = ["run_distributed", "free_port", "shutdown_pools", "release_megatron_objects"]

DEFAULT_TIMEOUT_S = 600.0


def free_port() -> int:
    """A TCP port that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_task(rank: int, world_size: int, task: bytes) -> tuple[bool, bytes | str]:
    """Run one pickled (port, device_kwargs, fn, args, kwargs) task on this rank."""
    from cdp_megatron.integration import cpu_runner

    try:
        port, device_kwargs, fn, args, kwargs = pickle.loads(task)
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
        )
        cpu_runner.activate(device_kwargs=device_kwargs)
        cpu_runner.init_distributed(rank, world_size)
        return True, pickle.dumps(fn(*args, **kwargs))
    except BaseException:
        return False, traceback.format_exc()
    finally:
        try:
            cpu_runner.destroy_distributed()
        finally:
            cpu_runner.deactivate()
            release_megatron_objects()


def release_megatron_objects() -> None:
    """Free what a task (or an in-process test) built before the process goes on.

    megatron keeps model objects in functools caches (``RotaryEmbedding.forward`` is an
    ``lru_cache`` keyed on the module), and a model holds its process groups: each group kept
    alive keeps its gloo threads (and rank 0's TCPStore thread) polling. Over a suite a kept
    worker gathered hundreds of such threads. Models also sit in reference cycles, which only
    the cycle collector frees.
    """
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("megatron"):
            continue
        for value in list(vars(module).values()):
            members = list(vars(value).values()) if isinstance(value, type) else []
            for member in (value, *members):
                if isinstance(member, functools._lru_cache_wrapper):
                    member.cache_clear()
    gc.collect()


def _worker(rank: int, world_size: int, tasks: Any, results: Any) -> None:
    # Two cores shared with other work: one intra-op thread per process.
    torch.set_num_threads(1)
    while True:
        task = tasks.get()
        if task is None:
            return
        results.put((rank, *_run_task(rank, world_size, task)))


class _Pool:
    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.processes = [
            ctx.Process(target=_worker, args=(rank, world_size, self.tasks[rank], self.results), daemon=True)
            for rank in range(world_size)
        ]
        for process in self.processes:
            process.start()
        self.broken = False  # a rank died or hung: the pool cannot be reused

    def run(self, task: bytes, timeout_s: float) -> tuple[dict[int, Any], dict[int, str]]:
        for rank_tasks in self.tasks:
            rank_tasks.put(task)
        values: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        while len(values) + len(errors) < self.world_size:
            if errors:  # the other ranks may be stuck in a collective: give them a moment
                deadline = min(deadline, time.monotonic() + 5.0)
            try:
                rank, ok, payload = self.results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.processes) if not p.is_alive() and r not in values]
                for r in dead:
                    self.broken = True
                    errors.setdefault(r, f"process exited with code {self.processes[r].exitcode}")
                if time.monotonic() > deadline:
                    self.broken = True
                    for r in range(self.world_size):
                        if r not in values:
                            errors.setdefault(r, f"no result within {timeout_s:g} s (hung in a collective?)")
                continue
            if ok:
                values[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
        return values, errors

    def close(self, kill: bool = False) -> None:
        for process, rank_tasks in zip(self.processes, self.tasks):
            if not kill and process.is_alive():
                rank_tasks.put(None)
        for process in self.processes:
            if kill:
                process.kill()
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


_pools: dict[int, _Pool] = {}


def shutdown_pools() -> None:
    """Stop every kept worker process (runs at interpreter exit)."""
    while _pools:
        _pools.popitem()[1].close()


atexit.register(shutdown_pools)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    device_kwargs: bool = True,
    reuse: bool | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo processes; return results by rank.

    device_kwargs: the shim's ``device='cuda'`` rewrite (needed by optimizer/DDP/schedules).
    Raises RuntimeError with every failing rank's traceback when any rank fails.
    """
    if reuse is None:
        reuse = os.environ.get("CDP_DIST_FRESH", "0") != "1"
    task = pickle.dumps((free_port(), device_kwargs, fn, args, kwargs))
    pool = _pools.pop(world_size, None) if reuse else None
    if pool is None or not all(p.is_alive() for p in pool.processes):
        if pool is not None:
            pool.close(kill=True)
        pool = _Pool(world_size)
    values, errors = pool.run(task, timeout_s)
    if pool.broken or not reuse:
        pool.close(kill=pool.broken)
    else:
        _pools[world_size] = pool  # every rank reported back and cleaned up: reusable
    if errors:
        name = getattr(fn, "__qualname__", repr(fn))
        details = "\n".join(f"--- rank {rank} ---\n{errors[rank]}" for rank in sorted(errors))
        raise RuntimeError(f"{name} failed on {world_size} gloo processes:\n{details}")
    return [values[rank] for rank in range(world_size)]
