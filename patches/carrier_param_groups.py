"""Patch: param groups for hyperparameter sets that only segments of fused tensors use.

Upstream symbol: ``megatron.core.optimizer._get_param_groups`` (megatron-core 0.16.1,
``megatron/core/optimizer/__init__.py:115``; looked up as a module global by
``_get_param_groups_and_buffers``, so replacing the module attribute reaches every caller).

Checked on: megatron-core 0.16.1 (tests/integration/test_optimizer.py,
tests/integration/test_patches.py) and 0.19.2 (``optimizer/__init__.py:299``, same
signature and group fields; the same tests pass on it, CI job py312-mcore0.19).

Why: Megatron builds one param group per distinct ``config_overrides`` match of WHOLE
parameters. Complete(d)P gives q, k, v (fused in ``linear_qkv``) and mlp_gate, mlp_up (fused
in ``linear_fc1``) their own lr, weight decay, eps and betas; no whole parameter carries,
say, k's hyperparameters, so Megatron would create no group for them. Inside
``extra_param_groups(overrides)`` (used by ``cdp_megatron.integration.optimizer``), the
wrapper appends an EMPTY group for every override that no group already has. Empty groups are
a state Megatron supports (it creates them itself to align groups across pipeline ranks):
they are scheduled by ``OptimizerParamScheduler``, saved and matched in checkpoints, and the
segment step of ``cdp_megatron.integration.optimizer`` reads their hyperparameters. Outside
the context manager the wrapper returns upstream's result unchanged.

Undo: ``remove()`` restores the original function.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Iterator, Sequence

__all__ = ["apply", "remove", "is_applied", "extra_param_groups"]

_extra: contextvars.ContextVar[tuple[dict, ...]] = contextvars.ContextVar("cdp_extra_param_groups", default=())
_saved: dict[str, Any] = {}


def is_applied() -> bool:
    return bool(_saved)


@contextlib.contextmanager
def extra_param_groups(overrides: Sequence[dict]) -> Iterator[None]:
    """Within the block, ``_get_param_groups`` also returns a group for each override."""
    from . import PatchError

    if not _saved:
        raise PatchError(
            "carrier_param_groups is not applied: call cdp_megatron.patches.apply_all() first"
        )
    token = _extra.set(tuple(dict(o) for o in overrides))
    try:
        yield
    finally:
        _extra.reset(token)


def _has_group(groups: list[dict], override: dict) -> bool:
    return any(
        not g.get("is_expert_parallel", False) and all(k in g and g[k] == v for k, v in override.items())
        for g in groups
    )


def apply() -> None:
    """Wrap ``megatron.core.optimizer._get_param_groups``. Raises PatchError if applied."""
    from . import PatchError
    from megatron.core import optimizer as opt_pkg

    if _saved:
        raise PatchError("carrier_param_groups is already applied")
    original = getattr(opt_pkg, "_get_param_groups", None)
    if original is None:
        raise PatchError(
            "carrier_param_groups: megatron.core.optimizer._get_param_groups is missing in "
            "this megatron-core version"
        )

    @functools.wraps(original)
    def _get_param_groups(model_chunks, config, config_overrides=None, *args, **kwargs):
        groups = original(model_chunks, config, config_overrides, *args, **kwargs)
        for override in _extra.get():
            if not _has_group(groups, override):
                # The same fields upstream gives every group (optimizer/__init__.py:207-226).
                groups.append(
                    {
                        "params": [],
                        "is_expert_parallel": False,
                        "default_config": False,
                        "wd_mult": 1.0,
                        "lr_mult": 1.0,
                        "is_decoupled_lr": False,
                        "max_lr": config.lr,
                        "min_lr": config.min_lr,
                        **override,
                    }
                )
        return groups

    _saved["original"] = original
    opt_pkg._get_param_groups = _get_param_groups


def remove() -> None:
    """Restore ``_get_param_groups`` (no-op when not applied)."""
    if not _saved:
        return
    from megatron.core import optimizer as opt_pkg

    opt_pkg._get_param_groups = _saved.pop("original")
