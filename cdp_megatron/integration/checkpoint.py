"""Save and load model + optimizer + scheduler with Megatron's ``dist_checkpointing``.

The layout follows Megatron-LM's ``generate_state_dict``: ``model`` (or ``model0``,
``model1``, ... with virtual pipeline chunks), ``optimizer`` (built from the model's sharded
state dict, so it reshards with the model) and ``opt_param_scheduler``, plus a small common
``cdp`` dict (iteration and anything the caller adds). A checkpoint can be resumed on another
TP/PP/DP layout with the plain optimizer; the distributed optimizer's state is saved in one
of Megatron's two formats (``distrib_optim_sharding_type``, recorded in the checkpoint's
content metadata as Megatron-LM does, so a load picks the saved one):

* ``dp_reshardable`` (the default, Megatron-LM's too): each rank writes its own shard; the
  checkpoint resumes on the same TP/PP/VPP with any DP size. A load on another TP/PP/VPP is
  refused with a ``CheckpointError`` naming the saved layout.
* ``fully_reshardable`` (Megatron-LM's ``--dist-ckpt-optim-fully-reshardable``): the state is
  gathered over DP and saved per model parameter, so the checkpoint resumes on any TP/PP/VPP/DP
  layout. It costs a gather of the rank's full optimizer state on every DP rank during the
  save, or, with ``mem_efficient`` (``--distrib-optim-fully-reshardable-mem-efficient``), on
  DP rank 0 only (over gloo). Loading it into torch's Adam needs the
  ``dist_opt_step_state`` patch.

The optimizer's per-group hyperparameters are restored exactly only with the
``param_group_identity`` patch applied (``cdp_megatron.patches``; ``load_checkpoint`` applies
the patches): upstream matches saved to current groups on four flags that all Complete(d)P
groups share.

A training run's checkpoint directory (``save_iteration``, ``latest_checkpoint``) has
Megatron-LM's layout: ``iter_NNNNNNN/`` per saved iteration and the tracker file
``latest_checkpointed_iteration.txt`` naming the latest; each ``iter_`` directory also holds
every rank's RNG state as ``rng/rank_<r>.pt``. ``save_iteration`` publishes atomically.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "sharded_state_dict",
    "save_checkpoint",
    "load_checkpoint",
    "default_dist_opt_format",
    "DIST_OPT_FORMATS",
    "model_parallel_layout",
    "TRACKER_FILE",
    "CheckpointError",
    "checkpoint_dirname",
    "latest_checkpoint",
    "checkpoint_to_load",
    "saved_iterations",
    "write_atomically",
    "save_rng_state",
    "load_rng_state",
    "save_iteration",
    "saved_extras",
]

TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron-LM's name for the "latest" pointer


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be resumed from (bad or dangling tracker file)."""

DIST_OPT_FORMATS = ("dp_reshardable", "fully_reshardable")


def default_dist_opt_format() -> str:
    """The distributed optimizer's default checkpoint format (``distrib_optim_sharding_type``):
    "dp_reshardable", as in Megatron-LM (see the module docstring). "fully_sharded_model_space"
    is not offered: it fails to save in megatron-core 0.16.1 ("ShardedTensor.flattened_range is
    not supported")."""
    return "dp_reshardable"


def _chunks(model_chunks: Sequence[Any] | Any) -> list:
    return list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]


def _metadata(dist_opt_format: str, mem_efficient: bool = False) -> dict:
    if dist_opt_format not in DIST_OPT_FORMATS:
        raise ValueError(
            f"dist_opt_format {dist_opt_format!r}: use one of {', '.join(DIST_OPT_FORMATS)}"
        )
    metadata = {"distrib_optim_sharding_type": dist_opt_format, "chained_optim_avoid_prefix": True}
    if mem_efficient and dist_opt_format == "fully_reshardable":
        metadata["distrib_optim_fully_reshardable_mem_efficient"] = True
    return metadata


def _uses_distributed_optimizer(optimizer: Any) -> bool:
    from megatron.core.optimizer import DistributedOptimizer

    return optimizer is not None and any(
        isinstance(o, DistributedOptimizer)
        for o in (getattr(optimizer, "chained_optimizers", None) or [optimizer])
    )


