"""The Complete(d)P optimizer: every parameter, and every segment of a fused one, gets the
lr, min lr, weight decay, eps and betas of its (type, global layer, weight|bias) group.

Three layers, each using Megatron's own mechanism where it reaches:

1. Whole parameters: ``get_megatron_optimizer(..., config_overrides=...)`` with one override
   per distinct hyperparameter set (groups with identical values are merged)::

       max_lr = lr, min_lr = min_lr,            (0.16 ignores lr_mult: the LR lives here)
       start_wd = end_wd = weight_decay, wd_mult = 1,
       eps = eps, betas = (beta1, beta2)        (passed through to the torch param group)

   Every parameter gets an explicit weight decay from the target, so Megatron's standard
   overrides (no decay on 1-D parameters and biases) are not added: the target already
   encodes them (``decay_norms_and_biases``; spec.py gives norms and biases wd 0 by default).
2. Fused tensors (``linear_qkv``: q/k/v per query group; ``linear_fc1``: gate/up): Megatron
   keeps ONE tensor (checkpoint layout unchanged) in one param group. Each segment is stepped
   exactly with the hyperparameters of its "carrier" group (a real Megatron param group, empty
   when no whole parameter shares those values; created by ``patches.carrier_param_groups``),
   as contiguous views of the fused param, its grad and its exp_avg/exp_avg_sq. Adam is
   elementwise, so this is exact. Two ways, by inner optimizer:
   - torch Adam/AdamW (what Megatron picks without TE/apex): ``grouped_adam.GroupedAdamStep``
     replaces its step by ONE multi-tensor pass over all groups and segments with per-tensor
     scalar lists (the same foreach ops as torch's, bit-identical on CPU), so ~100 distinct
     groups cost about what Megatron's usual two do;
   - any other Adam (apex / TE FusedAdam): ``_SegmentStep``, a step pre-hook puts the views in
     temporary copies of their carrier groups and a post-hook restores the standard layout.
   Either way the optimizer state stays full-tensor, so state dicts and checkpoints are
   ordinary. The same holds for the Float16 optimizer (fp32 main params) and the distributed
   optimizer (shard main params: segments are intersected with this DP rank's range).
3. Schedule: one ``OptimizerParamScheduler`` for all groups, linear warmup from 0
   (``init_lr = 0`` keeps the ratios between groups during warmup) then cosine to each
   group's min_lr; weight decay constant per group.

Public API: ``build_optimizer``, ``build_scheduler``, ``optimizer_hyperparameters``,
``HParams``, ``Assignment``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import torch

from . import grouped_adam
from .grouped_adam import flat_view

logger = logging.getLogger(__name__)

__all__ = [
    "HParams",
    "Piece",
    "Assignment",
    "build_optimizer",
    "build_scheduler",
    "optimizer_hyperparameters",
    "param_pieces",
]


# --- hyperparameter sets ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HParams:
    """One distinct set of per-group optimizer hyperparameters (hashable; merge key)."""

    lr: float
    min_lr: float
    weight_decay: float
    eps: float
    beta1: float
    beta2: float

    @classmethod
    def of(cls, group: Any) -> "HParams":
        """From a target Group (docs/target-format.md)."""
        return cls(
            float(group.lr), float(group.min_lr), float(group.weight_decay),
            float(group.eps), float(group.beta1), float(group.beta2),
        )

    @classmethod
    def of_param_group(cls, pg: dict) -> "HParams | None":
        """From a Megatron/torch param group built by ``build_optimizer`` (None otherwise)."""
        if "start_wd" not in pg or "betas" not in pg:
            return None
        b1, b2 = pg["betas"]
        return cls(pg["max_lr"], pg["min_lr"], pg["start_wd"], pg["eps"], b1, b2)

    def override(self) -> dict:
        """The Megatron ``ParamGroupOverride`` for this set."""
        return {
            "max_lr": self.lr,
            "min_lr": self.min_lr,
            "start_wd": self.weight_decay,
            "end_wd": self.weight_decay,
            "wd_mult": 1.0,
            "eps": self.eps,
            "betas": (self.beta1, self.beta2),
        }


@dataclasses.dataclass(frozen=True)
class Piece:
    """Elements ``[start, end)`` of a parameter's flattened local tensor, one HParams."""

    start: int
    end: int
    hparams: HParams


