"""Save and load model + optimizer + scheduler with Megatron's ``dist_checkpointing``.

The layout follows Megatron-LM's ``generate_state_dict``: ``model`` (or ``model0``,
``model1``, ... with virtual pipeline chunks), ``optimizer`` (built from the model's sharded
state dict, so it reshards with the model) and ``opt_param_scheduler``, plus a small common
``cdp`` dict (iteration and anything the caller adds). A checkpoint can be resumed on another
TP/PP/DP layout with the plain optimizer and with the distributed optimizer's fully
reshardable formats.

The optimizer's per-group hyperparameters are restored exactly only with the
``param_group_identity`` patch applied (``cdp_megatron.patches``; ``load_checkpoint`` applies
the patches): upstream matches saved to current groups on four flags that all Complete(d)P
groups share.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

__all__ = ["sharded_state_dict", "save_checkpoint", "load_checkpoint", "default_dist_opt_format"]

def default_dist_opt_format() -> str:
    """The distributed optimizer's checkpoint format (``distrib_optim_sharding_type``).

    "fully_reshardable" (resume on any TP/PP/DP layout) with apex/TE optimizers. With torch's
    optimizers (no apex/TE: CPU runs) megatron-core 0.16.1 cannot load that format (its
    ``_set_main_param_and_optimizer_states`` copies a ``step`` entry that the saved state
    lacks: KeyError 'step'), so "dp_reshardable" is used: resume on the same TP/PP layout,
    any DP size. "fully_sharded_model_space" fails to save in 0.16.1 ("ShardedTensor.
    flattened_range is not supported").
    """
    from megatron.core.optimizer import distrib_optimizer

    return "fully_reshardable" if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", False) else "dp_reshardable"


def _chunks(model_chunks: Sequence[Any] | Any) -> list:
    return list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]


def _metadata(dist_opt_format: str) -> dict:
    return {"distrib_optim_sharding_type": dist_opt_format, "chained_optim_avoid_prefix": True}


def sharded_state_dict(
    model_chunks: Sequence[Any] | Any,
    optimizer: Any = None,
    scheduler: Any = None,
    *,
    is_loading: bool = False,
    dist_opt_format: str | None = None,
    common: dict | None = None,
) -> dict:
    """The sharded state dict of a training run (Megatron-LM's key layout)."""
    from .classify import unwrap_model

    metadata = _metadata(dist_opt_format or default_dist_opt_format())
    chunks = _chunks(model_chunks)
    state: dict[str, Any] = {}
    for index, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{index}"
        state[key] = unwrap_model(chunk).sharded_state_dict(metadata=metadata)
    if optimizer is not None:
        state["optimizer"] = _index_group_lists(
            optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
        )
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    state["cdp"] = dict(common or {})
    return state


def save_checkpoint(
    path: str | os.PathLike,
    model_chunks: Sequence[Any] | Any,
    optimizer: Any = None,
    scheduler: Any = None,
    *,
    iteration: int | None = None,
    extra: dict | None = None,
    dist_opt_format: str | None = None,
) -> None:
    """Save a checkpoint into the directory ``path`` (created; collective on all ranks).

    extra: small picklable values stored with the iteration (read back by load_checkpoint).
    """
    from megatron.core import dist_checkpointing

    path = os.fspath(path)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    common = {"iteration": iteration, **(extra or {})}
    state = sharded_state_dict(
        model_chunks, optimizer, scheduler, dist_opt_format=dist_opt_format, common=common
    )
    dist_checkpointing.save(state, path)


def load_checkpoint(
    path: str | os.PathLike,
    model_chunks: Sequence[Any] | Any,
    optimizer: Any = None,
    scheduler: Any = None,
    *,
    strict: bool = True,
    dist_opt_format: str | None = None,
    apply_patches: bool = True,
) -> dict:
    """Load a checkpoint saved by ``save_checkpoint`` into the model (and optimizer and
    scheduler when given); returns the common dict (``iteration`` and the saved extras).

    Applies the cdp patches first (the optimizer's groups are matched by all their
    hyperparameters; a checkpoint whose groups differ from the current ones is refused);
    ``apply_patches=False`` leaves them as they are (tests demonstrate the upstream bug).
    dist_opt_format must be the format the checkpoint was saved with (default: the same
    default as ``save_checkpoint``).
    """
    from megatron.core import dist_checkpointing

    from cdp_megatron import patches

    from .classify import unwrap_model

    if optimizer is not None and apply_patches:
        patches.apply_all()
    chunks = _chunks(model_chunks)
    if optimizer is not None:
        _init_empty_distributed_state(optimizer)
    state = sharded_state_dict(
        chunks, optimizer, scheduler, is_loading=True, dist_opt_format=dist_opt_format
    )
    loaded = dist_checkpointing.load(state, os.fspath(path))
    for index, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{index}"
        unwrap_model(chunk).load_state_dict(loaded[key], strict=strict)
    if optimizer is not None:
        with torch.no_grad():  # 0.16.1's dp_reshardable path copies into views of leaf params
            optimizer.load_state_dict(_unindex_group_lists(loaded["optimizer"]))
        _restore_step_tensors(optimizer)
    if scheduler is not None:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    return dict(loaded.get("cdp", {}))


_GROUP_LISTS = ("fp32_from_fp16_params",)
_INDEXED = "__cdp_indexed_list__"


def _index_group_lists(state: Any) -> Any:
    """Store per-group lists (Float16 optimizer's ``fp32_from_fp16_params``) as dicts.

    dist_checkpointing splits a list into its sharded and its plain items and cannot merge
    them back when some groups are empty (the empty groups cdp adds for fused-tensor segments,
    or upstream's own pipeline-alignment groups): "Cannot merge two lists with different
    lengths". A dict keyed by group index splits and merges by key.
    """
    if isinstance(state, dict):
        return {
            k: ({_INDEXED: True, **dict(enumerate(v))} if k in _GROUP_LISTS and isinstance(v, list)
                else _index_group_lists(v))
            for k, v in state.items()
        }
    return state


def _unindex_group_lists(state: Any) -> Any:
    if isinstance(state, dict):
        if state.get(_INDEXED):
            items = {k: v for k, v in state.items() if k != _INDEXED}
            return [items[i] for i in range(len(items))]
        return {k: _unindex_group_lists(v) for k, v in state.items()}
    return state


def _init_empty_distributed_state(optimizer: Any) -> None:
    """Allocate zero Adam state for a fresh distributed optimizer before a load.

    megatron-core 0.16.1's ``DistributedOptimizer.state_dict`` (distrib_optimizer.py:640,
    torch-optimizer path, i.e. without apex/TE) asserts that the state holds exactly one step
    value, so building the sharded state dict to load into an optimizer that has not stepped
    yet fails. The values are overwritten by the load.
    """
    from megatron.core.optimizer import DistributedOptimizer
    from megatron.core.optimizer import distrib_optimizer

    for mopt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(mopt, "optimizer", None)
        if not isinstance(mopt, DistributedOptimizer) or inner is None or len(inner.state):
            continue
        mopt.init_state_fn(inner, mopt.config)
        if not getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
            for state in inner.state.values():
                state.setdefault("step", torch.tensor(0.0))


def _restore_step_tensors(optimizer: Any) -> None:
    """Give every parameter of a distributed optimizer its own, correct ``step`` tensor.

    megatron-core 0.16.1's ``DistributedOptimizer.load_state_dict`` (torch-optimizer path,
    distrib_optimizer.py:818-824) assigns ONE step tensor to every parameter's state, which
    ``load_parameter_state_from_dp_reshardable`` then overwrites in place with a saved value
    that is not the step count; torch's Adam increments ``step`` in place once per parameter,
    so a shared tensor would also advance by the number of parameters per step. The correct
    count is the one the load wrote into every param group (``group['step']``).
    """
    from megatron.core.optimizer import DistributedOptimizer

    for mopt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(mopt, "optimizer", None)
        if not isinstance(mopt, DistributedOptimizer) or inner is None:
            continue
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                if state and isinstance(state.get("step"), torch.Tensor):
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype)