def _params_dtype(model_chunks: list) -> str | None:
    """The dtype of the model's parameters ("float32", "bfloat16"): with bf16 the optimizer
    also keeps fp32 main params, so the optimizer's checkpoint differs in kind, not just in
    values."""
    from .classify import unwrap_model

    for chunk in model_chunks:
        for p in unwrap_model(chunk).parameters():
            return str(p.dtype).removeprefix("torch.")
    return None


def model_parallel_layout(model_chunks: Sequence[Any] | Any = None) -> dict:
    """This run's TP/PP/VPP sizes and, where the pipeline's model chunks hold different numbers
    of layers (megatron-core's uneven or embedding/loss-counting split), each chunk's layers
    (``model_chunks``' config), [pipeline rank][virtual stage]: what a ``dp_reshardable``
    optimizer checkpoint is bound to."""
    from megatron.core import parallel_state as ps

    layout = {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    }
    if model_chunks is not None:
        from .classify import unwrap_model
        from .model import pipeline_stage_layers

        stages = pipeline_stage_layers(unwrap_model(_chunks(model_chunks)[0]).config)
        if len({n for stage in stages for n in stage}) > 1:
            layout["layers"] = stages
    return layout


def _describe(layout: dict) -> str:
    return (f"TP={layout['tp']}, PP={layout['pp']}" + (f", VPP={layout['vpp']}" if layout.get("vpp", 1) > 1 else "")
            + (f" (layers a stage: {' | '.join(','.join(map(str, s)) for s in layout['layers'])})"
               if "layers" in layout else ""))


def sharded_state_dict(
    model_chunks: Sequence[Any] | Any,
    optimizer: Any = None,
    scheduler: Any = None,
    *,
    is_loading: bool = False,
    dist_opt_format: str | None = None,
    mem_efficient: bool = False,
    common: dict | None = None,
) -> dict:
    """The sharded state dict of a training run (Megatron-LM's key layout)."""
    from .classify import unwrap_model

    metadata = _metadata(dist_opt_format or default_dist_opt_format(), mem_efficient)
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
    mem_efficient: bool = False,
    fully_parallel: bool = True,
) -> None:
    """Save a checkpoint into the directory ``path`` (created; collective on all ranks).

    fully_parallel: Megatron-LM's default ``--ckpt-fully-parallel-save``: the data-parallel
    replicas share the writing of the tensors they hold alike (megatron's
    FullyParallelSaveStrategyWrapper), where otherwise DP rank 0 writes them all. The files
    are the same checkpoint either way.

    extra: small picklable values stored with the iteration (read back by load_checkpoint).
    dist_opt_format: the distributed optimizer's format, "dp_reshardable" (default) or
    "fully_reshardable" (resume on any layout); mem_efficient gathers the latter on DP rank 0
    only. The format and this run's TP/PP/VPP are stored in the checkpoint's content metadata.
    """
    from megatron.core import dist_checkpointing

    path = os.fspath(path)
    dist_opt_format = dist_opt_format or default_dist_opt_format()
    metadata = _metadata(dist_opt_format, mem_efficient)  # checks the format before any write
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    common = {"iteration": iteration, **(extra or {})}
    state = sharded_state_dict(
        model_chunks, optimizer, scheduler, dist_opt_format=dist_opt_format,
        mem_efficient=mem_efficient, common=common,
    )
    content = {
        **metadata,
        "cdp_model_parallel": model_parallel_layout(model_chunks),
        "cdp_distributed_optimizer": _uses_distributed_optimizer(optimizer),
        "cdp_params_dtype": _params_dtype(_chunks(model_chunks)),
    }
    strategy = None
    if fully_parallel and torch.distributed.is_initialized():
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

        strategy = _over_data_parallel(FullyParallelSaveStrategyWrapper, get_default_save_sharded_strategy("torch_dist"))
    dist_checkpointing.save(state, path, sharded_strategy=strategy, content_metadata=content)


