"""GroupedAdamStep: one multi-tensor pass over all groups and segments equals torch's own
Adam/AdamW run on each group (each segment) separately, bit for bit on CPU (and on CUDA where
one exists); state, hooks and remove() behave as torch's."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from cdp_megatron.integration.grouped_adam import GroupedAdamStep, unsupported_reason

GROUPS = [  # lr, weight_decay, eps, betas
    dict(lr=1e-2, weight_decay=0.1, eps=1e-8, betas=(0.9, 0.95)),
    dict(lr=3e-3, weight_decay=0.0, eps=1e-6, betas=(0.8, 0.99)),
    dict(lr=2e-2, weight_decay=0.05, eps=1e-10, betas=(0.9, 0.999)),
    dict(lr=5e-3, weight_decay=0.1, eps=1e-8, betas=(0.95, 0.9)),  # carrier only: no whole tensor
]
# (shape, group, pieces as (start, end, group) or None for a whole tensor)
TENSORS = [
    ((6, 4), 0, None),
    ((4,), 1, None),
    ((9, 4), 0, [(0, 8, 0), (8, 20, 3), (20, 24, 1), (24, 36, 2)]),  # a fused qkv-like tensor
    ((5,), 2, None),
    ((8, 3), 1, [(0, 12, 1), (12, 24, 3)]),  # gate / up
]


def _grads(steps: int, device: str) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [[torch.randn(shape, generator=gen).to(device) for shape, _, _ in TENSORS] for _ in range(steps)]


def _init(device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=gen).to(device) for shape, _, _ in TENSORS]


def _change_hparams(group: dict) -> None:
    """A schedule moves lr; a user (or a loaded checkpoint) may move betas and eps too."""
    group["lr"] *= 0.5
    group["betas"] = (group["betas"][0] * 0.99, 1 - (1 - group["betas"][1]) * 2)
    group["eps"] *= 4


def _grouped_optimizer(cls, device: str) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """TENSORS as params in GROUPS, stepped by a GroupedAdamStep with their pieces."""
    params = [torch.nn.Parameter(t.clone()) for t in _init(device)]
    groups = [dict(g, params=[]) for g in GROUPS]
    for p, (_, gi, _) in zip(params, TENSORS):
        groups[gi]["params"].append(p)
    opt = cls(groups)
    GroupedAdamStep(opt, {id(p): pc for p, (_, _, pc) in zip(params, TENSORS) if pc})
    return params, opt


def _buffer_views(params: list[torch.Tensor], device: str = "cpu") -> list[torch.Tensor]:
    """One view per param, shaped like it, into one persistent grad buffer (Megatron's DDP)."""
    grad_buffer = torch.zeros(sum(p.numel() for p in params), device=device)
    return [v.view_as(p) for v, p in zip(grad_buffer.split([p.numel() for p in params]), params)]


def _grouped(cls, device: str, steps: int, with_hp_change: bool, buffer: bool = False,
             skip: tuple[int, int] | None = None) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """buffer: every grad a view into one persistent buffer, as under Megatron's DDP (the
    grouped step then keeps its rows across steps); skip: (step, tensor) without a grad."""
    params, opt = _grouped_optimizer(cls, device)
    views = _buffer_views(params, device)
    for step, grads in enumerate(_grads(steps, device)):
        for ti, (p, g, view) in enumerate(zip(params, grads, views)):
            p.grad = view.copy_(g) if buffer else g.clone()
            if skip == (step, ti):
                p.grad = None
        if with_hp_change and step == 2:
            for g in opt.param_groups:
                _change_hparams(g)
        opt.step()
    return [p.detach() for p in params], opt


def _reference(cls, device: str, steps: int, with_hp_change: bool, foreach: bool, pieces: bool = True,
               skip: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """torch's optimizer, one instance per group, segments as separate leaf tensors (with
    ``pieces=False``: fused tensors stepped whole in their own group)."""
    leaves = []  # (tensor index, start, end, param)
    per_group: list[list[torch.nn.Parameter]] = [[] for _ in GROUPS]
    for ti, (t, (_, gi, pc)) in enumerate(zip(_init(device), TENSORS)):
        for lo, hi, pgi in (pc if pc and pieces else [(0, t.numel(), gi)]):
            leaf = torch.nn.Parameter(t.reshape(-1)[lo:hi].clone())
            leaves.append((ti, lo, hi, leaf))
            per_group[pgi].append(leaf)
    opts = [cls(leaf_list, foreach=foreach, **GROUPS[gi]) for gi, leaf_list in enumerate(per_group) if leaf_list]
    for step, grads in enumerate(_grads(steps, device)):
        for ti, lo, hi, leaf in leaves:
            leaf.grad = None if skip == (step, ti) else grads[ti].reshape(-1)[lo:hi].clone()
        if with_hp_change and step == 2:
            for o in opts:
                _change_hparams(o.param_groups[0])
        for o in opts:
            o.step()
    out = [t.clone() for t in _init(device)]
    for ti, lo, hi, leaf in leaves:
        out[ti].view(-1)[lo:hi] = leaf.detach()
    return out


# torch's Adam default on each device: the single-tensor loop on CPU, foreach on CUDA.
DEVICES = [
    pytest.param("cpu", False, id="cpu"),
    pytest.param("cuda", True, id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


@pytest.mark.parametrize("device,foreach", DEVICES)
@pytest.mark.parametrize("buffer", [False, True], ids=["fresh-grads", "grad-buffer"])
@pytest.mark.parametrize("one_buffer", [False, True], ids=["per-tensor-sqrt", "one-buffer-sqrt"])
@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam], ids=["adamw", "adam-l2"])
def test_grouped_step_is_bit_identical_to_torch_per_group(cls, one_buffer, buffer, device, foreach, monkeypatch):
    from cdp_megatron.integration import grouped_adam

    monkeypatch.setattr(grouped_adam, "_one_buffer", lambda rows: one_buffer)
    got, opt = _grouped(cls, device, 6, with_hp_change=True, buffer=buffer)
    assert (opt.cdp_grouped_step._kept is not None) == buffer  # rows kept across steps only then
    want = _reference(cls, device, 6, with_hp_change=True, foreach=foreach)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"tensor {i}: max diff {(a - b).abs().max().item()}"
    # the segments' own hyperparameters matter: stepped whole, the fused tensors end elsewhere
    whole = _reference(cls, device, 6, with_hp_change=True, foreach=foreach, pieces=False)
    assert not torch.equal(whole[2], want[2]) and not torch.equal(whole[4], want[4])
    assert torch.equal(whole[0], want[0])


def test_state_is_torchs_full_tensor_state_and_hooks_run():
    calls = []
    _, opt = _grouped(torch.optim.AdamW, "cpu", 0, False)
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    opt.step()
    assert calls == ["pre", "post"]
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
            assert state["exp_avg"].shape == p.shape and state["step"].item() == 1.0
    sd = opt.state_dict()
    assert len(sd["state"]) == len(TENSORS) and len(sd["param_groups"]) == len(GROUPS)


def test_remove_restores_torchs_step_and_params_without_grad_are_skipped():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p, q], lr=0.1)
    stepper = GroupedAdamStep(opt, {})
    p.grad = torch.ones(3)
    opt.step()
    assert q not in opt.state and opt.state[p]["step"].item() == 1.0
    assert "step" in vars(opt)
    stepper.remove()
    assert "step" not in vars(opt) and not hasattr(opt, "cdp_grouped_step")
    opt.step()  # torch's own step continues from the same state
    assert opt.state[p]["step"].item() == 2.0


