"""Patch: optimizer param groups are matched on load by ALL their hyperparameters.

Upstream symbols (megatron-core 0.16.1, ``megatron/core/optimizer/``):

* ``optimizer.py:96``  ``param_group_identifier_keys = ('wd_mult', 'lr_mult',
  'is_expert_parallel', 'is_decoupled_lr')``, also bound by name in
  ``distrib_optimizer.py:56`` (``from .optimizer import ... param_group_identifier_keys``)
  and in ``optimizer/__init__.py``: every binding is replaced.
* ``optimizer.py:383`` ``MegatronOptimizer._filter_and_reorder_param_groups`` (the load path of
  the FP32 and Float16 optimizers) and ``distrib_optimizer.py:690``
  ``DistributedOptimizer.load_state_dict`` (inline ``make_needed_groups``): wrapped, not
  rewritten, so that a group lacking one of the added keys still matches (see below).

Checked on: megatron-core 0.16.1 (tests/integration/test_checkpoint.py demonstrates the bug
without this patch and its fix with it; tests/integration/test_patches.py runs Megatron's own
matching function). 0.19.2: the same symbols exist and the same tests pass on it (CI job
py312-mcore0.19). 0.19.2 widened the tuple to ParamGroupOverride's keys (max_lr,
min_lr, start_wd, end_wd, wd_mult, optimizer) plus lr_mult/is_expert_parallel/
is_decoupled_lr, but not eps/betas: groups that differ only in eps or betas still collide
there, so the patch adds ``eps``/``betas`` (the keys it already has are not repeated).

Why: on load, Megatron pairs each current param group with the saved group that has the same
identity tuple. Groups that differ only in ``max_lr``/``min_lr``/``eps``/``betas``/
``start_wd``/``end_wd`` (every Complete(d)P optimizer: per-type and per-depth learning rates
with ``wd_mult = lr_mult = 1``) share one identity, so every group silently receives the
hyperparameters of the LAST saved group with that identity (or the load fails with a size
mismatch when the lists differ in length).

The fix appends ``IDENTITY_EXTRA_KEYS`` to the identity tuple. A group may lack some of them
(``start_wd``/``end_wd`` exist only when overridden; SGD has no ``eps``/``betas``): the
wrappers fill an ``ABSENT`` placeholder in both the saved and the current groups before the
upstream matching and strip it afterwards, so absent keys match absent keys only. A current
group without a saved counterpart raises ValueError naming the keys (as upstream does in the
FP32/Float16 path; the distributed path would otherwise raise a bare KeyError).

Undo: ``remove()`` restores every original binding.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["IDENTITY_EXTRA_KEYS", "ABSENT", "apply", "remove", "is_applied", "identity"]

IDENTITY_EXTRA_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd", "eps", "betas")
ABSENT = "<cdp:absent>"

_saved: dict[str, Any] = {}  # name -> original, while applied


def _modules():
    from megatron.core import optimizer as opt_pkg
    from megatron.core.optimizer import distrib_optimizer, optimizer

    return opt_pkg, optimizer, distrib_optimizer


def is_applied() -> bool:
    return bool(_saved)


def identity(group: dict, keys: tuple[str, ...]) -> tuple:
    """The identity tuple of ``group`` under ``keys`` (NeMo's ``pre_`` names, ABSENT)."""
    out = []
    for key in keys:
        value = group[key] if key in group else group.get(f"pre_{key}", ABSENT)
        out.append(tuple(value) if isinstance(value, list) else value)
    return tuple(out)


def _fill(groups: list[dict]) -> list[list[str]]:
    """Add ABSENT for missing extra keys (and betas lists -> tuples); return what was added."""
    added = []
    for group in groups:
        keys = []
        for key in IDENTITY_EXTRA_KEYS:
            if key not in group and f"pre_{key}" not in group:
                group[key] = ABSENT
                keys.append(key)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        added.append(keys)
    return added


def _strip(groups: list[dict]) -> None:
    for group in groups:
        for key in IDENTITY_EXTRA_KEYS:
            if isinstance(group.get(key), str) and group[key] == ABSENT:
                del group[key]


def _check_matches(current: list[dict], saved: list[dict], keys: tuple[str, ...]) -> None:
    available = {identity(g, keys) for g in saved}
    for group in current:
        if identity(group, keys) not in available:
            listing = "\n".join(f"  {k}" for k in sorted(available, key=repr))
            raise ValueError(
                "Optimizer checkpoint: no saved param group has the hyperparameters of the "
                f"current group {identity(group, keys)}.\nSaved groups:\n{listing}\n"
                f"Identity keys: {keys}. The run's per-group hyperparameters (lr, min lr, "
                "weight decay, eps, betas) must equal the checkpoint's to resume its optimizer "
                "state (cdp_megatron.patches.param_group_identity)."
            )


def apply() -> None:
    """Widen the identity tuple and wrap both load paths. Raises PatchError if applied."""
    from . import PatchError

    if _saved:
        raise PatchError("param_group_identity is already applied")
    opt_pkg, optimizer, distrib_optimizer = _modules()
    original_keys = getattr(optimizer, "param_group_identifier_keys", None)
    megatron_optimizer = getattr(optimizer, "MegatronOptimizer", None)
    if original_keys is None or not hasattr(megatron_optimizer, "_filter_and_reorder_param_groups"):
        raise PatchError(
            "param_group_identity: megatron.core.optimizer.optimizer.param_group_identifier_keys "
            "or MegatronOptimizer._filter_and_reorder_param_groups is missing in this "
            "megatron-core version"
        )
    keys = tuple(original_keys) + tuple(k for k in IDENTITY_EXTRA_KEYS if k not in original_keys)

    original_filter = megatron_optimizer.__dict__["_filter_and_reorder_param_groups"]
    filter_fn = original_filter.__func__

    @functools.wraps(filter_fn)
    def _filter_and_reorder_param_groups(current_groups, state_dict_groups):
        _fill(current_groups)
        _fill(state_dict_groups)
        try:
            _check_matches(current_groups, state_dict_groups, keys)
            result = filter_fn(current_groups, state_dict_groups)
        finally:
            _strip(current_groups)
            _strip(state_dict_groups)
        _strip(result)
        return result

    dist_cls = distrib_optimizer.DistributedOptimizer
    original_dist_load = dist_cls.__dict__["load_state_dict"]

    @functools.wraps(original_dist_load)
    def load_state_dict(self, state_dict):
        saved_groups = state_dict["optimizer"]["param_groups"]
        _fill(saved_groups)
        _fill(self.optimizer.param_groups)
        try:
            if not self.ddp_config.use_megatron_fsdp:
                _check_matches(self.optimizer.param_groups, saved_groups, keys)
            return original_dist_load(self, state_dict)
        finally:
            _strip(saved_groups)
            _strip(self.optimizer.param_groups)

    _saved["keys"] = original_keys
    _saved["bindings"] = [
        m for m in (opt_pkg, optimizer, distrib_optimizer)
        if getattr(m, "param_group_identifier_keys", None) is original_keys
    ]
    _saved["filter"] = original_filter
    _saved["dist_load"] = original_dist_load
    for module in _saved["bindings"]:
        module.param_group_identifier_keys = keys
    megatron_optimizer._filter_and_reorder_param_groups = staticmethod(_filter_and_reorder_param_groups)
    dist_cls.load_state_dict = load_state_dict


def remove() -> None:
    """Restore the upstream bindings (no-op when not applied)."""
    if not _saved:
        return
    _, optimizer, distrib_optimizer = _modules()
    for module in _saved["bindings"]:
        module.param_group_identifier_keys = _saved["keys"]
    optimizer.MegatronOptimizer._filter_and_reorder_param_groups = _saved["filter"]
    distrib_optimizer.DistributedOptimizer.load_state_dict = _saved["dist_load"]
    _saved.clear()