def _over_data_parallel(wrapper: Any, strategy: Any) -> Any:
    """``strategy`` shared by the data-parallel replicas (megatron's fully parallel wrappers,
    over the group Megatron-LM gives them)."""
    from megatron.core import parallel_state

    return wrapper(strategy, parallel_state.get_data_parallel_group(with_context_parallel=True))


def load_checkpoint(
    path: str | os.PathLike,
    model_chunks: Sequence[Any] | Any,
    optimizer: Any = None,
    scheduler: Any = None,
    *,
    strict: bool = True,
    dist_opt_format: str | None = None,
    apply_patches: bool = True,
    fully_parallel: bool = False,
) -> dict:
    """Load a checkpoint saved by ``save_checkpoint`` into the model (and optimizer and
    scheduler when given); returns the common dict (``iteration`` and the saved extras).

    Applies the cdp patches first (the optimizer's groups are matched by all their
    hyperparameters; a checkpoint whose groups differ from the current ones is refused);
    ``apply_patches=False`` leaves them as they are (tests demonstrate the upstream bug).
    The distributed optimizer's format is the one the checkpoint records (``dist_opt_format``
    is only used for a checkpoint that records none). A ``dp_reshardable`` distributed-optimizer
    checkpoint loaded on another TP/PP/VPP raises CheckpointError. ``fully_parallel``
    (Megatron-LM's ``--ckpt-fully-parallel-load``): the data-parallel replicas share the
    reading and exchange what they read (megatron's FullyParallelLoadStrategyWrapper).
    """
    from megatron.core import dist_checkpointing

    from cdp_megatron import patches

    from .classify import unwrap_model

    path = os.fspath(path)
    if optimizer is not None and apply_patches:
        patches.apply_all()
    chunks = _chunks(model_chunks)
    saved = _saved_metadata(path)
    dist_opt_format = saved.get("distrib_optim_sharding_type") or dist_opt_format
    if optimizer is not None:
        _check_compatible(path, saved, dist_opt_format or default_dist_opt_format(), optimizer, chunks)
        _init_empty_distributed_state(optimizer)
    state = sharded_state_dict(
        chunks, optimizer, scheduler, is_loading=True, dist_opt_format=dist_opt_format
    )
    _check_padded_shapes(path, [state[key] for key in state if key.startswith("model")])
    strategy = None
    if fully_parallel and torch.distributed.is_initialized():
        from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

        strategy = _over_data_parallel(FullyParallelLoadStrategyWrapper, get_default_load_sharded_strategy(path))
    loaded = dist_checkpointing.load(state, path, sharded_strategy=strategy)
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


def saved_extras(path: str | os.PathLike) -> dict:
    """The common ``cdp`` dict of a checkpoint (``iteration`` and the caller's extras), read
    without loading any tensor, e.g. to check a checkpoint against a run before loading it."""
    from megatron.core import dist_checkpointing

    return dict(dist_checkpointing.load_common_state_dict(os.fspath(path)).get("cdp", {}))


def _saved_metadata(path: str) -> dict:
    """The content metadata ``save_checkpoint`` stores; for a checkpoint without it (saved
    before cdp-megatron recorded it, or by other code), the distributed optimizer's format
    as its common state records it."""
    from megatron.core import dist_checkpointing

    saved = dist_checkpointing.load_content_metadata(path)
    if saved:
        return saved
    optimizer = dist_checkpointing.load_common_state_dict(path).get("optimizer")
    fmt = optimizer.get("param_state_sharding_type") if isinstance(optimizer, dict) else None
    return {"distrib_optim_sharding_type": fmt} if fmt else {}