def test_unsupported_options_are_named():
    p = torch.nn.Parameter(torch.ones(2))
    assert unsupported_reason(torch.optim.AdamW([p])) is None
    assert "amsgrad" in unsupported_reason(torch.optim.AdamW([p], amsgrad=True))
    assert "maximize" in unsupported_reason(torch.optim.Adam([p], maximize=True))
    assert "SGD" in unsupported_reason(torch.optim.SGD([p], lr=0.1))
    with pytest.raises(ValueError, match="amsgrad"):
        GroupedAdamStep(torch.optim.AdamW([p], amsgrad=True), {})


@pytest.mark.parametrize("buffer", [False, True], ids=["fresh-grads", "grad-buffer"])
@pytest.mark.parametrize("skipped", [0, 2, 4], ids=["whole", "qkv-like", "gate-up"])
def test_a_param_without_grad_for_a_step_lags_one_step_as_in_torch(skipped, buffer):
    """A param skipped once is one Adam step behind the others (its own bias corrections),
    exactly as torch's per-param step counts have it; the kept rows are rebuilt around it."""
    got, opt = _grouped(torch.optim.AdamW, "cpu", 6, with_hp_change=True, buffer=buffer, skip=(3, skipped))
    want = _reference(torch.optim.AdamW, "cpu", 6, with_hp_change=True, foreach=False, skip=(3, skipped))
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"tensor {i}: max diff {(a - b).abs().max().item()}"
    steps = [opt.state[p]["step"].item() for g in opt.param_groups for p in g["params"]]
    assert sorted(steps) == [5.0] + [6.0] * (len(TENSORS) - 1)