# Tests set this to False to step every segment separately even when values agree.
_MERGE_EQUAL_SEGMENTS = True


def param_pieces(info: Any, target: Any) -> tuple[Piece, ...]:
    """The segments of a classified parameter with their hyperparameters; adjacent segments
    with equal hyperparameters are merged (one piece when the whole tensor shares them)."""
    pieces: list[Piece] = []
    for seg in info.segments:
        hp = HParams.of(target.group(seg.type, info.layer, info.param))
        if _MERGE_EQUAL_SEGMENTS and pieces and pieces[-1].hparams == hp and pieces[-1].end == seg.start:
            pieces[-1] = Piece(pieces[-1].start, seg.end, hp)
        else:
            pieces.append(Piece(seg.start, seg.end, hp))
    return tuple(pieces)


# --- the segment step ------------------------------------------------------------------------
# Tests set this to False to step torch's Adam through _SegmentStep (the path apex's and TE's
# FusedAdam take) instead of the grouped multi-tensor step.
_GROUPED_STEP = True


@dataclasses.dataclass(frozen=True)
class _View:
    """Elements ``[offset, offset + length)`` of a flattened tensor, stepped in one group."""

    offset: int
    length: int
    group: int

    def of(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.offset:self.offset + self.length]


def _views_for(pieces: list[tuple[int, int, int]]) -> list[_View]:
    return [_View(lo, hi - lo, gi) for lo, hi, gi in pieces]


class _Split:
    """One inner-optimizer tensor stepped as several views, each in its carrier group."""

    __slots__ = ("param", "views", "bound", "states")

    def __init__(self, param: torch.Tensor, views: list[_View]):
        self.param, self.views = param, views
        self.bound: tuple | None = None  # identity of the outer state the views are bound to
        self.states: list[dict] | None = None