def _check_padded_shapes(path: str, model_states: list) -> None:
    """Refuse a checkpoint whose vocabulary-padded tensors (word embeddings, output layer) have
    other rows than the model's. Megatron marks them ``allow_shape_mismatch`` and loads them
    without a word: the rows both have are read, the others zeroed, so the padding logits
    restart at 0 and the resumed run is not the saved one."""
    from megatron.core.dist_checkpointing import ShardedTensor, load_tensors_metadata
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    padded = [t for state in model_states for t in nested_values(state)
              if isinstance(t, ShardedTensor) and t.allow_shape_mismatch]
    if not padded:
        return
    saved = load_tensors_metadata(path)
    for tensor in padded:
        there = saved.get(tensor.key)
        if there is not None and tuple(there.global_shape) != tuple(tensor.global_shape):
            raise CheckpointError(
                f"{path}: {tensor.key} has {there.global_shape[0]} rows there, {tensor.global_shape[0]} "
                "here: the vocabulary is padded to another size (a multiple of "
                "--make-vocab-size-divisible-by x TP); pad it as the checkpoint did"
            )


_PRECISION_FLAGS = {"bfloat16": "--bf16", "float16": "--fp16"}  # else: "without --bf16"


def _check_compatible(path: str, saved: dict, dist_opt_format: str, optimizer: Any, model_chunks: list) -> None:
    """Refuse, before anything is read, a load Megatron cannot do exactly: another precision,
    the other kind of optimizer, a ``dp_reshardable`` optimizer state on another layout."""
    saved_dtype, dtype = saved.get("cdp_params_dtype"), _params_dtype(model_chunks)
    if saved_dtype is not None and dtype is not None and saved_dtype != dtype:
        # bf16 -> fp32: Megatron reads the optimizer without its fp32 main params (a KeyError with
        # the distributed optimizer, mismatched param groups with the plain one); fp32 -> bf16: a
        # KeyError. Neither would resume the saved run exactly.
        there, here = (_PRECISION_FLAGS.get(d, "without --bf16") for d in (saved_dtype, dtype))
        raise CheckpointError(
            f"{path} was saved with {saved_dtype} parameters ({there}), this run's are {dtype} ({here}): "
            "resume with the precision it was saved with"
        )
    saved_dist = saved.get("cdp_distributed_optimizer")
    if saved_dist is not None and saved_dist != _uses_distributed_optimizer(optimizer):
        kinds = {True: "the distributed optimizer", False: "the plain optimizer"}
        raise CheckpointError(
            f"{path} was saved with {kinds[saved_dist]}, this run uses "
            f"{kinds[not saved_dist]}: resume with the same optimizer "
            f"({'with' if saved_dist else 'without'} --use-distributed-optimizer)"
        )
    layout, here = saved.get("cdp_model_parallel"), model_parallel_layout(model_chunks)
    if (
        dist_opt_format == "dp_reshardable" and saved_dist and layout is not None
        and layout != here
    ):
        raise CheckpointError(
            f"{path} holds the distributed optimizer's state in the dp_reshardable format, saved "
            f"on {_describe(layout)}; it resumes only on that layout (any DP size), not on "
            f"{_describe(here)}. Resume on {_describe(layout)}, or save with "
            "the fully_reshardable format (cdp-pretrain --dist-ckpt-optim-fully-reshardable) "
            "to change the layout"
        )


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


# ========================================================== a training run's checkpoint directory
def checkpoint_dirname(iteration: int) -> str:
    """Megatron-LM's directory name for the checkpoint of an iteration."""
    return f"iter_{iteration:07d}"


def latest_checkpoint(directory: str) -> str | None:
    """The checkpoint the tracker file of ``directory`` points at (None: no tracker file).

    Raises CheckpointError when the tracker does not hold an iteration or names a missing
    checkpoint (the message names the file, not the directory: callers prefix it)."""
    tracker = os.path.join(directory, TRACKER_FILE)
    if not os.path.isfile(tracker):
        return None
    text = open(tracker).read().strip()
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"{TRACKER_FILE} holds {text!r}, not an iteration") from None
    path = os.path.join(directory, checkpoint_dirname(iteration))
    if not os.path.isdir(path):
        raise CheckpointError(f"{TRACKER_FILE} points at {path}, which does not exist")
    return path


_ITERATION_DIR = re.compile(r"iter_(\d{7,})")


