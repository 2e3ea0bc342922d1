"""CUDA-on-CPU shim: run megatron-core on a CPU (gloo) for tests and proxy-scale runs.

Megatron-Core assumes a CUDA device in a few places; this module redirects them to the CPU.
Checked with megatron-core 0.16.1 (Python 3.11, torch 2.13 CPU) and 0.19.2 (Python 3.12,
torch 2.11 CUDA build with no visible GPU): DDP, plain and distributed optimizer (with
overlapped grad reduce / param gather), bf16, TP=2, DP=2, PP=2 and VPP=2 on gloo; see
``shared/docs/megatron-core-notes.md`` ("Running Megatron-Core on a CPU").

What is patched, and why (``activate()`` patches, ``deactivate()`` restores the originals):

=======================================================  ====================================
upstream symbol                                          replaced by / why
=======================================================  ====================================
``torch.cuda.current_device``                            ``torch.device('cpu')``: used as a
                                                         device for buffers everywhere
``torch.cuda.manual_seed``/``manual_seed_all``           seed the CPU default generator
``torch.cuda.get_rng_state``/``set_rng_state``           CPU generator state (RNG tracker)
``megatron.core.tensor_parallel.random.``                CPU generator state: on a CPU build
``_get_cuda_rng_state``/``_set_cuda_rng_state``          the originals queue a lazy CUDA call
                                                         that never runs (silent no-op)
``torch.cuda.synchronize``                               no-op (p2p, parallel_state, DDP)
``torch.cuda.current_stream``/``default_stream``/        a do-nothing stream and event: CPU
``Stream``/``stream``/``Event``                          ops run in order (0.19 DDP waits on
                                                         ``current_stream()`` every step)
``torch.Tensor.cuda``, ``torch.nn.Module.cuda``          no-op (optimizer state, grad scaler)
``torch.Tensor.type()`` (no argument)                    reports ``torch.cuda.*`` names: the
                                                         Float16/distributed optimizers and
                                                         clip_grads check them
``device='cuda'`` keyword (optional TorchFunctionMode)   ``device='cpu'``: optimizer, grad
                                                         scaler, clip_grads, schedules, DDP
=======================================================  ====================================

The RNG tracker forks therefore swap the state of the one CPU generator, so dropout under
``get_cuda_rng_tracker().fork()`` is reproducible as on a GPU. The device-keyword mode costs
speed on every torch call, so it is switchable: the model forward/backward alone does not
need it, the optimizer, DDP and the pipeline schedules do.

Not a patch but needed on gloo: PP with VPP needs ``batch_p2p_comm=False`` (gloo matches a
batch of isend/irecv to one peer in issue order and swaps the two directions); ``model.
gpt_config`` sets it on a CPU. Pass an explicit causal attention mask (``model.
causal_attention_mask``): Megatron's default one is built with ``device='cuda'``, which only
the (slow) device-keyword mode rewrites.

Never active when CUDA is present: ``activate()`` is then a no-op and returns False.
Usage::

    with cpu_runner.active():          # or activate() ... deactivate()
        init_distributed()
        ...
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "activate",
    "deactivate",
    "active",
    "is_active",
    "init_distributed",
    "destroy_distributed",
]

_originals: list[tuple[Any, str, Any]] = []  # (owner, attribute, original value)
_device_mode: "_CudaToCpuDeviceMode | None" = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    # A bare int is a CUDA ordinal in torch's device-argument convention.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuDeviceMode(TorchFunctionMode):
    """Rewrites a ``device`` keyword (and ``Tensor.to``'s positional device) naming CUDA."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


_CPU = torch.device("cpu")


# --- replacements -------------------------------------------------------------------------
def _current_device() -> torch.device:
    return _CPU


def _manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _get_rng_state(device: Any = "cuda", *args: Any, **kwargs: Any) -> torch.Tensor:
    # Megatron's _get_cuda_rng_state(device, clone, graph_safe): the CPU state is a copy.
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class _CpuEvent:
    """Stands in for torch.cuda.Event: CPU work is complete when the call returns."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    record = wait = synchronize = _noop

    def query(self) -> bool:
        return True


class _CpuStream:
    """Stands in for torch.cuda.Stream: one in-order CPU stream, nothing to wait for."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    wait_stream = wait_event = synchronize = _noop

    def record_event(self, event: Any = None) -> _CpuEvent:
        return event if event is not None else _CpuEvent()

    def query(self) -> bool:
        return True


_CPU_STREAM = _CpuStream()


def _current_stream(*args: Any, **kwargs: Any) -> _CpuStream:
    return _CPU_STREAM


def _stream_context(stream: Any = None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext(stream)


def _return_self(self, *args: Any, **kwargs: Any):
    return self


_original_tensor_type = torch.Tensor.type


def _tensor_type(self, dtype: Any = None, non_blocking: bool = False, **kwargs: Any):
    if dtype is None and not kwargs:
        name = _original_tensor_type(self)
        # 'torch.FloatTensor' -> 'torch.cuda.FloatTensor' (only dense CPU tensors).
        if name.startswith("torch.") and name.count(".") == 1:
            return "torch.cuda." + name[len("torch."):]
        return name
    return _original_tensor_type(self, dtype, non_blocking, **kwargs)


# --- activate / deactivate ----------------------------------------------------------------
def _patch(owner: Any, name: str, value: Any) -> None:
    _originals.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def is_active() -> bool:
    """True while the shim is active (``activate()`` without ``deactivate()``)."""
    return bool(_originals)


def activate(device_kwargs: bool = True) -> bool:
    """Activate the shim; a no-op (returns False) when CUDA is available.

    device_kwargs: also rewrite ``device='cuda'`` keywords through a TorchFunctionMode
    (needed by the optimizer, DDP and the pipeline schedules; slows every torch call).
    Calling it again while active only switches the device-keyword mode on or off.
    Returns whether the shim is active.
    """
    global _device_mode
    if torch.cuda.is_available():
        return False
    if not _originals:
        from megatron.core.tensor_parallel import random as mcore_random

        _patch(torch.cuda, "current_device", _current_device)
        for module in (torch.cuda, torch.cuda.random):
            _patch(module, "manual_seed", _manual_seed)
            _patch(module, "manual_seed_all", _manual_seed)
            _patch(module, "get_rng_state", _get_rng_state)
            _patch(module, "set_rng_state", _set_rng_state)
        _patch(mcore_random, "_get_cuda_rng_state", _get_rng_state)
        _patch(mcore_random, "_set_cuda_rng_state", _set_rng_state)
        _patch(torch.cuda, "synchronize", _noop)
        _patch(torch.cuda, "empty_cache", _noop)
        _patch(torch.cuda, "current_stream", _current_stream)
        _patch(torch.cuda, "default_stream", _current_stream)
        _patch(torch.cuda, "Stream", _CpuStream)
        _patch(torch.cuda, "stream", _stream_context)
        _patch(torch.cuda, "Event", _CpuEvent)
        _patch(torch.Tensor, "cuda", _return_self)
        _patch(torch.nn.Module, "cuda", _return_self)
        _patch(torch.Tensor, "type", _tensor_type)
    if device_kwargs and _device_mode is None:
        _device_mode = _CudaToCpuDeviceMode()
        _device_mode.__enter__()
    elif not device_kwargs and _device_mode is not None:
        _exit_device_mode()
    return True


def _exit_device_mode() -> None:
    global _device_mode
    mode, _device_mode = _device_mode, None
    mode.__exit__(None, None, None)


def deactivate() -> None:
    """Restore every patched symbol (safe to call when inactive)."""
    if _device_mode is not None:
        _exit_device_mode()
    while _originals:
        owner, name, original = _originals.pop()
        setattr(owner, name, original)


@contextlib.contextmanager
def active(device_kwargs: bool = True) -> Iterator[bool]:
    """Context manager form of ``activate``/``deactivate``; yields whether it is active.

    Restores the state it found: nested use inside an active shim leaves the shim active.
    """
    was_active, had_mode = is_active(), _device_mode is not None
    result = activate(device_kwargs)
    try:
        yield result
    finally:
        if not was_active:
            deactivate()
        elif result:
            activate(had_mode)


# --- torch.distributed ----------------------------------------------------------------------
def init_distributed(
    rank: int | None = None,
    world_size: int | None = None,
    backend: str | None = None,
    timeout_s: float = 300.0,
) -> None:
    """Initialise torch.distributed: gloo on CPU, nccl (one GPU per local rank) on GPU.

    rank / world_size default to the RANK / WORLD_SIZE environment variables (torchrun);
    MASTER_ADDR / MASTER_PORT come from the environment (``env://``).
    """
    if torch.distributed.is_initialized():
        return
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    torch.distributed.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def destroy_distributed() -> None:
    """Tear down megatron's model-parallel groups and the default process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