def _is_per_element(value: Any, numel: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.numel() == numel


class _SegmentStep:
    """Step pre/post hooks on a torch optimizer that step split tensors view by view."""

    def __init__(self, opt: torch.optim.Optimizer, splits: list[_Split]):
        self.opt, self.splits = opt, splits
        self._pending: tuple[int, list] | None = None
        self.handles = (
            opt.register_step_pre_hook(self._pre),
            opt.register_step_post_hook(self._post),
        )

    def remove(self) -> None:
        self._undo()
        for handle in self.handles:
            handle.remove()

    def _piece_states(self, sp: _Split) -> list[dict] | None:
        """Per-view state dicts viewing the full tensor's state (None: not created yet)."""
        outer = self.opt.state.get(sp.param)
        if not outer:
            return None
        key = tuple((k, id(v)) for k, v in outer.items())
        if sp.bound == key:
            return sp.states
        numel = sp.param.numel()
        flats = {k: flat_view(v, f"state {k!r}") for k, v in outer.items() if _is_per_element(v, numel)}
        states = []
        for i, view in enumerate(sp.views):
            # View 0 shares the full tensor's scalars (e.g. torch's `step` tensor, updated in
            # place), the others get copies: the full tensor is never stepped itself.
            states.append({
                k: view.of(flats[k]) if k in flats
                else (v if i == 0 or not isinstance(v, torch.Tensor) else v.clone())
                for k, v in outer.items()
            })
        sp.bound, sp.states = key, states
        return states

    def _pre(self, opt, args, kwargs) -> None:
        self._undo()
        base = len(opt.param_groups)
        extra: dict[int, dict] = {}
        stash = []
        for sp in self.splits:
            param, grad = sp.param, sp.param.grad
            if grad is None:
                continue
            flat, flat_grad = flat_view(param, "param"), flat_view(grad, "grad")
            states = self._piece_states(sp)
            views = []
            for i, spec in enumerate(sp.views):
                view = spec.of(flat)
                view.grad = spec.of(flat_grad)
                group = extra.get(spec.group)
                if group is None:
                    group = extra[spec.group] = {**opt.param_groups[spec.group], "params": []}
                group["params"].append(view)
                if states is not None:
                    opt.state[view] = states[i]
                views.append(view)
            param.grad = None  # skipped by the regular step; its views are stepped instead
            stash.append((sp, grad, views))
        if not stash:
            return
        # Optimizers with a per-group step count (apex / TE FusedAdam): use the common one.
        steps = [g["step"] for g in opt.param_groups[:base] if "step" in g and g["params"]]
        for group in extra.values():
            if steps:
                group["step"] = max(steps)
        opt.param_groups.extend(extra.values())
        self._pending = (base, stash)

    def _post(self, opt, args, kwargs) -> None:
        if self._pending is None:
            return
        base, stash = self._pending
        del opt.param_groups[base:]
        for sp, grad, views in stash:
            piece_states = [opt.state.pop(v, None) for v in views]
            if sp.states is None or sp.bound is None:
                self._adopt(sp, piece_states)
            elif piece_states[0] is not None:
                outer = opt.state[sp.param]
                for k, v in piece_states[0].items():  # non-tensor scalars are rebound, not updated
                    if not isinstance(v, torch.Tensor) and outer.get(k) is not v:
                        outer[k] = v
            for view in views:
                view.grad = None
            sp.param.grad = grad
        self._pending = None

    def _adopt(self, sp: _Split, piece_states: list[dict | None]) -> None:
        """First step: gather the views' fresh state into full-tensor state for the param."""
        if any(not s for s in piece_states):
            return  # the optimizer keeps no state (e.g. SGD without momentum)
        outer = {}
        for k, v0 in piece_states[0].items():
            if isinstance(v0, torch.Tensor) and v0.dim() > 0 and v0.numel() == sp.views[0].length:
                full = torch.empty(sp.param.shape, dtype=v0.dtype, device=v0.device)
                flat = full.view(-1)
                for spec, st in zip(sp.views, piece_states):
                    spec.of(flat).copy_(st[k])
                outer[k] = full
            else:
                outer[k] = v0
        self.opt.state[sp.param] = outer
        sp.bound = sp.states = None

    def _undo(self) -> None:
        """Undo a pre-hook whose step raised (the post-hook did not run)."""
        if self._pending is None:
            return
        base, stash = self._pending
        del self.opt.param_groups[base:]
        for sp, grad, views in stash:
            for view in views:
                self.opt.state.pop(view, None)
            sp.param.grad = grad
        self._pending = None


# --- mapping inner-optimizer tensors to model parameters --------------------------------------
def _sub_optimizers(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _inner_tensor_map(mopt: Any) -> dict[int, tuple[torch.nn.Parameter, int, int]]:
    """id(inner-optimizer tensor) -> (model param, start, end) in the param's flat index."""
    from megatron.core.optimizer import DistributedOptimizer, Float16OptimizerWithFloat16Params

    out: dict[int, tuple[torch.nn.Parameter, int, int]] = {}
    if isinstance(mopt, DistributedOptimizer):
        pairs = [
            *zip(mopt.model_float16_groups, mopt.shard_fp32_from_float16_groups),
            *zip(mopt.model_fp32_groups, mopt.shard_fp32_groups),
        ]
        for model_group, shard_group in pairs:
            for model_param, shard in zip(model_group, shard_group):
                rng = mopt._get_model_param_range_map(model_param)["param"]
                out[id(shard)] = (model_param, rng.start, rng.end)
    elif isinstance(mopt, Float16OptimizerWithFloat16Params):
        for model_group, main_group in zip(mopt.float16_groups, mopt.fp32_from_float16_groups):
            for model_param, main_param in zip(model_group, main_group):
                out[id(main_param)] = (model_param, 0, model_param.numel())
        for group in mopt.fp32_from_fp32_groups:
            for param in group:
                out[id(param)] = (param, 0, param.numel())
    else:  # FP32Optimizer: the model params themselves
        for group in mopt.optimizer.param_groups:
            for param in group["params"]:
                out[id(param)] = (param, 0, param.numel())
    return out


@dataclasses.dataclass
class _Entry:
    """One inner-optimizer tensor: its group, model param, range and (split) pieces."""

    group: int
    tensor: torch.Tensor
    model_param: torch.nn.Parameter
    info: Any  # classify.ParamInfo
    start: int
    end: int
    pieces: list[tuple[int, int, int]]  # (start, end) relative to `start`, carrier group index


def _layout(mopt: Any, pieces: dict[Any, tuple[Piece, ...]], infos: dict) -> list[_Entry]:
    inner = mopt.optimizer
    index = {}
    for gi, pg in enumerate(inner.param_groups):
        hp = HParams.of_param_group(pg)
        if hp is not None and not pg.get("is_expert_parallel", False):
            index.setdefault(hp, gi)
    tensor_map = _inner_tensor_map(mopt)
    entries = []
    for gi, pg in enumerate(inner.param_groups):
        for tensor in pg["params"]:
            model_param, start, end = tensor_map[id(tensor)]
            local = []
            for piece in pieces[model_param]:
                lo, hi = max(piece.start, start), min(piece.end, end)
                if lo < hi:
                    if piece.hparams not in index:
                        raise RuntimeError(f"no param group carries {piece.hparams}")
                    local.append((lo - start, hi - start, index[piece.hparams]))
            entries.append(_Entry(gi, tensor, model_param, infos[model_param], start, end, local))
    return entries


# --- build -----------------------------------------------------------------------------------
def _check_config(config: Any, model_config: Any) -> None:
    if getattr(model_config, "use_mup", False):
        raise ValueError(
            "TransformerConfig.use_mup=True (megatron-core's own width-only muP) cannot be "
            "combined with cdp-megatron: two parameterisations at once. Set use_mup=False."
        )
    problems = []
    if config.optimizer != "adam":
        problems.append(f"optimizer={config.optimizer!r} (the target gives Adam eps/betas; use 'adam')")
    if config.decoupled_lr is not None or config.decoupled_min_lr is not None:
        problems.append("decoupled_lr/decoupled_min_lr (the target sets every group's lr)")
    if config.use_precision_aware_optimizer:
        problems.append("use_precision_aware_optimizer (main params held by TE FusedAdam: untested)")
    if config.optimizer_cpu_offload:
        problems.append("optimizer_cpu_offload (HybridDeviceOptimizer: untested)")
    if problems:
        raise ValueError("cdp_megatron.build_optimizer does not support: " + "; ".join(problems))


def _target_hparams(target: Any) -> list[HParams]:
    return list(dict.fromkeys(HParams.of(g) for g in target.groups))


def build_optimizer(
    model_chunks: Sequence[Any] | Any,
    target: Any,
    optimizer_config: Any,
    *,
    param_infos: dict | None = None,
    lr_decay_iters: int | None = None,
    lr_warmup_iters: int | None = None,
    scheduler: bool = True,
    **megatron_kwargs: Any,
):
    """Build Megatron's optimizer with the target's per-group hyperparameters.

    model_chunks: the (DDP-wrapped) model chunks, as for ``get_megatron_optimizer``.
    target: a resolved Target (``cdp_megatron.target.resolve``/``load_target``).
    optimizer_config: megatron ``OptimizerConfig`` (adam; fp32, bf16 or fp16; plain or
        distributed). ``lr``/``min_lr`` default to the target's global values; per-group values
        always come from the target.
    param_infos: ``classify_model``'s result (computed when None).
    lr_decay_iters / lr_warmup_iters: default to ``target.train_iters`` / ``target.lr_warmup_iters``.
    scheduler: also build the ``OptimizerParamScheduler`` (returned as None when False).
    megatron_kwargs: passed to ``get_megatron_optimizer`` (e.g. ``use_gloo_process_groups``).

    Returns (optimizer, scheduler). Applies the cdp patches (``cdp_megatron.patches``) when they
    are not applied yet: they are needed to build (carrier groups) and to resume (identity).
    """
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
    from megatron.core.utils import get_model_config

    from cdp_megatron import patches
    from cdp_megatron.patches import carrier_param_groups

    from .classify import classify_model

    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    patches.apply_all()
    glob = getattr(target, "global_hyperparameters", None) or {}
    if optimizer_config.lr is None or optimizer_config.min_lr is None:
        optimizer_config = dataclasses.replace(
            optimizer_config,
            lr=optimizer_config.lr if optimizer_config.lr is not None else glob.get("lr", max(g.lr for g in target.groups)),
            min_lr=optimizer_config.min_lr if optimizer_config.min_lr is not None else glob.get("min_lr", 0.0),
        )
    _check_config(optimizer_config, get_model_config(chunks[0]))

    infos = param_infos if param_infos is not None else classify_model(chunks)
    pieces: dict[Any, tuple[Piece, ...]] = {}
    used_infos: dict[Any, Any] = {}
    members: dict[HParams, list[Any]] = {}
    for chunk in chunks:
        for param in chunk.parameters():
            if not param.requires_grad or param in pieces:
                continue
            info = infos[param] if param in infos else getattr(param, "cdp_info", None)
            if info is None:
                raise ValueError(f"parameter of shape {tuple(param.shape)} is not classified")
            used_infos[param] = info
            pieces[param] = param_pieces(info, target)
            # A fused tensor sits in the group of its first piece; other pieces are stepped
            # with their carrier group's values by _SegmentStep.
            members.setdefault(pieces[param][0].hparams, []).append(param)

    overrides = {}
    for i, (hp, params) in enumerate(members.items()):
        ids = frozenset(id(p) for p in params)
        # ParamPredicates hash by name only: each gets its own.
        predicate = ParamPredicate(name=f"cdp_hparams_{i}", fn=lambda p, ids=ids: id(p) in ids)
        overrides[ParamKey(predicate=predicate)] = hp.override()

    with carrier_param_groups.extra_param_groups([hp.override() for hp in _target_hparams(target)]):
        optimizer = get_megatron_optimizer(
            optimizer_config, chunks, config_overrides=overrides, **megatron_kwargs
        )

    n_split = n_views = 0
    for mopt in _sub_optimizers(optimizer):
        if getattr(mopt, "optimizer", None) is None or getattr(mopt, "is_stub_optimizer", False):
            continue
        layout = _layout(mopt, pieces, used_infos)
        mopt.cdp_layout = layout
        split = [e for e in layout if len(e.pieces) > 1 or (e.pieces and e.pieces[0][2] != e.group)]
        if _GROUPED_STEP and grouped_adam.unsupported_reason(mopt.optimizer) is None:
            # torch's Adam: one multi-tensor step over all groups and segments.
            grouped_adam.GroupedAdamStep(mopt.optimizer, {id(e.tensor): e.pieces for e in split})
        elif split:
            # apex / TE FusedAdam (or a torch Adam with options the grouped step lacks):
            # segments as views in their carrier groups, stepped by the optimizer itself.
            mopt.cdp_segment_step = _SegmentStep(mopt.optimizer, [_Split(e.tensor, _views_for(e.pieces)) for e in split])
        n_split += len(split)
        n_views += sum(len(e.pieces) for e in split)

    n_groups = sum(len(m.optimizer.param_groups) for m in _sub_optimizers(optimizer) if getattr(m, "optimizer", None))
    _log_rank0(
        f"cdp optimizer: {len(_target_hparams(target))} distinct hyperparameter sets, "
        f"{n_groups} param groups, {n_split} fused tensors stepped as {n_views} views"
    )
    sched = (
        build_scheduler(optimizer, target, optimizer_config, lr_decay_iters=lr_decay_iters, lr_warmup_iters=lr_warmup_iters)
        if scheduler else None
    )
    return optimizer, sched


def build_scheduler(
    optimizer: Any,
    target: Any,
    optimizer_config: Any,
    *,
    lr_decay_iters: int | None = None,
    lr_warmup_iters: int | None = None,
):
    """The schedule shared by every group: linear warmup from 0 over ``lr_warmup_iters``
    (default ``target.lr_warmup_iters``), then ``target.lr_decay_style`` (cosine) from each
    group's max_lr to its min_lr at ``lr_decay_iters`` (default ``target.train_iters``);
    weight decay constant (each group's start_wd = end_wd). Step it once per iteration."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay = int(lr_decay_iters if lr_decay_iters is not None else target.train_iters)
    warmup = int(lr_warmup_iters if lr_warmup_iters is not None else target.lr_warmup_iters)
    if not 0 <= warmup < decay:  # Megatron's scheduler asserts it; say which numbers, and do not change them
        raise ValueError(f"lr warmup of {warmup} iterations must be shorter than the decay ({decay} iterations)")
    lr = float(optimizer_config.lr)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=lr,
        min_lr=min(float(optimizer_config.min_lr or 0.0), lr),
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        lr_decay_style=target.lr_decay_style,
        start_wd=float(optimizer_config.weight_decay),
        end_wd=float(optimizer_config.weight_decay),
        wd_incr_steps=decay,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=False,
    )


def _log_rank0(message: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        logger.info(message)


# --- report ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Assignment:
    """The optimizer group of one segment of one parameter (elements [start, end) of the
    flattened local tensor) on this rank, with that group's hyperparameters."""

    name: str
    type: str
    layer: int | None
    param: str
    start: int
    end: int
    group: int  # index into the (sub-)optimizer's param_groups
    optimizer_index: int  # index of the sub-optimizer of a ChainedOptimizer
    lr: float  # max_lr (peak)
    min_lr: float
    weight_decay: float  # the group's current weight_decay (as set by the scheduler)
    eps: float
    beta1: float
    beta2: float
    current_lr: float


def optimizer_hyperparameters(optimizer: Any) -> list[Assignment]:
    """For every parameter (every segment of a fused one) this rank's optimizer steps, the
    hyperparameters of the group that steps it. With the distributed optimizer only this DP
    rank's shard ranges are listed. Requires an optimizer from ``build_optimizer``."""
    out: list[Assignment] = []
    for oi, mopt in enumerate(_sub_optimizers(optimizer)):
        layout = getattr(mopt, "cdp_layout", None)
        if layout is None:
            if getattr(mopt, "optimizer", None) is None or getattr(mopt, "is_stub_optimizer", False):
                continue
            raise ValueError("optimizer_hyperparameters needs an optimizer built by build_optimizer")
        groups = mopt.optimizer.param_groups
        for entry in layout:
            info = entry.info
            for lo, hi, gi in entry.pieces:
                a, b = entry.start + lo, entry.start + hi
                pg = groups[gi]
                for seg in info.segments:
                    s, e = max(seg.start, a), min(seg.end, b)
                    if s < e:
                        out.append(Assignment(
                            info.name, seg.type, info.layer, info.param, s, e, gi, oi,
                            pg["max_lr"], pg["min_lr"], pg["weight_decay"], pg["eps"],
                            pg["betas"][0], pg["betas"][1], pg["lr"],
                        ))
    return out