def saved_iterations(directory: str) -> list[int]:
    """The iterations of the published checkpoints (``iter_N`` folders, not ``.tmp``) in
    ``directory``, ascending."""
    if not os.path.isdir(directory):
        return []
    found = (_ITERATION_DIR.fullmatch(name) for name in os.listdir(directory))
    return sorted(int(m.group(1)) for m in found if m and os.path.isdir(os.path.join(directory, m.group(0))))


def checkpoint_iteration(path: str) -> int:
    """The iteration of the checkpoint folder ``path`` (``.../iter_NNNNNNN``)."""
    match = _ITERATION_DIR.fullmatch(os.path.basename(os.path.normpath(path)))
    if match is None:
        raise CheckpointError(f"{path} is not a checkpoint folder (iter_NNNNNNN)")
    return int(match.group(1))


def remove_older_checkpoints(directory: str, keep: int, retain: int | None = None) -> list[int]:
    """Remove the checkpoints of ``directory`` older than iteration ``keep``, except those of
    multiples of ``retain`` (Megatron-LM's non-persistent folder keeps only the latest; its
    ``--save-retain-interval`` the multiples and the latest), and unfinished ``.tmp`` saves;
    returns the removed checkpoints' iterations. Rank 0 only, after ``keep`` is published, so
    that a crash leaves a checkpoint to resume from."""
    older = [i for i in saved_iterations(directory) if i < keep and not (retain and i % retain == 0)]
    for iteration in older:
        shutil.rmtree(os.path.join(directory, checkpoint_dirname(iteration)))
    for name in os.listdir(directory):  # what crashed saves left (none is running now)
        if name.endswith(".tmp") and _ITERATION_DIR.fullmatch(name[:-4]):
            shutil.rmtree(os.path.join(directory, name))
    return older


def _torch_dist(path: str) -> str:
    """``path`` if it holds a dist_checkpointing (torch_dist) checkpoint; else CheckpointError
    naming the format it holds and, for Megatron-LM's torch format, its conversion."""
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    names = os.listdir(path)
    name = os.path.basename(os.path.normpath(path))
    if any(n.startswith("mp_rank_") for n in names):
        raise CheckpointError(
            f"{name} is a Megatron-LM checkpoint in the torch format (mp_rank_*/model_optim_rng.pt); cdp-pretrain "
            "reads torch_dist checkpoints: convert it with Megatron-LM (its training command with --ckpt-format "
            "torch --ckpt-convert-format torch_dist --ckpt-convert-save DIR added) and give --load DIR/torch_dist"
        )
    if ".metadata" in names:
        raise CheckpointError(f"{name} is a torch.distributed.checkpoint (torch_dcp) checkpoint; cdp-pretrain reads "
                              "torch_dist checkpoints (megatron's dist_checkpointing) only")
    raise CheckpointError(f"{name} holds no checkpoint cdp-pretrain can read (no metadata.json of megatron's "
                          "dist_checkpointing): a save that did not finish, or another format")


