"""One multi-tensor Adam(W) step over every param group and every fused-tensor segment.

torch's Adam steps param groups one after the other: with Complete(d)P's ~100 distinct
groups (and q/k/v, gate/up segments stepped in their carrier groups) that is ~100 rounds of
``_foreach_*`` kernel launches and Python bookkeeping per step, where the global
hyperparameters need two (measured on an H100: 2.35x the optimizer step, 1.12-1.14x the train
step). ``GroupedAdamStep`` replaces the ``step`` of one ``torch.optim.Adam``/``AdamW`` instance
by a single pass: the tensors of all groups (segments as contiguous views of the fused param,
its grad and its exp_avg / exp_avg_sq) go into one list per (device, dtype), and every
hyperparameter becomes a per-tensor scalar list of the same ``torch._foreach_*`` ops
torch's own multi-tensor Adam runs (``torch/optim/adam.py: _multi_tensor_adam``, non-capturable
branch), in the same order:

    step += 1
    p *= 1 - lr * wd                       (AdamW; Adam: g = g + wd * p)
    m.lerp_(g, 1 - beta1);  v *= beta2;  v += (1 - beta2) * g * g
    d = sqrt(v) / sqrt(1 - beta2^step) + eps
    p += -(lr / (1 - beta1^step)) * m / d

Each scalar is computed by the same Python expression as in torch, per tensor from its
group, so the update of every element equals torch's Adam run on that group alone: on CPU
bit for bit (tests/integration/test_grouped_adam.py compares with per-group torch optimizers,
and tests/integration/test_optimizer.py with plain Megatron-Core), on CUDA the scalar-list
kernels compute the same formulas as the scalar ones (checked on an H100, README "Overheads").

The optimizer's state stays torch's (``step``, ``exp_avg``, ``exp_avg_sq`` per param, full
tensors for fused params), so ``state_dict``/checkpoints are unchanged. Hooks registered on the
optimizer still run (the step is wrapped by torch's ``Optimizer.profile_hook_step``).
``remove()`` restores the class's own step.

Supported: torch Adam/AdamW with amsgrad, maximize, capturable, differentiable and fused all
off, float lr/betas, dense real grads (``unsupported_reason`` says why not otherwise; the
caller then keeps torch's step).
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch
from torch.optim.optimizer import _get_scalar_dtype

__all__ = ["GroupedAdamStep", "flat_view", "unsupported_reason"]

_OFF_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable", "fused")


def unsupported_reason(opt: torch.optim.Optimizer) -> str | None:
    """None when ``GroupedAdamStep`` can step ``opt`` exactly, else why not."""
    if type(opt) not in (torch.optim.Adam, torch.optim.AdamW):
        return f"{type(opt).__name__} is not torch.optim.Adam/AdamW"
    for group in opt.param_groups:
        on = [flag for flag in _OFF_FLAGS if group.get(flag)]
        if on:
            return f"param group with {', '.join(on)}=True"
        if any(isinstance(v, torch.Tensor) for v in (group["lr"], *group["betas"])):
            return "tensor-valued lr or betas"
        if any(torch.is_complex(p) for p in group["params"]):
            return "complex parameters"
    return None


def _decoupled(opt: torch.optim.Optimizer) -> bool:
    # torch >= 2.6: AdamW is Adam with decoupled_weight_decay=True (a group default).
    if type(opt) is torch.optim.AdamW:
        return True
    return bool(opt.defaults.get("decoupled_weight_decay", False))


class _Rows:
    """The tensors of one (device, dtype) bucket, one flat (1-D) row per tensor or segment."""

    __slots__ = ("params", "grads", "exp_avgs", "exp_avg_sqs", "groups", "owners", "sizes", "used", "one_buffer", "memo")

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.exp_avgs: list[torch.Tensor] = []
        self.exp_avg_sqs: list[torch.Tensor] = []
        self.groups: list[int] = []  # param group whose hyperparameters step the row
        self.owners: list[int] = []  # index of the owning param in the step's param list
        self.sizes: list[int] = []  # elements per row
        self.used: list[int] = []  # the distinct groups of the rows, ascending
        self.one_buffer = False  # sqrt(exp_avg_sq) into one buffer (see _one_buffer)
        self.memo: dict[str, tuple] = {}  # _per_row's lists of the last step

    def add(self, slot: "_Slot", grads: list[torch.Tensor], owner: int) -> None:
        self.params.extend(slot.params)
        self.grads.extend(grads)
        self.exp_avgs.extend(slot.exp_avgs)
        self.exp_avg_sqs.extend(slot.exp_avg_sqs)
        self.groups.extend(slot.groups)
        self.owners.extend([owner] * len(slot.sizes))
        self.sizes.extend(slot.sizes)

    def seal(self) -> None:
        self.used = sorted(set(self.groups))
        self.one_buffer = _one_buffer(self)


class _Slot:
    """One param's flat views (whole tensor, or one per piece) of param, exp_avg and
    exp_avg_sq, valid while the three tensors keep their storage; and of its grad, kept across
    steps only when the grad is a view into a larger buffer (Megatron's grad buffers), so that
    no freed gradient stays alive."""

    __slots__ = ("key", "group", "ranges", "groups", "sizes", "params", "exp_avgs", "exp_avg_sqs", "grad_key", "grads", "bucket")

    def __init__(self, p: torch.Tensor, state: dict, group: int, ranges: list[tuple[int, int]], groups: list[int]):
        self.key, self.group = _key(p, state), group  # group: the param group p sits in
        self.ranges, self.groups = ranges, groups
        self.sizes = [hi - lo for lo, hi in ranges]
        self.params = _flat_views(p, ranges, "param")
        self.exp_avgs = _flat_views(state["exp_avg"], ranges, "exp_avg")
        self.exp_avg_sqs = _flat_views(state["exp_avg_sq"], ranges, "exp_avg_sq")
        self.bucket = (p.device, p.dtype)
        self.grad_key: tuple | None = None
        self.grads: list[torch.Tensor] = []

    def holds_grad(self, grad: torch.Tensor) -> bool:
        """Whether the kept grad views are views of ``grad``."""
        return self.grad_key == (grad.data_ptr(), grad.dtype, grad.numel())

    def grad_views(self, grad: torch.Tensor) -> list[torch.Tensor]:
        if self.holds_grad(grad):
            return self.grads
        views = _flat_views(grad, self.ranges, "grad")
        if grad.untyped_storage().nbytes() > grad.numel() * grad.element_size():
            self.grad_key, self.grads = (grad.data_ptr(), grad.dtype, grad.numel()), views  # a persistent buffer
        return views


def _key(p: torch.Tensor, state: dict) -> tuple:
    return (p.data_ptr(), state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr())


def flat_view(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` as a 1-D view (segments are slices of it); a non-contiguous tensor has none."""
    if not t.is_contiguous():
        raise RuntimeError(f"cdp optimizer: the {what} of a parameter is not contiguous")
    return t.detach().view(-1)


def _flat_views(t: torch.Tensor, ranges: list[tuple[int, int]], what: str) -> list[torch.Tensor]:
    flat = flat_view(t, what)
    if len(ranges) == 1 and ranges[0] == (0, flat.numel()):
        return [flat]
    return [flat[lo:hi] for lo, hi in ranges]


class GroupedAdamStep:
    """Installs a grouped step on ``opt`` (``opt.step`` becomes it until ``remove()``).

    pieces: ``id(tensor) -> [(start, end, group_index), ...]`` for the tensors stepped as
        segments (elements [start, end) of the flattened tensor, with the hyperparameters of
        ``opt.param_groups[group_index]``; the pieces cover the tensor). Any other tensor is
        stepped whole with its own group's values.

    The rows (the per-bucket tensor lists handed to the ``_foreach_*`` ops) are built once and
    kept while every stepped param, its state and its grad keep their storage, as they do
    under Megatron (grads are views into the DDP grad buffers): a step then costs the host one
    check per param and the per-group scalars, not a rebuild of ~1000-row lists.
    """

    def __init__(self, opt: torch.optim.Optimizer, pieces: dict[int, list[tuple[int, int, int]]]):
        reason = unsupported_reason(opt)
        if reason is not None:
            raise ValueError(f"GroupedAdamStep: {reason}")
        self.opt = opt
        self.pieces = {k: list(v) for k, v in pieces.items()}
        self.n_views = sum(len(v) for v in self.pieces.values())
        self._decoupled = _decoupled(opt)
        self._slots: dict[int, _Slot] = {}
        self._kept: tuple[list[_Slot], dict[tuple, _Rows]] | None = None  # rows of the last step
        opt.step = types.MethodType(torch.optim.Optimizer.profile_hook_step(_grouped_step), opt)
        opt.cdp_grouped_step = self

    def remove(self) -> None:
        """Give ``opt`` back its class's step."""
        if getattr(self.opt, "cdp_grouped_step", None) is self:
            del self.opt.step
            del self.opt.cdp_grouped_step

    def _slot(self, p: torch.Tensor, state: dict, gi: int) -> _Slot:
        slot = self._slots.get(id(p))
        if slot is None or slot.key != _key(p, state) or slot.group != gi:
            pieces = self.pieces.get(id(p)) or [(0, p.numel(), gi)]
            slot = self._slots[id(p)] = _Slot(p, state, gi, [(lo, hi) for lo, hi, _ in pieces], [g for _, _, g in pieces])
        return slot

    def rows(self) -> tuple[dict[tuple, _Rows], list[torch.Tensor]]:
        """The step's rows per (device, dtype), and the step tensor of each stepped param;
        initialises missing state as torch's Adam does."""
        opt = self.opt
        slots: list[_Slot] = []
        grads: list[torch.Tensor] = []
        steps: list[torch.Tensor] = []
        kept_grads = True
        for gi, group in enumerate(opt.param_groups):
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("Adam does not support sparse gradients")
                state = opt.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                slot = self._slot(p, state, gi)
                kept_grads = kept_grads and slot.holds_grad(grad)
                slots.append(slot)
                grads.append(grad)
                steps.append(state["step"])
        if kept_grads and self._kept is not None and self._kept[0] == slots:
            return self._kept[1], steps
        buckets: dict[tuple, _Rows] = {}
        kept = True
        for owner, (slot, grad) in enumerate(zip(slots, grads)):
            rows = buckets.get(slot.bucket)
            if rows is None:
                rows = buckets[slot.bucket] = _Rows()
            rows.add(slot, slot.grad_views(grad), owner)
            kept = kept and slot.holds_grad(grad)  # grad_views keeps views of persistent grads only
        for rows in buckets.values():
            rows.seal()
        self._kept = (slots, buckets) if kept else None
        return buckets, steps

    # --- the update -----------------------------------------------------------------------------
    def update(self) -> None:
        buckets, steps = self.rows()
        if not steps:
            return
        if steps[0].is_cpu:
            torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(steps, 1)
        step_values = [s.item() for s in steps]
        hp = [
            (g["lr"], g["weight_decay"], g["eps"], g["betas"][0], g["betas"][1])
            for g in self.opt.param_groups
        ]
        first = step_values[0]
        if all(s == first for s in step_values):
            # The usual case: one step count, so the scalars are per group.
            table = [(*h, first) for h in hp]
            for rows in buckets.values():
                _update_bucket(rows, table, rows.groups, rows.used, self._decoupled)
            return
        for rows in buckets.values():  # params at different step counts: scalars per (group, step)
            index: dict[tuple[int, float], int] = {}
            keys = [index.setdefault((g, step_values[o]), len(index)) for g, o in zip(rows.groups, rows.owners)]
            table = [(*hp[g], s) for g, s in index]
            _update_bucket(rows, table, keys, list(range(len(table))), self._decoupled)


# Host seconds per allocation vs device seconds per byte copied (H100: ~2 us, ~2 TB/s).
_ALLOC_S, _COPY_S_PER_BYTE = 2e-6, 1 / 2e12


def _one_buffer(rows: _Rows) -> bool:
    """torch computes sqrt(exp_avg_sq) out of place, one allocation per tensor. With many
    rows (fused tensors split into ~1000 segments) those allocations cost more host time than
    one buffer for the bucket plus a copy pass costs the device; same values either way."""
    t = rows.exp_avg_sqs[0]
    if t.device.type != "cuda":
        return False
    copy_bytes = 2 * sum(rows.sizes) * t.element_size()
    return len(rows.sizes) * _ALLOC_S > copy_bytes * _COPY_S_PER_BYTE


def _per_row(values: list[float], keys: list[int], used: list[int], memo: dict | None = None, name: str = "") -> float | list[float]:
    """Row i's scalar is ``values[keys[i]]``; ``used`` lists the distinct keys. One scalar
    when every row has the same value (the scalar kernels fit more tensors per launch), else
    the per-row list; the same numbers either way. With ``memo`` (the bucket's), the list
    made for ``name`` last time is reused when ``keys`` and ``values`` are unchanged (betas
    and eps do not move between steps)."""
    if memo is not None:
        last = memo.get(name)
        if last is not None and last[0] is keys and last[1] == values:
            return last[2]
    first = values[used[0]]
    out = first if all(values[k] == first for k in used) else [values[k] for k in keys]
    if memo is not None:
        memo[name] = (keys, values, out)
    return out


def _update_bucket(rows: _Rows, table: list[tuple], keys: list[int], used: list[int], decoupled: bool) -> None:
    """One Adam step of a bucket. ``table[k]`` = (lr, weight_decay, eps, beta1, beta2, step) of
    the rows whose key is k (``keys``: one per row; ``used``: the distinct keys, ascending).
    Every scalar is torch's own expression (``_multi_tensor_adam``) evaluated per key."""
    params, grads, exp_avgs, exp_avg_sqs = rows.params, rows.grads, rows.exp_avgs, rows.exp_avg_sqs
    lr, wd, eps, beta1, beta2, step = (list(col) for col in zip(*table))

    decaying = [k for k in used if wd[k] != 0]
    if decaying:
        if len(decaying) == len(used):
            idx, sub_keys, sub_params = range(len(keys)), keys, params
        else:
            idx = [i for i, k in enumerate(keys) if wd[k] != 0]
            sub_keys, sub_params = [keys[i] for i in idx], [params[i] for i in idx]
        if decoupled:
            torch._foreach_mul_(sub_params, _per_row([1 - lr_k * wd_k for lr_k, wd_k in zip(lr, wd)], sub_keys, decaying))
        else:  # L2: g = g + wd * p, one call per distinct wd (alpha is a single scalar)
            grads = list(grads)
            for w in dict.fromkeys(wd[k] for k in decaying):
                idx_w = [i for i, k in zip(idx, sub_keys) if wd[k] == w]
                new = torch._foreach_add([grads[i] for i in idx_w], [params[i] for i in idx_w], alpha=w)
                for i, g in zip(idx_w, new):
                    grads[i] = g

    memo = rows.memo
    torch._foreach_lerp_(exp_avgs, grads, _per_row([1 - b for b in beta1], keys, used, memo, "1-beta1"))
    torch._foreach_mul_(exp_avg_sqs, _per_row(beta2, keys, used, memo, "beta2"))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, _per_row([1 - b for b in beta2], keys, used, memo, "1-beta2"))
    del grads

    step_size = [(lr_k / (1 - b1 ** s)) * -1 for lr_k, b1, s in zip(lr, beta1, step)]
    bias_correction2_sqrt = [(1 - b2 ** s) ** 0.5 for b2, s in zip(beta2, step)]
    if rows.one_buffer:
        denom = torch.empty(sum(rows.sizes), dtype=exp_avg_sqs[0].dtype, device=exp_avg_sqs[0].device).split(rows.sizes)
        torch._foreach_copy_(denom, exp_avg_sqs)
        torch._foreach_sqrt_(denom)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, _per_row(bias_correction2_sqrt, keys, used))
    torch._foreach_add_(denom, _per_row(eps, keys, used, memo, "eps"))
    torch._foreach_addcdiv_(params, exp_avgs, denom, _per_row(step_size, keys, used))


@torch.no_grad()
def _grouped_step(opt: torch.optim.Optimizer, closure: Callable[[], Any] | None = None) -> Any:
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    opt.cdp_grouped_step.update()
    return loss