def test_kept_rows_follow_state_loaded_from_a_checkpoint():
    """load_state_dict gives the params new state tensors: the kept rows must step those, not
    the old ones (the continued run equals one that never stopped)."""
    want, _ = _grouped(torch.optim.AdamW, "cpu", 6, with_hp_change=False, buffer=True)
    params, opt = _grouped_optimizer(torch.optim.AdamW, "cpu")
    stepper = opt.cdp_grouped_step
    views = _buffer_views(params)
    grads = _grads(6, "cpu")

    def step(k):
        for p, g, view in zip(params, grads[k], views):
            p.grad = view.copy_(g)
        opt.step()

    step(0), step(1)
    saved = ([p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()))
    step(2), step(3)  # rolled back below
    kept = stepper._kept
    assert kept is not None
    opt.load_state_dict(saved[1])
    for p, value in zip(params, saved[0]):
        p.data.copy_(value)
    for k in range(2, 6):
        step(k)
    assert stepper._kept is not None and stepper._kept is not kept  # rebuilt on the new state
    assert all(opt.state[p]["step"].item() == 6.0 for p in params)
    for i, (a, b) in enumerate(zip([p.detach() for p in params], want)):
        assert torch.equal(a, b), f"tensor {i}: max diff {(a - b).abs().max().item()}"


# The usual target: segments differ in lr and weight decay, share betas and eps.
SHARED = [dict(g, eps=1e-8, betas=(0.9, 0.95)) for g in GROUPS]


class _ForeachSpy:
    """Records (op, number of tensors in its first list) for every torch._foreach_* call."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, int]] = []
        for name in [n for n in dir(torch) if n.startswith("_foreach_")]:
            monkeypatch.setattr(torch, name, self._wrap(name, getattr(torch, name)))

    def _wrap(self, name, fn):
        def op(*args, **kwargs):
            self.calls.append((name, len(args[0])))
            return fn(*args, **kwargs)
        return op


def _spied_run(monkeypatch) -> _ForeachSpy:
    """Six AdamW steps of the grouped step (grads in a buffer, rows kept), checked bit-identical
    to torch's per group; the spy holds the foreach calls of the grouped run."""
    want = _reference(torch.optim.AdamW, "cpu", 6, with_hp_change=True, foreach=False)
    spy = _ForeachSpy(monkeypatch)
    got, _ = _grouped(torch.optim.AdamW, "cpu", 6, with_hp_change=True, buffer=True)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"tensor {i}: max diff {(a - b).abs().max().item()}"
    return spy


