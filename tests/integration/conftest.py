"""Fixtures for the Megatron integration tests (CPU, gloo).

- ``megatron_1proc``: this pytest process as a 1-rank gloo world with megatron's
  model-parallel state (TP=PP=1) and the CUDA-on-CPU shim; torn down after the test.
- ``make_target``: ``_tiny.tiny_target``, a tiny resolved Target (importable by spawned
  workers as ``from tests.integration._tiny import tiny_target``).

Multi-process tests use ``_dist.run_distributed`` instead.
"""

from __future__ import annotations

import warnings

import pytest

# Megatron warns at import about missing apex/TE; that is expected on this machine.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

from ._tiny import tiny_target  # noqa: E402


@pytest.fixture
def make_target():
    return tiny_target


@pytest.fixture
def megatron_1proc(monkeypatch):
    pytest.importorskip("megatron.core")
    import torch
    from ._dist import free_port, release_megatron_objects

    from cdp_megatron.integration import cpu_runner
    from cdp_megatron.integration.model import initialize_model_parallel

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu_runner.activate(device_kwargs=False)
    try:
        cpu_runner.init_distributed(rank=0, world_size=1)
        initialize_model_parallel(1, 1)
        yield
    finally:
        cpu_runner.destroy_distributed()
        cpu_runner.deactivate()
        release_megatron_objects()
        torch.set_num_threads(threads)
