"""The loss (cross-entropy plus z-loss on vocabulary-parallel logits), checked against torch's
own cross-entropy and logsumexp in float64, with autograd's gradient (``fused=False``) and with
the fused function's own backward (``fused=True``, ``--cross-entropy-loss-fusion``), on one
process and on TP 2 (each rank holds half the vocabulary)."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402

from ._dist import run_distributed  # noqa: E402

pytestmark = pytest.mark.megatron

VOCAB, Z = 64, 1e-2


def _case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(3, 7, VOCAB, generator=gen)
    labels = torch.randint(0, VOCAB, (3, 7), generator=gen)
    labels[0, :3] = torch.tensor([0, VOCAB // 2 - 1, VOCAB - 1])  # the first and last id of each TP shard
    mask = (torch.rand(3, 7, generator=gen) > 0.2).float()
    return logits, labels, mask


def _reference(logits, labels, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, [CE sum, z * Z sum, tokens], d loss / d logits) in float64."""
    full = logits.double().requires_grad_()
    ce = torch.nn.functional.cross_entropy(full.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    lse = torch.logsumexp(full, dim=-1)
    ce_sum, z_sum = (ce * mask).sum(), (lse.square() * mask).sum()
    loss = ce_sum + Z * z_sum
    loss.backward()
    return loss.detach(), torch.stack([ce_sum.detach(), Z * z_sum.detach(), mask.sum().double()]), full.grad


def _ours(logits, labels, mask, fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from cdp_megatron.integration.training import LOSS_REPORT_KEY, cross_entropy_with_z_loss

    leaf = logits.detach().clone().requires_grad_()
    loss, tokens, report = cross_entropy_with_z_loss(labels, mask, Z, leaf, fused=fused)
    loss.backward()
    assert int(tokens) == int(mask.sum())
    return loss.detach(), report[LOSS_REPORT_KEY], leaf.grad


def _check(ours, reference, dtype: torch.dtype, shard: slice = slice(None)) -> None:
    loss, report, grad = ours
    ref_loss, ref_report, ref_grad = reference
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)  # bf16 logits are exact in fp32
    torch.testing.assert_close(report.double(), ref_report, rtol=1e-5, atol=0)
    assert grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(grad.double(), ref_grad[..., shard], rtol=0, atol=1e-6)
    else:  # the bf16 gradient's own rounding: 8 significant bits
        torch.testing.assert_close(grad.double(), ref_grad[..., shard], rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fused", [False, True], ids=["autograd", "fused"])
def test_loss_and_gradient_are_torch_cross_entropy_plus_z_loss(megatron_1proc, fused, dtype):
    logits, labels, mask = _case()
    logits = logits.to(dtype)
    before = logits.clone()
    _check(_ours(logits, labels, mask, fused), _reference(logits, labels, mask), dtype)
    assert torch.equal(logits, before)  # the input is not written


def _tp2_worker(fused: bool, dtype: torch.dtype) -> None:
    from megatron.core import parallel_state

    from cdp_megatron.integration import initialize_model_parallel

    initialize_model_parallel(2, 1)
    logits, labels, mask = _case(seed=1)
    logits = logits.to(dtype)
    half = VOCAB // 2
    shard = slice(parallel_state.get_tensor_model_parallel_rank() * half, (parallel_state.get_tensor_model_parallel_rank() + 1) * half)
    _check(_ours(logits[..., shard].contiguous(), labels, mask, fused), _reference(logits, labels, mask), dtype, shard)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fused", [False, True], ids=["autograd", "fused"])
def test_loss_and_gradient_on_tp2(fused, dtype):
    run_distributed(_tp2_worker, 2, fused, dtype)


def test_fused_and_autograd_agree_within_rounding(megatron_1proc):
    logits, labels, mask = _case(seed=2)
    a, b = _ours(logits, labels, mask, False), _ours(logits, labels, mask, True)
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(a[2], b[2], rtol=0, atol=2.5e-7)  # two float32 ulps of 1


def test_loss_benchmark_prints_its_ratios():
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "benchmarks/loss_memory.py", "--batch", "2", "--seq", "16", "--vocab",
                           "4096", "--rounds", "2", "--bf16"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = dict(re.findall(r"^  (\w+) *: peak \+(\d+) MiB over the logits", proc.stdout, re.M))
    assert set(peaks) == {"autograd", "fused"}, proc.stdout
    for what in ("peak memory", "time"):
        m = re.search(rf"^{what} ratio \(fused / autograd\): (\d+\.\d+)", proc.stdout, re.M)
        assert m and float(m.group(1)) > 0, proc.stdout
