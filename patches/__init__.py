"""Patches of Megatron-Core symbols that its extension points cannot reach.

Installed as ``cdp_megatron.patches`` (the top-level ``patches/`` folder). One module per
patched upstream symbol; each states the symbol, the megatron-core versions it was checked
on, why it is needed, and has ``apply()`` (raises ``PatchError`` when already applied),
``remove()`` (restores the originals; a no-op when not applied) and ``is_applied()``.

==========================  ===============================================================
module                      upstream symbol(s)
==========================  ===============================================================
param_group_identity        ``param_group_identifier_keys`` (optimizer.py and, imported by
                            name, distrib_optimizer.py) and the two load paths that match
                            saved to current param groups: the checkpoint bug (groups that
                            differ only in lr/eps/betas are mixed up on load)
carrier_param_groups        ``megatron.core.optimizer._get_param_groups``: adds (empty)
                            param groups for hyperparameter sets that only segments of
                            fused tensors use (q/k/v of linear_qkv, gate/up of linear_fc1)
dist_opt_step_state         ``DistributedOptimizer._set_main_param_and_optimizer_states``:
                            the distributed optimizer's ``fully_reshardable`` checkpoints
                            (resume on another TP/PP layout) load into torch's Adam, whose
                            per-parameter ``step`` upstream expects in the saved state
checkpoint_without_output_  ``megatron.core.tensor_parallel.random.CheckpointWithoutOutput.
fp8                         __init__``: norm recomputation (``recompute_modules``
                            "layernorm") took Transformer Engine's FP8 branch, a NameError
                            where Transformer Engine is not installed
==========================  ===============================================================

Only the megatron-core versions in ``SUPPORTED_MEGATRON_CORE`` (CI runs the whole suite on each)
are accepted; another version is refused unless ``CDP_ALLOW_UNTESTED_MEGATRON=1`` is set (or
``allow_untested=True``). The versions in ``PASSED_ONCE`` passed the whole suite (default and slow
tests, with the override) once by hand, and their refusal says so: the patches' symbols and
behaviour were as on the supported versions then, but CI does not keep them so.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = [
    "SUPPORTED_MEGATRON_CORE",
    "PASSED_ONCE",
    "ALLOW_UNTESTED_ENV",
    "PATCH_MODULES",
    "PatchError",
    "UnsupportedMegatronVersion",
    "megatron_core_version",
    "check_megatron_version",
    "patch_modules",
    "apply_all",
    "remove_all",
    "applied",
]

SUPPORTED_MEGATRON_CORE = ("0.16.1", "0.19.2")
# version -> (date, environment) of a by-hand run of the whole suite with the override
PASSED_ONCE = {"0.17.1": ("2026-12-07", "Python 3.12, torch 2.14.1"), "0.18.2": ("2026-12-07", "Python 3.12, torch 2.14.1")}
ALLOW_UNTESTED_ENV = "CDP_ALLOW_UNTESTED_MEGATRON"
# Order matters only for remove_all (reverse order).
PATCH_MODULES = ("param_group_identity", "carrier_param_groups", "dist_opt_step_state", "checkpoint_without_output_fp8")


class PatchError(RuntimeError):
    """A patch was applied twice, or its upstream symbol is not where it was checked."""


class UnsupportedMegatronVersion(RuntimeError):
    """The installed megatron-core is not one cdp-megatron was tested with."""


def megatron_core_version() -> str:
    """The installed megatron-core version (package metadata, else megatron.core)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("megatron-core")
    except PackageNotFoundError:
        from megatron.core.package_info import __version__

        return __version__


def check_megatron_version(allow_untested: bool | None = None) -> str:
    """Return the megatron-core version, or raise UnsupportedMegatronVersion.

    allow_untested: accept any version (default: the CDP_ALLOW_UNTESTED_MEGATRON environment
    variable set to 1/true/yes).
    """
    found = megatron_core_version()
    if found in SUPPORTED_MEGATRON_CORE:
        return found
    if allow_untested is None:
        allow_untested = os.environ.get(ALLOW_UNTESTED_ENV, "").lower() in ("1", "true", "yes")
    if allow_untested:
        return found
    once = PASSED_ONCE.get(found)
    raise UnsupportedMegatronVersion(
        f"megatron-core {found} is not supported by cdp-megatron; supported versions: "
        f"{', '.join(SUPPORTED_MEGATRON_CORE)}"
        + (f" ({found} passed cdp-megatron's whole test suite once, on {once[0]} with {once[1]}, but is not "
           "tested in CI)" if once else "")
        + ". Install one of them, or set "
        f"{ALLOW_UNTESTED_ENV}=1 to run on an untested version at your own risk (the patches "
        "check that their upstream symbols exist, not that they behave as on a tested version)."
    )


def patch_modules() -> list[ModuleType]:
    """The patch modules, in application order."""
    return [importlib.import_module(f"{__name__}.{name}") for name in PATCH_MODULES]


def apply_all(allow_untested: bool | None = None) -> list[str]:
    """Check the megatron-core version, then apply every patch not yet applied.

    Idempotent (patches already applied are left alone). Returns the names applied now.
    """
    check_megatron_version(allow_untested)
    done = []
    for module in patch_modules():
        if not module.is_applied():
            module.apply()
            done.append(module.__name__.rsplit(".", 1)[-1])
    return done


def remove_all() -> None:
    """Remove every applied patch (reverse order), restoring the upstream symbols."""
    for module in reversed(patch_modules()):
        module.remove()


def applied() -> list[str]:
    """Names of the patches currently applied."""
    return [m.__name__.rsplit(".", 1)[-1] for m in patch_modules() if m.is_applied()]
