"""GroupedAdamStep: one multi-tensor pass over all groups and segments equals torch's own
Adam/AdamW run on each group (each segment) separately, bit for bit on CPU (and on CUDA where
one exists); state, hooks and remove() behave as torch's."""

from __future__ import annotations

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


def _grouped(cls, device: str, steps: int, with_lr_change: bool) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    params = [torch.nn.Parameter(t.clone()) for t in _init(device)]
    groups = [dict(g, params=[]) for g in GROUPS]
    for p, (_, gi, _) in zip(params, TENSORS):
        groups[gi]["params"].append(p)
    opt = cls(groups)
    pieces = {id(p): pc for p, (_, _, pc) in zip(params, TENSORS) if pc}
    GroupedAdamStep(opt, pieces)
    for step, grads in enumerate(_grads(steps, device)):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if with_lr_change and step == 2:
            for g in opt.param_groups:
                g["lr"] *= 0.5
        opt.step()
    return [p.detach() for p in params], opt


def _reference(cls, device: str, steps: int, with_lr_change: bool, foreach: bool, pieces: bool = True) -> list[torch.Tensor]:
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
            leaf.grad = grads[ti].reshape(-1)[lo:hi].clone()
        if with_lr_change and step == 2:
            for o in opts:
                o.param_groups[0]["lr"] *= 0.5
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
@pytest.mark.parametrize("one_buffer", [False, True], ids=["per-tensor-sqrt", "one-buffer-sqrt"])
@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam], ids=["adamw", "adam-l2"])
def test_grouped_step_is_bit_identical_to_torch_per_group(cls, one_buffer, device, foreach, monkeypatch):
    from cdp_megatron.integration import grouped_adam

    monkeypatch.setattr(grouped_adam, "_one_buffer", lambda rows: one_buffer)
    got, _ = _grouped(cls, device, 6, with_lr_change=True)
    want = _reference(cls, device, 6, with_lr_change=True, foreach=foreach)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"tensor {i}: max diff {(a - b).abs().max().item()}"
    # the segments' own hyperparameters matter: stepped whole, the fused tensors end elsewhere
    whole = _reference(cls, device, 6, with_lr_change=True, foreach=foreach, pieces=False)
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