def checkpoint_to_load(directory: str, step: int | None = None) -> str | None:
    """The checkpoint a resume from ``directory`` reads: that of iteration ``step`` when given
    (Megatron-LM's ``--ckpt-step``), else the one the tracker file points at; None where the
    folder holds no checkpoint (a fresh start).

    Raises CheckpointError (the message names the fix, not ``directory``: callers prefix it)
    for a missing ``step``, a bad tracker, a folder that is itself one checkpoint, a folder
    that holds checkpoints but no tracker (a first save stopped before publishing it), where a
    fresh start would train the run again from scratch, and a checkpoint of another format
    than torch_dist (Megatron-LM's torch format names its conversion)."""
    if step is not None:
        path = os.path.join(directory, checkpoint_dirname(step))
        if os.path.isdir(path):
            return _torch_dist(path)
        have = saved_iterations(directory)
        there = f"iterations {', '.join(map(str, have))}" if have else "none"
        raise CheckpointError(f"no checkpoint of iteration {step} (--ckpt-step) here; the checkpoints here: {there}")
    path = latest_checkpoint(directory)
    if path is not None:
        return _torch_dist(path)
    parent, name = os.path.split(os.path.normpath(directory))
    single = _ITERATION_DIR.fullmatch(name)
    if single or os.path.isfile(os.path.join(directory, "metadata.json")):
        fix = (f"give --load {parent or '.'} --ckpt-step {int(single.group(1))}" if single
               else "give the folder that holds it")
        raise CheckpointError(f"this is one checkpoint, not a folder of them ({TRACKER_FILE} missing): {fix}")
    have = saved_iterations(directory)
    if have:
        raise CheckpointError(
            f"checkpoints of iterations {', '.join(map(str, have))} but no {TRACKER_FILE} (a save that stopped "
            f"before publishing it); give --ckpt-step {have[-1]} to resume from the latest"
        )
    return None


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced temporary file and a rename: a reader sees
    the old or the new content, never a partial one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_rng_state(directory: str, rank: int, layout: dict) -> None:
    """Each rank's RNG state (dropout masks) as ``rng/rank_<r>.pt``: dist_checkpointing's
    common state is written by rank 0 only, and the states differ between ranks. ``layout``
    (any comparable dict, e.g. TP/PP/VPP/world sizes) is stored with it."""
    from .training import rng_state

    os.makedirs(os.path.join(directory, "rng"), exist_ok=True)
    torch.save({"layout": layout, "state": rng_state()}, os.path.join(directory, "rng", f"rank_{rank}.pt"))


def load_rng_state(directory: str, layout: dict) -> bool:
    """Restore this rank's RNG state saved by ``save_rng_state``; returns False (and restores
    nothing) when there is none or it was saved for another ``layout``: RNG streams belong to
    a layout (Megatron-LM does the same)."""
    from .training import set_rng_state

    path = os.path.join(directory, "rng", f"rank_{torch.distributed.get_rank()}.pt")
    saved = torch.load(path, weights_only=False) if os.path.isfile(path) else None
    if saved is None or saved["layout"] != layout:
        return False
    set_rng_state(saved["state"])
    return True


def save_iteration(
    save_dir: str,
    iteration: int,
    model_chunks: Sequence[Any] | Any,
    optimizer: Any = None,
    scheduler: Any = None,
    *,
    layout: dict,
    extra: dict | None = None,
    before_publish: Callable[[], None] | None = None,
    dist_opt_format: str | None = None,
    mem_efficient: bool = False,
    save_rng: bool = True,
    fully_parallel: bool = True,
) -> str:
    """Save the checkpoint of ``iteration`` under ``save_dir`` atomically; returns its path
    (``save_dir/iter_NNNNNNN``). Collective on all ranks.

    Writes ``iter_N.tmp`` (``save_checkpoint`` with ``extra`` plus ``layout``, and every
    rank's RNG state), renames it to ``iter_N`` (replacing an older save of the same
    iteration), then replaces the tracker file. A crash at any point leaves the previous
    checkpoint and tracker intact; a stale ``iter_N.tmp`` of a crashed save is removed first.
    ``before_publish`` runs on every rank once everything is written, before the rename.
    dist_opt_format, mem_efficient, fully_parallel: as for ``save_checkpoint``. ``save_rng=False`` leaves the
    RNG state out (``--no-save-rng``); ``optimizer`` and ``scheduler`` None leave theirs out.
    """
    rank = torch.distributed.get_rank()
    final = os.path.join(save_dir, checkpoint_dirname(iteration))
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        if os.path.exists(tmp):  # left by a crashed save
            shutil.rmtree(tmp)
    torch.distributed.barrier()
    save_checkpoint(
        tmp, model_chunks, optimizer, scheduler, iteration=iteration,
        extra={**(extra or {}), "layout": layout}, dist_opt_format=dist_opt_format,
        mem_efficient=mem_efficient, fully_parallel=fully_parallel,
    )
    if save_rng:
        save_rng_state(tmp, rank, layout)
    torch.distributed.barrier()
    if before_publish is not None:
        before_publish()
    if rank == 0:
        if os.path.exists(final):  # saving the same iteration again: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomically(os.path.join(save_dir, TRACKER_FILE), f"{iteration}\n")
    torch.distributed.barrier()
    return final
