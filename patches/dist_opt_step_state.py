"""Patch: the distributed optimizer's model-space checkpoint loads into torch's Adam.

Upstream symbol: ``megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.
_set_main_param_and_optimizer_states`` (megatron-core 0.16.1, ``distrib_optimizer.py:911``;
0.19.2, ``distrib_optimizer.py:1193``). Called on load by
``load_parameter_state_from_fully_reshardable`` (and ``..._from_fs_model_space``), the
loaders of the formats that resume on ANOTHER tensor/pipeline-parallel layout.

Checked on: megatron-core 0.16.1 and 0.19.2 (tests/integration/test_checkpoint.py: a
distributed-optimizer checkpoint saved on one TP/PP/DP layout resumes on another; the test
fails with KeyError 'step' without this patch; tests/integration/test_patches.py).

Why: without apex or Transformer Engine (every CPU run) Megatron uses torch's Adam, whose
per-parameter state holds a ``step`` tensor besides ``exp_avg``/``exp_avg_sq``. Megatron saves
``step`` in the param groups, not per parameter, so the per-parameter tensors a load passes in
have no ``step`` entry; upstream copies every key of the DESTINATION state from the source
(``tensors[key]``) and raises KeyError 'step'. The format was therefore unusable with torch
optimizers and a distributed-optimizer run could resume only on its own TP/PP layout.

The wrapper hides the destination's ``step`` while upstream copies param, exp_avg and
exp_avg_sq, then puts it back unchanged. Every other key still has to be in the source:
a checkpoint that lacks one still fails as upstream does. The step count itself is restored
from the param groups after the load (``cdp_megatron.integration.checkpoint.
_restore_step_tensors``). With apex/TE optimizers the state has no ``step`` and the wrapper
calls upstream unchanged.

Undo: ``remove()`` restores the original method.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["apply", "remove", "is_applied"]

_saved: dict[str, Any] = {}


def is_applied() -> bool:
    return bool(_saved)


def _cls():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return DistributedOptimizer


def apply() -> None:
    """Wrap ``DistributedOptimizer._set_main_param_and_optimizer_states``. Raises PatchError if
    applied or if the method is missing."""
    from . import PatchError

    if _saved:
        raise PatchError("dist_opt_step_state is already applied")
    cls = _cls()
    original = cls.__dict__.get("_set_main_param_and_optimizer_states")
    if original is None:
        raise PatchError(
            "dist_opt_step_state: DistributedOptimizer._set_main_param_and_optimizer_states is "
            "missing in this megatron-core version"
        )

    @functools.wraps(original)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        state = None
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state.get(main_param)
        step = state.pop("step", None) if state is not None else None
        try:
            return original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    _saved["original"] = original
    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states


def remove() -> None:
    """Restore the original method (no-op when not applied)."""
    if not _saved:
        return
    _cls()._set_main_param_and_optimizer_states = _saved.pop("original")
