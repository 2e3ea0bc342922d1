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

Each op sees the rows in its own runs: adjacent segments of one param whose scalar for that
op is the same number are one view (q, k, v and gate, up that differ only in lr get one
tensor per param in the moment updates and the denominator, which is cut into views where
the lr-dependent update needs a tensor per segment; with the one sqrt buffer, the sqrt, and
the bias correction and eps where they are global, run on the bucket's whole buffer). Elementwise
ops give each element the same result however the elements are split into tensors, so this
cuts the tensors (host time, launches) and not a bit of the result.

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
    """The tensors of one (device, dtype) bucket, one flat (1-D) row per tensor or segment,
    and the whole flat tensors of the params the rows belong to (``flats``), from which an op
    whose scalar is the same for adjacent rows steps them as one view (``_Runs``)."""

    __slots__ = ("params", "grads", "exp_avgs", "exp_avg_sqs", "groups", "owners", "used",
                 "one_buffer", "memo", "slot_of", "starts", "ends", "cum", "flats", "numels")

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.exp_avgs: list[torch.Tensor] = []
        self.exp_avg_sqs: list[torch.Tensor] = []
        self.groups: list[int] = []  # param group whose hyperparameters step the row
        self.owners: list[int] = []  # index of the owning param in the step's param list
        self.used: list[int] = []  # the distinct groups of the rows, ascending
        self.one_buffer = False  # sqrt(exp_avg_sq) into one buffer (see _one_buffer)
        self.memo: dict[str, tuple] = {}  # the ops' runs of the last step
        self.slot_of: list[int] = []  # per row: the bucket's index of its param
        self.starts: list[int] = []  # per row: its elements [start, end) of its param's flat tensor
        self.ends: list[int] = []
        self.cum: list[int] = [0]  # cum[i]: elements in rows before row i
        self.flats: dict[str, list[torch.Tensor]] = {k: [] for k in _KINDS}  # per param of the bucket
        self.numels: list[int] = []  # per param of the bucket

    def add(self, slot: "_Slot", grad_flat: torch.Tensor, grads: list[torch.Tensor], owner: int) -> None:
        self.params.extend(slot.params)
        self.grads.extend(grads)
        self.exp_avgs.extend(slot.exp_avgs)
        self.exp_avg_sqs.extend(slot.exp_avg_sqs)
        self.groups.extend(slot.groups)
        self.owners.extend([owner] * len(slot.sizes))
        self.slot_of.extend([len(self.numels)] * len(slot.sizes))
        for lo, hi in slot.ranges:
            self.starts.append(lo)
            self.ends.append(hi)
            self.cum.append(self.cum[-1] + hi - lo)
        for kind, flat in zip(_KINDS, (slot.flats[0], grad_flat, slot.flats[1], slot.flats[2])):
            self.flats[kind].append(flat)
        self.numels.append(slot.flats[0].numel())

    def seal(self) -> None:
        self.used = sorted(set(self.groups))
        self.one_buffer = _one_buffer(self)


_KINDS = ("params", "grads", "exp_avgs", "exp_avg_sqs")


class _Slot:
    """One param's flat views (whole tensor, or one per piece, in order) of param, exp_avg
    and exp_avg_sq, valid while the three tensors keep their storage; and of its grad, kept
    across steps only when the grad is a view into a larger buffer (Megatron's grad buffers),
    so that no freed gradient stays alive."""

    __slots__ = ("key", "group", "ranges", "groups", "sizes", "flats", "params", "exp_avgs", "exp_avg_sqs",
                 "grad_key", "grad_flat", "grads", "bucket")

    def __init__(self, p: torch.Tensor, state: dict, group: int, pieces: list[tuple[int, int, int]]):
        self.key, self.group = _key(p, state), group  # group: the param group p sits in
        pieces = sorted(pieces)
        if pieces[0][0] != 0 or pieces[-1][1] != p.numel() or any(
            a[1] != b[0] for a, b in zip(pieces, pieces[1:])
        ) or any(lo > hi for lo, hi, _ in pieces):
            raise ValueError(f"GroupedAdamStep: pieces {pieces} do not tile a tensor of {p.numel()} elements")
        self.ranges, self.groups = [(lo, hi) for lo, hi, _ in pieces], [g for _, _, g in pieces]
        self.sizes = [hi - lo for lo, hi in self.ranges]
        self.flats = tuple(flat_view(t, what) for t, what in (
            (p, "param"), (state["exp_avg"], "exp_avg"), (state["exp_avg_sq"], "exp_avg_sq")))
        self.params, self.exp_avgs, self.exp_avg_sqs = (_views_of(flat, self.ranges) for flat in self.flats)
        self.bucket = (p.device, p.dtype)
        self.grad_key: tuple | None = None
        self.grad_flat: torch.Tensor | None = None
        self.grads: list[torch.Tensor] = []

    def holds_grad(self, grad: torch.Tensor) -> bool:
        """Whether the kept grad views are views of ``grad``."""
        return self.grad_key == (grad.data_ptr(), grad.dtype, grad.numel())

    def grad_views(self, grad: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the flat grad, its views per piece)."""
        if self.holds_grad(grad):
            return self.grad_flat, self.grads
        flat = flat_view(grad, "grad")
        views = _views_of(flat, self.ranges)
        if grad.untyped_storage().nbytes() > grad.numel() * grad.element_size():
            # a persistent buffer
            self.grad_key, self.grad_flat, self.grads = (grad.data_ptr(), grad.dtype, grad.numel()), flat, views
        return flat, views


def _key(p: torch.Tensor, state: dict) -> tuple:
    return (p.data_ptr(), state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr())


def flat_view(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` as a 1-D view (segments are slices of it); a non-contiguous tensor has none."""
    if not t.is_contiguous():
        raise RuntimeError(f"cdp optimizer: the {what} of a parameter is not contiguous")
    return t.detach().view(-1)


def _views_of(flat: torch.Tensor, ranges: list[tuple[int, int]]) -> list[torch.Tensor]:
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
            slot = self._slots[id(p)] = _Slot(p, state, gi, pieces)
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
            rows.add(slot, *slot.grad_views(grad), owner)
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
    return rows.exp_avg_sqs[0].device.type == "cuda" and _buffer_pays(rows)


def _buffer_pays(rows: _Rows) -> bool:
    """The cost model of ``_one_buffer`` (a CUDA device assumed)."""
    copy_bytes = 2 * rows.cum[-1] * rows.exp_avg_sqs[0].element_size()
    return len(rows.groups) * _ALLOC_S > copy_bytes * _COPY_S_PER_BYTE


class _Runs:
    """The rows of a bucket as one op steps them: adjacent rows of one param whose scalar for
    the op is the same number become one view, and rows the op skips (scalar None) are left
    out. An elementwise op gives every element the same result however the elements are
    split into tensors, so this changes the number of tensors the ``_foreach_*`` op handles,
    not a bit of its output. With q/k/v and gate/up differing only in lr, the moment updates
    then see one tensor per param instead of one per segment."""

    __slots__ = ("rows", "bounds", "rep", "sizes", "views_of", "scalars")

    def __init__(self, rows: _Rows, row_cls: list):
        slot_of, starts, ends = rows.slot_of, rows.starts, rows.ends
        bounds: list[list[int]] = []  # [first row, end row) per run
        prev = None
        for i, c in enumerate(row_cls):
            if c is None:  # skipped by the op
                prev = None
                continue
            if prev is not None and c == prev and slot_of[i] == slot_of[i - 1] and starts[i] == ends[i - 1]:
                bounds[-1][1] = i + 1
            else:
                bounds.append([i, i + 1])
            prev = c
        self.rows, self.bounds = rows, bounds
        self.rep = [first for first, _ in bounds]  # a row of each run (its scalar is the run's)
        self.sizes = [rows.cum[b] - rows.cum[a] for a, b in bounds]
        self.views_of: dict[str, list[torch.Tensor]] = {}
        self.scalars: dict[str, tuple] = {}

    def views(self, kind: str) -> list[torch.Tensor]:
        """The runs as views of the bucket's params, grads, exp_avgs or exp_avg_sqs."""
        out = self.views_of.get(kind)
        if out is None:
            rows = self.rows
            fine, flats = getattr(rows, kind), rows.flats[kind]
            out = [fine[a] if b - a == 1 else flats[rows.slot_of[a]][rows.starts[a]:rows.ends[b - 1]] for a, b in self.bounds]
            self.views_of[kind] = out
        return out

    def scalar(self, values: list, keys: list[int], name: str) -> float | list[float]:
        """The op's scalar per run (``values[keys[row]]``), one scalar when all are the same;
        the list of the last step is reused while ``values`` are (betas, eps)."""
        last = self.scalars.get(name)
        if last is not None and last[0] == values:
            return last[1]
        out = [values[keys[i]] for i in self.rep]
        first = out[0]
        out = first if all(v == first for v in out) else out
        self.scalars[name] = (values, out)
        return out


def _classes(values: list) -> list:
    """A class per value (a number, or a tuple of numbers), equal for equal numbers (zeros of
    each sign apart); None stays None."""
    ids: dict = {}
    out = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        if isinstance(v, tuple):
            key = v if all(v) else tuple(x if x else str(x) for x in v)
        else:
            key = v if v else str(v)
        out.append(ids.setdefault(key, len(ids)))
    return out


def _runs(rows: _Rows, name: str, values: list, keys: list[int]) -> _Runs:
    """The op ``name``'s runs for per-key scalars ``values`` (row i's is ``values[keys[i]]``),
    kept in the bucket's memo while the keys and the pattern of equal values stay (the
    schedule moves lr every step, not which groups share it)."""
    last = rows.memo.get(name)
    if last is not None and last[0] is keys and last[1] == values:
        return last[3]
    cls = _classes(values)
    if last is not None and last[0] is keys and last[2] == cls:
        runs = last[3]
    else:
        runs = _Runs(rows, [cls[k] for k in keys])
    rows.memo[name] = (keys, values, cls, runs)
    return runs


def _each_row(rows: _Rows) -> _Runs:
    """One run per row (ops on the new per-row grads of Adam's L2 weight decay)."""
    last = rows.memo.get("each row")
    if last is None:
        last = rows.memo["each row"] = _Runs(rows, list(range(len(rows.groups))))
    return last


def _update_bucket(rows: _Rows, table: list[tuple], keys: list[int], used: list[int], decoupled: bool) -> None:
    """One Adam step of a bucket. ``table[k]`` = (lr, weight_decay, eps, beta1, beta2, step) of
    the rows whose key is k (``keys``: one per row; ``used``: the distinct keys, ascending).
    Every scalar is torch's own expression (``_multi_tensor_adam``) evaluated per key; each op
    steps the rows in its own runs (``_Runs``)."""
    lr, wd, eps, beta1, beta2, step = (list(col) for col in zip(*table))

    grads_l2 = None  # Adam's L2 weight decay: new grads, one per row
    if any(wd[k] != 0 for k in used):
        if decoupled:
            decay = [1 - lr_k * wd_k for lr_k, wd_k in zip(lr, wd)]
            runs = _runs(rows, "decay", [d if wd_k != 0 else None for d, wd_k in zip(decay, wd)], keys)
            torch._foreach_mul_(runs.views("params"), runs.scalar(decay, keys, "decay"))
        else:  # L2: g = g + wd * p, one call per distinct wd (alpha is a single scalar)
            grads_l2 = list(rows.grads)
            for w in dict.fromkeys(wd[k] for k in used if wd[k] != 0):
                idx_w = [i for i, k in enumerate(keys) if wd[k] == w]
                new = torch._foreach_add([grads_l2[i] for i in idx_w], [rows.params[i] for i in idx_w], alpha=w)
                for i, g in zip(idx_w, new):
                    grads_l2[i] = g

    one_minus_beta1 = [1 - b for b in beta1]
    one_minus_beta2 = [1 - b for b in beta2]
    # the ops that read the grads step one tensor per row where L2 made new ones
    runs = _runs(rows, "beta1", one_minus_beta1, keys) if grads_l2 is None else _each_row(rows)
    grads = runs.views("grads") if grads_l2 is None else grads_l2
    torch._foreach_lerp_(runs.views("exp_avgs"), grads, runs.scalar(one_minus_beta1, keys, "1-beta1"))
    runs = _runs(rows, "beta2", beta2, keys)
    torch._foreach_mul_(runs.views("exp_avg_sqs"), runs.scalar(beta2, keys, "beta2"))
    if grads_l2 is None:
        grads = runs.views("grads")
    else:
        runs = _each_row(rows)
    torch._foreach_addcmul_(runs.views("exp_avg_sqs"), grads, grads, runs.scalar(one_minus_beta2, keys, "1-beta2"))
    del grads, grads_l2

    step_size = [(lr_k / (1 - b1 ** s)) * -1 for lr_k, b1, s in zip(lr, beta1, step)]
    bias_correction2_sqrt = [(1 - b2 ** s) ** 0.5 for b2, s in zip(beta2, step)]
    # d = sqrt(v) / bias correction + eps on runs of (bias correction, eps); then
    # p += step size * m / d on runs of (bias correction, eps, step size), which split those
    # (d's tensors cut into views where the step size differs: lr moves, betas and eps don't)
    runs = _runs(rows, "bc2 eps", list(zip(bias_correction2_sqrt, eps)), keys)
    fine = _runs(rows, "denominator", list(zip(bias_correction2_sqrt, eps, step_size)), keys)
    bc2 = runs.scalar(bias_correction2_sqrt, keys, "bc2")
    eps_ = runs.scalar(eps, keys, "eps")
    if rows.one_buffer:
        # into one buffer for the bucket (copied a param at a time): its sqrt is one tensor,
        # and so are the bias correction and eps where every row has the same
        t = rows.exp_avg_sqs[0]
        buffer = torch.empty(rows.cum[-1], dtype=t.dtype, device=t.device)
        torch._foreach_copy_(list(buffer.split(rows.numels)), rows.flats["exp_avg_sqs"])
        torch._foreach_sqrt_([buffer])
        denom = list(buffer.split(fine.sizes))
        coarse = [buffer]  # the runs of (bias correction, eps), for whichever is not global
        if isinstance(bc2, list) or isinstance(eps_, list):
            coarse = denom if len(runs.bounds) == len(fine.bounds) else list(buffer.split(runs.sizes))
        torch._foreach_div_(coarse if isinstance(bc2, list) else [buffer], bc2)
        torch._foreach_add_(coarse if isinstance(eps_, list) else [buffer], eps_)
    else:
        denom = torch._foreach_sqrt(runs.views("exp_avg_sqs"))
        torch._foreach_div_(denom, bc2)
        torch._foreach_add_(denom, eps_)
        if len(runs.bounds) != len(fine.bounds):
            denom = _cut(denom, _nested_sizes(rows, runs, fine))
    torch._foreach_addcdiv_(fine.views("params"), fine.views("exp_avgs"), denom, fine.scalar(step_size, keys, "step"))


def _nested_sizes(rows: _Rows, coarse: _Runs, fine: _Runs) -> list[list[int]]:
    """Per run of ``coarse``, the sizes of the runs of ``fine`` it holds (``fine``'s classes
    refine ``coarse``'s, so each fine run lies in one coarse run); kept while both are."""
    last = rows.memo.get("nested sizes")
    if last is not None and last[0] is coarse and last[1] is fine:
        return last[2]
    out: list[list[int]] = [[] for _ in coarse.bounds]
    c = 0
    for (a, b), size in zip(fine.bounds, fine.sizes):
        while not coarse.bounds[c][0] <= a < coarse.bounds[c][1]:
            c += 1
        assert b <= coarse.bounds[c][1], "fine runs must nest in coarse runs"
        out[c].append(size)
    rows.memo["nested sizes"] = (coarse, fine, out)
    return out


def _cut(tensors: list[torch.Tensor], sizes: list[list[int]]) -> list[torch.Tensor]:
    """Each tensor split into views of the given sizes, in order."""
    out: list[torch.Tensor] = []
    for t, parts in zip(tensors, sizes):
        if len(parts) == 1:
            out.append(t)
        else:
            out.extend(t.split(parts))
    return out


@torch.no_grad()
def _grouped_step(opt: torch.optim.Optimizer, closure: Callable[[], Any] | None = None) -> Any:
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    opt.cdp_grouped_step.update()
    return loss
