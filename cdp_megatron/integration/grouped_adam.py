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

    __slots__ = ("params", "grads", "exp_avgs", "exp_avg_sqs", "groups", "owners", "sizes")

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.exp_avgs: list[torch.Tensor] = []
        self.exp_avg_sqs: list[torch.Tensor] = []
        self.groups: list[int] = []  # param group whose hyperparameters step the row
        self.owners: list[int] = []  # index of the owning param in the step's param list
        self.sizes: list[int] = []  # elements per row


class _Slot:
    """One param's flat views (whole tensor, or one per piece) of param, exp_avg and
    exp_avg_sq, valid while the three tensors keep their storage; and of its grad, kept across
    steps only when the grad is a view into a larger buffer (Megatron's grad buffers), so that
    no freed gradient stays alive."""

    __slots__ = ("key", "ranges", "groups", "sizes", "params", "exp_avgs", "exp_avg_sqs", "grad_key", "grads")

    def __init__(self, p: torch.Tensor, state: dict, ranges: list[tuple[int, int]], groups: list[int]):
        self.key = _key(p, state)
        self.ranges, self.groups = ranges, groups
        self.sizes = [hi - lo for lo, hi in ranges]
        self.params = _flat_views(p, ranges, "param")
        self.exp_avgs = _flat_views(state["exp_avg"], ranges, "exp_avg")
        self.exp_avg_sqs = _flat_views(state["exp_avg_sq"], ranges, "exp_avg_sq")
        self.grad_key: tuple | None = None
        self.grads: list[torch.Tensor] = []

    def grad_views(self, grad: torch.Tensor) -> list[torch.Tensor]:
        key = (grad.data_ptr(), grad.dtype, grad.numel())
        if key == self.grad_key:
            return self.grads
        views = _flat_views(grad, self.ranges, "grad")
        if grad.untyped_storage().nbytes() > grad.numel() * grad.element_size():
            self.grad_key, self.grads = key, views  # a view into a persistent buffer
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
        opt.step = types.MethodType(torch.optim.Optimizer.profile_hook_step(_grouped_step), opt)
        opt.cdp_grouped_step = self

    def remove(self) -> None:
        """Give ``opt`` back its class's step."""
        if getattr(self.opt, "cdp_grouped_step", None) is self:
            del self.opt.step
            del self.opt.cdp_grouped_step

    def _slot(self, p: torch.Tensor, state: dict, gi: int) -> _Slot:
        slot = self._slots.get(id(p))
        if slot is None or slot.key != _key(p, state):
            pieces = self.pieces.get(id(p)) or [(0, p.numel(), gi)]
            slot = self._slots[id(p)] = _Slot(p, state, [(lo, hi) for lo, hi, _ in pieces], [g for _, _, g in pieces])
        return slot

    def rows(self) -> tuple[dict[tuple, _Rows], list[torch.Tensor]]:
        """The step's rows per (device, dtype), and the step tensor of each stepped param;
        initialises missing state as torch's Adam does."""
        opt = self.opt
        buckets: dict[tuple, _Rows] = {}
        steps: list[torch.Tensor] = []
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
                rows = buckets.get((p.device, p.dtype))
                if rows is None:
                    rows = buckets[(p.device, p.dtype)] = _Rows()
                slot = self._slot(p, state, gi)
                rows.params.extend(slot.params)
                rows.grads.extend(slot.grad_views(grad))
                rows.exp_avgs.extend(slot.exp_avgs)
                rows.exp_avg_sqs.extend(slot.exp_avg_sqs)
                rows.groups.extend(slot.groups)
                rows.owners.extend([len(steps)] * len(slot.sizes))
                rows.sizes.extend(slot.sizes)
                steps.append(state["step"])
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
        for rows in buckets.values():
            _update_bucket(rows, hp, step_values, self._decoupled)


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


def _scalars(values: list[float]) -> float | list[float]:
    """One scalar when every row has the same value (the scalar kernels fit more tensors per
    launch), else the per-row list; the same numbers either way."""
    first = values[0]
    return first if all(v == first for v in values) else values


def _update_bucket(rows: _Rows, hp: list[tuple], step_values: list[float], decoupled: bool) -> None:
    params, grads, exp_avgs, exp_avg_sqs = rows.params, rows.grads, rows.exp_avgs, rows.exp_avg_sqs
    lr, wd, eps, beta1, beta2 = (list(col) for col in zip(*(hp[g] for g in rows.groups)))

    decay = [i for i, w in enumerate(wd) if w != 0]
    if decay:
        if decoupled:
            torch._foreach_mul_([params[i] for i in decay], _scalars([1 - lr[i] * wd[i] for i in decay]))
        else:  # L2: g = g + wd * p, one call per distinct wd (alpha is a single scalar)
            grads = list(grads)
            for w in dict.fromkeys(wd[i] for i in decay):
                idx = [i for i in decay if wd[i] == w]
                new = torch._foreach_add([grads[i] for i in idx], [params[i] for i in idx], alpha=w)
                for i, g in zip(idx, new):
                    grads[i] = g

    torch._foreach_lerp_(exp_avgs, grads, _scalars([1 - b for b in beta1]))
    torch._foreach_mul_(exp_avg_sqs, _scalars(beta2))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, _scalars([1 - b for b in beta2]))
    del grads

    steps = [step_values[o] for o in rows.owners]
    step_size = [(lr_i / (1 - b1 ** s)) * -1 for lr_i, b1, s in zip(lr, beta1, steps)]
    bias_correction2_sqrt = [(1 - b2 ** s) ** 0.5 for b2, s in zip(beta2, steps)]
    if _one_buffer(rows):
        denom = torch.empty(sum(rows.sizes), dtype=exp_avg_sqs[0].dtype, device=exp_avg_sqs[0].device).split(rows.sizes)
        torch._foreach_copy_(denom, exp_avg_sqs)
        torch._foreach_sqrt_(denom)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, _scalars(bias_correction2_sqrt))
    torch._foreach_add_(denom, _scalars(eps))
    torch._foreach_addcdiv_(params, exp_avgs, denom, _scalars(step_size))


@torch.no_grad()
def _grouped_step(opt: torch.optim.Optimizer, closure: Callable[[], Any] | None = None) -> Any:
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    opt.cdp_grouped_step.update()
    return loss