@pytest.mark.parametrize("one_buffer", [False, True], ids=["per-tensor-sqrt", "one-buffer-sqrt"])
def test_an_op_steps_adjacent_segments_with_its_same_scalar_as_one_tensor(one_buffer, monkeypatch):
    """With shared betas and eps, the moment updates get one tensor per param, not one per
    segment (and with the one sqrt buffer, the sqrt, bias correction and eps one tensor for
    the bucket); the lr-dependent ops keep a tensor per segment; the result is bit-identical
    to torch's."""
    from cdp_megatron.integration import grouped_adam

    this = sys.modules[__name__]
    monkeypatch.setattr(this, "GROUPS", SHARED)
    monkeypatch.setattr(grouped_adam, "_one_buffer", lambda rows: one_buffer)
    spy = _spied_run(monkeypatch)
    # 5 params in 9 rows; group 1 (weight decay 0) is skipped by the decay, which leaves 6
    # (tensor 2's first two segments have different lr * wd).
    moments = [("_foreach_lerp_", 5), ("_foreach_mul_", 5), ("_foreach_addcmul_", 5)]
    if one_buffer:
        # copied a param at a time; sqrt, bias correction and eps (the same for all rows) on
        # the whole buffer
        denominator = [("_foreach_copy_", 5), ("_foreach_sqrt_", 1), ("_foreach_div_", 1), ("_foreach_add_", 1)]
    else:
        # sqrt, bias correction and eps (the same for all rows) a param at a time, cut into
        # the segments' views for the lr-dependent update
        denominator = [("_foreach_sqrt", 5), ("_foreach_div_", 5), ("_foreach_add_", 5)]
    last_step = spy.calls[-len(moments) - len(denominator) - 3:]
    assert last_step == [("_foreach_add_", 5), ("_foreach_mul_", 6), *moments, *denominator, ("_foreach_addcdiv_", 9)]


def test_a_group_whose_betas_part_from_its_neighbours_splits_the_runs(monkeypatch):
    """Runs are kept across steps while the pattern of equal scalars stays; when one group's
    beta1 changes mid-run, its segments must be stepped apart from their neighbours again."""
    this = sys.modules[__name__]

    def change_group_1(group):
        if group["lr"] == SHARED[1]["lr"]:
            group["betas"] = (0.85, group["betas"][1])

    monkeypatch.setattr(this, "GROUPS", SHARED)
    monkeypatch.setattr(this, "_change_hparams", change_group_1)
    spy = _spied_run(monkeypatch)
    lerps = [n for op, n in spy.calls if op == "_foreach_lerp_"]
    assert lerps == [5, 5, 8, 8, 8, 8]  # tensor 2: [g0 g3] g1 g2; tensor 4: g1 g3


@pytest.mark.parametrize("one_buffer", [False, True], ids=["per-tensor-sqrt", "one-buffer-sqrt"])
def test_the_denominator_is_built_on_runs_of_eps_and_cut_where_the_step_size_differs(one_buffer, monkeypatch):
    """Groups 0 and 3 share eps and betas and differ in lr: tensor 2's first two segments
    (g0, g3) get one denominator tensor, cut in two for the update; the other segments and
    tensors have their own eps. Bit-identical to torch's."""
    from cdp_megatron.integration import grouped_adam

    this = sys.modules[__name__]
    groups = [dict(g, betas=(0.9, 0.95)) for g in GROUPS]
    groups[3]["eps"] = groups[0]["eps"]
    monkeypatch.setattr(this, "GROUPS", groups)
    monkeypatch.setattr(this, "_change_hparams", lambda group: group.update(lr=group["lr"] * 0.5))
    monkeypatch.setattr(grouped_adam, "_one_buffer", lambda rows: one_buffer)
    spy = _spied_run(monkeypatch)
    # rows: t0 | t1 | t2: g0 g3 g1 g2 | t3 | t4: g1 g3 -> runs of eps: 1, 1, 3, 1, 2 = 8
    ops = [op for op, _ in spy.calls]
    last = spy.calls[len(ops) - 1 - ops[::-1].index("_foreach_lerp_"):]
    if one_buffer:
        assert last[4:] == [("_foreach_sqrt_", 1), ("_foreach_div_", 1), ("_foreach_add_", 8), ("_foreach_addcdiv_", 9)]
    else:
        assert last[3:] == [("_foreach_sqrt", 8), ("_foreach_div_", 8), ("_foreach_add_", 8), ("_foreach_addcdiv_", 9)]


def test_scalar_classes_keep_zeros_of_each_sign_apart():
    from cdp_megatron.integration.grouped_adam import _classes

    assert _classes([0.0, -0.0, 1.0, 0.0, None, 1.0]) == [0, 1, 2, 0, None, 2]


def test_pieces_that_do_not_tile_their_tensor_are_refused():
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=0.1)
    GroupedAdamStep(opt, {id(p): [(0, 3, 0)]})
    p.grad = torch.ones(4)
    with pytest.raises(ValueError, match="do not tile a tensor of 4 elements"):
        opt.step()
